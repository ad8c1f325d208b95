//! Build ids on GCP: the value of the `pilot-build-id` label on the image and of the
//! `pilot-build-id` custom metadata on the Cloud Storage object (objects have no labels).

use super::error::{GcpError, Result};
pub use crate::steps::new_build_id;

/// The label (image) and metadata key (object) that marks everything of a publish.
pub const BUILD_ID_LABEL: &str = "pilot-build-id";
/// Longest build id: a label value holds 63 characters.
pub const MAX_BUILD_ID: usize = 63;

/// A build id is a label value and part of the image's name and the object's path: lowercase
/// letters, digits and `-` (GCP label values allow `_` too, image names do not).
pub fn check_build_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_BUILD_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(GcpError::Invalid {
            flag: "--build-id",
            reason: format!(
                "expected 1 to {MAX_BUILD_ID} lowercase letters, digits or '-' (a GCP label \
                 value), got {id:?}"
            ),
        });
    }
    Ok(())
}

/// `[a-z]([-a-z0-9]{0,61}[a-z0-9])?`: image names and families (RFC 1035).
pub fn is_resource_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[b.len() - 1] != b'-'
}

/// GCP label rules (ASCII subset): a key is 1 to 63 of `[a-z0-9_-]` starting with a letter; a
/// value 0 to 63 of `[a-z0-9_-]`.
pub fn check_label(key: &str, value: &str) -> std::result::Result<(), String> {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-';
    if key.is_empty()
        || key.len() > 63
        || !key.as_bytes()[0].is_ascii_lowercase()
        || !key.bytes().all(ok)
    {
        return Err(format!(
            "label key {key:?}: 1 to 63 lowercase letters, digits, '_' or '-', starting with a letter"
        ));
    }
    if value.len() > 63 || !value.bytes().all(ok) {
        return Err(format!(
            "label {key}: value {value:?}: at most 63 lowercase letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_label_values() {
        assert!(check_build_id("pb-1763790000-0a1b2c3d").is_ok());
        assert!(check_build_id(&new_build_id()).is_ok());
        for bad in ["", "A", "a b", "a_b", "x/y", &"a".repeat(64)] {
            assert!(check_build_id(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_follow_rfc1035() {
        for good in ["a", "pilot-pb-1-2", &"a".repeat(63)] {
            assert!(is_resource_name(good), "{good:?}");
        }
        for bad in ["", "1a", "a-", "A", "a_b", &"a".repeat(64)] {
            assert!(!is_resource_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn labels_follow_gcp_rules() {
        assert!(check_label("env", "prod").is_ok());
        assert!(check_label("team_x", "").is_ok());
        assert!(check_label("Env", "x").is_err());
        assert!(check_label("1env", "x").is_err());
        assert!(check_label("env", "Prod").is_err());
        assert!(check_label("env", &"a".repeat(64)).is_err());
    }
}
