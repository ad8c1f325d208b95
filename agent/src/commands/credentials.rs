//! `pilot-agent credentials [--json]`: prints the credentials view
//! ([`crate::views::credentials`]) for the Pilot CLI: JSON for machines, `key: value` lines
//! for people. For root only: the token and password files are 0600.

use std::path::Path;

pub use crate::views::credentials::CredentialsError;
use crate::views::credentials::credentials;

/// What the command prints on stdout. The secrets are exposed here and only here.
pub fn render(config_path: &Path, json: bool) -> Result<String, CredentialsError> {
    let c = credentials(config_path)?;
    Ok(if json {
        // Serializing a Value cannot fail.
        let mut s = serde_json::to_string_pretty(&c.to_json()).unwrap_or_default();
        s.push('\n');
        s
    } else {
        c.to_text()
    })
}
