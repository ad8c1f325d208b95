//! Fuzz target: the HTTP requests the endpoint accepts, as raw bytes on one connection, served
//! by hyper's HTTP/1 server with the endpoint's own settings (`endpoint::http_builder`: the
//! head's size and deadline) on an in-memory stream. Every request hyper hands over is routed
//! (`endpoint::route`) and authenticated (`endpoint::auth::check`) as the endpoint does, and
//! checked: a method other than GET/HEAD (but POST to `/v1/runner-token`) is refused first,
//! only `/healthz` skips the token,
//! the token check agrees with an independent reading of the header (the token is
//! `ENDPOINT_TOKEN`), and no head larger than `endpoint::MAX_BUF` got through. Any bytes must
//! end the connection, never panic or hang.
#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use pilot_agent::config::endpoint::TokenHash;
use pilot_agent::endpoint::{MAX_BUF, Route, auth, http_builder, route};
use pilot_agent_fuzz::{ENDPOINT_TOKEN_SHA256, expected_auth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
}

fn answer(req: &Request<Incoming>, hash: &TokenHash) -> StatusCode {
    let method = req.method();
    let path = req.uri().path();
    let r = route(method, path);
    if method == Method::POST && path == "/v1/runner-token" {
        // The routes that take a body (the runner token mint, a runner forgotten): they
        // need a token.
        assert_eq!(r, Route::RunnerToken, "{method} {path}");
        assert!(r.needs_auth());
    } else if method == Method::POST && path == "/v1/runner-forget" {
        assert_eq!(r, Route::RunnerForget, "{method} {path}");
        assert!(r.needs_auth());
    } else if method != Method::GET && method != Method::HEAD {
        assert_eq!(r, Route::MethodNotAllowed, "{method} {path}");
    } else {
        assert_ne!(r, Route::MethodNotAllowed, "{method} {path}");
        assert_eq!(r.needs_auth(), path != "/healthz", "{method} {path}: {r:?}");
    }
    let head: usize = req.uri().to_string().len()
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum::<usize>();
    assert!(
        head <= MAX_BUF,
        "a request head of {head} bytes got through"
    );
    let presented = req.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let checked = auth::check(presented, hash);
    assert_eq!(
        checked,
        expected_auth(presented),
        "Authorization: {presented:?}"
    );
    match (r, checked) {
        (Route::MethodNotAllowed, _) => StatusCode::METHOD_NOT_ALLOWED,
        (r, Err(_)) if r.needs_auth() => StatusCode::UNAUTHORIZED,
        (Route::NotFound, _) => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

fuzz_target!(|data: &[u8]| {
    let hash = TokenHash::from_hex(ENDPOINT_TOKEN_SHA256).unwrap();
    let served = Rc::new(RefCell::new(0usize));
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let (mut client, server) = tokio::io::duplex(data.len() + (1 << 16));
            let count = served.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                let status = answer(&req, &hash);
                *count.borrow_mut() += 1;
                async move {
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = status;
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = http_builder().serve_connection(TokioIo::new(server), service);
            let talk = async {
                client.write_all(data).await.ok();
                client.shutdown().await.ok();
                let mut answers = Vec::new();
                client.read_to_end(&mut answers).await.ok();
                answers
            };
            let (_, answers) = tokio::join!(conn, talk);
            // Every response is a status line; no more of them than requests served.
            let responses = answers.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
            assert!(responses <= *served.borrow() + 1, "{responses} responses");
        });
    });
});
