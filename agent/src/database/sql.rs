//! SQL text for the statements that cannot take bind parameters (`CREATE ROLE`, `ALTER ROLE`,
//! `CREATE DATABASE`, `GRANT`): identifier validation and quoting, literal quoting, and the
//! client-side SCRAM-SHA-256 verifier that stands in for the password.

use zeroize::Zeroizing;

use pilot_values::Secret;

/// Quotes an identifier. Names are validated before they get here; quoting anyway keeps the
/// statement correct even for reserved words such as `user`.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal in the escape-string form (`E'…'`), which means the same whatever
/// `standard_conforming_strings` is set to.
pub(crate) fn quote_literal(value: &str) -> String {
    format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The SCRAM-SHA-256 verifier of `password` with a fresh random salt, in the form PostgreSQL
/// stores (`SCRAM-SHA-256$4096:salt$StoredKey:ServerKey`). Sent in place of the password,
/// the server stores it as is, so the plain text never reaches the server: not its logs
/// (`log_statement`, `pg_stat_statements`), not a replica, not an audit trail.
pub(crate) fn scram_verifier(password: &Secret) -> Zeroizing<String> {
    Zeroizing::new(postgres_protocol::password::scram_sha_256(
        password.expose().as_bytes(),
    ))
}

/// `CREATE ROLE` / `ALTER ROLE` with a password given as its verifier.
pub(crate) fn role_statement(verb: &str, role: &str, password: &Secret) -> Zeroizing<String> {
    let verifier = scram_verifier(password);
    Zeroizing::new(format!(
        "{verb} ROLE {} LOGIN PASSWORD {}",
        quote_ident(role),
        quote_literal(&verifier)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("user"), "\"user\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's \\ ok"), "E'it''s \\\\ ok'");
    }

    #[test]
    fn role_statement_carries_a_verifier_not_the_password() {
        let pw = Secret::new("plain-text-password");
        let stmt = role_statement("CREATE", "pilot_app", &pw);
        assert!(!stmt.contains("plain-text-password"));
        assert!(
            stmt.starts_with("CREATE ROLE \"pilot_app\" LOGIN PASSWORD E'SCRAM-SHA-256$4096:"),
            "{}",
            &*stmt
        );
        // A fresh salt every time: two verifiers of one password differ.
        assert_ne!(*scram_verifier(&pw), *scram_verifier(&pw));
    }
}
