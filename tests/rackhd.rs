//! RackHD drop-in, through the real binary: RackHD-shaped task definitions and graphs (a
//! corpus written for these tests, in RackHD's JSON form) load unchanged and run on a demo
//! node — RackHD's base tasks, its OBM action names, `Task.noop`, `Task.Base.Rest` with
//! `data` and `recvTimeoutMs`, subgraphs — unsupported base tasks and actions are refused
//! naming them, `/api/current/...` is `/api/2.0/...`, and RackHD's tokenless callback is
//! taken only where the node is proven (docs/rackhd.md).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::Server;

const LIMIT: Duration = Duration::from_secs(30);

/// A demo server (simulated BMCs) with its node-facing listener on a port of its own.
fn demo(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--demo",
        "--node-listen",
        "127.0.0.1:0",
        "--grpc-listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    Server::start(dir, "sled", &args)
}

/// A receiver for `Task.Base.Rest`: records each request's method, path and JSON body.
async fn receiver() -> (String, Arc<Mutex<Vec<(String, String, Value)>>>) {
    use axum::extract::Request;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    let app = axum::Router::new().fallback(move |req: Request| {
        let kept = kept.clone();
        async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, 1 << 20)
                .await
                .unwrap_or_default();
            let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            kept.lock().unwrap().push((
                parts.method.to_string(),
                parts.uri.path().to_owned(),
                value,
            ));
            axum::Json(json!({"received": true}))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), seen)
}

/// RackHD task definitions as RackHD writes them (JSON, `properties`, RackHD option
/// names), for base tasks metalgraph runs.
fn task_definitions(rest_url: &str) -> Vec<Value> {
    vec![
        json!({"friendlyName": "Power On Node", "injectableName": "Task.Test.Obm.PowerOn",
               "implementsTask": "Task.Base.Obm.Node",
               "options": {"action": "powerOn", "obmServiceName": "ipmi-obm-service"},
               "properties": {"power": {}}}),
        json!({"friendlyName": "Power Status", "injectableName": "Task.Test.Obm.PowerStatus",
               "implementsTask": "Task.Base.Obm.Node",
               "options": {"action": "powerStatus"}, "properties": {"power": {}}}),
        json!({"friendlyName": "Set PXE", "injectableName": "Task.Test.Obm.SetBootPxe",
               "implementsTask": "Task.Base.Obm.Node",
               "options": {"action": "setBootPxe"}, "properties": {}}),
        json!({"friendlyName": "Clear the System Event Log",
               "injectableName": "Task.Test.Obm.ClearSEL",
               "implementsTask": "Task.Base.Obm.Node",
               "options": {"action": "clearSEL", "obmServiceName": "ipmi-obm-service"},
               "properties": {}}),
        json!({"friendlyName": "Disk boot", "injectableName": "Task.Test.Obm.DiskBoot",
               "implementsTask": "Task.Base.Obm.Node",
               "options": {"action": "setBootDisk", "obmServiceName": "ipmi-obm-service"},
               "properties": {}}),
        json!({"friendlyName": "Post it", "injectableName": "Task.Test.Rest",
               "implementsTask": "Task.Base.Rest",
               "options": {"url": format!("{rest_url}/hook"), "method": "POST",
                           "headers": {"X-From": "rackhd"},
                           "data": {"node": "{{ task.nodeId }}", "step": "posted"},
                           "recvTimeoutMs": 5000},
               "properties": {}}),
        json!({"friendlyName": "Check", "injectableName": "Task.Test.Condition",
               "implementsTask": "Task.Base.Evaluate.Condition",
               "options": {"when": "true"}, "properties": {}}),
        json!({"friendlyName": "Wait", "injectableName": "Task.Test.Wait.Notification",
               "implementsTask": "Task.Base.Wait.Notification",
               "options": {}, "properties": {}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rackhd_definitions_load_unchanged_and_run() {
    let (rest_url, seen) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let server = demo(dir.path(), &[]);
    let api = server.api();

    // Every definition that uses a supported base task loads as RackHD wrote it.
    for def in task_definitions(&rest_url) {
        let (code, body) = api
            .send("PUT", "/api/2.0/workflows/tasks", Some(def.clone()))
            .await;
        assert_eq!(code, 201, "{}: {body}", def["injectableName"]);
    }
    let child = json!({"friendlyName": "Child", "injectableName": "Graph.Test.Child",
        "tasks": [{"label": "child-noop", "taskName": "Task.noop"}]});
    // RackHD's graph: `taskName`s of the definitions above and of RackHD's own names, an
    // inline definition with a base task, a subgraph through Task.Base.Graph.Run.
    let graph = json!({
        "friendlyName": "RackHD-shaped", "injectableName": "Graph.Test.Rackhd",
        "options": {"defaults": {"obmServiceName": "ipmi-obm-service"}},
        "tasks": [
            {"label": "noop", "taskName": "Task.noop"},
            {"label": "set-boot-pxe", "taskName": "Task.Test.Obm.SetBootPxe",
             "waitOn": {"noop": "succeeded"}},
            {"label": "power-on", "taskName": "Task.Test.Obm.PowerOn",
             "waitOn": {"set-boot-pxe": "succeeded"}},
            {"label": "status", "taskName": "Task.Test.Obm.PowerStatus",
             "waitOn": {"power-on": "succeeded"}},
            {"label": "reboot", "taskDefinition": {
                "friendlyName": "Reboot", "injectableName": "Task.Inline.Reboot",
                "implementsTask": "Task.Base.Obm.Node",
                "options": {"action": "reboot"}, "properties": {}},
             "waitOn": {"status": "succeeded"}},
            {"label": "post", "taskName": "Task.Test.Rest", "waitOn": {"reboot": "succeeded"}},
            {"label": "check", "taskName": "Task.Test.Condition", "waitOn": {"post": "succeeded"}},
            {"label": "child", "taskDefinition": {
                "friendlyName": "Run child", "injectableName": "Task.Inline.Graph.Run",
                "implementsTask": "Task.Base.Graph.Run",
                "options": {"graphName": "Graph.Test.Child", "graphOptions": {}},
                "properties": {}},
             "waitOn": {"check": "succeeded"}}
        ]
    });
    let status_only = json!({"injectableName": "Graph.Test.Status",
        "tasks": [{"label": "status", "taskName": "Task.Test.Obm.PowerStatus"}]});
    let disk = json!({"injectableName": "Graph.Test.DiskBoot",
        "tasks": [{"label": "disk", "taskName": "Task.Test.Obm.DiskBoot"}]});
    for g in [child, graph, status_only, disk] {
        let (code, body) = api
            .send("PUT", "/api/2.0/workflows/graphs", Some(g.clone()))
            .await;
        assert_eq!(code, 201, "{}: {body}", g["injectableName"]);
    }
    let wf = api
        .run_wait("Graph.Test.Rackhd", Some("demo-node-01"), json!({}), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["status"]["powerState"], "On", "{wf:#}");
    let posted = seen.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0].0, "POST");
    assert_eq!(posted[0].1, "/hook");
    assert_eq!(
        posted[0].2,
        json!({"node": "demo-node-01", "step": "posted"}),
        "`data` is the body"
    );

    // `setBootDisk`: the disk on the next boot, read back from the BMC.
    let wf = api
        .run_wait(
            "Graph.Test.DiskBoot",
            Some("demo-node-05"),
            json!({}),
            LIMIT,
        )
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["disk"]["readback"]["device"], "hdd", "{wf:#}");

    // RackHD's node defaulting: `nodeId: null` is the node the graph runs on; without a
    // node it must be given.
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/graphs",
            Some(json!({"injectableName": "Graph.Test.NodeId", "tasks": [{
                "label": "tell", "taskDefinition": {
                    "friendlyName": "Tell", "injectableName": "Task.Inline.Tell",
                    "implementsTask": "Task.Base.Rest",
                    "options": {"nodeId": null, "url": format!("{rest_url}/tell"),
                                "method": "POST", "data": {"node": "{{ options.nodeId }}"}},
                    "properties": {}}}]})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let wf = api
        .run_wait("Graph.Test.NodeId", Some("demo-node-06"), json!({}), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let told = seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (told.1.as_str(), &told.2),
        ("/tell", &json!({"node": "demo-node-06"}))
    );
    let (code, body) = api
        .send(
            "POST",
            "/api/2.0/workflows",
            Some(json!({"name": "Graph.Test.NodeId"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body.to_string().contains("option 'nodeId' is required"),
        "{body}"
    );

    // RackHD's template dialect, chosen for a definition of a RackHD base task: `||`,
    // sections over lists, inverted sections, RackHD's variables, and options that refer
    // to options (rendered first). A graph option layer that names no task is ignored.
    let dialect = json!({"injectableName": "Graph.Test.Dialect",
        "options": {"not-a-task": {"x": 1}},
        "tasks": [{"label": "tell", "taskDefinition": {
            "friendlyName": "Dialect", "injectableName": "Task.Inline.Dialect",
            "implementsTask": "Task.Base.Rest",
            "options": {
                "base": rest_url, "url": "{{ options.base }}/dialect", "method": "POST",
                "name": "", "version": 7, "dns": ["10.0.0.2", "10.0.0.3"],
                "installScript": "centos-ks",
                "scriptUri": "{{ api.templates }}/{{ options.installScript }}?nodeId={{ task.nodeId }}",
                "data": {
                    "who": "{{ options.name || task.nodeId }}",
                    "target": "{{ context.target }}",
                    "graph": "{{ context.graphId }}",
                    "repo": "{{ file.server }}/centos/{{ options.version }}/os",
                    "dns": "{{#options.dns}}ns={{.}};{{/options.dns}}",
                    "anon": "{{^options.name}}anonymous{{/options.name}}",
                    "script": "{{ options.scriptUri }}"
                }},
            "properties": {}}}]});
    let (code, body) = api
        .send("PUT", "/api/2.0/workflows/graphs", Some(dialect))
        .await;
    assert_eq!(code, 201, "{body}");
    let wf = api
        .run_wait("Graph.Test.Dialect", Some("demo-node-06"), json!({}), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let told = seen.lock().unwrap().last().cloned().unwrap();
    let templates = server.node_url("/api/current/templates");
    assert_eq!(
        (told.1.as_str(), &told.2),
        (
            "/dialect",
            &json!({
                "who": "demo-node-06",
                "target": "demo-node-06",
                "graph": wf["instanceId"],
                "repo": format!("{}/centos/7/os", server.node_url("/files")),
                "dns": "ns=10.0.0.2;ns=10.0.0.3;",
                "anon": "anonymous",
                "script": format!("{templates}/centos-ks?nodeId=demo-node-06"),
            })
        )
    );
    // A RackHD template that cannot be read is refused when stored, naming the tag.
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/tasks",
            Some(json!({"injectableName": "Task.Test.Unclosed",
                        "implementsTask": "Task.Base.noop",
                        "options": {"x": "{{#options.kvm}}kvm"}})),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body.to_string()
            .contains("the section {{#options.kvm}} is never closed with {{/options.kvm}}"),
        "{body}"
    );

    // RackHD's reset graphs, shipped under their names; the soft one leaves the node off.
    for (graph, node, state) in [
        ("Graph.Reset.Node", "demo-node-04", "On"),
        ("Graph.Reset.Soft.Node", "demo-node-05", "Off"),
    ] {
        let wf = api.run_wait(graph, Some(node), json!({}), LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{graph}: {wf:#}");
        let status = api
            .run_wait("Graph.Test.Status", Some(node), json!({}), LIMIT)
            .await;
        assert_eq!(
            status["context"]["status"]["powerState"], state,
            "{graph}: {status:#}"
        );
    }

    // RackHD's SEL and BMC-reset graphs, shipped under their names, run on a simulated
    // BMC: demo-node-01's power actions above logged events, which clearing reports.
    let wf = api
        .run_wait(
            "Graph.ClearSEL.Node",
            Some("demo-node-01"),
            json!({}),
            LIMIT,
        )
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["clearsel"]["cleared"], true, "{wf:#}");
    assert!(
        wf["context"]["clearsel"]["entriesBefore"].as_u64() >= Some(2),
        "{wf:#}"
    );
    let wf = api
        .run_wait(
            "Graph.ClearSEL.Node",
            Some("demo-node-01"),
            json!({}),
            LIMIT,
        )
        .await;
    assert_eq!(wf["context"]["clearsel"]["entriesBefore"], 0, "{wf:#}");
    let options = json!({"defaults": {"resetGrace": "100ms", "pollInterval": "50ms"}});
    let wf = api
        .run_wait("Graph.McReset", Some("demo-node-07"), options, LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["mc-reset"]["reset"], "cold", "{wf:#}");

    // A base task metalgraph does not run is refused, naming it; so is an OBM action its
    // drivers do not perform, listing those they do.
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/tasks",
            Some(json!({"injectableName": "Task.Test.Bootstrap",
                        "implementsTask": "Task.Base.Linux.Bootstrap",
                        "options": {"kernelFile": "vmlinuz"}, "properties": {}})),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("RackHD base task Task.Base.Linux.Bootstrap")
            && text.contains("does not support")
            && text.contains("Task.Base.Obm.Node"),
        "{text}"
    );
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/tasks",
            Some(json!({"injectableName": "Task.Test.Identify",
                        "implementsTask": "Task.Base.Obm.Node",
                        "options": {"action": "identifyOn"}})),
        )
        .await;
    assert_eq!(code, 422, "{body}");
    let text = body.to_string();
    assert!(
        text.contains("identifyOn") && text.contains("powerOn") && text.contains("mcResetCold"),
        "{text}"
    );

    // `/api/current/...` is `/api/2.0/...`, under the same rules.
    let (code, nodes) = api.get("/api/current/nodes").await;
    assert_eq!(code, 200, "{nodes}");
    assert_eq!(nodes.as_array().unwrap().len(), 8);
    let (code, _) = api.get("/api/current/health").await;
    assert_eq!(code, 200);
    let anonymous = server.http_as(None);
    let r = anonymous
        .get(server.url("/api/current/nodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the alias needs a token as the path does");
    let r = anonymous
        .get(server.url("/api/current/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // RackHD's installers call back without a token. By default that is taken only from a
    // request proven to be the node; from anywhere else it is answered as a wrong token.
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/graphs",
            Some(json!({"injectableName": "Graph.Test.Install",
                        "tasks": [{"label": "wait", "taskName": "Task.Test.Wait.Notification"}]})),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let id = api
        .run("Graph.Test.Install", Some("demo-node-02"), json!({}))
        .await;
    api.wait_task(&id, "wait", "running", LIMIT).await;
    let callback = server.node_url("/api/current/notification?nodeId=demo-node-02");
    let node_http = reqwest::Client::new();
    let mut refused = None;
    // The waiter registers a moment after the task shows running.
    for _ in 0..50 {
        let r = node_http
            .post(&callback)
            .json(&json!({"status": "done"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        refused = Some((status, r.text().await.unwrap()));
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, text) = refused.unwrap();
    assert_eq!(status, 404, "{text}");
    let wrong = node_http
        .post(server.node_url(
            "/api/current/notification?nodeId=demo-node-02&token=0123456789abcdef0123456789abcdef",
        ))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 404);
    assert_eq!(wrong.text().await.unwrap(), text, "one answer for both");
    server.terminate();

    // With the operator's compatibility switch (`node_tokens = open`), the tokenless
    // callback completes the node's waiting task.
    let server = demo(dir.path(), &["--node-tokens", "open"]);
    let api = server.api();
    let id = api
        .run("Graph.Test.Install", Some("demo-node-03"), json!({}))
        .await;
    api.wait_task(&id, "wait", "running", LIMIT).await;
    let callback = server.node_url("/api/current/notification?nodeId=demo-node-03");
    assert!(
        post_until_taken(&node_http, &callback, json!({"status": "installed"})).await,
        "the tokenless callback was taken"
    );
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["wait"]["status"], "installed", "{wf:#}");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_rackhd_loads_a_directory_and_says_what_it_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = demo(dir.path(), &[]);
    let corpus = tempfile::tempdir().unwrap();
    let write = |rel: &str, v: &str| {
        let p = corpus.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, v).unwrap();
    };
    write(
        "tasks/power-on.json",
        r#"{"friendlyName": "Power On", "injectableName": "Task.Import.PowerOn",
            "implementsTask": "Task.Base.Obm.Node",
            "options": {"action": "powerOn", "obmServiceName": "ipmi-obm-service"},
            "properties": {"power": {}}}"#,
    );
    write(
        "tasks/more.json",
        r#"[{"injectableName": "Task.Import.Noop", "implementsTask": "Task.Base.noop",
             "options": {"option1": 1}, "properties": {}},
            {"injectableName": "Task.Import.Check", "implementsTask": "Task.Base.Evaluate.Condition",
             "options": {"when": "true"}, "properties": {}}]"#,
    );
    write(
        "tasks/bootstrap.json",
        r#"{"injectableName": "Task.Import.Bootstrap", "implementsTask": "Task.Base.Linux.Bootstrap",
            "options": {"kernelFile": "vmlinuz"}, "properties": {}}"#,
    );
    write(
        "graphs/power.json",
        r#"{"friendlyName": "Power", "injectableName": "Graph.Import.Power",
            "tasks": [{"label": "noop", "taskName": "Task.Import.Noop"},
                      {"label": "on", "taskName": "Task.Import.PowerOn", "waitOn": {"noop": "succeeded"}}]}"#,
    );
    write(
        "graphs/broken.json",
        r#"{"injectableName": "Graph.Import.Broken", "tasks": [ "#,
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metalgraph"))
        .arg("import-rackhd")
        .arg(corpus.path())
        .env("METALGRAPH_SERVER", &server.base)
        .env("METALGRAPH_DATA_DIR", &server.data_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "something was refused: {stdout}"
    );
    for want in [
        "loaded Task.Import.PowerOn",
        "loaded Task.Import.Noop",
        "loaded Task.Import.Check",
        "refused Task.Import.Bootstrap",
        "RackHD base task Task.Base.Linux.Bootstrap",
        "loaded Graph.Import.Power",
        "broken.json",
        "loaded 3 of 4 task definitions and 1 of 1 graphs; 2 refused",
    ] {
        assert!(stdout.contains(want), "{want:?} missing from:\n{stdout}");
    }
    // What was loaded runs.
    let wf = server
        .api()
        .run_wait("Graph.Import.Power", Some("demo-node-07"), json!({}), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    server.terminate();
}

/// POSTs `body` to a node callback `url` until it is taken (200): the waiter registers a
/// moment after its task shows running. Whether it was taken within 2.5 s.
async fn post_until_taken(http: &reqwest::Client, url: &str, body: Value) -> bool {
    for _ in 0..50 {
        let r = http.post(url).json(&body).send().await.unwrap();
        if r.status() == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Fetches `url` as a node does, retrying while the server says the task has not started
/// (the profile's retry script) or nothing waits yet.
async fn fetch_as_node(url: &str, must_contain: &str) -> String {
    let http = reqwest::Client::new();
    let mut last = String::new();
    for _ in 0..100 {
        let r = http.get(url).send().await.unwrap();
        let status = r.status();
        last = r.text().await.unwrap();
        if status == 200 && last.contains(must_contain) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never answered with {must_contain:?}; last answer: {last}");
}

/// The first whitespace-delimited word after `key` in `text`.
fn word_after<'a>(text: &'a str, key: &str) -> &'a str {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
    text[at + key.len()..]
        .split(|c: char| c.is_whitespace() || c == '\'')
        .next()
        .unwrap()
}

/// RackHD's OS-install graphs, shipped under RackHD's names, run end to end on demo nodes:
/// the test plays the node — it fetches its profile by MAC, then the install script the
/// profile names, and calls back as the installer does — and the workflow succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rackhd_install_graphs_run_end_to_end_on_a_demo_node() {
    let dir = tempfile::tempdir().unwrap();
    // A demo node has no DHCP lease to prove it is the node, and these requests carry no
    // capability until the profile hands one on: the operator's RackHD compatibility
    // switch lets the first request through, as RackHD did.
    let server = demo(dir.path(), &["--node-tokens", "open"]);
    let api = server.api();

    // The version is required, and the 400 says where to give it.
    let (code, body) = api
        .send(
            "POST",
            "/api/2.0/nodes/demo-node-07/workflows",
            Some(json!({"name": "Graph.InstallCentOS"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("'version' is required"), "{body}");

    let id = api
        .run(
            "Graph.InstallCentOS",
            Some("demo-node-07"),
            json!({"install-os": {"version": "9-stream", "hostname": "web01", "domain": "lab",
                                  "rootPassword": "pa55-Word", "dnsServers": ["10.0.0.2"]}}),
        )
        .await;
    api.wait_task(&id, "install-os", "running", LIMIT).await;

    // The profile, by MAC, on RackHD's path: Anaconda from the repository under /files,
    // with the kickstart's URL (its cap= proves the node on the next request).
    let profile = fetch_as_node(
        &server.node_url("/api/current/profiles?macs=02:00:00:00:00:07"),
        "inst.ks=",
    )
    .await;
    let files = server.node_url("/files");
    assert!(
        profile.contains(&format!(
            "kernel {files}/centos/9-stream/os/x86_64/images/pxeboot/vmlinuz"
        )),
        "{profile}"
    );
    let ks_url = word_after(&profile, "inst.ks=").to_owned();
    assert!(
        ks_url.starts_with(
            &server.node_url("/api/current/templates/centos-ks?nodeId=demo-node-07&cap=")
        ),
        "{ks_url}"
    );

    // The kickstart, rendered for the node with install-os's options and its callback.
    let ks = fetch_as_node(&ks_url, "%post").await;
    for want in [
        format!("url --url=\"{files}/centos/9-stream/os/x86_64\""),
        "--hostname=web01.lab".to_owned(),
        "pa55-Word".to_owned(),
        "10.0.0.2".to_owned(),
    ] {
        assert!(ks.contains(&want), "{want} missing from:\n{ks}");
    }
    // The password is the node's alone: the management API does not show it.
    let (_, wf) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    assert!(!wf.to_string().contains("pa55-Word"), "{wf:#}");

    // %post calls back with the task's token, as the kickstart says.
    let callback = word_after(&ks, "-d '{\"status\": \"installed\"}' '").to_owned();
    assert!(
        callback.contains("/notification?nodeId=demo-node-07&token="),
        "{callback}"
    );
    let r = reqwest::Client::new()
        .post(&callback)
        .json(&json!({"status": "installed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(wf["context"]["install-os"]["status"], "installed");

    // RackHD's own shape of the graph, in RackHD's JSON (a corpus written for this test):
    // its task definition's install script URL carries no capability, and a second wait
    // takes the installed system's first-boot callback, which the kickstart installs when
    // the definition names RackHD's callback script.
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/tasks",
            Some(json!({
                "friendlyName": "Install CentOS", "injectableName": "Task.Test.Os.Install.CentOS",
                "implementsTask": "Task.Base.Os.Install",
                "options": {
                    "osType": "linux", "profile": "install-centos.ipxe",
                    "installScript": "centos-ks",
                    "installScriptUri": "{{api.templates}}/{{options.installScript}}?nodeId={{task.nodeId}}",
                    "hostname": "localhost", "comport": "ttyS0",
                    "rackhdCallbackScript": "centos.rackhdcallback",
                    "repo": "{{file.server}}/centos/{{options.version}}/os/x86_64",
                    "rootPassword": "changeme", "remoteLogging": false,
                    "progressMilestones": {"completed": {"value": 6, "description": "done"}}
                },
                "properties": {"os": {"linux": {"distribution": "centos"}}}
            })),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = api
        .send(
            "PUT",
            "/api/2.0/workflows/graphs",
            Some(json!({
                "friendlyName": "Install CentOS (RackHD's shape)",
                "injectableName": "Graph.Test.InstallCentOS",
                "options": {"install-os": {"version": null, "_taskTimeout": 3600000},
                            "rackhd-callback-notification-wait": {"_taskTimeout": 1200000}},
                "tasks": [
                    {"label": "set-boot-pxe", "taskName": "Task.Obm.Node.PxeBoot", "ignoreFailure": true},
                    {"label": "reboot", "taskName": "Task.Obm.Node.Reboot",
                     "waitOn": {"set-boot-pxe": "finished"}},
                    {"label": "install-os", "taskName": "Task.Test.Os.Install.CentOS",
                     "waitOn": {"reboot": "succeeded"}},
                    {"label": "rackhd-callback-notification-wait", "taskName": "Task.Wait.Notification",
                     "waitOn": {"install-os": "succeeded"}}
                ]
            })),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let id = api
        .run(
            "Graph.Test.InstallCentOS",
            Some("demo-node-06"),
            json!({"install-os": {"version": "7"}}),
        )
        .await;
    api.wait_task(&id, "install-os", "running", LIMIT).await;
    let profile = fetch_as_node(
        &server.node_url("/api/current/profiles?macs=02:00:00:00:00:06"),
        "inst.ks=",
    )
    .await;
    let ks_url = word_after(&profile, "inst.ks=").to_owned();
    assert_eq!(
        ks_url,
        server.node_url("/api/current/templates/centos-ks?nodeId=demo-node-06")
    );
    let ks = fetch_as_node(&ks_url, "%post").await;
    let first_boot = server.node_url("/api/2.0/notification?nodeId=demo-node-06");
    assert!(
        ks.contains("metalgraph-firstboot.service") && ks.contains(&format!("\"{first_boot}\"")),
        "{ks}"
    );
    let callback = word_after(&ks, "-d '{\"status\": \"installed\"}' '").to_owned();
    let node_http = reqwest::Client::new();
    let r = node_http
        .post(&callback)
        .json(&json!({"status": "installed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    api.wait_task(&id, "rackhd-callback-notification-wait", "running", LIMIT)
        .await;
    assert!(
        post_until_taken(&node_http, &first_boot, json!({"status": "booted"})).await,
        "the first-boot callback was taken"
    );
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(
        wf["context"]["rackhd-callback-notification-wait"]["status"],
        "booted"
    );

    // Another OS, called back the way RackHD's installers do: no token, RackHD's path.
    let id = api
        .run(
            "Graph.InstallUbuntu",
            Some("demo-node-08"),
            json!({"install-os": {"version": "24.04", "hostname": "db01"}}),
        )
        .await;
    api.wait_task(&id, "install-os", "running", LIMIT).await;
    let profile = fetch_as_node(
        &server.node_url("/api/current/profiles?macs=02:00:00:00:00:08"),
        "autoinstall",
    )
    .await;
    assert!(
        profile.contains("/api/current/templates/ubuntu-autoinstall?nodeId=demo-node-08&cap="),
        "{profile}"
    );
    let user_data = fetch_as_node(
        &server.node_url(
            "/api/current/templates/ubuntu-autoinstall?nodeId=demo-node-08&seed=user-data",
        ),
        "autoinstall",
    )
    .await;
    assert!(user_data.contains("db01"), "{user_data}");
    let r = reqwest::Client::new()
        .post(server.node_url("/api/current/notification?nodeId=demo-node-08"))
        .json(&json!({"status": "installed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    server.terminate();
}
