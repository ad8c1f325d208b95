//! `pilot-agent config validate FILE`: every problem as `FILE:LINE:COL: message`.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// The report to print and whether the file is valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    pub valid: bool,
    /// One line per problem (`FILE:LINE:COL: message`), or `FILE: ok`.
    pub lines: Vec<String>,
}

/// Checks `path`. Names the file as given, so the lines match what the operator typed.
pub fn validate(path: &Path) -> Validation {
    let shown = path.display();
    match Config::load(path) {
        Ok(_) => Validation {
            valid: true,
            lines: vec![format!("{shown}: ok")],
        },
        Err(ConfigError::Invalid { diagnostics, .. }) => Validation {
            valid: false,
            lines: diagnostics.iter().map(|d| format!("{shown}:{d}")).collect(),
        },
        Err(e @ ConfigError::Read { .. }) => Validation {
            valid: false,
            lines: vec![format!("{shown}: {e}")],
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_ok_or_every_problem() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.yaml");
        std::fs::write(&good, "state_dir: /var/lib/x\n").unwrap();
        let v = validate(&good);
        assert!(v.valid);
        assert_eq!(v.lines, vec![format!("{}: ok", good.display())]);

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "state_dir: x\nnope: 1\n").unwrap();
        let v = validate(&bad);
        assert!(!v.valid);
        assert_eq!(v.lines.len(), 2);
        assert!(
            v.lines[0].starts_with(&format!("{}:1:12: ", bad.display())),
            "{:?}",
            v.lines
        );
        assert!(
            v.lines[1].starts_with(&format!("{}:2:1: ", bad.display())),
            "{:?}",
            v.lines
        );

        let v = validate(&dir.path().join("missing.yaml"));
        assert!(!v.valid);
        assert!(v.lines[0].contains("cannot read"), "{:?}", v.lines);
    }
}
