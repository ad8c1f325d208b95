//! The grammar of Pilot's configuration values, one definition for every program that reads or
//! writes them.
//!
//! `pilot-agent` reads these values from `/etc/pilot/agent.yaml`; `pilot-image user-data`
//! checks the same values before it writes that file into a VM's user-data. Both call the
//! functions here, so a value the image accepts is one the agent accepts, and the reverse
//! (`image/tests/grammar.rs` runs both binaries over one table to show it).
//!
//! ```text
//! host_port.rs     HOST, HOST:PORT, [IPV6]:PORT; DNS names (RFC 1123)
//! endpoint.rs      the server VM's endpoint address (HOST[:PORT], default port 8443)
//! cidr.rs          networks in CIDR notation, or one address
//! fingerprint.rs   SHA-256 certificate fingerprints (as `openssl x509 -fingerprint -sha256`)
//! pg_name.rs       PostgreSQL role and database names
//! secret.rs        a string that never prints itself (passwords, tokens); secret files
//! choice.rs        the enumerated values: role, database TLS mode; numeric bounds
//! ```
//!
//! Nothing here reads files or talks to anything: every function is pure.

pub mod choice;
pub mod cidr;
pub mod endpoint;
pub mod fingerprint;
pub mod host_port;
pub mod pg_name;
pub mod secret;

pub use choice::{MAX_RUNNERS, Role, TlsMode};
pub use cidr::{CidrError, parse_cidr};
pub use endpoint::{DEFAULT_ENDPOINT_PORT, EndpointParseError, ServerEndpoint};
pub use fingerprint::{Fingerprint, FingerprintError, parse_sha256_hex};
pub use host_port::{check_host, is_dns_name, join_host_port, parse_host_port};
pub use pg_name::{pg_identifier, pg_role_name};
pub use secret::Secret;
