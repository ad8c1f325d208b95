//! Build ids: the value of the `pilot:build-id` tag that marks every resource of a build.

use super::error::{AwsError, Result};
pub use crate::steps::new_build_id;

/// The tag that marks every resource of a build.
pub const BUILD_ID_TAG: &str = "pilot:build-id";
/// Longest accepted build id: it becomes part of resource names (AMI names allow 128).
pub const MAX_BUILD_ID: usize = 64;

/// Checks a build id given on the command line: it is embedded in names and tag filters.
pub fn check_build_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > MAX_BUILD_ID
        || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(AwsError::Invalid {
            flag: "--build-id",
            reason: format!("expected 1 to {MAX_BUILD_ID} letters, digits or '-', got {id:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_checked() {
        assert!(check_build_id("pb-1763790000-0a1b2c3d").is_ok());
        assert!(check_build_id(&new_build_id()).is_ok());
        for bad in ["", "a b", "x/y", "tag:*", &"a".repeat(65)] {
            assert!(check_build_id(bad).is_err(), "{bad:?} accepted");
        }
    }
}
