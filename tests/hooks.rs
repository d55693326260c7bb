//! Webhooks against the real binary: signed deliveries in order, retries after failures, a
//! receiver that never answers holding up nobody else, undelivered events surviving a
//! kill -9, and bad registrations refused with a clear error.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};
use support::{Api, Launch, Server, describe_event};

/// One delivery the receiver accepted.
#[derive(Debug, Clone)]
struct Delivery {
    headers: HeaderMap,
    body: Bytes,
}

impl Delivery {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

/// A local receiver: answers 500 to the first `fail` requests, 204 to the rest.
#[derive(Clone, Default)]
struct Receiver {
    fail: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
    accepted: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    async fn start(fail: usize) -> (Receiver, String) {
        let r = Receiver::default();
        r.fail.store(fail, Ordering::SeqCst);
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(r.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (r, url)
    }

    fn accepted(&self) -> Vec<Delivery> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits until a delivery satisfies `done`, or panics after a minute.
    async fn wait_for(&self, done: impl Fn(&Value) -> bool) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.accepted();
            if got.iter().any(|d| done(&d.json())) {
                return got;
            }
            assert!(Instant::now() < deadline, "never delivered: {got:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    r.attempts.fetch_add(1, Ordering::SeqCst);
    let failing = r
        .fail
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    r.accepted.lock().unwrap().push(Delivery { headers, body });
    StatusCode::NO_CONTENT
}

/// `label:state` or `wf:status` of each delivered event.
fn describe(deliveries: &[Delivery]) -> Vec<String> {
    deliveries
        .iter()
        .map(|d| describe_event(&d.json()))
        .collect()
}

const EXPECTED: [&str; 7] = [
    "wf:pending",
    "wf:running",
    "a:running",
    "a:succeeded",
    "b:running",
    "b:succeeded",
    "wf:succeeded",
];

fn number(id: &str) -> u64 {
    id.rsplit_once('-').unwrap().1.parse().unwrap()
}

/// Every delivery's id names a distinct event, in increasing order, and its headers agree
/// with its body.
fn check_order_and_headers(deliveries: &[Delivery]) {
    let ids: Vec<u64> = deliveries
        .iter()
        .map(|d| number(d.json()["id"].as_str().unwrap()))
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for d in deliveries {
        let v = d.json();
        assert_eq!(
            d.headers["x-metalgraph-delivery"],
            v["id"].as_str().unwrap()
        );
        assert_eq!(d.headers["x-metalgraph-event"], v["kind"].as_str().unwrap());
        assert_eq!(d.headers["content-type"], "application/json");
    }
}

async fn put_graphs(api: &Api) {
    for g in [
        "{injectableName: Hk.G, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}]}",
        "{injectableName: Hk.Other, tasks: [{label: x, taskName: Task.Noop}]}",
    ] {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert_eq!(code, 201, "{body}");
    }
}

/// Registers a hook.
async fn create_hook(api: &Api, body: Value) -> (u16, Value) {
    api.send("POST", "/api/2.0/hooks", Some(body)).await
}

/// Polls a hook's view until `done` holds, or panics after 30 s.
async fn wait_hook(api: &Api, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = api.get(&format!("/api/2.0/hooks/{id}")).await;
        assert_eq!(code, 200, "{v}");
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "hook {id} never got there: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn fast_retries() -> [(&'static str, &'static str); 3] {
    [
        ("METALGRAPH_HOOKS_RETRY_BACKOFF_MS", "100"),
        ("METALGRAPH_HOOKS_MAX_RETRY_BACKOFF_MS", "400"),
        ("METALGRAPH_HOOKS_DELIVERY_TIMEOUT_MS", "1000"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_in_order_retried_and_never_held_up_by_a_dead_receiver() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::launch_with_env(data.path(), "sled", Launch::default(), &fast_retries());
    let api = server.api();
    put_graphs(&api).await;

    // A receiver that fails three times, then takes everything.
    let (flaky, flaky_url) = Receiver::start(3).await;
    let secret = "hook-s3cret-value";
    let (code, hook) = create_hook(
        &api,
        json!({"url": flaky_url, "secret": secret, "filters": {"graph": "Hk.G"}}),
    )
    .await;
    assert_eq!(code, 201, "{hook}");
    assert!(!hook.to_string().contains(secret), "{hook}");
    assert_eq!(hook["signed"], true);
    assert_eq!(hook["filters"], json!({"graph": "Hk.G"}));
    let hook_id = hook["id"].as_str().unwrap().to_owned();

    // A receiver that accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}/hook", silent.local_addr().unwrap());
    let (code, dead) = create_hook(&api, json!({"url": silent_url})).await;
    assert_eq!(code, 201, "{dead}");
    assert_eq!(dead["signed"], false);
    let dead_id = dead["id"].as_str().unwrap().to_owned();

    let other = api.run("Hk.Other", None, json!({})).await;
    let id = api.run("Hk.G", None, json!({})).await;
    let done = api.wait(&id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "succeeded");

    let got = flaky
        .wait_for(|v| v["workflowId"] == id.as_str() && v["status"] == "succeeded")
        .await;
    assert_eq!(describe(&got), EXPECTED, "{other} must be filtered out");
    assert!(got.iter().all(|d| d.json()["workflowId"] == id.as_str()));
    assert!(got.iter().all(|d| d.json()["graph"] == "Hk.G"));
    check_order_and_headers(&got);
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), got.len() + 3);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    for d in &got {
        let sig = d.headers["x-metalgraph-signature"].to_str().unwrap();
        let hex = sig.strip_prefix("sha256=").expect("sha256=<hex>");
        let tag: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        ring::hmac::verify(&key, &d.body, &tag).expect("the signature verifies");
        assert_eq!(d.headers["x-metalgraph-hook"], hook_id.as_str());
    }

    // The flaky hook's status: everything delivered, the last failure remembered.
    let (code, status) = api.get(&format!("/api/2.0/hooks/{hook_id}")).await;
    assert_eq!(code, 200, "{status}");
    let last_id = got.last().unwrap().json()["id"].clone();
    assert_eq!(status["status"]["delivered"], 7, "{status}");
    assert_eq!(status["status"]["backlog"], 0, "{status}");
    assert_eq!(status["status"]["lastEventId"], last_id, "{status}");
    assert_eq!(
        status["status"]["lastError"],
        "the receiver answered 500 Internal Server Error"
    );
    assert!(!status.to_string().contains(secret));

    // The silent receiver held up neither the workflow nor the other hook; it has every
    // event since it was registered waiting (Hk.Other's five and Hk.G's seven), the first
    // one timing out over and over.
    let dead = wait_hook(&api, &dead_id, |h| !h["status"]["lastError"].is_null()).await;
    assert_eq!(dead["status"]["delivered"], 0, "{dead}");
    assert_eq!(
        dead["status"]["lastError"], "no answer within 1000 ms",
        "{dead}"
    );
    assert_eq!(dead["status"]["backlog"], 5 + EXPECTED.len(), "{dead}");

    let (code, list) = api.get("/api/2.0/hooks").await;
    assert_eq!(code, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [hook_id.as_str(), dead_id.as_str()]);

    // Deleting the stuck hook stops its delivery at once.
    let (code, _) = api
        .send("DELETE", &format!("/api/2.0/hooks/{dead_id}"), None)
        .await;
    assert_eq!(code, 204);
    let (code, body) = api.get(&format!("/api/2.0/hooks/{dead_id}")).await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(
        body["error"]["message"],
        format!("hook {dead_id} not found")
    );
    drop(silent);
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_not_yet_delivered_survive_a_kill9() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::launch_with_env(data.path(), "sled", Launch::default(), &fast_retries());
    let api = server.api();
    put_graphs(&api).await;
    let (receiver, url) = Receiver::start(usize::MAX).await;
    let (code, hook) = create_hook(&api, json!({"url": url, "filters": {"graph": "Hk.G"}})).await;
    assert_eq!(code, 201, "{hook}");
    let id = api.run("Hk.G", None, json!({})).await;
    api.wait(&id, Duration::from_secs(30)).await;
    // The receiver has refused at least one delivery: the hook is stuck on the first event.
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.attempts.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no delivery was tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill9();

    receiver.fail.store(0, Ordering::SeqCst);
    let server = Server::launch_with_env(data.path(), "sled", Launch::default(), &fast_retries());
    let got = receiver
        .wait_for(|v| v["workflowId"] == id.as_str() && v["status"] == "succeeded")
        .await;
    assert_eq!(describe(&got), EXPECTED);
    check_order_and_headers(&got);
    assert!(
        got.iter()
            .all(|d| d.headers.get("x-metalgraph-signature").is_none())
    );
    let api = server.api();
    let (_, status) = api
        .get(&format!("/api/2.0/hooks/{}", hook["id"].as_str().unwrap()))
        .await;
    assert_eq!(status["status"]["delivered"], 7, "{status}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_are_refused_with_the_reason() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::launch(
        data.path(),
        "sled",
        Launch {
            rust_log: Some("info".into()),
            log: Some(data.path().join("server.log")),
            ..Launch::default()
        },
    );
    let api = server.api();
    for (body, message) in [
        (
            json!({"url": "ftp://example.test/x"}),
            "url ftp://example.test/x must be an http:// or https:// URL with a host",
        ),
        (
            json!({"url": "not a url"}),
            "url \"not a url\" is not a URL: relative URL without a base",
        ),
        (
            json!({"url": "http://a.test/", "secret": ""}),
            "secret must be 1 to 1024 bytes long",
        ),
        (
            json!({"url": "http://a.test/", "secret": "x".repeat(1025)}),
            "secret must be 1 to 1024 bytes long",
        ),
        (
            json!({"url": format!("http://a.test/{}", "x".repeat(2048))}),
            "url is longer than 2048 bytes",
        ),
        (
            json!({"url": "http://a.test/", "filters": {"nodes": "n1"}}),
            "invalid hook: unknown field `nodes`, expected one of `workflow`, `node`, `graph`",
        ),
        (
            json!({"url": "http://a.test/", "retries": 3}),
            "invalid hook: unknown field `retries`, expected one of `url`, `filters`, `secret`",
        ),
        (json!({}), "invalid hook: missing field `url`"),
    ] {
        let (code, got) = create_hook(&api, body.clone()).await;
        assert_eq!(code, 400, "{body}: {got}");
        assert_eq!(got["error"]["message"], message, "{body}");
    }
    // A password in the URL is the operator's secret: it is not shown back.
    let (code, hook) =
        create_hook(&api, json!({"url": "http://ops:pa55word@127.0.0.1:9/hook"})).await;
    assert_eq!(code, 201, "{hook}");
    assert!(!hook.to_string().contains("pa55word"), "{hook}");
    // Its deliveries fail (nothing listens on port 9), and the failure does not show it
    // either.
    put_graphs(&api).await;
    api.run("Hk.Other", None, json!({})).await;
    let id = hook["id"].as_str().unwrap();
    let failed = wait_hook(&api, id, |h| !h["status"]["lastError"].is_null()).await;
    assert!(!failed.to_string().contains("pa55word"), "{failed}");
    for _ in 1..64 {
        let (code, body) = create_hook(&api, json!({"url": "http://127.0.0.1:9/"})).await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, body) = create_hook(&api, json!({"url": "http://127.0.0.1:9/"})).await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(
        body["error"]["message"],
        "there are 64 hooks already, the most one server keeps; delete one first"
    );
    let (code, body) = api.send("DELETE", "/api/2.0/hooks/nope", None).await;
    assert_eq!(code, 404, "{body}");
    assert!(!server.logs().contains("pa55word"));
    server.terminate();
}
