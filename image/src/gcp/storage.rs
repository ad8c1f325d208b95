//! Cloud Storage through its JSON API: the resumable upload of the tarball (its custom
//! metadata `pilot-build-id` set in the initiating request: objects have no labels), the check
//! of what arrived, and the listing and deletion the clean-up uses.
//! <https://cloud.google.com/storage/docs/performing-resumable-uploads>

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tracing::{info, warn};

use super::api::{Api, api_error, transport, url};
use super::cancel::{Cancel, secs};
use super::error::{GcpError, Result};
use super::id::BUILD_ID_LABEL;

/// Cloud Storage's unit for resumable-upload chunks.
pub const CHUNK_UNIT: u64 = 256 * 1024;
/// Attempts per chunk when the service or the network fails transiently (429, 5xx, reset).
const ATTEMPTS: u32 = 5;

/// Where a build's objects live: `pilot-image/<build-id>/`.
pub fn prefix(build_id: &str) -> String {
    format!("pilot-image/{build_id}/")
}

/// The object of a build's tarball.
pub fn object_name(build_id: &str, image: &str) -> String {
    format!("{}{image}.tar.gz", prefix(build_id))
}

/// `https://storage.googleapis.com/BUCKET/OBJECT` (the endpoint's host for an emulator): the
/// form of `rawDisk.source`.
pub fn public_url(storage: &str, bucket: &str, object: &str) -> Result<String> {
    let mut segs = vec![bucket];
    segs.extend(object.split('/'));
    Ok(url(storage, &segs)?.to_string())
}

/// An object resource, as much as the publish reads of it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Object {
    pub name: String,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub md5_hash: Option<String>,
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
}

impl Object {
    /// The build id in the object's custom metadata.
    pub fn build_id(&self) -> Option<&str> {
        self.metadata
            .as_ref()
            .and_then(|m| m.get(BUILD_ID_LABEL))
            .map(String::as_str)
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList {
    #[serde(default)]
    items: Vec<Object>,
    #[serde(default)]
    next_page_token: Option<String>,
}

/// What was sent, to be compared with what arrived.
#[derive(Debug, Clone)]
pub struct Sent {
    pub size: u64,
    /// Base64 of the MD5, as the object's `md5Hash`.
    pub md5: String,
}

/// Where an upload goes, and the build id its metadata carries.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    pub bucket: &'a str,
    pub object: &'a str,
    pub build_id: &'a str,
}

/// Uploads `file` as `gs://bucket/object` in `chunk`-byte requests. Cancellation is checked
/// between requests (one in flight finishes); the session is then cancelled with DELETE, so no
/// object appears. Returns the object resource, after checking its size, MD5 and metadata.
pub async fn upload(
    api: &Api,
    cancel: &Cancel,
    to: &Destination<'_>,
    file: &Path,
    sent: &Sent,
    chunk: u64,
) -> Result<Object> {
    let Destination {
        bucket,
        object,
        build_id,
    } = *to;
    let mut init = url(&api.storage, &["upload", "storage", "v1", "b", bucket, "o"])?;
    init.query_pairs_mut()
        .append_pair("uploadType", "resumable")
        .append_pair("name", object);
    let body = serde_json::json!({
        "name": object,
        "contentType": "application/gzip",
        "metadata": { BUILD_ID_LABEL: build_id },
    });
    let resp = api
        .send(
            "storage objects.insert (resumable)",
            api.request(Method::POST, init)
                .header("X-Upload-Content-Type", "application/gzip")
                .header("X-Upload-Content-Length", sent.size)
                .json(&body),
        )
        .await?;
    // The session URI is a credential of its own (anyone holding it can upload): never logged.
    let session = resp
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| reqwest::Url::parse(s).ok())
        .ok_or(GcpError::Answer {
            op: "storage objects.insert (resumable)",
            what: "no session URI in Location".into(),
        })?;
    let result = send_chunks(api, cancel, &session, file, sent, chunk).await;
    if result.is_err() {
        // A cancelled session leaves nothing; a failure to cancel it only leaves an upload
        // that expires in a week and is not an object.
        match api.request(Method::DELETE, session.clone()).send().await {
            Ok(r) => info!(
                "asked to cancel the resumable upload: HTTP {}",
                r.status().as_u16()
            ),
            Err(e) => warn!("cannot cancel the resumable upload: {}", e.without_url()),
        }
    }
    let obj = result?;
    let verify = |what: String| GcpError::Verify {
        bucket: bucket.to_owned(),
        object: object.to_owned(),
        what,
    };
    if obj.size.as_deref() != Some(sent.size.to_string().as_str()) {
        return Err(verify(format!(
            "size {:?}, sent {}",
            obj.size.as_deref().unwrap_or("none"),
            sent.size
        )));
    }
    if obj.md5_hash.as_deref() != Some(sent.md5.as_str()) {
        return Err(verify(format!(
            "md5Hash {:?}, sent {}",
            obj.md5_hash.as_deref().unwrap_or("none"),
            sent.md5
        )));
    }
    if obj.build_id() != Some(build_id) {
        return Err(verify(format!(
            "metadata {BUILD_ID_LABEL} is {:?}",
            obj.build_id()
        )));
    }
    Ok(obj)
}

async fn send_chunks(
    api: &Api,
    cancel: &Cancel,
    session: &reqwest::Url,
    path: &Path,
    sent: &Sent,
    chunk: u64,
) -> Result<Object> {
    const OP: &str = "storage resumable upload";
    let total = sent.size;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|source| GcpError::Disk {
            path: path.to_owned(),
            source,
        })?;
    let mut offset = 0u64;
    let mut buf = Vec::new();
    let mut failures = 0u32;
    let t0 = Instant::now();
    let mut last_note = Instant::now();
    loop {
        cancel.check()?;
        let len = chunk.min(total - offset);
        buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .and(f.read_exact(&mut buf).await.map(|_| ()))
            .map_err(|source| GcpError::Disk {
                path: path.to_owned(),
                source,
            })?;
        let range = if len == 0 {
            format!("bytes */{total}")
        } else {
            format!("bytes {offset}-{}/{total}", offset + len - 1)
        };
        let answer = api
            .request(Method::PUT, session.clone())
            .header(reqwest::header::CONTENT_RANGE, range)
            .body(buf.clone())
            .send()
            .await;
        let transient = match answer {
            Ok(r) if r.status().is_success() => {
                return r.json().await.map_err(|e| GcpError::Answer {
                    op: OP,
                    what: e.without_url().to_string(),
                });
            }
            Ok(r) if r.status().as_u16() == 308 => {
                let next = persisted(&r)?;
                // A service that keeps answering 308 without taking bytes must not keep the
                // publish looping: that counts as a failed attempt.
                if next > offset {
                    failures = 0;
                } else {
                    failures += 1;
                    if failures >= ATTEMPTS {
                        return Err(GcpError::Answer {
                            op: OP,
                            what: format!(
                                "the upload does not advance: {ATTEMPTS} chunks in a row at byte \
                                 {offset} persisted nothing"
                            ),
                        });
                    }
                }
                offset = next;
                if last_note.elapsed() > Duration::from_secs(10) {
                    last_note = Instant::now();
                    info!(
                        "uploaded {} of {} MiB in {}",
                        offset >> 20,
                        total >> 20,
                        secs(t0.elapsed())
                    );
                }
                continue;
            }
            Ok(r)
                if r.status() == StatusCode::TOO_MANY_REQUESTS || r.status().is_server_error() =>
            {
                api_error(OP, r).await
            }
            Ok(r) => return Err(api_error(OP, r).await),
            Err(e) => transport(OP)(e),
        };
        failures += 1;
        if failures >= ATTEMPTS {
            return Err(transient);
        }
        let pause = Duration::from_secs(1 << failures);
        warn!(
            "{transient}; asking where the upload stands in {}",
            secs(pause)
        );
        cancel.sleep(pause).await?;
        // Where the session stands: 308 with the persisted range (or none), or 200/201 if the
        // last chunk did arrive.
        let r = api
            .request(Method::PUT, session.clone())
            .header(reqwest::header::CONTENT_RANGE, format!("bytes */{total}"))
            .send()
            .await
            .map_err(transport(OP))?;
        match r.status().as_u16() {
            200 | 201 => {
                return r.json().await.map_err(|e| GcpError::Answer {
                    op: OP,
                    what: e.without_url().to_string(),
                });
            }
            308 => offset = persisted(&r)?,
            _ => return Err(api_error(OP, r).await),
        }
    }
}

/// The next offset after a 308: `Range: bytes=0-N` means N+1 bytes persisted; no `Range`
/// means none.
fn persisted(r: &reqwest::Response) -> Result<u64> {
    let Some(v) = r.headers().get(reqwest::header::RANGE) else {
        return Ok(0);
    };
    v.to_str()
        .ok()
        .and_then(|s| s.strip_prefix("bytes=0-"))
        .and_then(|n| n.parse::<u64>().ok())
        .map(|n| n + 1)
        .ok_or_else(|| GcpError::Answer {
            op: "storage resumable upload",
            what: format!("Range header {v:?}"),
        })
}

/// Every object under `prefix` (all pages).
pub async fn list(api: &Api, bucket: &str, prefix: &str) -> Result<Vec<Object>> {
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    loop {
        let mut u = url(&api.storage, &["storage", "v1", "b", bucket, "o"])?;
        u.query_pairs_mut().append_pair("prefix", prefix);
        if let Some(p) = &page {
            u.query_pairs_mut().append_pair("pageToken", p);
        }
        let l: ObjectList = api
            .json("storage objects.list", api.request(Method::GET, u))
            .await?;
        out.extend(l.items);
        match l.next_page_token {
            Some(t) if !t.is_empty() => page = Some(t),
            _ => return Ok(out),
        }
    }
}

/// Deletes an object; false when it was already gone.
pub async fn delete(api: &Api, bucket: &str, object: &str) -> Result<bool> {
    let u = url(&api.storage, &["storage", "v1", "b", bucket, "o", object])?;
    match api
        .send("storage objects.delete", api.request(Method::DELETE, u))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e),
    }
}
