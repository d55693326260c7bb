//! Replicas of the real binary on one PostgreSQL database (docs/scale-out.md), in a
//! throwaway cluster this test process starts, with leases shortened to 3 s: three
//! replicas share the work; a token made through one works on another and one revoked
//! through another is refused everywhere; runs of one node through two replicas at once get
//! one 201 and one 409; SIGKILL of the replica driving running workflows, and SIGSTOP of one
//! past its lease, leave every workflow ending as it would have, taken over by the others,
//! and the stopped one writes nothing once it wakes; a callback posted to a replica that
//! does not drive the waiting task completes it; gRPC `Watch` on a replica that does not
//! drive a workflow sees its every transition in order; a webhook registered and deleted
//! through replicas that do not lead is delivered once per event by the one that does; a
//! database restart loses nothing.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metalgraph::api::grpc::pb;
use metalgraph_engine::ownership::partition_of;
use metalgraph_testkit::postgres;
use pb::workflows_client::WorkflowsClient;
use serde_json::json;
use support::{Api, Launch, Server, describe_event};

const LIMIT: Duration = Duration::from_secs(60);

const TTL_MS: u64 = 3_000;

const NAP: &str = r#"
injectableName: Nap
tasks:
  - {label: first, taskName: Task.Wait, optionOverrides: {duration: 2s}}
  - {label: second, taskName: Task.Wait, optionOverrides: {duration: 500ms}, waitOn: {first: succeeded}}
"#;

const CALL: &str = r#"
injectableName: Call
tasks:
  - {label: call, taskName: Task.Wait.Notification}
"#;

/// One replica: its data directory (replica id, secret key, token, TLS), its process and
/// its gRPC port.
struct Replica {
    dir: PathBuf,
    server: Option<Server>,
    grpc: u16,
}

impl Replica {
    fn start(dir: &Path, url: &str) -> Replica {
        std::fs::create_dir_all(dir).unwrap();
        let grpc = metalgraph_testkit::free_tcp_port();
        let grpc_listen = format!("127.0.0.1:{grpc}");
        let ttl = TTL_MS.to_string();
        let renew = (TTL_MS / 3).to_string();
        let scan = (TTL_MS / 6).to_string();
        let server = Server::launch_with_env(
            dir,
            "postgres",
            Launch {
                args: [
                    "--demo",
                    "--node-listen",
                    "127.0.0.1:0",
                    "--grpc-listen",
                    &grpc_listen,
                ]
                .map(str::to_owned)
                .to_vec(),
                rust_log: Some("warn".into()),
                log: Some(dir.join("serve.log")),
            },
            &[
                ("METALGRAPH_DATABASE_URL", url),
                ("METALGRAPH_LEASE_TTL_MS", &ttl),
                ("METALGRAPH_LEASE_RENEW_MS", &renew),
                ("METALGRAPH_LEASE_SCAN_MS", &scan),
            ],
        );
        Replica {
            dir: dir.to_owned(),
            server: Some(server),
            grpc,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().expect("the replica runs")
    }

    fn api(&self) -> Api {
        Api::from_data_dir(&self.server().base, &self.dir)
    }

    fn id(&self) -> String {
        std::fs::read_to_string(self.dir.join("replica-id"))
            .expect("the replica id")
            .trim()
            .to_owned()
    }
}

/// Three data directories sharing the first one's secret key and admin token, as the
/// replicas of one deployment do.
fn data_dirs(root: &Path) -> Vec<PathBuf> {
    (0..3).map(|i| root.join(format!("r{i}"))).collect()
}

fn share_secrets(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for file in ["secret.key", "admin.token"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

/// The replica id holding each partition's lease, from the database.
fn owners(pg: &metalgraph_testkit::Postgres, schema: &str) -> BTreeMap<u32, String> {
    let rows = pg.sql(
        "metalgraph",
        &format!(
            "SELECT convert_from(key, 'UTF8') || ' ' || convert_from(value, 'UTF8') \
             FROM {schema}.metalgraph_kv WHERE keyspace = 'partitions' \
             AND convert_from(key, 'UTF8') LIKE 'lease/%' ORDER BY key"
        ),
    );
    rows.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(' ')?;
            let p = key.strip_prefix("lease/")?.parse().ok()?;
            let lease: serde_json::Value = serde_json::from_str(value).ok()?;
            Some((p, lease["owner"].as_str()?.to_owned()))
        })
        .collect()
}

/// A digest of every workflow and task record in the database.
fn records(pg: &metalgraph_testkit::Postgres, schema: &str) -> String {
    pg.sql(
        "metalgraph",
        &format!(
            "SELECT count(*) || ' ' || md5(string_agg(keyspace || encode(key, 'hex') || \
             encode(value, 'hex'), ',' ORDER BY keyspace, key)) \
             FROM {schema}.metalgraph_kv WHERE keyspace IN ('workflows', 'tasks')"
        ),
    )
}

/// Runs `Nap` on each node through the live replicas in turn, and waits until each
/// workflow's first task runs. Returns the workflow ids.
async fn naps(replicas: &[Replica], nodes: &[String]) -> Vec<String> {
    let live: Vec<&Replica> = replicas.iter().filter(|r| r.server.is_some()).collect();
    let mut wfs = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let api = live[i % live.len()].api();
        wfs.push(api.run("Nap", Some(node), json!({})).await);
    }
    let api = live[0].api();
    for id in &wfs {
        api.wait_task(id, "first", "running", LIMIT).await;
    }
    wfs
}

/// Waits until every workflow of `wfs` has succeeded, asking `api`.
async fn all_succeed(api: &Api, wfs: &[String]) {
    for id in wfs {
        let wf = api.wait(id, LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{wf:#}");
    }
}

/// The index of the replica that drives `node`'s workflows, and a client of another one.
fn driver(
    pg: &metalgraph_testkit::Postgres,
    schema: &str,
    replicas: &[Replica],
    node: &str,
) -> (usize, Api) {
    let owner = owners(pg, schema)[&partition_of(node)].clone();
    let i = replicas
        .iter()
        .position(|r| r.server.is_some() && r.id() == owner)
        .unwrap_or_else(|| panic!("no live replica drives {node}"));
    let other = replicas
        .iter()
        .enumerate()
        .find(|(j, r)| *j != i && r.server.is_some())
        .map(|(_, r)| r.api())
        .expect("another live replica");
    (i, other)
}

/// Waits until every partition is held by one of `live`, none above its share.
async fn held_by(pg: &metalgraph_testkit::Postgres, schema: &str, live: &[String]) {
    let deadline = Instant::now() + LIMIT;
    let share = 65usize.div_ceil(live.len());
    loop {
        let o = owners(pg, schema);
        let most = live
            .iter()
            .map(|id| o.values().filter(|v| *v == id).count())
            .max()
            .unwrap_or(0);
        if o.len() == 65 && o.values().all(|id| live.contains(id)) && most <= share {
            return;
        }
        assert!(Instant::now() < deadline, "partitions never settled: {o:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_work_and_survive_kill_stop_and_a_database_restart() {
    let pg = postgres();
    let url = pg.store_url();
    let schema = url
        .rsplit("search_path%3D")
        .next()
        .expect("the schema in the URL")
        .to_owned();
    let root = tempfile::tempdir().unwrap();
    let dirs = data_dirs(root.path());
    let mut replicas = vec![Replica::start(&dirs[0], &url)];
    for dir in &dirs[1..] {
        share_secrets(&dirs[0], dir);
        replicas.push(Replica::start(dir, &url));
    }
    let ids: Vec<String> = replicas.iter().map(Replica::id).collect();
    held_by(pg, &schema, &ids).await;
    // Each replica's health names it and its share; one of them leads.
    let mut leading = 0;
    for r in &replicas {
        let (code, health) = r.api().get("/api/2.0/health").await;
        assert_eq!(code, 200, "{health}");
        assert_eq!(health["replica"]["id"], r.id().as_str(), "{health}");
        let share = health["replica"]["partitions"].as_u64().unwrap();
        assert!((1..=22).contains(&share), "{health}");
        leading += usize::from(health["replica"]["leads"] == true);
    }
    assert_eq!(leading, 1);
    let api0 = replicas[0].api();
    let (code, body) = api0.put_yaml("/api/2.0/workflows/graphs", NAP).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = api0.put_yaml("/api/2.0/workflows/graphs", CALL).await;
    assert_eq!(code, 201, "{body}");

    // A token made through one replica works on another, and one revoked through another
    // is refused everywhere, within a second or so.
    let (code, made) = replicas[1]
        .api()
        .send(
            "POST",
            "/api/2.0/tokens",
            Some(json!({"name": "ops", "role": "viewer"})),
        )
        .await;
    assert_eq!(code, 201, "{made}");
    let secret = made["token"].as_str().unwrap().to_owned();
    let status_with = |r: &Replica, secret: String| {
        let client = r.server().http_as(Some(&secret));
        let url = r.server().url("/api/2.0/workflows");
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    let until = |want: u16, r: usize| {
        let (replicas, secret) = (&replicas, secret.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let got = status_with(&replicas[r], secret.clone()).await;
                if got == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "replica {r} answers {got}, not {want}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    until(200, 2).await;
    let (code, body) = replicas[2]
        .api()
        .send("DELETE", "/api/2.0/tokens/ops", None)
        .await;
    assert_eq!(code, 204, "{body}");
    until(401, 1).await;
    until(401, 0).await;

    // (3) One node, two replicas, at once: exactly one run is created.
    let (a, b) = (replicas[1].api(), replicas[2].api());
    let path = "/api/2.0/nodes/demo-node-07/workflows";
    let body = json!({"name": "Nap"});
    let (ra, rb) = tokio::join!(
        a.send("POST", path, Some(body.clone())),
        b.send("POST", path, Some(body.clone()))
    );
    let mut codes = [ra.0, rb.0];
    codes.sort_unstable();
    assert_eq!(codes, [201, 409], "{ra:?} {rb:?}");

    // (1) Workflows run through every replica; the replica driving one of them is killed
    // while they run.
    let nodes: Vec<String> = (1..=6).map(|i| format!("demo-node-{i:02}")).collect();
    let wfs = naps(&replicas, &nodes).await;
    let (victim, survivor) = driver(pg, &schema, &replicas, &nodes[0]);
    let killed = Instant::now();
    replicas[victim].server.take().unwrap().kill9();
    all_succeed(&survivor, &wfs).await;
    // Taken over within the lease and a few scans, far inside the 30 s promised.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "{:?}",
        killed.elapsed()
    );
    let live: Vec<String> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, id)| id.clone())
        .collect();
    held_by(pg, &schema, &live).await;
    // The killed replica comes back with its id and takes its share again.
    replicas[victim] = Replica::start(&dirs[victim], &url);
    let deadline = Instant::now() + LIMIT;
    while !owners(pg, &schema).values().any(|o| *o == ids[victim]) {
        assert!(
            Instant::now() < deadline,
            "the restarted replica took nothing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let api0 = replicas[0].api();

    // (2) A replica frozen past its lease: the others take its workflows over and finish
    // them; once it wakes it writes nothing.
    let wfs = naps(&replicas, &nodes).await;
    let (frozen, awake) = driver(pg, &schema, &replicas, &nodes[1]);
    replicas[frozen].server().signal("STOP");
    all_succeed(&awake, &wfs).await;
    let before = records(pg, &schema);
    replicas[frozen].server().signal("CONT");
    tokio::time::sleep(Duration::from_millis(3 * TTL_MS)).await;
    assert_eq!(
        records(pg, &schema),
        before,
        "the replica that woke wrote to the workflows"
    );
    let logs = replicas[frozen].server().logs();
    assert!(
        logs.contains("another replica has taken over a partition")
            || logs.contains("lost the leases of partitions"),
        "the woken replica noticed it lost its partitions:\n{logs}"
    );

    // (4) A callback posted to a replica that does not drive the waiting task.
    let node = "demo-node-08";
    let id = api0.run("Call", Some(node), json!({})).await;
    api0.wait_task(&id, "call", "running", LIMIT).await;
    let (driving, _) = driver(pg, &schema, &replicas, node);
    let other = replicas
        .iter()
        .enumerate()
        .find(|(i, _)| *i != driving)
        .map(|(_, r)| r)
        .unwrap();
    let token = call_token(&url, &dirs[0].join("secret.key"), &id);
    let callback = other.server().node_url(&format!(
        "/api/2.0/notification?nodeId={node}&token={token}"
    ));
    let r = reqwest::Client::new()
        .post(&callback)
        .json(&json!({"done": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let wf = api0.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");

    // gRPC Watch on a replica that does not drive a workflow sees its every transition,
    // in order.
    let node = "demo-node-04";
    let (driving, _) = driver(pg, &schema, &replicas, node);
    let watcher = replicas
        .iter()
        .enumerate()
        .find(|(i, _)| *i != driving)
        .map(|(_, r)| r)
        .unwrap();
    let mut watch = WorkflowsClient::new(watcher.server().grpc(watcher.grpc).await)
        .watch(pb::WatchRequest {
            workflow_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = replicas[driving]
        .api()
        .run("Nap", Some(node), json!({}))
        .await;
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(LIMIT, watch.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .expect("the stream stays open");
        match ev.event.unwrap() {
            pb::watch_event::Event::Workflow(w) if w.workflow_id == id => {
                let status = pb::WorkflowStatus::try_from(w.status).unwrap();
                seen.push(format!("wf:{}", status.as_str_name()));
                if status == pb::WorkflowStatus::Succeeded {
                    break;
                }
            }
            pb::watch_event::Event::Task(t) if t.workflow_id == id => seen.push(format!(
                "{}:{}",
                t.label,
                pb::TaskState::try_from(t.state).unwrap().as_str_name()
            )),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "wf:WORKFLOW_STATUS_PENDING",
            "wf:WORKFLOW_STATUS_RUNNING",
            "first:TASK_STATE_RUNNING",
            "first:TASK_STATE_SUCCEEDED",
            "second:TASK_STATE_RUNNING",
            "second:TASK_STATE_SUCCEEDED",
            "wf:WORKFLOW_STATUS_SUCCEEDED"
        ]
    );

    // A webhook registered through a replica that does not lead is delivered once per
    // event by the one that does, and deleting it through another stops its deliveries.
    let leader = owners(pg, &schema)[&64].clone();
    let others: Vec<&Replica> = replicas.iter().filter(|r| r.id() != leader).collect();
    let (received, hook_url) = receiver().await;
    let (code, hook) = others[0]
        .api()
        .send("POST", "/api/2.0/hooks", Some(json!({"url": hook_url})))
        .await;
    assert_eq!(code, 201, "{hook}");
    let hook_id = hook["id"].as_str().unwrap().to_owned();
    // The leader starts delivering it within a second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wfs = naps(&replicas, &nodes[..3]).await;
    all_succeed(&api0, &wfs).await;
    let deadline = Instant::now() + LIMIT;
    loop {
        let got = received.lock().unwrap().clone();
        let ended = |id: &String| {
            got.iter()
                .any(|e| e["workflowId"] == id.as_str() && describe_event(e) == "wf:succeeded")
        };
        if wfs.iter().all(ended) {
            let mut ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
            let n = ids.len();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), n, "no event was delivered twice");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every end was delivered: {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, listed) = others[1].api().get("/api/2.0/hooks").await;
    assert_eq!(code, 200, "{listed}");
    assert_eq!(listed[0]["id"], hook_id.as_str(), "{listed}");
    let (code, body) = others[1]
        .api()
        .send("DELETE", &format!("/api/2.0/hooks/{hook_id}"), None)
        .await;
    assert_eq!(code, 204, "{body}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let delivered = received.lock().unwrap().len();
    let wfs = naps(&replicas, &nodes[..1]).await;
    all_succeed(&api0, &wfs).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        received.lock().unwrap().len(),
        delivered,
        "the deleted hook was still delivered"
    );

    // (5) The database restarts under running workflows: nothing acknowledged is lost and
    // the replicas reconnect by themselves.
    let wfs = naps(&replicas, &nodes).await;
    pg.restart_immediate();
    all_succeed(&api0, &wfs).await;
    for r in &replicas {
        let (code, health) = r.api().get("/api/2.0/health").await;
        assert_eq!(code, 200, "{health}");
    }
}

/// A webhook receiver on a free loopback port: every body it took, and its URL.
async fn receiver() -> (
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    String,
) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<serde_json::Value>| {
            let kept = kept.clone();
            async move {
                kept.lock().unwrap().push(body.0);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (got, url)
}

/// The notification token of workflow `id`'s waiting task, as its node is shown it: here
/// read from the database with the replicas' key, since the test is not the node.
fn call_token(url: &str, key: &Path, id: &str) -> String {
    use metalgraph_engine::seal::{SealedStore, Sealer};
    use metalgraph_store::{PgOptions, PgStore};
    let store = PgStore::open(&PgOptions {
        url: url.to_owned(),
        ca_pem: None,
    })
    .unwrap();
    let sealer = std::sync::Arc::new(Sealer::load_or_create(key).unwrap());
    let sealed = SealedStore::wrap(std::sync::Arc::new(store), sealer);
    let raw = sealed
        .get("tasks", format!("{id}/00000").as_bytes())
        .unwrap()
        .expect("the task record");
    let task: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    task["token"].as_str().expect("a token").to_owned()
}
