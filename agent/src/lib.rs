//! pilot-agent: converges a Pilot VM to a known state and keeps it there.
//!
//! The binary (`main.rs`) is a thin shell over this library. Where things are:
//!
//! ```text
//! cli.rs              the command line (also the source of --help)
//! commands/           up, firewall, config validate, status, credentials: what main.rs calls
//! config/             /etc/pilot/agent.yaml: schema walker (every error with line:col), sections
//! endpoint/           the HTTPS endpoint of `run`: health, status, credentials, metrics
//! engine.rs           named steps, dependency order, fail-open, status transitions
//! plan.rs             which steps `up` runs and what they share (Ctx, Facts)
//! service/            `run`: the re-converge loop (Docker events, timers, backoff), sd_notify
//! status.rs           STATE_DIR/status.json, the file `pilot-agent status` reads
//! history_file.rs     STATE_DIR/history.jsonl, the newest passes (`status --history`)
//! fsutil.rs           atomic, skip-if-identical file writes; modes; the state lock
//! host.rs             host name and addresses -> the server certificate's SANs
//! identity/           cloud identity (AWS IMDSv2, GCP metadata, host), the clone marker
//! pki.rs              the CA, dockerd's server certificate, runner/operator client certificates
//! firewall/           the agent's own nftables table (ruleset, idempotence check, nft runner)
//! docker/             daemon.json merge, systemd drop-in, restart backend, TLS readiness probe
//! waypoint/           the Waypoint server and runner containers (bollard): images, network,
//!                     bootstrap-once, advertise address, runner tokens, drift by spec hash;
//!                     on a runner-only host the link to the server VM
//! tls.rs              rustls provider and the verifier for uncheckable peer certificates
//! database/           the application role and database on the Pilot PostgreSQL
//! remote/             a runner-only host's client of the server VM's endpoint (CA pinned by
//!                     its SHA-256 fingerprint)
//! ```
//!
//! Errors are typed per module (thiserror); a converge step turns any of them into the one
//! line its status shows ([`engine::StepError`]). `anyhow` appears only in `main.rs`.

pub mod addresses;
pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod converge;
pub mod database;
pub mod docker;
pub mod endpoint;
pub mod engine;
pub mod firewall;
pub mod fsutil;
pub mod history_file;
pub mod identity;
pub mod layout;
pub mod pki;
pub mod plan;
pub mod remote;
pub mod service;
pub mod status_file;
pub mod tls;
pub mod views;
pub mod waypoint;
