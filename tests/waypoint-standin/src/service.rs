//! Waypoint's server-side rules, shared by the stand-in server and the CLI's in-memory local
//! server: who a token is ([`authenticate`], after Waypoint's `Authenticate`, `authRunner`
//! and `authLogin`) and what each call then allows. Errors carry a gRPC code and Waypoint's
//! message; the HTTP layer maps the code to a status, the CLI prints the message.
//!
//! Waypoint 0.11 has no RBAC: a login token may do everything; a runner token passes
//! authentication for any endpoint (an id-bound one only while its runner is registered and
//! adopted), and only the calls themselves refuse it where Waypoint's do (`no user found from
//! current context` when minting a login token, a different runner id when minting a runner
//! token). `server config-set` with an adopted runner's token therefore succeeds, as on
//! Waypoint, and so does `project apply`: `UpsertProject`, `GetProject` and `ListProjects` look
//! at no user (`pkg/server/singleprocess/service_project.go`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::project::{self, Project};
use crate::state::{Adoption, Advertise, StateStore, TokenKind};
use crate::token::{self, Body, Kind as TokenBodyKind};

/// How long Waypoint holds a call from a runner that is not adopted before refusing it.
pub const TARPIT: Duration = Duration::from_secs(5);

/// gRPC status codes used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Code {
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    FailedPrecondition,
    PermissionDenied,
    Unauthenticated,
    Internal,
    Unavailable,
}

impl Code {
    pub fn name(self) -> &'static str {
        match self {
            Code::Unknown => "Unknown",
            Code::InvalidArgument => "InvalidArgument",
            Code::DeadlineExceeded => "DeadlineExceeded",
            Code::NotFound => "NotFound",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::PermissionDenied => "PermissionDenied",
            Code::Unauthenticated => "Unauthenticated",
            Code::Internal => "Internal",
            Code::Unavailable => "Unavailable",
        }
    }

    /// The HTTP status of the stand-in's API for this code (token decoding errors, which
    /// Waypoint returns as `Unknown`, are 401 there).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Unknown | Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::InvalidArgument | Code::FailedPrecondition => 400,
            Code::NotFound => 404,
            Code::DeadlineExceeded => 504,
            Code::Unavailable => 503,
            Code::Internal => 500,
        }
    }
}

/// A refused call: code and message, as a gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
    /// Waypoint's `ErrorDetail` key/value pairs, which `hcerr.Externalize` attaches (the
    /// arguments after its message) and the CLI's `clierrors.Humanize` prints, one
    /// `"KEY": "VALUE"` line each after the message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<(String, String)>,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            details: Vec::new(),
        }
    }

    /// Waypoint's `hcerr.Externalize(log, err, msg, key, value)`: the code of `code`, the
    /// message replaced by `message`, one detail.
    pub fn externalized(code: Code, message: &str, key: &str, value: &str) -> RpcError {
        RpcError {
            code,
            message: message.to_string(),
            details: vec![(key.to_string(), value.to_string())],
        }
    }

    /// What `clierrors.Humanize` shows before wrapping: the message, then each detail as
    /// `"KEY": "VALUE"` (Go's `%q`) on its own line.
    pub fn human_text(&self) -> String {
        let mut text = self.message.clone();
        for (k, v) in &self.details {
            text.push_str(&format!(
                "\n{}: {}",
                crate::flags::go_quote(k),
                crate::flags::go_quote(v)
            ));
        }
        text
    }

    /// Go's `status.Error(...).Error()`: `rpc error: code = CODE desc = MESSAGE`.
    pub fn go_text(&self) -> String {
        format!(
            "rpc error: code = {} desc = {}",
            self.code.name(),
            self.message
        )
    }

    pub fn to_json(&self) -> Value {
        if self.details.is_empty() {
            json!({ "code": self.code, "message": self.message })
        } else {
            json!({ "code": self.code, "message": self.message, "details": self.details })
        }
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The CLI's in-memory local server: no auth at all.
    Superuser,
    /// A login token of this user id.
    User(String),
    /// A runner token, bound to a runner id (empty: any runner) and label hash (0: any).
    Runner { id: String, label_hash: u64 },
}

/// The calls of the stand-in's API, named after Waypoint's RPCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// The stand-in's `GET /v1/whoami`.
    Whoami,
    GenerateLoginToken,
    GenerateRunnerToken,
    RunnerConfig,
    /// The stand-in runner's report of what Docker answered (stands for the runner's other
    /// authenticated calls, such as its job stream).
    RunnerReport,
    ListRunners,
    ForgetRunner,
    SetServerConfig,
    GetServerConfig,
    CreateSnapshot,
    RestoreSnapshot,
    UpsertProject,
    GetProject,
    ListProjects,
}

/// The outcome of [`authenticate`].
#[derive(Debug)]
pub enum Auth {
    Ok(Principal),
    Refused(RpcError),
    /// Refused after Waypoint's tarpit ([`TARPIT`]); the caller sleeps before answering.
    Tarpit(RpcError),
}

/// Waypoint's authentication of `token` for `endpoint` against `store`.
pub fn authenticate(store: &StateStore, token: Option<&str>, endpoint: Endpoint) -> Auth {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Auth::Refused(RpcError::new(
            Code::Unauthenticated,
            "Authorization token is not supplied",
        ));
    };
    let body = match token::decode(token, &|id| store.key(id)) {
        Ok(b) => b,
        Err(refused) => return Auth::Refused(RpcError::new(Code::Unknown, refused.0)),
    };
    match body.kind {
        TokenBodyKind::Trigger => Auth::Refused(RpcError::new(
            Code::PermissionDenied,
            "Trigger URL token not authorized to make requests on this endpoint.",
        )),
        TokenBodyKind::Login => {
            if !store.state().users.iter().any(|u| u == &body.subject) {
                return Auth::Refused(RpcError::new(
                    Code::Unauthenticated,
                    "Pre-Waypoint 0.5 token must be for the default user. This should always \
                     be the case so the token is likely corrupt.",
                ));
            }
            Auth::Ok(Principal::User(body.subject))
        }
        TokenBodyKind::Runner => {
            let principal = Principal::Runner {
                id: body.subject.clone(),
                label_hash: body.label_hash,
            };
            if body.subject.is_empty() || endpoint == Endpoint::RunnerConfig {
                return Auth::Ok(principal);
            }
            let record = store.runner(&body.subject);
            let adopted = record.is_some_and(|r| {
                matches!(r.adoption_state, Adoption::Adopted | Adoption::Preadopted)
            });
            if !adopted {
                return Auth::Tarpit(RpcError::new(
                    Code::PermissionDenied,
                    "runner is not adopted",
                ));
            }
            let labels_changed = record.is_some_and(|r| {
                body.label_hash > 0 && token::label_hash(&r.labels) != body.label_hash
            });
            if labels_changed {
                return Auth::Refused(RpcError::new(
                    Code::PermissionDenied,
                    "runner labels have changed since this token was issued",
                ));
            }
            Auth::Ok(principal)
        }
    }
}

fn internal(context: &str, err: impl std::fmt::Display) -> RpcError {
    crate::log!("server: {context}: {err}");
    RpcError::new(Code::Internal, format!("{context}: {err}"))
}

/// What `GenerateLoginToken` is asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoginRequest {
    /// Nanoseconds; 0 or absent: no expiry.
    #[serde(default)]
    pub duration_ns: u64,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub trigger: bool,
}

/// What `GenerateRunnerToken` is asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnerTokenRequest {
    #[serde(default)]
    pub duration_ns: u64,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

fn ttl(duration_ns: u64) -> Option<Duration> {
    (duration_ns > 0).then(|| Duration::from_nanos(duration_ns))
}

/// Waypoint's `GenerateLoginToken`.
pub fn generate_login(
    store: &mut StateStore,
    who: &Principal,
    req: &LoginRequest,
) -> Result<String, RpcError> {
    let user = match who {
        Principal::Superuser => token::DEFAULT_USER_ID.to_string(),
        Principal::User(u) => u.clone(),
        Principal::Runner { .. } => {
            return Err(RpcError::new(
                Code::Unauthenticated,
                "no user found from current context",
            ));
        }
    };
    let subject = match req.username.as_deref().filter(|u| !u.is_empty()) {
        None => user.clone(),
        Some("waypoint")
            if store
                .state()
                .users
                .contains(&token::DEFAULT_USER_ID.to_string()) =>
        {
            token::DEFAULT_USER_ID.to_string()
        }
        Some(_) => return Err(RpcError::new(Code::NotFound, "user not found")),
    };
    let body = if req.trigger {
        Body::trigger(&user, ttl(req.duration_ns))
    } else {
        Body::login(&subject, ttl(req.duration_ns))
    };
    store
        .mint(TokenKind::Login, &body)
        .map_err(|e| internal("failed to sign the token", e))
}

/// Waypoint's `GenerateRunnerToken`.
pub fn generate_runner(
    store: &mut StateStore,
    who: &Principal,
    req: &RunnerTokenRequest,
) -> Result<String, RpcError> {
    let other_runner = match who {
        Principal::Runner { id, .. } if id != &req.id => Some(id),
        _ => None,
    };
    if let Some(id) = other_runner {
        return Err(RpcError::new(
            Code::InvalidArgument,
            format!(
                "cannot generate a token for runner {} using a runner token for runner {id}",
                req.id
            ),
        ));
    }
    let body = Body::runner(
        &req.id,
        token::label_hash(&req.labels),
        ttl(req.duration_ns),
    );
    store
        .mint(TokenKind::Runner, &body)
        .map_err(|e| internal("failed to sign the token", e))
}

/// Waypoint's `runnerVerifyToken` and the registration half of `RunnerConfig`.
pub fn register_runner(
    store: &mut StateStore,
    who: &Principal,
    id: &str,
    labels: &BTreeMap<String, String>,
) -> Result<Adoption, RpcError> {
    if id.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "runner id is required",
        ));
    }
    if let Principal::Runner {
        id: bound,
        label_hash,
    } = who
    {
        if !bound.is_empty() && !bound.eq_ignore_ascii_case(id) {
            return Err(RpcError::new(
                Code::PermissionDenied,
                "provided runner token is for a different runner",
            ));
        }
        if *label_hash > 0 && token::label_hash(labels) != *label_hash {
            return Err(RpcError::new(
                Code::PermissionDenied,
                "provided runner token is for a different set of runner labels",
            ));
        }
    }
    let state = store
        .register_runner(id, labels)
        .map_err(|e| internal("failed to create runner", e))?;
    if state == Adoption::Rejected {
        return Err(RpcError::new(
            Code::PermissionDenied,
            "runner is explicitly rejected (unadopted)",
        ));
    }
    Ok(state)
}

/// Waypoint's `SetServerConfig` (exactly one advertise address, which may be empty).
pub fn set_server_config(store: &mut StateStore, advertise: Advertise) -> Result<(), RpcError> {
    store
        .set_advertise(advertise)
        .map_err(|e| internal("failed to set server config", e))
}

/// Waypoint's `ForgetRunner`.
pub fn forget_runner(store: &mut StateStore, id: &str) -> Result<(), RpcError> {
    if id.is_empty() {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "runner_id: cannot be blank.",
        ));
    }
    store
        .forget_runner(id)
        .map_err(|e| internal("failed to delete runner", e))
}

/// The runners as the API lists them (`online`: an open configuration stream right now).
pub fn list_runners(store: &StateStore, online: &dyn Fn(&str) -> bool) -> Value {
    let runners: Vec<Value> = store
        .state()
        .runners
        .values()
        .map(|r| {
            json!({
                "id": r.id,
                "labels": r.labels,
                "adoption_state": r.adoption_state.as_str(),
                "online": online(&r.id),
                "docker_ok": r.docker_ok,
                "docker_version": r.docker_version,
                "first_seen": r.first_seen,
                "last_seen": r.last_seen,
            })
        })
        .collect();
    json!({ "runners": runners })
}

/// Waypoint's `UpsertProject`: validation (`InvalidArgument` with ozzo-validation's text),
/// then `ProjectPut`, whose failures come back externalized as `failed to upsert project`
/// with the project's name as a detail. Returns the project as stored.
pub fn upsert_project(store: &mut StateStore, project: Project) -> Result<Project, RpcError> {
    project::validate_upsert(&project).map_err(|e| RpcError::new(Code::InvalidArgument, e))?;
    let externalized = |code| {
        RpcError::externalized(
            code,
            "failed to upsert project",
            "project_name",
            &project.name,
        )
    };
    if let Some((code, detail)) = project::storage_error(&project) {
        crate::log!(
            "server: failed to upsert project {:?}: {detail}",
            project.name
        );
        return Err(externalized(code));
    }
    store.put_project(project.clone()).map_err(|e| {
        crate::log!("server: failed to upsert project {:?}: {e}", project.name);
        externalized(Code::Internal)
    })?;
    Ok(store.project(&project.name).cloned().unwrap_or(project))
}

/// Waypoint's `GetProject`: the project and its workspaces (always none in the stand-in, which
/// runs no operations). An unknown name is `NotFound`, externalized as `failed to get project`
/// with an empty `project_name` (Waypoint names the empty result there, not the request).
pub fn get_project(store: &StateStore, name: Option<&str>) -> Result<Value, RpcError> {
    let Some(name) = name else {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "project: cannot be blank.",
        ));
    };
    match store.project(name) {
        Some(p) => Ok(json!({ "project": p, "workspaces": [] })),
        None => Err(RpcError::externalized(
            Code::NotFound,
            "failed to get project",
            "project_name",
            "",
        )),
    }
}

/// Waypoint's `ListProjects`: references by id (the lower-case name), in id order.
pub fn list_projects(store: &StateStore) -> Value {
    let projects: Vec<Value> = store
        .state()
        .projects
        .keys()
        .map(|id| json!({ "project": id }))
        .collect();
    json!({ "projects": projects, "total_count": projects.len() })
}

/// The stand-in's `whoami`: what the token is.
pub fn whoami(who: &Principal) -> Value {
    match who {
        Principal::Superuser => json!({ "token_kind": "superuser", "standin": true }),
        Principal::User(u) => json!({ "token_kind": "login", "user_id": u, "standin": true }),
        Principal::Runner { id, .. } => {
            json!({ "token_kind": "runner", "runner_id": id, "standin": true })
        }
    }
}
