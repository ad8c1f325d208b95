//! `service:` — how `pilot-agent run` schedules its passes (unused by `up`).

use super::schema::{Node, Walker};

/// The section's settings; every key has a default, so the section itself is optional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// A full converge pass at least this often, whatever else happened. This is also how
    /// often certificate expiry and host address changes are noticed (the pki step checks
    /// both on every pass), hence the upper bound: an hour is far inside
    /// `pki.renew_before_days`, and a new address is picked up within it.
    pub interval_secs: u64,
    /// While a step is degraded (the database unreachable), passes are retried after 5 s,
    /// doubling up to this.
    pub database_retry_max_secs: u64,
}

/// The first retry of a degraded pass; doubled after each degraded pass.
pub const DATABASE_RETRY_MIN_SECS: u64 = 5;
/// Bounds of `interval_secs`: often enough to notice drift Docker events do not report
/// (an address change, a certificate near expiry), rarely enough to cost nothing.
pub const INTERVAL_MIN_SECS: i64 = 10;
pub const INTERVAL_MAX_SECS: i64 = 3600;

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            interval_secs: 300,
            database_retry_max_secs: 300,
        }
    }
}

pub fn read(w: &mut Walker, node: &Node<'_>) -> ServiceSettings {
    let mut c = ServiceSettings::default();
    let Some(f) = w.mapping(
        node,
        "service",
        &["interval_secs", "database_retry_max_secs"],
    ) else {
        return c;
    };
    // The range checks make the conversions lossless.
    if let Some(s) = f.integer(w, "interval_secs", INTERVAL_MIN_SECS, INTERVAL_MAX_SECS) {
        c.interval_secs = s as u64;
    }
    if let Some(s) = f.integer(
        w,
        "database_retry_max_secs",
        DATABASE_RETRY_MIN_SECS as i64,
        INTERVAL_MAX_SECS,
    ) {
        c.database_retry_max_secs = s as u64;
    }
    c
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn defaults_and_values() {
        let c = Config::from_yaml("state_dir: /x\n").unwrap();
        assert_eq!(c.service.interval_secs, 300);
        assert_eq!(c.service.database_retry_max_secs, 300);
        let c = Config::from_yaml("service:\n").unwrap();
        assert_eq!(c.service, super::ServiceSettings::default());
        let c =
            Config::from_yaml("service:\n  interval_secs: 60\n  database_retry_max_secs: 120\n")
                .unwrap();
        assert_eq!(c.service.interval_secs, 60);
        assert_eq!(c.service.database_retry_max_secs, 120);
    }

    #[test]
    fn errors_name_line_and_column() {
        let d = Config::from_yaml(
            "service:\n  interval_secs: 5\n  database_retry_max_secs: x\n  interval_sec: 3\n",
        )
        .unwrap_err();
        assert_eq!(d.len(), 3, "{d:?}");
        assert_eq!((d[0].line, d[0].col), (2, 18), "{d:?}");
        assert!(d[0].message.contains("service.interval_secs"), "{d:?}");
        assert_eq!((d[1].line, d[1].col), (3, 28), "{d:?}");
        assert!(
            d[2].message.contains(
                "unknown key `interval_sec` in `service` (did you mean `interval_secs`?)"
            ),
            "{d:?}"
        );
        let d = Config::from_yaml("service: 3\n").unwrap_err();
        assert!(
            d[0].message.contains("service: expected a mapping"),
            "{d:?}"
        );
    }
}
