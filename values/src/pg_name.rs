//! PostgreSQL role and database names (`database.app_role`, `database.app_database`).

/// Checks a name against `^[a-z_][a-z0-9_]{0,62}$`: lower case so that quoted and unquoted
/// spellings name the same object, and at most 63 bytes (NAMEDATALEN - 1) so PostgreSQL never
/// truncates it into another name.
pub fn pg_identifier(value: &str) -> Result<(), String> {
    let bytes = value.as_bytes();
    let valid = match bytes.split_first() {
        None => false,
        Some((first, rest)) => {
            (first.is_ascii_lowercase() || *first == b'_')
                && rest.len() <= 62
                && rest
                    .iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
        }
    };
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{value:?} is not a valid name: use 1 to 63 characters from a-z, 0-9 and _, \
             not starting with a digit"
        ))
    }
}

/// Checks a role name the agent logs in as (`database.admin_user`): 1 to 63 bytes, so
/// PostgreSQL does not truncate it into another role's name, without control characters.
/// Other spellings (upper case, `-`) are allowed: the admin role is often not the agent's.
pub fn pg_role_name(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 63 || value.chars().any(char::is_control) {
        return Err(format!(
            "expected 1 to 63 bytes without control characters, got {value:?}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["pilot", "_a", "a1_b", &"a".repeat(63)] {
            assert!(pg_identifier(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "Pilot",
            "a-b",
            "a b",
            "a\"b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(pg_identifier(bad).is_err(), "{bad}");
        }
    }
}
