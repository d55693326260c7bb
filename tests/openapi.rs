//! The OpenAPI documents against the real binary: `GET /api/2.0/openapi.json` (the
//! management API) and `?api=node` (the node-facing API) are valid OpenAPI 3.1 as
//! openapi-spec-validator reads it; their paths and methods are exactly the routes below,
//! and each is served by a handler, not by the router's "no route" or "method not allowed"
//! fallbacks; and schemathesis, fuzzing both APIs of a seeded server for a bounded time,
//! finds no server error and no answer the documents do not describe.
//!
//! The fuzzing runs inside a network namespace of its own (`unshare --net`, root only):
//! the server and schemathesis share a fresh loopback and nothing else, so whatever the
//! fuzzer registers — a webhook, an `http.request` task, a Redfish or IPMI BMC at any
//! address — can reach nothing outside it, not even other servers on this machine's
//! loopback. The test binary re-executes itself there, like the pxe crate's netns tests.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Api, Launch, Server};

/// Every route of the management API as (method, OpenAPI path): the one list the document
/// is checked against. The router and the document come from the same handler list
/// (`http::management_routes`), so a route cannot be served undocumented; this list makes
/// every change of the API's surface a deliberate one.
const MANAGEMENT_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/2.0/health"),
    ("GET", "/api/2.0/openapi.json"),
    ("GET", "/api/2.0/events"),
    ("GET", "/api/2.0/workflows/graphs"),
    ("PUT", "/api/2.0/workflows/graphs"),
    ("GET", "/api/2.0/workflows/graphs/{name}"),
    ("DELETE", "/api/2.0/workflows/graphs/{name}"),
    ("GET", "/api/2.0/workflows/tasks"),
    ("PUT", "/api/2.0/workflows/tasks"),
    ("GET", "/api/2.0/workflows/tasks/{name}"),
    ("DELETE", "/api/2.0/workflows/tasks/{name}"),
    ("GET", "/api/2.0/workflows"),
    ("POST", "/api/2.0/workflows"),
    ("GET", "/api/2.0/workflows/{id}"),
    ("DELETE", "/api/2.0/workflows/{id}"),
    ("PUT", "/api/2.0/workflows/{id}/action"),
    ("GET", "/api/2.0/nodes"),
    ("POST", "/api/2.0/nodes"),
    ("GET", "/api/2.0/nodes/{id}"),
    ("PATCH", "/api/2.0/nodes/{id}"),
    ("DELETE", "/api/2.0/nodes/{id}"),
    ("GET", "/api/2.0/nodes/{id}/workflows"),
    ("POST", "/api/2.0/nodes/{id}/workflows"),
    ("GET", "/api/2.0/nodes/{id}/obm"),
    ("PUT", "/api/2.0/nodes/{id}/obm"),
    ("GET", "/api/2.0/nodes/{id}/catalogs"),
    ("GET", "/api/2.0/nodes/{id}/catalogs/{source}"),
    ("GET", "/api/2.0/hooks"),
    ("POST", "/api/2.0/hooks"),
    ("GET", "/api/2.0/hooks/{id}"),
    ("DELETE", "/api/2.0/hooks/{id}"),
    ("GET", "/api/2.0/tokens"),
    ("POST", "/api/2.0/tokens"),
    ("DELETE", "/api/2.0/tokens/{name}"),
    ("GET", "/api/2.0/audit"),
    ("GET", "/api/2.0/endpoints"),
    ("POST", "/api/2.0/endpoints"),
    ("GET", "/api/2.0/endpoints/{id}"),
    ("PATCH", "/api/2.0/endpoints/{id}"),
    ("DELETE", "/api/2.0/endpoints/{id}"),
    ("GET", "/api/2.0/endpoints/{id}/systems"),
    ("POST", "/api/2.0/endpoints/{id}/discover"),
    ("GET", "/api/2.0/systems"),
    ("GET", "/api/2.0/batches"),
    ("POST", "/api/2.0/batches"),
    ("GET", "/api/2.0/batches/{id}"),
    ("PUT", "/api/2.0/batches/{id}/action"),
    ("GET", "/metrics"),
];

/// Every route of the node-facing API, as above.
const NODE_ROUTES: &[(&str, &str)] = &[
    ("GET", "/api/2.0/notification"),
    ("POST", "/api/2.0/notification"),
    ("GET", "/api/2.0/profiles"),
    ("GET", "/api/2.0/templates/{name}"),
    ("GET", "/files/{path}"),
    ("HEAD", "/files/{path}"),
    ("GET", "/boot/{path}"),
    ("HEAD", "/boot/{path}"),
];

/// The methods a probe tries on every documented path. HEAD is left out: axum answers it
/// on every GET route (and `/files` documents it), OPTIONS and TRACE nobody serves.
const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

/// The python of the peers' venv (scripts/install-peers.sh), with schemathesis and
/// openapi-spec-validator.
fn venv_bin(name: &str) -> std::path::PathBuf {
    let python = metalgraph_testkit::venv_python();
    python.with_file_name(name)
}

async fn fetch_document(server: &Server, query: &str) -> Value {
    let resp = server
        .http()
        .get(server.url(&format!("/api/2.0/openapi.json{query}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    resp.json().await.unwrap()
}

/// Validates a document with openapi-spec-validator; panics with its report.
fn validate(doc: &Value, dir: &Path, name: &str) {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    let out = Command::new(metalgraph_testkit::venv_python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .expect("the venv's python runs");
    assert!(
        out.status.success(),
        "openapi-spec-validator refused {name}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The (method, path) pairs a document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in [
            "get", "put", "post", "delete", "patch", "head", "options", "trace",
        ] {
            if item.get(method).is_some() {
                out.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    out
}

fn expected(routes: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    routes
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect()
}

/// A concrete URL path for an OpenAPI path: every parameter becomes `probe`.
fn concrete(path: &str) -> String {
    let mut out = String::new();
    let mut rest = path;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').expect("a closing brace") + open;
        out.push_str("probe");
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Whether an answer came from the router's fallbacks rather than a handler.
fn from_fallback(status: u16, body: &Value) -> bool {
    let code = body["error"]["code"].as_str().unwrap_or("");
    let message = body["error"]["message"].as_str().unwrap_or("");
    status == 405
        || code == "method_not_allowed"
        || (code == "not_found" && message.starts_with("no route for"))
}

/// Sends `method` to `base + path` and returns the status and, except for HEAD and the
/// endless event stream, the JSON body (null when not JSON).
async fn probe(http: &reqwest::Client, base: &str, method: &str, path: &str) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = http
        .request(m, format!("{base}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let status = resp.status().as_u16();
    let is_stream = resp
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if method == "HEAD" || is_stream {
        return (status, Value::Null);
    }
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Checks one document against its route list and the live listener at `base`.
async fn check_routes(http: &reqwest::Client, doc: &Value, routes: &[(&str, &str)], base: &str) {
    assert_eq!(
        operations(doc),
        expected(routes),
        "the document's operations differ from the route list"
    );
    let paths: BTreeSet<&str> = routes.iter().map(|(_, p)| *p).collect();
    for path in paths {
        let url_path = concrete(path);
        for &method in METHODS.iter().chain(["HEAD"].iter()) {
            let documented = routes.contains(&(method, path));
            if !documented && method == "HEAD" {
                continue;
            }
            let (status, body) = probe(http, base, method, &url_path).await;
            if documented {
                assert!(
                    !from_fallback(status, &body),
                    "{method} {path} is documented, but {url_path} reached a fallback: {status} {body}"
                );
            } else {
                assert_eq!(
                    (status, body["error"]["code"].as_str()),
                    (405, Some("method_not_allowed")),
                    "{method} {path} is not documented, but is served: {body}"
                );
            }
        }
    }
}

/// Every operation answers a success and describes its errors with the common body; every
/// request body is JSON or YAML.
fn check_shapes(doc: &Value) {
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{method} {path} documents no success"
            );
            for (status, response) in responses {
                if status.starts_with(['4', '5']) && method != "head" {
                    let schema = response
                        .pointer("/content/application~1json/schema/$ref")
                        .or_else(|| response.get("$ref"));
                    assert!(
                        schema.is_some(),
                        "{method} {path} {status} has no error body: {response}"
                    );
                }
            }
            if let Some(body) = op.get("requestBody") {
                let content = body["content"].as_object().unwrap();
                assert!(
                    content.contains_key("application/json")
                        && content.contains_key("application/yaml"),
                    "{method} {path}: a body is JSON or YAML: {body}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_are_valid_openapi_31_and_describe_every_route() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), "sled", &["--node-listen", "127.0.0.1:0"]);
    let management = fetch_document(&server, "").await;
    let node = fetch_document(&server, "?api=node").await;
    assert_eq!(fetch_document(&server, "?api=management").await, management);
    let (status, body) = server.api().get("/api/2.0/openapi.json?api=other").await;
    assert_eq!(status, 400, "{body}");

    for doc in [&management, &node] {
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        check_shapes(doc);
    }
    validate(&management, data.path(), "management.json");
    validate(&node, data.path(), "node.json");

    // The node-facing document points at the node-facing listener, the management one at
    // wherever it was fetched from.
    let node_base = server.node_base.clone().expect("the node listener is on");
    assert_eq!(
        node["servers"],
        json!([{"url": node_base, "description": "The node-facing listener"}])
    );
    assert_eq!(management["servers"][0]["url"], "/");
    // Webhook deliveries are described as OpenAPI webhooks, with the event schema.
    assert!(management["webhooks"]["event"]["post"].is_object());
    assert!(management["components"]["schemas"]["Event"].is_object());

    check_routes(&server.http(), &management, MANAGEMENT_ROUTES, &server.base).await;
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    check_routes(&plain, &node, NODE_ROUTES, &node_base).await;
}

/// The route lists in src/api/http.rs register handlers only through utoipa-axum's
/// `routes!`, which is what puts each one in the document: a plain `.route(...)` there
/// would serve a route the document does not know.
#[test]
fn the_routers_are_built_only_from_documented_handlers() {
    let source =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/api/http.rs")).unwrap();
    for list in ["fn management_routes()", "fn node_routes()"] {
        let start = source
            .find(list)
            .unwrap_or_else(|| panic!("{list} is gone"));
        let body = &source[start..];
        let body = &body[..body.find("\n}\n").expect("the function's end")];
        for plain in [".route(", ".route_service(", ".nest_service(", ".fallback"] {
            assert!(
                !body.contains(plain),
                "{list} calls {plain}: register handlers with routes!(...) so that they are documented"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Fuzzing with schemathesis

/// Set in the re-executed test binary inside the network namespace.
const NETNS_ENV: &str = "METALGRAPH_OPENAPI_NETNS";

/// What schemathesis checks. Left out: `positive_data_acceptance`, since the server checks
/// more than a schema can say (graph validity, node rules, OBM services, run options
/// against the jobs' option schemas) and rightly refuses such schema-valid bodies with 400
/// or 422; `missing_required_header` and `object_level_authorization`, which do not apply
/// (no operation requires a header besides the token; tokens are not per-object).
/// `ignored_auth` checks that every operation the document says needs the bearer token
/// refuses a call without one.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_headers_conformance,response_schema_conformance,negative_data_rejection,\
    unsupported_method,use_after_free,ensure_resource_availability,ignored_auth";

/// The fuzzing budget of each API, in seconds of schemathesis' own clock.
const MANAGEMENT_SECONDS: u32 = 50;
const NODE_SECONDS: u32 = 20;

/// The seed schemathesis draws from; `METALGRAPH_SCHEMATHESIS_SEED` picks another.
const DEFAULT_SEED: &str = "20261202";

#[test]
fn schemathesis_finds_no_failure_in_either_api() {
    if std::env::var_os(NETNS_ENV).is_some() {
        return fuzz_inside_the_namespace();
    }
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([
            "schemathesis_finds_no_failure_in_either_api",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(NETNS_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs (util-linux; the test needs root for a network namespace)");
    let out = wait_bounded(
        &mut child,
        Duration::from_secs(240),
        "the namespaced fuzz run",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "fuzzing inside the network namespace failed ({}); the report is above",
        out.status
    );
    assert!(
        stdout.contains("schemathesis: management API passed")
            && stdout.contains("schemathesis: node-facing API passed"),
        "the namespaced run did not fuzz both APIs"
    );
}

/// Waits for a child at most `limit`, killing it after that; its piped output is read on
/// threads meanwhile, so that a long report cannot block it on a full pipe.
fn wait_bounded(child: &mut std::process::Child, limit: Duration, what: &str) -> Output {
    fn drain(
        pipe: Option<impl std::io::Read + Send + 'static>,
    ) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let out = String::from_utf8_lossy(&stdout.join().unwrap()).into_owned();
            panic!("{what} did not finish within {limit:?}; it printed:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn fuzz_inside_the_namespace() {
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip runs");
    assert!(up.success(), "cannot bring the namespace's loopback up");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(fuzz());
}

/// What the seeded server holds, for schemathesis' dictionaries.
struct Seeded {
    nodes: Vec<String>,
    workflows: Vec<String>,
    hook: String,
}

async fn fuzz() {
    let data = tempfile::tempdir().unwrap();
    let files = data.path().join("files");
    let templates = data.path().join("templates");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(&templates).unwrap();
    std::fs::write(files.join("boot.txt"), "metalgraph boot file\n").unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/templates/kickstart-callback.ks"
        ),
        templates.join("kickstart-callback.ks"),
    )
    .unwrap();
    let server = Server::launch(
        &data.path().join("store"),
        "sled",
        Launch {
            args: [
                "--node-listen",
                "127.0.0.1:0",
                "--files-dir",
                files.to_str().unwrap(),
                "--templates-dir",
                templates.to_str().unwrap(),
            ]
            .map(str::to_owned)
            .to_vec(),
            rust_log: Some("warn".to_owned()),
            log: Some(data.path().join("server.log")),
        },
    );
    let seeded = seed(&server.api()).await;
    // schemathesis works as an admin of its own, so that the tokens it makes and revokes
    // are never the one the test holds.
    let (status, fuzz) = server
        .api()
        .send(
            "POST",
            "/api/2.0/tokens",
            Some(json!({"name": "fuzz-admin", "role": "admin"})),
        )
        .await;
    assert_eq!(status, 201, "{fuzz}");
    let access = Access {
        token: fuzz["token"].as_str().unwrap().to_owned(),
        ca: data.path().join("store/tls/ca.pem"),
    };
    let (management_config, node_config) = schemathesis_config(&seeded);
    let configs = [
        data.path().join("management.toml"),
        data.path().join("node.toml"),
    ];
    std::fs::write(&configs[0], management_config).unwrap();
    std::fs::write(&configs[1], node_config).unwrap();
    let seed = std::env::var("METALGRAPH_SCHEMATHESIS_SEED").unwrap_or(DEFAULT_SEED.to_owned());

    let node_base = server.node_base.clone().expect("the node listener is on");
    for (name, config, query, base, seconds, exclude) in [
        // The event stream never ends; tests/events.rs covers it. Revoking tokens is left
        // out: the stateful phase would revoke the very token it fuzzes with (it lists
        // them); tests/security.rs covers revocation.
        (
            "management API",
            &configs[0],
            "",
            server.base.clone(),
            MANAGEMENT_SECONDS,
            &["/api/2.0/events", "/api/2.0/tokens/{name}"][..],
        ),
        (
            "node-facing API",
            &configs[1],
            "?api=node",
            node_base,
            NODE_SECONDS,
            &[][..],
        ),
    ] {
        let out = schemathesis(
            config,
            &server.url(&format!("/api/2.0/openapi.json{query}")),
            &base,
            seconds,
            &seed,
            exclude,
            &access,
        );
        let report = String::from_utf8_lossy(&out.stdout);
        println!(
            "----- schemathesis, {name} -----\n{report}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "schemathesis found failures in the {name} (report above); server log:\n{}",
            server.logs()
        );
        println!("schemathesis: {name} passed");
    }
    // The server is still healthy after all that.
    let (status, _) = server.api().get("/api/2.0/health").await;
    assert_eq!(status, 200);
}

/// A graph, two nodes with simulated BMCs, a finished workflow, one waiting for its node's
/// callback, and a webhook to a port nothing listens on.
async fn seed(api: &Api) -> Seeded {
    for graph in [
        json!({"injectableName": "Graph.OpenAPI.Seed",
               "tasks": [{"label": "only", "taskName": "Task.Noop"}]}),
        json!({"injectableName": "Graph.OpenAPI.Wait",
               "tasks": [{"label": "wait", "taskName": "Task.Wait.Notification"}]}),
    ] {
        let (status, body) = api
            .send("PUT", "/api/2.0/workflows/graphs", Some(graph))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let mut nodes = Vec::new();
    for (id, mac) in [
        ("seed-a", "52:54:00:00:00:0a"),
        ("seed-b", "52:54:00:00:00:0b"),
    ] {
        nodes.push(
            api.create_node(json!({
                "id": id, "name": id, "identifiers": [mac],
                "obms": [{"service": "sim-obm-service", "config": {"host": id}}],
            }))
            .await,
        );
    }
    let done = api
        .run("Graph.OpenAPI.Seed", Some("seed-a"), json!({}))
        .await;
    api.wait(&done, Duration::from_secs(30)).await;
    let waiting = api
        .run("Graph.OpenAPI.Wait", Some("seed-b"), json!({}))
        .await;
    api.wait_task(&waiting, "wait", "running", Duration::from_secs(30))
        .await;
    let (status, hook) = api
        .send(
            "POST",
            "/api/2.0/hooks",
            Some(json!({"url": "http://127.0.0.1:9/metalgraph"})),
        )
        .await;
    assert_eq!(status, 201, "{hook}");
    Seeded {
        nodes,
        workflows: vec![done, waiting],
        hook: hook["id"].as_str().unwrap().to_owned(),
    }
}

/// The schemathesis configurations of the management and the node-facing API:
/// dictionaries of what exists, bound to the parameters that name it, so that the fuzzer
/// reaches more than 404s.
fn schemathesis_config(s: &Seeded) -> (String, String) {
    let list = |v: &[String]| serde_json::to_string(v).unwrap();
    let nodes = list(&s.nodes);
    let workflows = list(&s.workflows);
    let hooks = list(std::slice::from_ref(&s.hook));
    let management = format!(
        r#"
[dictionaries.nodes]
values = {nodes}
[dictionaries.workflows]
values = {workflows}
[dictionaries.hooks]
values = {hooks}
[dictionaries.graphs]
values = ["Graph.OpenAPI.Seed", "Graph.OpenAPI.Wait", "Graph.Reboot.Node"]
[dictionaries.tasks]
values = ["Task.Noop", "Task.Wait.Notification"]
[dictionaries.sources]
values = ["pxe", "redfish"]

[[operations]]
include-path-regex = "^/api/2\\.0/nodes/\\{{id\\}}"
parameters = {{ "path.id" = {{ dictionary = "nodes", probability = 0.7 }} }}

[[operations]]
include-path-regex = "^/api/2\\.0/workflows/\\{{id\\}}"
parameters = {{ "path.id" = {{ dictionary = "workflows", probability = 0.7 }} }}

[[operations]]
include-path-regex = "^/api/2\\.0/hooks/\\{{id\\}}"
parameters = {{ "path.id" = {{ dictionary = "hooks", probability = 0.7 }} }}

[[operations]]
include-path-regex = "^/api/2\\.0/workflows/graphs/\\{{name\\}}"
parameters = {{ "path.name" = {{ dictionary = "graphs", probability = 0.7 }} }}

[[operations]]
include-path-regex = "^/api/2\\.0/workflows/tasks/\\{{name\\}}"
parameters = {{ "path.name" = {{ dictionary = "tasks", probability = 0.7 }} }}

[[operations]]
include-path = "/api/2.0/nodes/{{id}}/catalogs/{{source}}"
parameters = {{ "path.id" = {{ dictionary = "nodes", probability = 0.7 }}, "path.source" = {{ dictionary = "sources", probability = 0.7 }} }}

[[operations]]
include-path = "/api/2.0/workflows"
include-method = "POST"
parameters = {{ "body.name" = {{ dictionary = "graphs", probability = 0.7 }}, "body.node" = {{ dictionary = "nodes", probability = 0.5 }} }}

[[operations]]
include-path = "/api/2.0/nodes/{{id}}/workflows"
include-method = "POST"
parameters = {{ "path.id" = {{ dictionary = "nodes", probability = 0.7 }}, "body.name" = {{ dictionary = "graphs", probability = 0.7 }} }}

# An endpoint's systems are read live from its service: one the fuzzer registered at an
# address nothing answers on (the namespace has no network) is the documented 502, which is
# that route's answer, not a server fault. A 500 there still fails.
[[operations]]
include-path = "/api/2.0/endpoints/{{id}}/systems"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502"]

"#
    );
    let node = format!(
        r#"
[dictionaries.nodes]
values = {nodes}
[dictionaries.macs]
values = ["52:54:00:00:00:0a", "52:54:00:00:00:0b"]
[dictionaries.templates]
values = ["kickstart-callback.ks"]
[dictionaries.files]
values = ["boot.txt"]

[[operations]]
include-path = "/api/2.0/notification"
parameters = {{ "query.nodeId" = {{ dictionary = "nodes", probability = 0.7 }} }}

[[operations]]
include-path = "/api/2.0/profiles"
parameters = {{ "query.macs" = {{ dictionary = "macs", probability = 0.7 }} }}

[[operations]]
include-path = "/api/2.0/templates/{{name}}"
parameters = {{ "path.name" = {{ dictionary = "templates", probability = 0.7 }}, "query.nodeId" = {{ dictionary = "nodes", probability = 0.7 }} }}

[[operations]]
include-path = "/files/{{path}}"
parameters = {{ "path.path" = {{ dictionary = "files", probability = 0.7 }} }}
"#
    );
    (management, node)
}

/// The token schemathesis sends, and the CA it trusts.
struct Access {
    token: String,
    ca: std::path::PathBuf,
}

/// Runs schemathesis against one document, bounded by its own clock and, should that fail,
/// by a kill.
fn schemathesis(
    config: &Path,
    document: &str,
    base: &str,
    seconds: u32,
    seed: &str,
    exclude: &[&str],
    access: &Access,
) -> Output {
    let mut cmd = Command::new(venv_bin("schemathesis"));
    // Its cache (`.schemathesis/`) goes beside the configuration, not into the work tree.
    cmd.current_dir(config.parent().expect("the config's directory"))
        .arg("--config-file")
        .arg(config)
        .arg("--no-color")
        .args(["run", document, "--url", base])
        .args(["--checks", &CHECKS.replace(char::is_whitespace, "")])
        .args(["--max-examples", "30", "--max-time", &seconds.to_string()])
        // One worker: with threads, CPython 3.11's `ast` can fail inside Hypothesis
        // ("AST constructor recursion depth mismatch"), an error of the tool, not the API.
        .args(["--workers", "1", "--request-timeout", "10", "--seed", seed])
        .args(["--output-truncate", "true"])
        .arg("--header")
        .arg(format!("Authorization: Bearer {}", access.token))
        .arg("--tls-verify")
        .arg(&access.ca)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for path in exclude {
        cmd.args(["--exclude-path", path]);
    }
    let mut child = cmd
        .spawn()
        .expect("schemathesis runs (scripts/install-peers.sh)");
    wait_bounded(
        &mut child,
        Duration::from_secs(u64::from(seconds) + 60),
        "schemathesis",
    )
}
