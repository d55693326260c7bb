//! The Redfish driver's send path against axum fakes (no peer needed): credentials only go to
//! the BMC's own origin, whatever links, action targets, redirects or `systemId` say, and
//! the session login path keeps the per-endpoint concurrency limit and the body cap.
//!
//! Each test starts a fake BMC and a second listener, "elsewhere", on another port: a
//! hostile BMC's links point there. Elsewhere answers everything with a plausible document,
//! so a driver that followed a link would succeed; the tests assert it got no request.

mod bmc_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bmc_support::{World, obm};
use metalgraph_tasks::PowerJob;
use metalgraph_tasks::bmc::{Bmc, DriverOptions, Drivers, PowerAction, REDFISH_SERVICE};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const USER: &str = "admin";
const PASSWORD: &str = "Origin-Passw0rd";
const TOKEN: &str = "fake-session-token";
const SESSIONS: &str = "/redfish/v1/SessionService/Sessions";

/// How the fake BMC checks credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `Authorization: Basic ...` on everything but the service root.
    Basic,
    /// `X-Auth-Token` from a login at [`SESSIONS`]; the service root and the
    /// SessionService itself are open.
    Session,
}

/// A fake Redfish service serving fixed documents by path.
struct FakeBmc {
    auth: Auth,
    docs: HashMap<String, Value>,
    /// Paths answered with `307 Temporary Redirect` to the given location.
    redirects: HashMap<String, String>,
    /// How long every answer takes, so that concurrent requests overlap.
    delay: Duration,
    hits: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A running fake: its base URL and its counters.
struct Running {
    base: String,
    fake: Arc<FakeBmc>,
}

impl FakeBmc {
    fn new(auth: Auth, docs: Vec<(&str, Value)>) -> Self {
        let mut all: HashMap<String, Value> = HashMap::new();
        all.insert(
            "/redfish/v1/".to_owned(),
            json!({
                "Systems": { "@odata.id": "/redfish/v1/Systems" },
                "SessionService": { "@odata.id": "/redfish/v1/SessionService" },
            }),
        );
        all.insert(
            "/redfish/v1/SessionService".to_owned(),
            json!({ "Sessions": { "@odata.id": SESSIONS } }),
        );
        all.insert(
            "/redfish/v1/Systems".to_owned(),
            json!({ "Members": [{ "@odata.id": "/redfish/v1/Systems/1" }] }),
        );
        all.insert(
            "/redfish/v1/Systems/1".to_owned(),
            system_doc("/redfish/v1"),
        );
        // The test's documents replace the defaults.
        all.extend(docs.into_iter().map(|(p, d)| (p.to_owned(), d)));
        Self {
            auth,
            docs: all,
            redirects: HashMap::new(),
            delay: Duration::ZERO,
            hits: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    fn redirect(mut self, path: &str, location: &str) -> Self {
        self.redirects.insert(path.to_owned(), location.to_owned());
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    async fn start(self) -> Running {
        let fake = Arc::new(self);
        let app = Router::new().fallback(serve).with_state(fake.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Running {
            base: format!("http://{addr}"),
            fake,
        }
    }

    fn authorized(&self, path: &str, headers: &HeaderMap) -> bool {
        let open = match self.auth {
            Auth::Basic => ["/redfish/v1/"].contains(&path),
            Auth::Session => ["/redfish/v1/", "/redfish/v1/SessionService"].contains(&path),
        };
        let given = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        open || match self.auth {
            Auth::Basic => given(header::AUTHORIZATION).is_some_and(|a| a.starts_with("Basic ")),
            Auth::Session => given(header::HeaderName::from_static("x-auth-token")) == Some(TOKEN),
        }
    }
}

/// Decrements the fake's in-flight count when an answer is done.
struct InFlight<'a>(&'a FakeBmc);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(
    State(fake): State<Arc<FakeBmc>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.hits.fetch_add(1, Ordering::SeqCst);
    let now = fake.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    fake.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _done = InFlight(&fake);
    tokio::time::sleep(fake.delay).await;

    let path = uri.path();
    if method == Method::POST && path == SESSIONS {
        let creds: Value = serde_json::from_slice(&body).unwrap_or_default();
        if creds["UserName"] != USER || creds["Password"] != PASSWORD {
            return (StatusCode::UNAUTHORIZED, "bad credentials").into_response();
        }
        return (
            StatusCode::CREATED,
            [("X-Auth-Token", TOKEN)],
            axum::Json(json!({ "Id": "1" })),
        )
            .into_response();
    }
    if !fake.authorized(path, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    if let Some(location) = fake.redirects.get(path) {
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(header::LOCATION, location.clone())],
        )
            .into_response();
    }
    match (method, fake.docs.get(path)) {
        (Method::GET, Some(doc)) => axum::Json(doc.clone()).into_response(),
        (Method::POST | Method::PATCH, _) => StatusCode::NO_CONTENT.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A ComputerSystem document whose links and action target start with `prefix`.
fn system_doc(prefix: &str) -> Value {
    json!({
        "@odata.id": format!("{prefix}/Systems/1"),
        "Id": "1",
        "PowerState": "Off",
        "Actions": { "#ComputerSystem.Reset": {
            "target": format!("{prefix}/Systems/1/Actions/ComputerSystem.Reset")
        } }
    })
}

/// The other origin: counts every request and answers each with something a driver would
/// accept (a system that is on, a session token), so following a link there would succeed.
async fn elsewhere() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .fallback(|State(hits): State<Arc<AtomicUsize>>| async move {
            hits.fetch_add(1, Ordering::SeqCst);
            let mut doc = system_doc("/redfish/v1");
            doc["PowerState"] = json!("On");
            doc["Members"] = json!([{ "@odata.id": "/redfish/v1/Systems/1" }]);
            (
                StatusCode::OK,
                [("X-Auth-Token", "stolen")],
                axum::Json(doc),
            )
        })
        .with_state(hits.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hits)
}

/// The OBM settings for `base`, with sessions when `auth` is [`Auth::Session`].
fn config(base: &str, auth: Auth, system_id: Option<&str>) -> metalgraph_engine::nodes::ObmConfig {
    let mut cfg = obm(REDFISH_SERVICE, base, USER, PASSWORD, system_id).config;
    if auth == Auth::Session {
        cfg.extra.insert("auth".into(), json!("session"));
    }
    cfg
}

/// The two spellings of a link to another origin: absolute and scheme-relative.
fn spellings(elsewhere: &str) -> [String; 2] {
    [
        elsewhere.to_owned(),
        format!("//{}", elsewhere.trim_start_matches("http://")),
    ]
}

fn assert_refused(err: &str, operation: &str, link: &str) {
    assert!(
        err.contains(operation) && err.contains("leaves the BMC's origin") && err.contains(link),
        "the error must name the operation ({operation}) and the cross-origin link ({link}): {err}"
    );
    assert!(!err.contains(PASSWORD), "{err}");
}

#[tokio::test]
async fn system_links_to_another_origin_are_never_followed() {
    for auth in [Auth::Basic, Auth::Session] {
        let (evil, evil_hits) = elsewhere().await;
        for other in spellings(&evil) {
            let link = format!("{other}/redfish/v1/Systems/1");
            let bmc = FakeBmc::new(
                auth,
                vec![(
                    "/redfish/v1/Systems",
                    json!({ "Members": [{ "@odata.id": link }] }),
                )],
            )
            .start()
            .await;
            let d = Drivers::default();
            let driver = d.redfish("n1", &config(&bmc.base, auth, None)).unwrap();
            let err = driver.power_state().await.unwrap_err().to_string();
            eprintln!("{auth:?}, cross-origin system link: {err}");
            assert_refused(&err, "read power state", &link);
            assert!(
                bmc.fake.hits.load(Ordering::SeqCst) > 0,
                "the BMC itself was asked"
            );
        }
        assert_eq!(
            evil_hits.load(Ordering::SeqCst),
            0,
            "{auth:?}: a request reached the other origin"
        );
    }
}

#[tokio::test]
async fn the_session_login_never_posts_the_password_to_another_origin() {
    let (evil, evil_hits) = elsewhere().await;
    for other in spellings(&evil) {
        let sessions = format!("{other}/redfish/v1/SessionService/Sessions");
        // Both places a service names its Sessions collection.
        for root in [
            json!({
                "Systems": { "@odata.id": "/redfish/v1/Systems" },
                "Links": { "Sessions": { "@odata.id": sessions } },
            }),
            json!({
                "Systems": { "@odata.id": "/redfish/v1/Systems" },
                "SessionService": { "@odata.id": "/redfish/v1/SessionService" },
            }),
        ] {
            let bmc = FakeBmc::new(
                Auth::Session,
                vec![
                    ("/redfish/v1/", root),
                    (
                        "/redfish/v1/SessionService",
                        json!({ "Sessions": { "@odata.id": sessions } }),
                    ),
                ],
            )
            .start()
            .await;
            let d = Drivers::default();
            let driver = d
                .redfish("n1", &config(&bmc.base, Auth::Session, None))
                .unwrap();
            let err = driver.systems().await.unwrap_err().to_string();
            eprintln!("cross-origin Sessions collection: {err}");
            assert_refused(&err, "list systems", &sessions);
        }
    }
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_action_target_on_another_origin_is_refused() {
    let (evil, evil_hits) = elsewhere().await;
    for auth in [Auth::Basic, Auth::Session] {
        for other in spellings(&evil) {
            let mut system = system_doc("/redfish/v1");
            let target = format!("{other}/redfish/v1/Systems/1/Actions/ComputerSystem.Reset");
            system["Actions"]["#ComputerSystem.Reset"]["target"] = json!(target);
            let bmc = FakeBmc::new(auth, vec![("/redfish/v1/Systems/1", system)])
                .start()
                .await;
            let d = Drivers::default();
            let driver = d.redfish("n1", &config(&bmc.base, auth, None)).unwrap();
            let err = driver
                .power_action(PowerAction::On)
                .await
                .unwrap_err()
                .to_string();
            eprintln!("{auth:?}, cross-origin action target: {err}");
            assert_refused(&err, "power on", &target);
        }
    }
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_redirect_to_another_origin_is_not_followed() {
    let (evil, evil_hits) = elsewhere().await;
    for auth in [Auth::Basic, Auth::Session] {
        let location = format!("{evil}/redfish/v1/Systems/1");
        let bmc = FakeBmc::new(auth, vec![])
            .redirect("/redfish/v1/Systems/1", &location)
            .start()
            .await;
        let d = Drivers::default();
        let driver = d.redfish("n1", &config(&bmc.base, auth, None)).unwrap();
        let err = driver.power_state().await.unwrap_err().to_string();
        eprintln!("{auth:?}, cross-origin redirect: {err}");
        assert!(
            err.contains("read power state")
                && err.contains("redirect")
                && err.contains(&location)
                && err.contains("leaves the BMC's origin"),
            "{err}"
        );
    }
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0);

    // A redirect within the BMC's origin is still followed (sushy redirects a system's
    // name to its id).
    let bmc = FakeBmc::new(Auth::Session, vec![])
        .redirect("/redfish/v1/Systems/node-1", "/redfish/v1/Systems/1")
        .start()
        .await;
    let d = Drivers::default();
    let driver = d
        .redfish("n1", &config(&bmc.base, Auth::Session, Some("node-1")))
        .unwrap();
    assert_eq!(
        driver.power_state().await.unwrap(),
        metalgraph_tasks::bmc::PowerState::Off
    );
}

#[tokio::test]
async fn a_system_id_that_is_a_url_is_refused() {
    let (evil, evil_hits) = elsewhere().await;
    let bmc = FakeBmc::new(Auth::Basic, vec![]).start().await;
    let world = World::default();
    let job = PowerJob::new(Arc::new(Drivers::default()));
    for other in spellings(&evil) {
        let system_id = format!("{other}/x");
        let mut node_obm = obm(REDFISH_SERVICE, &bmc.base, USER, PASSWORD, None);
        node_obm.config = config(&bmc.base, Auth::Basic, Some(&system_id));
        let node = world.node("n1", node_obm);
        let err = world
            .run(&job, json!({ "action": "status" }), Some(&node))
            .await
            .unwrap_err();
        eprintln!("systemId as a URL: {err}");
        assert!(
            err.message.contains("systemId")
                && err.message.contains(&system_id)
                && err.message.contains("not a URL"),
            "{err}"
        );
        assert!(!err.message.contains(PASSWORD), "{err}");
    }
    assert_eq!(evil_hits.load(Ordering::SeqCst), 0);
    // A path on the BMC's own origin is still a valid systemId.
    let d = Drivers::default();
    let driver = d
        .redfish(
            "n1",
            &config(&bmc.base, Auth::Basic, Some("/redfish/v1/Systems/1")),
        )
        .unwrap();
    assert_eq!(
        driver.power_state().await.unwrap(),
        metalgraph_tasks::bmc::PowerState::Off
    );
}

#[tokio::test]
async fn the_session_service_answer_is_capped() {
    // Valid JSON that names the Sessions collection, padded past the 8 MiB cap: read
    // whole, it would be accepted.
    let padding = "x".repeat(9 * 1024 * 1024);
    let bmc = FakeBmc::new(
        Auth::Session,
        vec![(
            "/redfish/v1/SessionService",
            json!({ "Padding": padding, "Sessions": { "@odata.id": SESSIONS } }),
        )],
    )
    .start()
    .await;
    let d = Drivers::default();
    let driver = d
        .redfish("n1", &config(&bmc.base, Auth::Session, None))
        .unwrap();
    let err = driver.systems().await.unwrap_err().to_string();
    eprintln!("oversized SessionService: {err}");
    assert!(
        err.contains("list systems") && err.contains("larger than 8 MiB"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_login_path_keeps_the_concurrency_limit() {
    let bmc = FakeBmc::new(Auth::Session, vec![])
        .delay(Duration::from_millis(40))
        .start()
        .await;
    let d = Arc::new(Drivers::new(DriverOptions {
        per_endpoint_limit: 1,
        ..DriverOptions::default()
    }));
    let cfg = config(&bmc.base, Auth::Session, None);
    // Separate drivers of one endpoint: each discovers the SessionService and logs in.
    let mut runs = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let driver = d.redfish("n1", &cfg).unwrap();
        runs.spawn(async move { driver.systems().await });
    }
    while let Some(done) = runs.join_next().await {
        assert_eq!(done.unwrap().unwrap(), vec!["/redfish/v1/Systems/1"]);
    }
    assert!(bmc.fake.hits.load(Ordering::SeqCst) >= 4);
    assert_eq!(
        bmc.fake.max_in_flight.load(Ordering::SeqCst),
        1,
        "more requests than the per-endpoint limit were in flight at once"
    );
}
