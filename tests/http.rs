//! The management and node-facing HTTP APIs, driven through `app()` / `node_app()` with
//! `oneshot`, over a real engine on a temporary sled store.

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use metalgraph::api::{AppState, app, node_app};
use metalgraph_engine::job::{BoxFuture, JobContext, JobResult};
use metalgraph_engine::{ApiUrls, Engine, EngineOptions, Job, OptionSchema};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

#[path = "support/router.rs"]
mod router;
use router::raw;

/// The body limit the tests run with.
const LIMIT: usize = 64 * 1024;

/// A job that waits for the node's notification, as `wait.notification` does.
#[derive(Default)]
struct WaitForNode {
    schema: OptionSchema,
}

impl Job for WaitForNode {
    fn name(&self) -> &'static str {
        "test.wait-for-node"
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let services = ctx.services.clone();
        Box::pin(async move { services.wait_notification(&ctx).await })
    }

    fn occupies_slot(&self) -> bool {
        false
    }
}

struct Harness {
    app: Router,
    node_app: Router,
    engine: Engine,
    state: AppState,
    _dir: tempfile::TempDir,
    _stop: tokio_util::sync::DropGuard,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = metalgraph_store::open(metalgraph_store::Backend::Sled, dir.path())
        .expect("the store opens");
    let mut jobs = metalgraph::server::jobs();
    jobs.register(WaitForNode::default());
    let library = metalgraph::library::library().expect("the library loads");
    let stop = CancellationToken::new();
    let (engine, _task) = Engine::start(EngineOptions::new(store, jobs, library), stop.clone());
    let state = AppState::new(engine.clone(), LIMIT).expect("the state");
    // The harness's client holds an admin token and sends it with every management call.
    let token = state
        .tokens
        .create("test-admin", metalgraph::auth::Role::Admin)
        .await
        .expect("a token")
        .token;
    let bearer = axum::http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    let h = Harness {
        app: app(state.clone()).layer(axum::middleware::from_fn(
            move |mut req: axum::extract::Request, next: axum::middleware::Next| {
                req.headers_mut()
                    .insert(header::AUTHORIZATION, bearer.clone());
                next.run(req)
            },
        )),
        node_app: node_app(state.clone()),
        state,
        engine,
        _dir: dir,
        _stop: stop.drop_guard(),
    };
    // Every test builds on these task definitions, so that none depends on what the shipped
    // library holds.
    for (name, job, options) in [
        ("Test.Noop", "noop", json!({})),
        ("Test.Nap", "sleep", json!({"duration": "50ms"})),
        ("Test.Long", "sleep", json!({"duration": "30s"})),
        ("Test.WaitForNode", "test.wait-for-node", json!({})),
    ] {
        let def = json!({"injectableName": name, "implementsTask": job, "options": options});
        let (status, body) = h.put("/api/2.0/workflows/tasks", &def).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    h
}

/// One request: method, URI, optional content type, raw body.
async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let resp = app
        .clone()
        .oneshot(req.body(body.into()).expect("a request"))
        .await
        .expect("the router answers");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("a body");
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "{method} {uri}: a non-JSON body ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    (status, value)
}

impl Harness {
    async fn get(&self, uri: &str) -> (StatusCode, Value) {
        send(&self.app, "GET", uri, None, Body::empty()).await
    }

    async fn delete(&self, uri: &str) -> (StatusCode, Value) {
        send(&self.app, "DELETE", uri, None, Body::empty()).await
    }

    async fn json(&self, method: &str, uri: &str, body: &Value) -> (StatusCode, Value) {
        send(
            &self.app,
            method,
            uri,
            Some("application/json"),
            body.to_string(),
        )
        .await
    }

    async fn put(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.json("PUT", uri, body).await
    }

    async fn post(&self, uri: &str, body: &Value) -> (StatusCode, Value) {
        self.json("POST", uri, body).await
    }

    async fn put_graph(&self, graph: &Value) {
        let (status, body) = self.put("/api/2.0/workflows/graphs", graph).await;
        assert!(status.is_success(), "{status}: {body}");
    }

    /// Runs a graph and returns the workflow's id.
    async fn run(&self, uri: &str, body: &Value) -> String {
        let (status, view) = self.post(uri, body).await;
        assert_eq!(status, StatusCode::CREATED, "{view}");
        view["instanceId"]
            .as_str()
            .expect("an instance id")
            .to_owned()
    }

    /// Polls a workflow until `done` holds of it.
    async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, view) = self.get(&format!("/api/2.0/workflows/{id}")).await;
            assert_eq!(status, StatusCode::OK, "{view}");
            if done(&view) {
                return view;
            }
            assert!(
                Instant::now() < deadline,
                "workflow {id} never got there: {view}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_status(&self, id: &str, status: &str) -> Value {
        self.wait_for(id, |v| v["status"] == status || is_terminal(v))
            .await
    }
}

fn is_terminal(view: &Value) -> bool {
    matches!(
        view["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Checks the error shape and code, and returns the message.
fn error_of(body: &Value, code: &str) -> String {
    let err = &body["error"];
    assert_eq!(err["code"], code, "{body}");
    assert!(err["details"].is_array(), "{body}");
    err["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no message: {body}"))
        .to_owned()
}

fn one_task_graph(name: &str, task: &str) -> Value {
    json!({"injectableName": name, "tasks": [{"label": "only", "taskName": task}]})
}

fn chain_graph(name: &str) -> Value {
    json!({
        "injectableName": name,
        "friendlyName": "first, nap, last",
        "tasks": [
            {"label": "first", "taskName": "Test.Noop"},
            {"label": "nap", "taskName": "Test.Nap", "waitOn": {"first": "succeeded"}},
            {"label": "last", "taskName": "Test.Noop", "waitOn": {"nap": "succeeded"}},
        ]
    })
}

#[tokio::test]
async fn health_reports_the_store() {
    let h = harness().await;
    let (status, body) = h.get("/api/2.0/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"status": "ok", "store": "sled"}));
}

#[tokio::test]
async fn graphs_are_created_replaced_read_listed_and_deleted() {
    let h = harness().await;
    let graph = chain_graph("Graph.Test.Chain");
    let (status, body) = h.put("/api/2.0/workflows/graphs", &graph).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["source"], "user");
    assert_eq!(body["injectableName"], "Graph.Test.Chain");
    let (status, body) = h.put("/api/2.0/workflows/graphs", &graph).await;
    assert_eq!(status, StatusCode::OK, "a second PUT replaces: {body}");

    let (status, body) = h.get("/api/2.0/workflows/graphs/Graph.Test.Chain").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["tasks"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["source"], "user");

    let (status, list) = h.get("/api/2.0/workflows/graphs").await;
    assert_eq!(status, StatusCode::OK);
    let mine = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|g| g["injectableName"] == "Graph.Test.Chain")
        .expect("listed");
    assert_eq!(mine["source"], "user");

    // What GET returns can be stored back unchanged.
    let (status, _) = h.put("/api/2.0/workflows/graphs", &body).await;
    assert_eq!(status, StatusCode::OK);

    let (status, body) = h.delete("/api/2.0/workflows/graphs/Graph.Test.Chain").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = h.get("/api/2.0/workflows/graphs/Graph.Test.Chain").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body, "not_found").contains("Graph.Test.Chain"));
    let (status, body) = h.delete("/api/2.0/workflows/graphs/Graph.Test.Chain").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body, "not_found");
}

#[tokio::test]
async fn graphs_upload_as_yaml() {
    let h = harness().await;
    let yaml = "injectableName: Graph.Test.Yaml\n\
                options:\n  defaults: {}\n\
                tasks:\n  - label: a\n    taskName: Test.Noop\n  - label: b\n    taskName: Test.Nap\n    waitOn: {a: finished}\n";
    for (i, ct) in [
        "application/yaml",
        "application/x-yaml",
        "text/yaml; charset=utf-8",
    ]
    .into_iter()
    .enumerate()
    {
        let (status, body) = send(&h.app, "PUT", "/api/2.0/workflows/graphs", Some(ct), yaml).await;
        let want = if i == 0 {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        assert_eq!(status, want, "{ct}: {body}");
        assert_eq!(body["tasks"][1]["waitOn"], json!({"a": "finished"}));
    }
}

#[tokio::test]
async fn task_definitions_are_stored_and_read() {
    let h = harness().await;
    let (status, list) = h.get("/api/2.0/workflows/tasks").await;
    assert_eq!(status, StatusCode::OK);
    let list = list.as_array().expect("a list");
    assert!(
        list.iter()
            .any(|t| t["injectableName"] == "Test.Nap" && t["source"] == "user")
    );
    assert!(
        list.iter()
            .all(|t| t["source"] == "user" || t["source"] == "library"),
        "every task names its source"
    );

    let def = json!({"injectableName": "Test.Nap", "implementsTask": "sleep", "options": {"duration": "10ms"}});
    let (status, body) = h.put("/api/2.0/workflows/tasks", &def).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = h.get("/api/2.0/workflows/tasks/Test.Nap").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["options"]["duration"], "10ms");
    assert_eq!(body["source"], "user");

    let (status, body) = h.get("/api/2.0/workflows/tasks/Test.Missing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body, "not_found");

    let (status, body) = h
        .put(
            "/api/2.0/workflows/tasks",
            &json!({"injectableName": "Test.Gone", "implementsTask": "noop"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, _) = h.delete("/api/2.0/workflows/tasks/Test.Gone").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = h.delete("/api/2.0/workflows/tasks/Test.Gone").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body, "not_found");
    let (status, body) = h.delete("/api/2.0/workflows/tasks/Task.Noop").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "library definitions are read-only: {body}"
    );
    error_of(&body, "conflict");

    let bad = json!({"injectableName": "Test.Bad", "implementsTask": "no.such.job"});
    let (status, body) = h.put("/api/2.0/workflows/tasks", &bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    error_of(&body, "invalid_definition");
    assert_eq!(body["error"]["details"][0]["field"], "implementsTask");
    assert_eq!(body["error"]["details"][0]["task"], "Test.Bad");

    let bad = json!({"injectableName": "Test.BadOption", "implementsTask": "sleep", "options": {"duration": "soon"}});
    let (status, body) = h.put("/api/2.0/workflows/tasks", &bad).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["field"], "options.duration");
}

#[tokio::test]
async fn invalid_graphs_are_422_naming_graph_label_and_field() {
    let h = harness().await;
    let unknown_label = json!({
        "injectableName": "Graph.Test.BadWait",
        "tasks": [
            {"label": "a", "taskName": "Test.Noop"},
            {"label": "b", "taskName": "Test.Noop", "waitOn": {"zzz": "succeeded"}},
        ]
    });
    let (status, body) = h.put("/api/2.0/workflows/graphs", &unknown_label).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let message = error_of(&body, "invalid_definition");
    assert!(message.contains("zzz"), "{message}");
    let detail = &body["error"]["details"][0];
    assert_eq!(detail["graph"], "Graph.Test.BadWait");
    assert_eq!(detail["label"], "b");
    assert_eq!(detail["field"], "waitOn.zzz");

    let cycle = json!({
        "injectableName": "Graph.Test.Cycle",
        "tasks": [
            {"label": "a", "taskName": "Test.Noop", "waitOn": {"c": "succeeded"}},
            {"label": "b", "taskName": "Test.Noop", "waitOn": {"a": "succeeded"}},
            {"label": "c", "taskName": "Test.Noop", "waitOn": {"b": "succeeded"}},
        ]
    });
    let (status, body) = h.put("/api/2.0/workflows/graphs", &cycle).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        error_of(&body, "invalid_definition").contains("cycle"),
        "{body}"
    );
    assert_eq!(body["error"]["details"][0]["field"], "waitOn");
    assert!(body["error"]["details"][0]["label"].is_string());

    let unknown_task = one_task_graph("Graph.Test.NoTask", "Task.Does.Not.Exist");
    let (status, body) = h.put("/api/2.0/workflows/graphs", &unknown_task).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"]["details"][0]["field"], "taskName");

    // A body that is a mapping but not a graph's shape is a 422 naming the graph.
    let shapeless = json!({"injectableName": "Graph.Test.Shapeless", "tasks": "not a list"});
    let (status, body) = h.put("/api/2.0/workflows/graphs", &shapeless).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"]["details"][0]["graph"], "Graph.Test.Shapeless");

    let (status, body) = h.get("/api/2.0/workflows/graphs/Graph.Test.Cycle").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing invalid was stored: {body}"
    );
}

#[tokio::test]
async fn bad_bodies_get_400_413_and_415_in_the_error_shape() {
    let h = harness().await;
    let uri = "/api/2.0/workflows/graphs";

    let (status, body) = send(
        &h.app,
        "PUT",
        uri,
        Some("application/json"),
        "{\"injectableName\": ",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body, "bad_request").contains("malformed JSON"),
        "{body}"
    );

    let (status, body) = send(
        &h.app,
        "PUT",
        uri,
        Some("application/yaml"),
        "tasks: [a, b\nfoo: : :",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body, "bad_request").contains("malformed YAML"),
        "{body}"
    );

    let (status, body) = send(&h.app, "PUT", uri, Some("text/plain"), "hello").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(error_of(&body, "unsupported_media_type").contains("text/plain"));

    let (status, body) = send(&h.app, "PUT", uri, None, "{}").await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    error_of(&body, "unsupported_media_type");

    let huge = json!({"injectableName": "Graph.Test.Huge", "friendlyName": "x".repeat(LIMIT + 1), "tasks": []});
    let (status, body) = h.put(uri, &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error_of(&body, "payload_too_large").contains(&LIMIT.to_string()));

    let (status, body) = send(&h.app, "PUT", uri, Some("application/json"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an empty body: {body}");
    error_of(&body, "bad_request");

    let (status, body) = h
        .put(
            uri,
            &json!({"injectableName": "Task.X", "implementsTask": "noop"}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a task sent to graphs: {body}"
    );

    let (status, body) = h.get("/api/2.0/workflows?active=maybe").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    error_of(&body, "bad_request");
}

/// serde builds a struct from a list of its fields in order; the API takes mappings only.
/// Found by schemathesis (tests/openapi.rs): `filters: [null, null]` made a hook.
#[tokio::test]
async fn lists_where_mappings_belong_are_400() {
    let h = harness().await;
    for (method, uri, body) in [
        (
            "POST",
            "/api/2.0/hooks",
            json!({"url": "http://127.0.0.1:9/", "filters": [null, null]}),
        ),
        ("POST", "/api/2.0/hooks", json!(["http://127.0.0.1:9/"])),
        ("POST", "/api/2.0/nodes", json!(["n1"])),
        (
            "POST",
            "/api/2.0/nodes",
            json!({"name": "n1", "obms": [["sim-obm-service", {}]]}),
        ),
        (
            "POST",
            "/api/2.0/nodes",
            json!({"name": "n1", "obms": [{"service": "sim-obm-service", "config": ["sim"]}]}),
        ),
        ("POST", "/api/2.0/workflows", json!(["Graph.Test.Chain"])),
        (
            "PUT",
            "/api/2.0/workflows/graphs",
            json!({"injectableName": "Graph.Test.Lists", "tasks": [["only", "Test.Noop"]]}),
        ),
        (
            "PUT",
            "/api/2.0/workflows/graphs",
            json!({"injectableName": "Graph.Test.Lists",
                   "tasks": [{"label": "only", "taskName": "Test.Noop", "retries": [1]}]}),
        ),
    ] {
        let (status, body) = h.json(method, uri, &body).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {uri}: {status} {body}"
        );
    }
    let (_, hooks) = h.get("/api/2.0/hooks").await;
    assert_eq!(hooks, json!([]));
    let (_, nodes) = h.get("/api/2.0/nodes").await;
    assert_eq!(nodes, json!([]));
}

/// A PATCH without a body changes nothing (the OpenAPI document says the body is optional).
#[tokio::test]
async fn an_empty_patch_changes_nothing() {
    let h = harness().await;
    let (status, node) = h
        .json("POST", "/api/2.0/nodes", &json!({"name": "n1"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{node}");
    let uri = format!("/api/2.0/nodes/{}", node["id"].as_str().unwrap());
    let (status, after) = send(&h.app, "PATCH", &uri, None, Body::empty()).await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["name"], "n1");
    // A body that says null is not an empty one: the document says the body is a mapping.
    for (ct, doc) in [("application/json", "null"), ("application/yaml", "~\n")] {
        let (status, body) = send(&h.app, "PATCH", &uri, Some(ct), doc.to_owned()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{ct}: {body}");
        assert!(error_of(&body, "bad_request").contains("null"), "{body}");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let h = harness().await;
    let (status, body) = h.get("/api/2.0/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body, "not_found").contains("/api/2.0/nothing-here"));
    let (status, body) = h.delete("/api/2.0/workflows/tasks").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&body, "method_not_allowed");
}

#[tokio::test]
async fn a_small_graph_runs_to_success() {
    let h = harness().await;
    h.put_graph(&chain_graph("Graph.Test.Chain")).await;
    let (status, created) = h
        .post(
            "/api/2.0/workflows",
            &json!({"name": "Graph.Test.Chain", "options": {}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["name"], "Graph.Test.Chain");
    assert!(matches!(
        created["status"].as_str(),
        Some("pending" | "running")
    ));
    let id = created["instanceId"].as_str().expect("an id").to_owned();

    let view = h.wait_for(&id, is_terminal).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    let states: Vec<&str> = view["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| t["state"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(states, ["succeeded"; 3]);
    assert!(view["finishedAt"].is_string());

    let (_, finished) = h.get("/api/2.0/workflows?active=false").await;
    assert!(
        finished
            .as_array()
            .expect("a list")
            .iter()
            .any(|w| w["instanceId"] == id)
    );
    let (_, active) = h.get("/api/2.0/workflows?active=true").await;
    assert!(
        !active
            .as_array()
            .expect("a list")
            .iter()
            .any(|w| w["instanceId"] == id)
    );

    let (status, _) = h.delete(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = h.get(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body, "not_found");

    // RackHD clients may name the graph in the query.
    let id = h
        .run("/api/2.0/workflows?name=Graph.Test.Chain", &json!({}))
        .await;
    assert_eq!(h.wait_for(&id, is_terminal).await["status"], "succeeded");
}

/// A workflow's tasks show what they wait for as the graph wrote it, and when they ran:
/// what a client needs to draw the workflow's graph and its timing.
#[tokio::test]
async fn workflow_views_show_each_tasks_wait_and_timing() {
    let h = harness().await;
    let waits = [
        ("a", json!({})),
        ("b", json!({"a": "succeeded"})),
        ("c", json!({"a": ["failed", "timeout"]})),
        (
            "d",
            json!({"b": "finished", "anyOf": {"c": "succeeded", "a": "skipped"}}),
        ),
    ];
    let tasks: Vec<Value> = waits
        .iter()
        .map(|(label, wait)| {
            let mut t = json!({"label": label, "taskName": "Test.Noop"});
            if wait.as_object().is_some_and(|w| !w.is_empty()) {
                t["waitOn"] = wait.clone();
            }
            t
        })
        .collect();
    h.put_graph(&json!({"injectableName": "Graph.Test.Waits", "tasks": tasks}))
        .await;
    let id = h
        .run("/api/2.0/workflows", &json!({"name": "Graph.Test.Waits"}))
        .await;
    let view = h.wait_for(&id, is_terminal).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    for (i, (label, wait)) in waits.iter().enumerate() {
        let task = &view["tasks"][i];
        assert_eq!(task["label"], *label, "{view}");
        assert_eq!(task["waitOn"], *wait, "task {label}: {task}");
        assert_eq!(task["taskName"], "Test.Noop", "task {label}: {task}");
    }
    // `c` could never start (a succeeded): it was skipped, never started.
    assert_eq!(view["tasks"][2]["state"], "skipped", "{view}");
    assert!(view["tasks"][2]["startedAt"].is_null(), "{view}");
    let a = &view["tasks"][0];
    for field in ["startedAt", "finishedAt"] {
        let at = a[field].as_str().unwrap_or_default();
        assert!(
            at.len() == 24 && at.ends_with('Z'),
            "{field} of task a is RFC 3339 with milliseconds: {a}"
        );
    }
    assert!(a["startedAt"].as_str() <= a["finishedAt"].as_str(), "{a}");
}

#[tokio::test]
async fn run_requests_are_checked() {
    let h = harness().await;
    h.put_graph(&json!({
        "injectableName": "Graph.Test.NeedsUrl",
        "options": {"defaults": {"imageUrl": null}},
        "tasks": [{"label": "only", "taskName": "Test.Noop"}],
    }))
    .await;

    let (status, body) = h
        .post(
            "/api/2.0/workflows",
            &json!({"name": "Graph.Test.NeedsUrl"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        error_of(&body, "bad_request").contains("imageUrl"),
        "{body}"
    );
    // The details name the graph and the field, for programs.
    assert_eq!(
        body["error"]["details"][0]["graph"], "Graph.Test.NeedsUrl",
        "{body}"
    );
    assert_eq!(
        body["error"]["details"][0]["field"], "options.defaults.imageUrl",
        "{body}"
    );

    let ok = json!({"name": "Graph.Test.NeedsUrl", "options": {"defaults": {"imageUrl": "http://x/a.iso"}}});
    let id = h.run("/api/2.0/workflows", &ok).await;
    assert_eq!(h.wait_for(&id, is_terminal).await["status"], "succeeded");

    for (body, what) in [
        (
            json!({"name": "Graph.Test.NeedsUrl", "options": [1, 2]}),
            "options",
        ),
        (
            json!({"name": "Graph.Test.NeedsUrl", "options": {"defaults": 3}}),
            "options.defaults",
        ),
        (json!({"options": {}}), "name"),
        (
            json!({"name": "Graph.Test.NeedsUrl", "optoins": {}}),
            "optoins",
        ),
    ] {
        let (status, resp) = h.post("/api/2.0/workflows", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {resp}");
        assert!(error_of(&resp, "bad_request").contains(what), "{resp}");
    }

    let (status, body) = h
        .post("/api/2.0/workflows", &json!({"name": "Graph.Test.Nope"}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body, "not_found").contains("Graph.Test.Nope"));

    let (status, body) = h
        .post(
            "/api/2.0/nodes/no-such-node/workflows",
            &json!({"name": "Graph.Test.NeedsUrl", "options": {"defaults": {"imageUrl": "x"}}}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body, "not_found").contains("no-such-node"));
}

#[tokio::test]
async fn a_running_workflow_is_cancelled_and_cannot_be_deleted_before() {
    let h = harness().await;
    h.put_graph(&one_task_graph("Graph.Test.Long", "Test.Long"))
        .await;
    let id = h
        .run("/api/2.0/workflows", &json!({"name": "Graph.Test.Long"}))
        .await;
    h.wait_for(&id, |v| v["tasks"][0]["state"] == "running")
        .await;

    let (status, body) = h.delete(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body, "conflict").contains(&id));

    let action = format!("/api/2.0/workflows/{id}/action");
    let (status, body) = h.put(&action, &json!({"command": "pause"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body, "bad_request").contains("pause"));

    let (status, view) = h.put(&action, &json!({"command": "cancel"})).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{view}");
    assert_eq!(view["instanceId"], id);
    // The answer comes once the workflow has ended.
    assert_eq!(view["status"], "cancelled", "{view}");
    let view = h.wait_for(&id, is_terminal).await;
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["tasks"][0]["state"], "cancelled");

    let (status, body) = h.put(&action, &json!({"command": "cancel"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "a finished workflow: {body}");
    let (status, _) = h.delete(&format!("/api/2.0/workflows/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let (status, body) = h
        .put(
            "/api/2.0/workflows/no-such-id/action",
            &json!({"command": "cancel"}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    error_of(&body, "not_found");
}

#[tokio::test]
async fn a_busy_node_refuses_a_second_workflow() {
    let h = harness().await;
    h.put_graph(&one_task_graph("Graph.Test.Long", "Test.Long"))
        .await;
    let (status, node) = h
        .post(
            "/api/2.0/nodes",
            &json!({"id": "n1", "name": "rack1-u1", "identifiers": ["AA-BB-CC-DD-EE-01"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{node}");
    assert_eq!(node["identifiers"], json!(["aa:bb:cc:dd:ee:01"]));

    let id = h
        .run(
            "/api/2.0/nodes/n1/workflows",
            &json!({"name": "Graph.Test.Long", "options": {}}),
        )
        .await;
    let (status, body) = h
        .post(
            "/api/2.0/nodes/n1/workflows",
            &json!({"name": "Graph.Test.Long"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body, "conflict").contains("n1"));
    let (status, body) = h
        .post(
            "/api/2.0/workflows",
            &json!({"name": "Graph.Test.Long", "node": "n1"}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    let (status, body) = h.delete("/api/2.0/nodes/n1").await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a busy node is not deleted: {body}"
    );

    for uri in [
        "/api/2.0/workflows?node=n1",
        "/api/2.0/workflows?active=true&node=n1",
        "/api/2.0/nodes/n1/workflows",
    ] {
        let (status, list) = h.get(uri).await;
        assert_eq!(status, StatusCode::OK);
        let ids: Vec<&Value> = list
            .as_array()
            .expect("a list")
            .iter()
            .map(|w| &w["instanceId"])
            .collect();
        assert_eq!(ids, [&json!(id)], "{uri}");
    }
    let (_, others) = h.get("/api/2.0/workflows?node=n2").await;
    assert_eq!(others, json!([]));

    let (status, _) = h
        .put(
            &format!("/api/2.0/workflows/{id}/action"),
            &json!({"command": "cancel"}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(h.wait_status(&id, "cancelled").await["status"], "cancelled");
    let (status, body) = h.delete("/api/2.0/nodes/n1").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
}

#[tokio::test]
async fn nodes_are_managed_and_obm_passwords_never_shown() {
    const SECRET: &str = "s3cret-Passw0rd";
    let h = harness().await;
    let shown = |v: &Value| v.to_string().contains(SECRET);

    let node = json!({
        "id": "bmc-1",
        "name": "rack1-u2",
        "identifiers": ["52:54:00:00:00:02"],
        "tags": ["rack1"],
        "obms": [{"service": "redfish-obm-service", "config": {"host": "https://10.0.0.2", "user": "root", "password": SECRET}}],
    });
    let (status, created) = h.post("/api/2.0/nodes", &node).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert!(!shown(&created));
    assert_eq!(created["obms"][0]["config"]["passwordSet"], true);
    assert_eq!(created["type"], "compute");

    let (status, body) = h.post("/api/2.0/nodes", &node).await;
    assert_eq!(status, StatusCode::CONFLICT, "the id is taken: {body}");
    assert!(!shown(&body));

    let (status, body) = h.get("/api/2.0/nodes/bmc-1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!shown(&body));
    assert_eq!(body["obms"][0]["config"]["user"], "root");
    let (status, body) = h.get("/api/2.0/nodes").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.as_array().map(Vec::len), Some(1));
    assert!(!shown(&body));
    let (status, body) = h.get("/api/2.0/nodes/bmc-1/obm").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!shown(&body));
    assert_eq!(body[0]["config"]["passwordSet"], true);

    // A PATCH that round-trips the OBM without its password keeps the stored one.
    let patch = json!({"name": "rack1-u2-renamed", "tags": ["rack1", "gpu"], "obms": body});
    let (status, patched) = send(
        &h.app,
        "PATCH",
        "/api/2.0/nodes/bmc-1",
        Some("application/json"),
        patch.to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{patched}");
    assert_eq!(patched["name"], "rack1-u2-renamed");
    assert_eq!(patched["tags"], json!(["rack1", "gpu"]));
    assert_eq!(
        patched["identifiers"],
        json!(["52:54:00:00:00:02"]),
        "fields not given stay"
    );
    assert_eq!(patched["obms"][0]["config"]["passwordSet"], true);
    assert!(!shown(&patched));
    let stored = h
        .engine
        .nodes()
        .get("bmc-1")
        .await
        .expect("readable")
        .expect("present");
    assert_eq!(
        stored.obms[0].config.password.as_ref().map(|p| p.expose()),
        Some(SECRET)
    );

    // PUT obm without a password keeps it for the same host, drops it for a new host.
    let same = json!({"service": "redfish-obm-service", "config": {"host": "https://10.0.0.2", "user": "admin"}});
    let (status, obms) = h.put("/api/2.0/nodes/bmc-1/obm", &same).await;
    assert_eq!(status, StatusCode::OK, "{obms}");
    assert_eq!(obms[0]["config"]["user"], "admin");
    assert_eq!(obms[0]["config"]["passwordSet"], true);
    // Pointing the OBM at another BMC without a password is refused: the stored password
    // is only ever sent to the BMC it was given for.
    let moved = json!({"service": "redfish-obm-service", "config": {"host": "https://10.0.0.9"}});
    let (status, body) = h.put("/api/2.0/nodes/bmc-1/obm", &moved).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let msg = error_of(&body, "bad_request");
    assert!(
        msg.contains("obms[0].config.password") && msg.contains("host or port"),
        "{msg}"
    );
    let moved_port = json!({"service": "redfish-obm-service", "config": {"host": "https://10.0.0.2", "port": 8443}});
    let (status, _) = h.put("/api/2.0/nodes/bmc-1/obm", &moved_port).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let stored = h.engine.nodes().get("bmc-1").await.unwrap().unwrap();
    assert_eq!(
        stored.obms[0].config.host, "https://10.0.0.2",
        "nothing changed"
    );
    let moved = json!({"service": "redfish-obm-service", "config": {"host": "https://10.0.0.9", "password": "new-one"}});
    let (status, obms) = h.put("/api/2.0/nodes/bmc-1/obm", &moved).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(obms[0]["config"]["passwordSet"], true);
    // A systemId is an id or a path on the BMC, never a URL.
    let url_id = json!({"service": "redfish-obm-service", "config": {"host": "https://10.0.0.9", "systemId": "http://attacker:9/x"}});
    let (status, body) = h.put("/api/2.0/nodes/bmc-1/obm", &url_id).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error_of(&body, "bad_request").contains("systemId"),
        "{body}"
    );
    let ipmi =
        json!({"service": "ipmi-obm-service", "config": {"host": "10.0.1.9", "password": SECRET}});
    let (status, obms) = h.put("/api/2.0/nodes/bmc-1/obm", &ipmi).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!shown(&obms));
    assert_eq!(obms.as_array().map(Vec::len), Some(2));
    assert_eq!(obms[1]["config"]["passwordSet"], true);

    let (status, body) = h
        .put(
            "/api/2.0/nodes/bmc-1/obm",
            &json!({"config": {"host": "x"}}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "an OBM needs a service: {body}"
    );

    // Catalogs.
    let (status, body) = h.get("/api/2.0/nodes/bmc-1/catalogs").await;
    assert_eq!((status, body), (StatusCode::OK, json!([])));
    h.engine
        .nodes()
        .put_catalog("bmc-1", "redfish", &json!({"Model": "R650"}))
        .await
        .expect("a catalog is stored");
    let (status, body) = h.get("/api/2.0/nodes/bmc-1/catalogs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body[0]["source"], "redfish");
    let (status, body) = h.get("/api/2.0/nodes/bmc-1/catalogs/redfish").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"]["Model"], "R650");
    let (status, body) = h.get("/api/2.0/nodes/bmc-1/catalogs/dmi").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body, "not_found").contains("dmi"));

    // Bad input and unknown nodes.
    let (status, body) = h.post("/api/2.0/nodes", &json!({"identifiers": []})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body, "bad_request").contains("name"));
    let (status, body) = h
        .post(
            "/api/2.0/nodes",
            &json!({"name": "other", "identifiers": ["52:54:00:00:00:02"]}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a MAC belongs to one node: {body}"
    );
    for (method, uri) in [
        ("GET", "/api/2.0/nodes/ghost"),
        ("DELETE", "/api/2.0/nodes/ghost"),
        ("GET", "/api/2.0/nodes/ghost/obm"),
        ("GET", "/api/2.0/nodes/ghost/catalogs"),
        ("GET", "/api/2.0/nodes/ghost/catalogs/redfish"),
        ("GET", "/api/2.0/nodes/ghost/workflows"),
    ] {
        let (status, body) = send(&h.app, method, uri, None, Body::empty()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {uri}");
        assert!(error_of(&body, "not_found").contains("ghost"), "{body}");
    }
    let (status, _) = send(
        &h.app,
        "PATCH",
        "/api/2.0/nodes/ghost",
        Some("application/json"),
        "{\"name\": \"x\"}",
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = h.put("/api/2.0/nodes/ghost/obm", &same).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, _) = h.delete("/api/2.0/nodes/bmc-1").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = h.get("/api/2.0/nodes/bmc-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn node_notifications_reach_the_waiting_task() {
    let h = harness().await;
    let notify = |query: &str, body: Value| {
        let app = h.node_app.clone();
        let uri = format!("/api/2.0/notification{query}");
        async move {
            send(
                &app,
                "POST",
                &uri,
                Some("application/json"),
                body.to_string(),
            )
            .await
        }
    };

    let (status, body) = notify("", json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "no token, no node: {body}");
    error_of(&body, "bad_request");
    // No token from a request that does not prove it is the node: as a wrong token.
    let (status, body) = notify("?nodeId=n1", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no token: {body}");
    let (status, nothing_waits) = notify("?nodeId=n1&token=abc", json!({})).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing waits: {nothing_waits}"
    );
    error_of(&nothing_waits, "not_found");

    h.put_graph(&one_task_graph("Graph.Test.Callback", "Test.WaitForNode"))
        .await;
    let (status, _) = h
        .post("/api/2.0/nodes", &json!({"id": "n1", "name": "n1"}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = h
        .run(
            "/api/2.0/nodes/n1/workflows",
            &json!({"name": "Graph.Test.Callback"}),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        if let Some((_, token)) = h.engine.waiting_token("n1") {
            break token;
        }
        assert!(Instant::now() < deadline, "the task never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // A wrong token is answered exactly like a node on which nothing waits, so that no
    // caller learns which nodes wait.
    let (status, body) = notify("?nodeId=n1&token=abc", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a wrong token: {body}");
    assert_eq!(body, nothing_waits);
    // The token may come in the body; it never reaches the task's output.
    let (status, body) = notify("?nodeId=n1", json!({"token": token, "installed": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["task"], "only");

    let view = h.wait_for(&id, is_terminal).await;
    assert_eq!(view["status"], "succeeded", "{view}");
    assert_eq!(view["context"]["only"], json!({"installed": true}));

    let (status, body) = send(
        &h.node_app,
        "GET",
        "/api/2.0/workflows",
        None,
        Body::empty(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the node-facing API serves no management paths: {body}"
    );
    error_of(&body, "not_found");
}

/// The node-facing router with a files and a templates directory.
fn node_app_with(h: &Harness, files: &std::path::Path, templates: &std::path::Path) -> Router {
    node_app(AppState {
        files_dir: Some(files.to_owned()),
        templates_dir: Some(templates.to_owned()),
        api: ApiUrls {
            base: "http://mg:8080/api/2.0".into(),
            node_base: "http://mg:8090/api/2.0".into(),
        },
        ..h.state.clone()
    })
}

#[tokio::test]
async fn node_files_serve_ranges_and_stay_inside_the_root() {
    let h = harness().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let root = dir.path().join("files");
    std::fs::create_dir_all(root.join("sub")).expect("dirs");
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(root.join("boot.img"), &data).expect("a file");
    std::fs::write(root.join("sub/a.txt"), "a").expect("a file");
    std::fs::write(dir.path().join("secret"), "top-secret-content").expect("a file");
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).expect("a link");
    let app = node_app_with(&h, &root, dir.path());
    let header = |h: &axum::http::HeaderMap, k: header::HeaderName| {
        h.get(k)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };

    let (status, hs, body) = raw(&app, "GET", "/files/boot.img", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, data);
    assert_eq!(header(&hs, header::CONTENT_LENGTH), "1000");
    assert_eq!(header(&hs, header::ACCEPT_RANGES), "bytes");
    assert_eq!(
        header(&hs, header::CONTENT_TYPE),
        "application/octet-stream"
    );
    let (status, hs, body) = raw(&app, "GET", "/files/sub/a.txt", &[]).await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, b"a".as_slice()));
    assert!(header(&hs, header::CONTENT_TYPE).starts_with("text/plain"));

    for (range, start, end) in [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=900-5000", 900, 999),
    ] {
        let (status, hs, body) = raw(&app, "GET", "/files/boot.img", &[("range", range)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(body, &data[start..=end], "{range}");
        assert_eq!(
            header(&hs, header::CONTENT_RANGE),
            format!("bytes {start}-{end}/1000"),
            "{range}"
        );
        assert_eq!(
            header(&hs, header::CONTENT_LENGTH),
            (end - start + 1).to_string()
        );
    }
    let (status, hs, _) = raw(&app, "GET", "/files/boot.img", &[("range", "bytes=1000-")]).await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&hs, header::CONTENT_RANGE), "bytes */1000");
    // Several ranges are not served as multipart: the whole file comes back.
    let (status, _, body) = raw(
        &app,
        "GET",
        "/files/boot.img",
        &[("range", "bytes=0-1,5-6")],
    )
    .await;
    assert_eq!((status, body.len()), (StatusCode::OK, 1000));

    let (status, hs, body) = raw(&app, "HEAD", "/files/boot.img", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.is_empty());
    assert_eq!(header(&hs, header::CONTENT_LENGTH), "1000");
    let (status, hs, body) = raw(&app, "HEAD", "/files/boot.img", &[("range", "bytes=0-9")]).await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert!(body.is_empty());
    assert_eq!(header(&hs, header::CONTENT_LENGTH), "10");

    for (uri, want) in [
        ("/files/../secret", StatusCode::FORBIDDEN),
        ("/files/sub/..%2F..%2Fsecret", StatusCode::FORBIDDEN),
        ("/files/%2Fetc%2Fpasswd", StatusCode::FORBIDDEN),
        ("/files/out", StatusCode::FORBIDDEN),
        ("/files/sub", StatusCode::NOT_FOUND),
        ("/files/missing.iso", StatusCode::NOT_FOUND),
    ] {
        let (status, _, body) = raw(&app, "GET", uri, &[]).await;
        assert_eq!(status, want, "{uri}: {}", String::from_utf8_lossy(&body));
        assert!(
            !String::from_utf8_lossy(&body).contains("top-secret"),
            "{uri}"
        );
    }
    // Without a files directory nothing is served.
    let (status, _, _) = raw(&h.node_app, "GET", "/files/boot.img", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Files larger than several read chunks (64 KiB) come back whole and in ranges that cross
/// chunk boundaries, byte for byte.
#[tokio::test]
async fn node_files_stream_large_files_and_ranges_across_chunks() {
    let h = harness().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let root = dir.path().join("files");
    std::fs::create_dir_all(&root).expect("dirs");
    let data: Vec<u8> = (0..1_100_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(root.join("image.iso"), &data).expect("a file");
    let app = node_app_with(&h, &root, dir.path());

    let (status, hs, body) = raw(&app, "GET", "/files/image.iso", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hs[header::CONTENT_LENGTH], "1100000");
    assert!(
        body == data,
        "the whole file differs ({} bytes)",
        body.len()
    );
    for (range, start, end) in [
        ("bytes=262000-262300", 262_000, 262_300),
        ("bytes=0-524288", 0, 524_288),
        ("bytes=300000-", 300_000, 1_099_999),
        ("bytes=-786433", 313_567, 1_099_999),
    ] {
        let (status, hs, body) = raw(&app, "GET", "/files/image.iso", &[("range", range)]).await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            hs[header::CONTENT_RANGE],
            format!("bytes {start}-{end}/1100000").as_str(),
            "{range}"
        );
        assert!(body == data[start..=end], "{range}: the bytes differ");
    }
}

/// Downloads beyond `max_file_transfers` get a 503 with Retry-After while the others are
/// in progress; HEAD takes no slot; a finished (or abandoned) download frees its slot.
#[tokio::test]
async fn node_files_beyond_the_transfer_bound_get_503_with_retry_after() {
    let h = harness().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let root = dir.path().join("files");
    std::fs::create_dir_all(&root).expect("dirs");
    std::fs::write(root.join("image.iso"), vec![7u8; 600_000]).expect("a file");
    let app = node_app(AppState {
        files_dir: Some(root.clone()),
        file_transfers: metalgraph::api::files::FileTransfers::new(1),
        ..h.state.clone()
    });
    let get = |uri: &str| {
        Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("a request")
    };

    // The first download is in progress while its body is unread.
    let first = app
        .clone()
        .oneshot(get("/files/image.iso"))
        .await
        .expect("an answer");
    assert_eq!(first.status(), StatusCode::OK);

    let (status, hs, body) = raw(&app, "GET", "/files/image.iso", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(hs[header::RETRY_AFTER], "5");
    let err: Value = serde_json::from_slice(&body).expect("a JSON error");
    assert_eq!(err["error"]["code"], "too_many_file_transfers", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("limits.max_file_transfers")),
        "{err}"
    );
    // A range is a download too; HEAD and refusals are not.
    let (status, _, _) = raw(&app, "GET", "/files/image.iso", &[("range", "bytes=0-9")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, hs, _) = raw(&app, "HEAD", "/files/image.iso", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(hs[header::CONTENT_LENGTH], "600000");
    let (status, _, _) = raw(&app, "GET", "/files/missing.iso", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Read to its end, the first download frees its slot.
    let body = axum::body::to_bytes(first.into_body(), usize::MAX)
        .await
        .expect("the body");
    assert_eq!(body.len(), 600_000);
    let (status, _, body) = raw(&app, "GET", "/files/image.iso", &[]).await;
    assert_eq!((status, body.len()), (StatusCode::OK, 600_000));

    // So does one the client abandons.
    let abandoned = app
        .clone()
        .oneshot(get("/files/image.iso"))
        .await
        .expect("an answer");
    assert_eq!(abandoned.status(), StatusCode::OK);
    let (status, _, _) = raw(&app, "GET", "/files/image.iso", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    drop(abandoned);
    let (status, _, _) = raw(&app, "GET", "/files/image.iso", &[]).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn templates_render_for_a_node_with_its_waiting_token() {
    let h = harness().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let kickstart = include_str!("../templates/kickstart-callback.ks");
    std::fs::write(dir.path().join("kickstart-callback.ks"), kickstart).expect("a template");
    std::fs::write(
        dir.path().join("plain.txt"),
        "{{ node.name }} {{ node.macs[0] }} {{ api.nodeBase }} {{ api.files }}",
    )
    .expect("a template");
    std::fs::write(dir.path().join("broken.txt"), "{{ nope.nothing }}").expect("a template");
    let app = node_app_with(&h, dir.path(), dir.path());
    let node = json!({
        "id": "n1", "name": "rack1-u1", "identifiers": ["52:54:00:aa:bb:01"],
        "obms": [{"service": "redfish-obm-service", "config": {"host": "10.0.0.5", "user": "root", "password": "hunter2"}}]
    });
    let (status, _) = h.post("/api/2.0/nodes", &node).await;
    assert_eq!(status, StatusCode::CREATED);
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8");

    let (status, hs, body) = raw(&app, "GET", "/api/2.0/templates/plain.txt?nodeId=n1", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        hs[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(
        text(body),
        "rack1-u1 52:54:00:aa:bb:01 http://mg:8090/api/2.0 http://mg:8090/files"
    );
    for (uri, want) in [
        ("/api/2.0/templates/plain.txt", StatusCode::BAD_REQUEST),
        (
            "/api/2.0/templates/plain.txt?nodeId=ghost",
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/2.0/templates/none.ks?nodeId=n1",
            StatusCode::NOT_FOUND,
        ),
        (
            "/api/2.0/templates/..%2Fsecret?nodeId=n1",
            StatusCode::FORBIDDEN,
        ),
        (
            "/api/2.0/templates/broken.txt?nodeId=n1",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
    ] {
        let (status, _, body) = raw(&app, "GET", uri, &[]).await;
        assert_eq!(status, want, "{uri}: {}", text(body));
    }
    // Nothing waits for the node yet, so the callback cannot be rendered.
    let ks = "/api/2.0/templates/kickstart-callback.ks?nodeId=n1";
    let (status, _, body) = raw(&app, "GET", ks, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let body: Value = serde_json::from_slice(&body).expect("JSON");
    assert!(
        error_of(&body, "conflict").contains("notification"),
        "{body}"
    );

    h.put_graph(&one_task_graph("Graph.Test.Callback", "Test.WaitForNode"))
        .await;
    let id = h
        .run(
            "/api/2.0/nodes/n1/workflows",
            &json!({"name": "Graph.Test.Callback"}),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let token = loop {
        if let Some((_, token)) = h.engine.waiting_token("n1") {
            break token;
        }
        assert!(Instant::now() < deadline, "the task never waited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Without the node's capability, the kickstart answers as if nothing waited.
    let (status, _, body) = raw(&app, "GET", ks, &[]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{}", text(body));
    let cap = h.engine.waiting_task("n1").await.expect("it waits").cap;
    let with_cap = format!("{ks}&cap={}", cap.as_str());
    let (status, _, body) = raw(&app, "GET", &with_cap, &[]).await;
    let rendered = text(body);
    assert_eq!(status, StatusCode::OK, "{rendered}");
    assert!(
        rendered.contains(&format!(
            "'http://mg:8090/api/2.0/notification?nodeId=n1&token={token}'"
        )),
        "{rendered}"
    );
    assert!(rendered.contains("--hostname=rack1-u1"), "{rendered}");
    assert!(!rendered.contains("hunter2"), "{rendered}");
    assert!(!rendered.contains("{{"), "{rendered}");

    let uri = format!("/api/2.0/notification?nodeId=n1&token={token}");
    let (status, body) = send(&app, "POST", &uri, Some("application/json"), "{}").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view = h.wait_for(&id, is_terminal).await;
    assert_eq!(view["status"], "succeeded", "{view}");
}

#[test]
fn every_shipped_definition_validates_against_the_registered_jobs() {
    let library = metalgraph::library::library().expect("the library loads");
    let files: Vec<(String, String)> = metalgraph::library::LIBRARY_FILES
        .iter()
        .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
        .collect();
    assert!(!files.is_empty(), "the library is embedded");
    let reports = metalgraph::validate::validate(&files, &library, &metalgraph::server::jobs());
    let problems: Vec<String> = reports
        .iter()
        .flat_map(|r| r.problems.iter().map(ToString::to_string))
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn workflow_lists_page_with_top_skip_and_a_next_link() {
    let h = harness().await;
    let (status, body) = h
        .put(
            "/api/2.0/workflows/graphs",
            &json!({"injectableName": "Graph.Test.One", "tasks": [{"label": "a", "taskName": "Test.Noop"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let mut made = Vec::new();
    for _ in 0..5 {
        made.push(
            h.run("/api/2.0/workflows", &json!({"name": "Graph.Test.One"}))
                .await,
        );
    }
    let (_, all) = h.get("/api/2.0/workflows?graph=Graph.Test.One").await;
    let newest_first: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instanceId"].as_str().unwrap())
        .collect();
    let mut sorted = newest_first.clone();
    sorted.sort();
    let mut want = made.clone();
    want.sort();
    assert_eq!(sorted, want);

    // Page by page through the Link header: 2, 2, 1, the same order, no link on the last.
    let mut uri = "/api/2.0/workflows?graph=Graph.Test.One&$top=2".to_owned();
    let mut pages = Vec::new();
    loop {
        let (status, headers, body) = raw(&h.app, "GET", &uri, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let page: Vec<String> = serde_json::from_slice::<Vec<Value>>(&body)
            .unwrap()
            .iter()
            .map(|w| w["instanceId"].as_str().unwrap().to_owned())
            .collect();
        pages.push(page);
        match headers.get(header::LINK) {
            None => break,
            Some(link) => {
                let link = link.to_str().unwrap();
                let next = link
                    .strip_prefix('<')
                    .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                    .unwrap_or_else(|| panic!("{link}"));
                assert!(
                    next.starts_with("/api/2.0/workflows?graph=Graph.Test.One&$top=2&cursor="),
                    "{next}"
                );
                uri = next.to_owned();
            }
        }
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [2, 2, 1]);
    assert_eq!(pages.concat(), newest_first);

    // RackHD's $skip.
    let (_, skipped) = h
        .get("/api/2.0/workflows?graph=Graph.Test.One&$skip=3&$top=10")
        .await;
    let skipped: Vec<&str> = skipped
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instanceId"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, newest_first[3..]);

    for (query, message) in [
        ("$top=0", "a page holds 1 to 1000 workflows, not 0"),
        ("$top=5000", "a page holds 1 to 1000 workflows, not 5000"),
        ("cursor=zz", "cursor \"zz\" is not one this server gave"),
        (
            "createdAfter=yesterday",
            "createdAfter \"yesterday\" is not an RFC 3339 time like 2026-12-01T00:00:00Z",
        ),
    ] {
        let (status, body) = h.get(&format!("/api/2.0/workflows?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(error_of(&body, "bad_request"), message, "{query}");
    }
    let (status, body) = h.get("/api/2.0/workflows?status=sleeping").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        error_of(&body, "bad_request").contains("sleeping"),
        "{body}"
    );
}

#[tokio::test]
async fn definition_lists_page_in_name_order_with_user_definitions_shadowing_the_library() {
    let h = harness().await;
    // User graphs interleaved with the library's names, one shadowing a library graph.
    for name in [
        "Graph.AAA.User",
        "Graph.Reboot.Node",
        "Graph.Zzz.User",
        "Graph.M.User",
    ] {
        let (status, body) = h
            .put(
                "/api/2.0/workflows/graphs",
                &json!({"injectableName": name, "tasks": [{"label": "a", "taskName": "Test.Noop"}]}),
            )
            .await;
        assert!(status.is_success(), "{name}: {body}");
    }
    let names = |v: &Value| -> Vec<(String, String)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["injectableName"].as_str().unwrap().to_owned(),
                    g["source"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (status, all) = h.get("/api/2.0/workflows/graphs?$top=1000").await;
    assert_eq!(status, StatusCode::OK);
    let all = names(&all);
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "name order");
    assert!(
        all.contains(&("Graph.Reboot.Node".into(), "user".into())),
        "{all:?}"
    );
    assert_eq!(
        all.iter().filter(|(n, _)| n == "Graph.Reboot.Node").count(),
        1,
        "shadowed, not listed twice"
    );

    // Page by page through the Link header: the same list, pages of 3.
    let mut uri = "/api/2.0/workflows/graphs?$top=3".to_owned();
    let mut paged = Vec::new();
    loop {
        let (status, headers, body) = raw(&h.app, "GET", &uri, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let page = names(&serde_json::from_slice(&body).unwrap());
        assert!(page.len() <= 3);
        paged.extend(page);
        match headers.get(header::LINK) {
            None => break,
            Some(link) => {
                let link = link.to_str().unwrap();
                uri = link
                    .strip_prefix('<')
                    .and_then(|l| l.strip_suffix(">; rel=\"next\""))
                    .unwrap_or_else(|| panic!("{link}"))
                    .to_owned();
            }
        }
    }
    assert_eq!(paged, all);
    // RackHD's $skip, and the bounds.
    let (_, skipped) = h.get("/api/2.0/workflows/graphs?$skip=2&$top=2").await;
    assert_eq!(names(&skipped), all[2..4]);
    let (status, body) = h.get("/api/2.0/workflows/tasks?$top=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.to_string().contains("1 to 1000"), "{body}");
    let (status, tasks) = h.get("/api/2.0/workflows/tasks?$top=2").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tasks.as_array().unwrap().len(), 2);
}

/// Follows a list's `Link: rel="next"` from `first`: every page, each link checked to
/// start with `prefix` (the path under `/api/2.0`, as a client must call it).
async fn pages(app: &Router, first: &str, prefix: &str) -> Vec<Vec<Value>> {
    let mut uri = first.to_owned();
    let mut pages = Vec::new();
    loop {
        let (status, headers, body) = raw(app, "GET", &uri, &[]).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        pages.push(serde_json::from_slice::<Vec<Value>>(&body).unwrap());
        let Some(link) = headers.get(header::LINK) else {
            return pages;
        };
        let link = link.to_str().unwrap();
        let next = link
            .strip_prefix('<')
            .and_then(|l| l.strip_suffix(">; rel=\"next\""))
            .unwrap_or_else(|| panic!("{link}"));
        assert!(next.starts_with(prefix), "{next}");
        uri = next.to_owned();
    }
}

#[tokio::test]
async fn endpoint_and_batch_lists_page_through_their_next_links() {
    let h = harness().await;
    // Endpoints in id order, whatever their names.
    let mut ids = Vec::new();
    for i in (0..5).rev() {
        let (status, ep) = h
            .post(
                "/api/2.0/endpoints",
                &json!({"name": format!("ep-{i}"), "service": "ipmi", "url": format!("10.0.0.{i}")}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{ep}");
        ids.push(ep["id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    let got = pages(
        &h.app,
        "/api/2.0/endpoints?$top=2",
        "/api/2.0/endpoints?$top=2&cursor=",
    )
    .await;
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    let listed: Vec<String> = got
        .concat()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, ids);

    // Batches newest first.
    let (status, body) = h
        .put(
            "/api/2.0/workflows/graphs",
            &one_task_graph("Graph.Test.One", "Test.Noop"),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, node) = h
        .post(
            "/api/2.0/nodes",
            &json!({"id": "n-batch", "name": "n-batch"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{node}");
    let mut made = Vec::new();
    for _ in 0..3 {
        let (status, b) = h
            .post(
                "/api/2.0/batches",
                &json!({"name": "Graph.Test.One", "nodes": ["n-batch"], "maxConcurrent": 1}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{b}");
        made.push(b["id"].as_str().unwrap().to_owned());
    }
    made.reverse();
    let got = pages(
        &h.app,
        "/api/2.0/batches?$top=2",
        "/api/2.0/batches?$top=2&cursor=",
    )
    .await;
    assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
    let listed: Vec<String> = got
        .concat()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, made);
}
