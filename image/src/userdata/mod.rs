//! Cloud-init user-data for a Pilot VM: the `#cloud-config` templates shipped in `cloud-init/`
//! (embedded at compile time), filled from flags and/or a JSON input file, refused above EC2's
//! 16 KiB user-data limit, and written atomically with mode 0600 (they carry secrets).
//!
//! The templates are valid cloud-config themselves, so `cloud-init schema` checks the shipped
//! files as well as every rendering. Two kinds of placeholder keep them valid:
//! - a line whose text is `# @@NAME@@` (a YAML comment) is replaced by a generated block,
//!   indented like that line; an empty block removes the line;
//! - the double-quoted scalar `"@@NAME@@"` is replaced by a double-quoted YAML string.
//!
//! The template is scanned once, line by line, so text that came from the deployment (a
//! password that happens to read `# @@SECRET_FILES@@`) is never taken for a placeholder.
//!
//! The agent's configuration is written to `/etc/pilot/agent.yaml`, and carries no secret and
//! no token hash. The `endpoint:` section (it turns the agent's HTTPS endpoint on) names a
//! 0600 file per token hash: `/etc/pilot/endpoint-token.sha256` for the single-token form
//! (`--endpoint-token-sha256`, an `admin` token named `default`, `endpoint.token_sha256_file`),
//! `/etc/pilot/endpoint-token-NAME.sha256` for each scoped token of `endpoint.tokens`, given by
//! its hash (`--endpoint-token NAME:SCOPE:SHA256`) or generated (`--generate-endpoint-token
//! NAME:SCOPE`, [`token`]: the command prints the token once, the VM gets only its SHA-256);
//! `endpoint.sources` when given. The database admin password goes to
//! `/etc/pilot/db-admin-password`, which `database.admin_password_file` names.
//!
//! A runner-only host (`--role runner`) gets `role: runner` and a `server:` section instead of
//! `database:`: the server VM's endpoint, the SHA-256 pin of its CA, and the path of that
//! host's copy of a `runner`-scope endpoint token of the server VM (`/etc/pilot/server-token`,
//! 0600, `server.token_file`).
//!
//! The parts, lowest first: [`error`]; [`input`], what is given (the flags and the `--from`
//! file); [`validate`], the pure checks on single values (host names, `HOST[:PORT]`,
//! fingerprints, networks, roles, runner counts, one-line secret files); [`token`], endpoint
//! token names, scopes and generation; [`spec`], the checked input, made from the input with
//! those checks; [`render`], the cloud-config text from a spec.

pub mod error;
pub mod input;
pub mod render;
pub mod spec;
pub mod token;
pub mod validate;

pub use error::UserDataError;
pub use input::{DbTls, Flavour, Role, UserDataInput};
pub use render::{
    AGENT_CONFIG_PATH, DB_ADMIN_PASSWORD_PATH, ENDPOINT_TOKEN_SHA256_PATH, SERVER_TOKEN_PATH,
    USER_DATA_LIMIT, agent_config, render, write_atomic, yaml_quote,
};
pub use spec::{DatabaseSpec, ServerLinkSpec, UserDataSpec};
pub use token::{EndpointTokenSpec, Scope, TokenHashInput, token_lines};
pub use validate::MAX_RUNNERS;
