//! Compute Engine v1: images.insert / get / list / delete and the global operations they
//! return. <https://cloud.google.com/compute/docs/reference/rest/v1/images>

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;

use super::api::Api;
use super::cancel::{Cancel, Deadline};
use super::error::{GcpError, Result};

/// A global operation, as much as is read of it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub name: String,
    /// PENDING, RUNNING or DONE.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub operation_type: Option<String>,
    #[serde(default)]
    pub target_link: Option<String>,
    #[serde(default)]
    pub error: Option<OperationErrors>,
    #[serde(default)]
    pub http_error_status_code: Option<u16>,
    #[serde(default)]
    pub http_error_message: Option<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct OperationErrors {
    #[serde(default)]
    pub errors: Vec<OperationError>,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct OperationError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
}

impl Operation {
    pub fn is_done(&self) -> bool {
        self.status == "DONE"
    }

    /// The operation's error in full (every entry, with the HTTP status it maps to), if any.
    pub fn failure(&self) -> Option<GcpError> {
        let errs = self.error.as_ref()?;
        let mut parts: Vec<String> = errs
            .errors
            .iter()
            .map(|e| {
                let mut s = e.code.clone().unwrap_or_else(|| "ERROR".into());
                if let Some(m) = &e.message {
                    s.push_str(": ");
                    s.push_str(m);
                }
                if let Some(l) = &e.location {
                    s.push_str(&format!(" (at {l})"));
                }
                s
            })
            .collect();
        if let Some(code) = self.http_error_status_code {
            parts.push(format!(
                "HTTP {code} {}",
                self.http_error_message.as_deref().unwrap_or("")
            ));
        }
        Some(GcpError::Operation {
            operation: self.name.clone(),
            kind: self.operation_type.clone().unwrap_or_default(),
            target: self.target_link.clone().unwrap_or_default(),
            errors: parts.join("; "),
        })
    }
}

/// An image, as much as is read of it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    pub name: String,
    /// PENDING, READY, FAILED, DELETING.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub self_link: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub archive_size_bytes: Option<String>,
    #[serde(default)]
    pub disk_size_gb: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ImageList {
    #[serde(default)]
    items: Vec<Image>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// images.insert: starts the import; the image exists (PENDING) once this answers.
pub async fn insert_image(api: &Api, body: &serde_json::Value) -> Result<Operation> {
    let u = api.global(&["images"])?;
    api.json(
        "compute images.insert",
        api.request(Method::POST, u).json(body),
    )
    .await
}

/// images.get; None when there is no such image.
pub async fn get_image(api: &Api, name: &str) -> Result<Option<Image>> {
    let u = api.global(&["images", name])?;
    match api
        .json("compute images.get", api.request(Method::GET, u))
        .await
    {
        Ok(i) => Ok(Some(i)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// images.list with a filter (e.g. `labels.pilot-build-id=ID`), every page.
pub async fn list_images(api: &Api, filter: &str) -> Result<Vec<Image>> {
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let mut u = api.global(&["images"])?;
        u.query_pairs_mut().append_pair("filter", filter);
        if let Some(p) = &page {
            u.query_pairs_mut().append_pair("pageToken", p);
        }
        let l: ImageList = api
            .json("compute images.list", api.request(Method::GET, u))
            .await?;
        out.extend(l.items);
        match l.next_page_token {
            Some(t) if !t.is_empty() => page = Some(t),
            _ => return Ok(out),
        }
    }
}

/// images.delete; None when the image was already gone.
pub async fn delete_image(api: &Api, name: &str) -> Result<Option<Operation>> {
    let u = api.global(&["images", name])?;
    match api
        .json("compute images.delete", api.request(Method::DELETE, u))
        .await
    {
        Ok(op) => Ok(Some(op)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until the operation is DONE (globalOperations.wait, which answers when the operation
/// is done or after about two minutes, called again until `deadline`); a cancellation ends the
/// wait at once (the wait call changes nothing). The operation's own error is the caller's
/// to read ([`Operation::failure`]).
pub async fn wait_operation(
    api: &Api,
    cancel: Option<&Cancel>,
    name: &str,
    deadline: Deadline,
) -> Result<Operation> {
    loop {
        let u = api.global(&["operations", name, "wait"])?;
        let call = api.json::<Operation>(
            "compute globalOperations.wait",
            api.request(Method::POST, u)
                // Longer than the server's own two-minute bound.
                .timeout(Duration::from_secs(150)),
        );
        let op = match cancel {
            Some(c) => tokio::select! {
                r = call => r?,
                () = c.cancelled() => return Err(GcpError::Cancelled),
            },
            None => call.await?,
        };
        if op.is_done() {
            return Ok(op);
        }
        deadline.check(format!("operation {name} to be DONE"), op.status.as_str())?;
        match cancel {
            Some(c) => c.sleep(api.poll).await?,
            None => tokio::time::sleep(api.poll).await,
        }
    }
}
