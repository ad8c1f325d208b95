//! `backup:` — scheduled backups of the Waypoint server by `pilot-agent run` (the key's presence
//! turns them on; `pilot-agent backup` works without it, into the default directory).

use std::path::{Path, PathBuf};

use saphyr::{Scalar, YamlData};

use super::schema::{Node, Walker, describe};

/// The directory under the state directory that holds backups when `dir` is not given.
pub const DEFAULT_DIR_NAME: &str = "backups";

#[derive(Debug, Clone, PartialEq)]
pub struct BackupConfig {
    /// A backup is due this long after the last successful one. Hours, as a number: `0.5` is
    /// every 30 minutes. Passes run at least every `service.interval_secs`, so a backup is
    /// taken within that of its due time.
    pub interval_hours: f64,
    /// How many backups the directory keeps (the newest; older ones are removed after a
    /// successful backup, never after a failed one).
    pub keep: u32,
    /// Where backups are written (0700); `None`: `STATE_DIR/backups`.
    pub dir: Option<PathBuf>,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            interval_hours: 24.0,
            keep: 7,
            dir: None,
        }
    }
}

impl BackupConfig {
    /// The backup directory for state directory `state_dir`.
    pub fn dir_under(&self, state_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| state_dir.join(DEFAULT_DIR_NAME))
    }

    pub fn interval(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.interval_hours * 3600.0)
    }
}

/// A backup at most every 3.6 seconds (the tests use short intervals), at least once a year.
const MIN_HOURS: f64 = 0.001;
const MAX_HOURS: f64 = 8760.0;
const MAX_KEEP: i64 = 1000;

pub fn read(w: &mut Walker, node: &Node<'_>) -> BackupConfig {
    let mut c = BackupConfig::default();
    // `backup:` with no value: every default.
    if matches!(node.data, YamlData::Value(Scalar::Null)) {
        return c;
    }
    let Some(f) = w.mapping(node, "backup", &["interval_hours", "keep", "dir"]) else {
        return c;
    };
    if let Some(n) = f.get("interval_hours") {
        let value = match &n.data {
            YamlData::Value(Scalar::Integer(i)) => Some(*i as f64),
            YamlData::Value(Scalar::FloatingPoint(v)) => Some(v.into_inner()),
            _ => None,
        };
        match value {
            Some(h) if (MIN_HOURS..=MAX_HOURS).contains(&h) => c.interval_hours = h,
            Some(h) => w.error(
                n,
                format!(
                    "backup.interval_hours: must be between {MIN_HOURS} and {MAX_HOURS}, got {h}"
                ),
            ),
            None => w.error(
                n,
                format!(
                    "backup.interval_hours: expected a number of hours, got {}",
                    describe(n)
                ),
            ),
        }
    }
    // The range check makes the conversion lossless.
    if let Some(k) = f.integer(w, "keep", 1, MAX_KEEP) {
        c.keep = k as u32;
    }
    if let Some(d) = f.path(w, "dir") {
        c.dir = Some(d);
    }
    c
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn absent_empty_and_set() {
        let c = Config::from_yaml("waypoint:\n").unwrap();
        assert_eq!(c.backup, None);
        let c = Config::from_yaml("waypoint:\nbackup:\n").unwrap();
        let b = c.backup.unwrap();
        assert_eq!((b.interval_hours, b.keep, b.dir.clone()), (24.0, 7, None));
        assert_eq!(b.interval().as_secs(), 86_400);
        let c = Config::from_yaml(
            "waypoint:\nbackup:\n  interval_hours: 0.5\n  keep: 3\n  dir: /srv/backups\n",
        )
        .unwrap();
        let b = c.backup.unwrap();
        assert_eq!(b.interval().as_secs(), 1800);
        assert_eq!(b.keep, 3);
        assert_eq!(
            b.dir_under("/x".as_ref()),
            std::path::PathBuf::from("/srv/backups")
        );
        let c =
            Config::from_yaml("state_dir: /s\nwaypoint:\nbackup:\n  interval_hours: 6\n").unwrap();
        assert_eq!(
            c.backup.unwrap().dir_under(&c.state_dir),
            std::path::PathBuf::from("/s/backups")
        );
    }

    #[test]
    fn errors_name_line_and_column() {
        let d = Config::from_yaml(
            "waypoint:\nbackup:\n  interval_hours: 0\n  keep: 0\n  dir: rel\n  every: 1\n",
        )
        .unwrap_err();
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(
            d[0].message
                .contains("backup.interval_hours: must be between"),
            "{d:?}"
        );
        assert_eq!((d[0].line, d[0].col), (3, 19), "{d:?}");
        assert!(d[1].message.contains("backup.keep"), "{d:?}");
        assert!(d[2].message.contains("absolute path"), "{d:?}");
        assert!(d[3].message.contains("unknown key `every`"), "{d:?}");
        let d = Config::from_yaml("waypoint:\nbackup:\n  interval_hours: soon\n").unwrap_err();
        assert!(d[0].message.contains("expected a number of hours"), "{d:?}");
        let d = Config::from_yaml("backup:\n").unwrap_err();
        assert!(d[0].message.contains("backup"), "{d:?}");
    }
}
