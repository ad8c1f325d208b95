//! The host's own identity, off-cloud or when the metadata service gave none: the host name
//! (configured, or the kernel's) and the machine id as instance id.
//!
//! systemd makes `/etc/machine-id` at first boot when an image ships it empty (as images
//! should), so a VM cloned from a local image gets its own id, like a cloud instance.

use std::path::Path;

use super::{Identity, Provider};
use crate::addresses::kernel_hostname;

/// Where the machine id is looked for, in order (the D-Bus copy on hosts without systemd).
pub const MACHINE_ID_PATHS: &[&str] = &["/etc/machine-id", "/var/lib/dbus/machine-id"];

pub fn identity(hostname_override: Option<&str>) -> Identity {
    let hostname = match hostname_override {
        Some(h) => Some(h.to_string()),
        None => kernel_hostname().ok().filter(|h| !h.is_empty()),
    };
    Identity {
        provider: Provider::Host,
        instance_id: machine_id(MACHINE_ID_PATHS.iter().map(Path::new)),
        region: None,
        zone: None,
        private_ipv4: None,
        public_ipv4: None,
        hostname,
        public_hostname: None,
    }
}

/// The first machine id that is 32 hex digits (an empty or `uninitialized` file is none).
pub fn machine_id<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Option<String> {
    paths.into_iter().find_map(|p| {
        let id = std::fs::read_to_string(p).ok()?;
        let id = id.trim();
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_ascii_lowercase())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_id_skips_empty_and_uninitialized_files() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        let uninit = dir.path().join("uninit");
        let good = dir.path().join("good");
        std::fs::write(&empty, "").unwrap();
        std::fs::write(&uninit, "uninitialized\n").unwrap();
        std::fs::write(&good, "0123456789ABCDEF0123456789abcdef\n").unwrap();
        let missing = dir.path().join("missing");
        assert_eq!(
            machine_id([missing.as_path(), &empty, &uninit, &good]),
            Some("0123456789abcdef0123456789abcdef".into())
        );
        assert_eq!(machine_id([empty.as_path()]), None);
    }

    #[test]
    fn override_names_the_host() {
        let i = identity(Some("pilot-vm"));
        assert_eq!(i.provider, Provider::Host);
        assert_eq!(i.hostname.as_deref(), Some("pilot-vm"));
    }
}
