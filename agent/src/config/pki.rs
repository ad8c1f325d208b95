//! `pki:` — lifetimes of the agent's CA and certificates.

use super::schema::{Node, Walker};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiConfig {
    /// Validity of the CA certificate. It is re-made from the same key before it expires, so
    /// certificates already handed out stay valid.
    pub ca_validity_days: u32,
    /// Validity of the server and client certificates.
    pub cert_validity_days: u32,
    /// A certificate (or the CA) is renewed when it expires within this many days.
    pub renew_before_days: u32,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            ca_validity_days: 3650,
            // The CA/Browser Forum's ceiling for public server certificates; the agent renews
            // on its own, so a short life costs nothing.
            cert_validity_days: 397,
            renew_before_days: 30,
        }
    }
}

/// About 100 years; beyond that X.509 dates and operators' patience both run out.
const MAX_DAYS: i64 = 36_500;

pub fn read(w: &mut Walker, node: &Node<'_>) -> PkiConfig {
    let mut c = PkiConfig::default();
    let Some(f) = w.mapping(
        node,
        "pki",
        &[
            "ca_validity_days",
            "cert_validity_days",
            "renew_before_days",
        ],
    ) else {
        return c;
    };
    // The range checks above make these conversions lossless.
    if let Some(d) = f.integer(w, "ca_validity_days", 1, MAX_DAYS) {
        c.ca_validity_days = d as u32;
    }
    if let Some(d) = f.integer(w, "cert_validity_days", 1, MAX_DAYS) {
        c.cert_validity_days = d as u32;
    }
    let renew = f.integer(w, "renew_before_days", 0, MAX_DAYS);
    if let Some(d) = renew {
        c.renew_before_days = d as u32;
    }
    // A threshold at or past the lifetime would renew on every run.
    let shortest = c.cert_validity_days.min(c.ca_validity_days);
    if c.renew_before_days >= shortest {
        let at = f
            .get("renew_before_days")
            .or_else(|| f.get("cert_validity_days"))
            .or_else(|| f.get("ca_validity_days"))
            .unwrap_or(node);
        w.error(
            at,
            format!(
                "pki.renew_before_days ({}) must be less than the shortest validity ({shortest} \
                 days), or certificates would be renewed on every run",
                c.renew_before_days
            ),
        );
    }
    c
}
