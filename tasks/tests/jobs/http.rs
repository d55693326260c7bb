//! `http.request` against a real axum server on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::Path;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::routing::{any, get};
use metalgraph_engine::Job;
use metalgraph_tasks::{HttpRequestJob, MAX_RESPONSE_BYTES};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{ctx_for, raw_ctx, run};

/// Starts the test service on an ephemeral port and returns its address; it lives as long
/// as the test's runtime.
async fn start_server() -> SocketAddr {
    let app = Router::new()
        .route(
            "/json",
            get(|| async { Json(json!({ "hello": "world", "n": 3 })) }),
        )
        .route("/text", get(|| async { "plain words" }))
        .route("/echo", any(echo))
        .route("/status/{code}", get(status))
        .route("/auth", get(auth))
        .route("/hang", get(std::future::pending::<&'static str>))
        .route("/big", get(|| async { vec![b'x'; MAX_RESPONSE_BYTES + 1] }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Replies with what it was sent.
async fn echo(method: Method, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    Json(json!({
        "method": method.as_str(),
        "contentType": header("content-type"),
        "custom": header("x-custom"),
        "body": String::from_utf8_lossy(&body),
    }))
}

/// Replies with the status in the path and a body longer than errors quote.
async fn status(Path(code): Path<u16>) -> (StatusCode, String) {
    let body = format!("detail:{}", "x".repeat(600));
    (StatusCode::from_u16(code).unwrap(), body)
}

/// Replies with the Authorization header it got, or 401 without one.
async fn auth(headers: HeaderMap) -> Result<Json<Value>, StatusCode> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(StatusCode::UNAUTHORIZED)?;
    Ok(Json(json!({ "authorization": value.to_str().unwrap() })))
}

#[tokio::test]
async fn json_reply_is_parsed_and_text_reply_kept_as_text() {
    let addr = start_server().await;
    let cases = [
        (
            "json",
            "GET",
            json!({ "hello": "world", "n": 3 }),
            "application/json",
        ),
        (
            "text",
            "GET",
            json!("plain words"),
            "text/plain; charset=utf-8",
        ),
        // A HEAD reply has no body, whatever its content type.
        ("json", "HEAD", Value::Null, "application/json"),
    ];
    for (path, method, body, content_type) in cases {
        let out = run(
            &HttpRequestJob::default(),
            json!({ "url": format!("http://{addr}/{path}"), "method": method }),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} /{path}: {e}"));
        assert_eq!(out["status"], 200, "{method} /{path}");
        assert_eq!(out["body"], body, "{method} /{path}");
        assert_eq!(
            out["headers"]["content-type"], content_type,
            "{method} /{path}"
        );
    }
}

#[tokio::test]
async fn request_bodies_and_headers_are_sent() {
    let addr = start_server().await;
    let url = format!("http://{addr}/echo");
    // (method, body, extra headers, content type the server saw, body the server saw).
    let cases = [
        (
            "POST",
            json!({ "a": [1, 2] }),
            json!({}),
            "application/json",
            r#"{"a":[1,2]}"#,
        ),
        (
            "PUT",
            json!("raw text"),
            json!({}),
            "text/plain; charset=utf-8",
            "raw text",
        ),
        (
            "PATCH",
            json!("<a/>"),
            json!({ "Content-Type": "application/xml" }),
            "application/xml",
            "<a/>",
        ),
        ("DELETE", Value::Null, json!({}), "", ""),
    ];
    for (method, body, headers, content_type, seen_body) in cases {
        let mut headers = headers.as_object().unwrap().clone();
        headers.insert("X-Custom".to_owned(), json!("yes"));
        let out = run(
            &HttpRequestJob::default(),
            json!({ "url": url, "method": method, "body": body, "headers": headers }),
        )
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"));
        let seen = &out["body"];
        assert_eq!(seen["method"], method);
        assert_eq!(seen["custom"], "yes", "{method}");
        assert_eq!(seen["body"], seen_body, "{method}");
        if content_type.is_empty() {
            assert_eq!(seen["contentType"], Value::Null, "{method}");
        } else {
            assert_eq!(seen["contentType"], content_type, "{method}");
        }
    }
}

#[tokio::test]
async fn expect_status_decides_success() {
    let addr = start_server().await;
    // (status served, expectStatus, Ok(()) or Err(fragments of the error)).
    type Case = (u16, Value, Result<(), &'static [&'static str]>);
    let cases: [Case; 7] = [
        (200, Value::Null, Ok(())),
        (204, Value::Null, Ok(())),
        (404, json!(404), Ok(())),
        (409, json!("409"), Ok(())),
        (201, json!([200, 201]), Ok(())),
        (
            500,
            Value::Null,
            Err(&["status 500 Internal Server Error", "expected 2xx"]),
        ),
        (
            200,
            json!([201, 204]),
            Err(&["status 200 OK", "expected 201 or 204"]),
        ),
    ];
    for (code, expect, want) in cases {
        let url = format!("http://{addr}/status/{code}");
        let got = run(
            &HttpRequestJob::default(),
            json!({ "url": url, "expectStatus": expect }),
        )
        .await;
        match (want, got) {
            (Ok(()), Ok(out)) => assert_eq!(out["status"], code),
            (Err(fragments), Err(e)) => {
                let msg = &e.message;
                for fragment in fragments {
                    assert!(msg.contains(fragment), "{code}: {msg}");
                }
                assert!(
                    msg.contains(&format!("GET http://{addr}/status/{code}")),
                    "{msg}"
                );
                // The body is quoted, cut at 500 characters.
                let quoted = format!("detail:{}...", "x".repeat(500 - "detail:".len()));
                assert!(msg.ends_with(&quoted), "{msg}");
            }
            (want, got) => panic!("{code} {expect}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[tokio::test]
async fn a_hanging_endpoint_hits_the_timeout() {
    let addr = start_server().await;
    let started = Instant::now();
    let err = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://{addr}/hang"), "timeout": "200ms" }),
    )
    .await
    .unwrap_err();
    assert!(err.message.contains("timed out after 200ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn cancellation_returns_promptly() {
    let addr = start_server().await;
    let job = HttpRequestJob::default();
    let cancel = CancellationToken::new();
    let ctx = ctx_for(
        &job,
        json!({ "url": format!("http://{addr}/hang") }),
        cancel.clone(),
    );
    let started = Instant::now();
    let running = tokio::spawn(job.run(ctx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let err = tokio::time::timeout(Duration::from_secs(2), running)
        .await
        .expect("the job did not stop within 2s of its cancellation")
        .unwrap()
        .unwrap_err();
    assert!(err.message.contains("cancelled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn userinfo_becomes_basic_auth() {
    let addr = start_server().await;
    let out = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://admin:s3cret@{addr}/auth") }),
    )
    .await
    .unwrap();
    // base64("admin:s3cret")
    assert_eq!(out["body"]["authorization"], "Basic YWRtaW46czNjcmV0");
}

#[tokio::test]
async fn errors_never_show_passwords_or_header_values() {
    let addr = start_server().await;
    // A port nothing listens on, for a transport error.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let secret_header = json!({ "Authorization": "Bearer hunter2-token" });
    let cases = [
        json!({ "url": format!("http://admin:s3cret@{addr}/status/500") }),
        json!({ "url": format!("http://admin:s3cret@{addr}/status/500"), "headers": secret_header }),
        json!({ "url": format!("http://admin:s3cret@{closed}/x") }),
        json!({ "url": format!("http://admin:s3cret@{addr}/hang"), "timeout": "50ms" }),
        json!({ "url": format!("http://{addr}/status/500?user=a&password=s3cret") }),
        json!({ "url": "http://admin:s3cret@[::1/x" }),
        json!({ "url": "ftp://admin:s3cret@example.com/x" }),
        json!({ "url": format!("http://{addr}/json"), "headers": { "X-Token": ["s3cret"] } }),
    ];
    for options in cases {
        let err = run(&HttpRequestJob::default(), options.clone())
            .await
            .unwrap_err();
        let msg = err.message;
        assert!(!msg.contains("s3cret"), "{options}: {msg}");
        assert!(!msg.contains("hunter2"), "{options}: {msg}");
        assert!(!msg.contains("admin:"), "{options}: {msg}");
    }
}

#[tokio::test]
async fn transport_errors_name_the_request_and_the_cause() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let err = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://{closed}/x"), "method": "POST", "body": {} }),
    )
    .await
    .unwrap_err();
    assert!(
        err.message
            .starts_with(&format!("POST http://{closed}/x: ")),
        "{err}"
    );
    assert!(err.message.to_lowercase().contains("refused"), "{err}");
}

#[tokio::test]
async fn an_oversized_response_fails_clearly() {
    let addr = start_server().await;
    let err = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://{addr}/big") }),
    )
    .await
    .unwrap_err();
    assert!(err.message.contains("exceeds the limit of 16 MiB"), "{err}");
}

#[tokio::test]
async fn one_job_instance_serves_verifying_and_insecure_requests() {
    let addr = start_server().await;
    let job = HttpRequestJob::default();
    for verify in [true, false, true] {
        let out = run(
            &job,
            json!({ "url": format!("http://{addr}/json"), "verifySSL": verify }),
        )
        .await
        .unwrap();
        assert_eq!(out["status"], 200);
    }
}

#[tokio::test]
async fn options_the_schema_cannot_judge_are_checked() {
    let cases = [
        (json!({ "method": "GET" }), "option 'url' is required"),
        (
            json!({ "url": "not a url" }),
            "option 'url' is not a valid URL",
        ),
        (
            json!({ "url": "http://h/", "method": "TRACE" }),
            "option 'method' must be one of",
        ),
        (
            json!({ "url": "http://h/", "headers": { "bad name": "v" } }),
            "invalid header name",
        ),
        (
            json!({ "url": "http://h/", "expectStatus": "2xx" }),
            "option 'expectStatus'",
        ),
        (
            json!({ "url": "http://h/", "timeout": "later" }),
            "option 'timeout'",
        ),
    ];
    for (options, want) in cases {
        let err = HttpRequestJob::default()
            .run(raw_ctx(options.clone(), CancellationToken::new()))
            .await
            .unwrap_err();
        assert!(err.message.contains(want), "{options}: {err}");
    }
}

/// Credential headers never follow a redirect to another origin: a redirect within the
/// origin is followed, one elsewhere is answered as it came and the other origin sees
/// nothing.
#[tokio::test]
async fn redirects_never_take_headers_to_another_origin() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let other = Router::new().fallback(move || {
        counted.fetch_add(1, Ordering::SeqCst);
        async { "stolen" }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, other).await.unwrap() });
    let away = format!("http://{other_addr}/collect");
    let app = Router::new()
        .route(
            "/away",
            get(move || {
                let to = away.clone();
                async move { (StatusCode::FOUND, [(header::LOCATION, to)]) }
            }),
        )
        .route(
            "/here",
            get(|| async { (StatusCode::FOUND, [(header::LOCATION, "/echo")]) }),
        )
        .route("/echo", any(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let headers = json!({ "X-Api-Key": "k-123", "X-Custom": "c" });
    let out = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://{addr}/here"), "headers": headers }),
    )
    .await
    .expect("a same-origin redirect is followed");
    assert_eq!(out["body"]["custom"], "c");
    let got = run(
        &HttpRequestJob::default(),
        json!({ "url": format!("http://{addr}/away"), "headers": headers, "expectStatus": 302 }),
    )
    .await
    .expect("the redirect itself is the answer");
    assert_eq!(got["status"], 302);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the other origin was called"
    );
}
