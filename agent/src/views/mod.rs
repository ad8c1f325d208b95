//! What the agent shows about the host, gathered from the configuration and the state
//! directory and rendered for people and programs: the `credentials` view (the CLI command
//! and the endpoint's `/v1/credentials`) and the status view (`pilot-agent status`, the
//! endpoint's `/v1/status` and `/healthz`), and the history view (`pilot-agent status
//! --history`); and the redacted diagnostics archive (`pilot-agent collect-logs`).

pub mod credentials;
pub mod diagnostics;
pub mod history;
pub mod status_report;
