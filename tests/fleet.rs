//! Fleet operations end to end through the real binary against two sushy-tools emulators
//! at once (several systems each, Basic auth): endpoints registered and read, systems
//! aggregated with filters, discovery through endpoints, a batch over every node with at
//! most two workflows at once that survives a kill -9, a busy endpoint that cannot be
//! deleted, and a password rotated once for every node.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::peers::{Sushy, SushyOptions, system_uuid};
use support::{Api, Server};

const LIMIT: Duration = Duration::from_secs(90);
const PASSWORD_A: &str = "rack-a-Passw0rd";
const PASSWORD_B: &str = "rack-b-Passw0rd";

async fn sushy(first: usize, password: &str) -> Sushy {
    Sushy::start(SushyOptions {
        systems: 3,
        first_system: first,
        // A power change shows a second or so later: workflows overlap long enough to be
        // counted.
        delay_secs: Some(1),
        auth: Some(("admin".into(), password.into())),
        ..SushyOptions::default()
    })
    .await
}

fn fast() -> Value {
    json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "30s"}})
}

async fn register(api: &Api, name: &str, url: &str, password: &str) -> String {
    let (code, ep) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(json!({"name": name, "service": "redfish", "url": url,
                        "user": "admin", "password": password})),
        )
        .await;
    assert_eq!(code, 201, "{ep}");
    assert_eq!(ep["passwordSet"], true, "{ep}");
    assert!(!ep.to_string().contains(password), "{ep}");
    ep["id"].as_str().expect("an id").to_owned()
}

async fn discover(api: &Api, endpoint: &str) -> Value {
    let (code, wf) = api
        .send(
            "POST",
            &format!("/api/2.0/endpoints/{endpoint}/discover"),
            None,
        )
        .await;
    assert_eq!(code, 201, "{wf}");
    let wf = api
        .wait(wf["instanceId"].as_str().expect("an id"), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    wf
}

/// Every active workflow of `graph`, read from outside.
async fn active(api: &Api, graph: &str) -> Vec<Value> {
    let (code, list) = api
        .get(&format!("/api/2.0/workflows?active=true&graph={graph}"))
        .await;
    assert_eq!(code, 200, "{list}");
    list.as_array().expect("a list").clone()
}

async fn batch(api: &Api, id: &str) -> Value {
    let (code, b) = api.get(&format!("/api/2.0/batches/{id}")).await;
    assert_eq!(code, 200, "{b}");
    b
}

/// Polls the batch until it finishes, asserting at every look that no more than `max` of
/// its graph's workflows are active.
async fn follow(
    api: &Api,
    id: &str,
    graph: &str,
    max: usize,
    until: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let running = active(api, graph).await;
        assert!(
            running.len() <= max,
            "{} active: {running:#?}",
            running.len()
        );
        let b = batch(api, id).await;
        if until(&b) {
            return b;
        }
        assert!(Instant::now() < deadline, "{b:#}");
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_systems_discovery_batches_and_rotation() {
    let (rack_a, rack_b) = tokio::join!(sushy(0, PASSWORD_A), sushy(3, PASSWORD_B));
    let data = tempfile::tempdir().expect("a data dir");
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();

    // Registering: bad input is refused naming the field, a name is unique.
    let (code, body) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(json!({"name": "x", "service": "redfish", "url": "ftp://bmc"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("'url'"), "{body}");
    let (code, body) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(json!({"name": "x", "service": "snmp", "url": "https://bmc"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    let a = register(&api, "rack-a", &rack_a.base, PASSWORD_A).await;
    let b = register(&api, "rack-b", &rack_b.base, PASSWORD_B).await;
    let (code, body) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(json!({"name": "rack-a", "service": "redfish", "url": rack_a.base})),
        )
        .await;
    assert_eq!(code, 409, "{body}");

    // Systems, live, across both endpoints, with filters.
    let (code, all) = api.get("/api/2.0/systems").await;
    assert_eq!(code, 200, "{all}");
    let systems = all["systems"].as_array().expect("systems");
    assert_eq!(systems.len(), 6, "{all:#}");
    assert_eq!(all["errors"], json!([]));
    let uuids: BTreeSet<&str> = systems.iter().filter_map(|s| s["uuid"].as_str()).collect();
    let expected: BTreeSet<String> = (0..6).map(system_uuid).collect();
    assert_eq!(uuids, expected.iter().map(String::as_str).collect());
    assert!(systems.iter().all(|s| s["node"].is_null()), "{all:#}");
    let (_, only_b) = api.get("/api/2.0/systems?endpoint=rack-b").await;
    let only_b = only_b["systems"].as_array().expect("systems");
    assert_eq!(only_b.len(), 3);
    assert!(only_b.iter().all(|s| s["endpoint"]["id"] == b.as_str()));
    let (_, maker) = api
        .get("/api/2.0/systems?manufacturer=sushy%20emulator&powerState=off")
        .await;
    assert_eq!(
        maker["systems"].as_array().expect("systems").len(),
        6,
        "{maker:#}"
    );
    let (_, none) = api.get("/api/2.0/systems?powerState=On").await;
    assert_eq!(none["systems"], json!([]), "{none:#}");
    let (code, _) = api.get("/api/2.0/systems?endpoint=nope").await;
    assert_eq!(code, 404);

    // Discovery through each endpoint: one node per system, whose OBM refers to the
    // endpoint and carries no credential of its own.
    discover(&api, &a).await;
    discover(&api, &b).await;
    let (_, nodes) = api.get("/api/2.0/nodes").await;
    let nodes = nodes.as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), 6, "{nodes:#?}");
    for n in &nodes {
        let config = &n["obms"][0]["config"];
        assert!(
            config["endpoint"] == a.as_str() || config["endpoint"] == b.as_str(),
            "{n:#}"
        );
        assert!(config.get("host").is_none_or(|h| h == ""), "{n:#}");
        assert!(!n.to_string().contains("Passw0rd"), "{n:#}");
    }
    let node_ids: Vec<String> = nodes
        .iter()
        .map(|n| n["id"].as_str().expect("an id").to_owned())
        .collect();
    let (_, ep) = api.get(&format!("/api/2.0/endpoints/{a}")).await;
    assert_eq!(ep["nodes"], 3, "{ep:#}");
    assert_eq!(ep["systemsSeen"], 3, "{ep:#}");
    assert_eq!(ep["activeWorkflows"], 0, "{ep:#}");
    assert!(ep["lastContact"].is_string(), "{ep:#}");
    let (_, listed) = api.get(&format!("/api/2.0/endpoints/{a}/systems")).await;
    let listed = listed.as_array().expect("systems");
    assert_eq!(listed.len(), 3);
    assert!(
        listed
            .iter()
            .all(|s| node_ids.iter().any(|id| s["node"] == id.as_str())),
        "{listed:#?}"
    );

    // A batch over all six nodes, two at a time, killed mid-way and carried on.
    let graph = "Graph.PowerOn.Node";
    let (code, created) = api
        .send(
            "POST",
            "/api/2.0/batches",
            Some(json!({"name": graph, "options": fast(), "nodes": node_ids, "maxConcurrent": 2})),
        )
        .await;
    assert_eq!(code, 201, "{created}");
    let id = created["id"].as_str().expect("an id").to_owned();
    let midway = follow(&api, &id, graph, 2, |b| {
        b["counts"]["succeeded"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(midway["state"], "running", "{midway:#}");
    server.kill9();
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    let done = follow(&api, &id, graph, 2, |b| b["state"] == "finished").await;
    assert_eq!(done["counts"]["succeeded"], 6, "{done:#}");
    assert_eq!(done["total"], 6);
    let workflows: BTreeSet<&str> = done["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["workflow"].as_str())
        .collect();
    assert_eq!(workflows.len(), 6, "one workflow per node: {done:#}");
    for i in 0..3 {
        assert_eq!(rack_a.power_state(i).await, "On");
        assert_eq!(rack_b.power_state(3 + i).await, "On");
    }

    // A busy endpoint is not deleted, and the refusal names the node and its workflow.
    let hold = r#"
injectableName: Hold
tasks:
  - {label: hold, taskName: Task.Wait.Notification}
"#;
    let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", hold).await;
    assert_eq!(code, 201, "{body}");
    let a_node = nodes
        .iter()
        .find(|n| n["obms"][0]["config"]["endpoint"] == a.as_str())
        .and_then(|n| n["id"].as_str())
        .expect("a node of rack-a")
        .to_owned();
    let held = api.run("Hold", Some(&a_node), json!({})).await;
    let (code, body) = api
        .send(
            "DELETE",
            &format!("/api/2.0/endpoints/{a}?nodes=delete"),
            None,
        )
        .await;
    assert_eq!(code, 409, "{body}");
    let message = body.to_string();
    assert!(
        message.contains(&a_node) && message.contains(&held),
        "{body}"
    );
    let (_, ep) = api.get(&format!("/api/2.0/endpoints/{a}")).await;
    assert_eq!(ep["activeWorkflows"], 1, "{ep:#}");
    let (code, body) = api
        .send(
            "PUT",
            &format!("/api/2.0/workflows/{held}/action"),
            Some(json!({"command": "cancel"})),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    api.wait(&held, LIMIT).await;

    // Rotation: one wrong password makes every node of rack-b fail, the right one set
    // once makes every node work again.
    let b_nodes: Vec<String> = nodes
        .iter()
        .filter(|n| n["obms"][0]["config"]["endpoint"] == b.as_str())
        .map(|n| n["id"].as_str().expect("an id").to_owned())
        .collect();
    let rotate = |password: &'static str| {
        let api = &api;
        let path = format!("/api/2.0/endpoints/{b}");
        async move {
            let (code, body) = api
                .send("PATCH", &path, Some(json!({"password": password})))
                .await;
            assert_eq!(code, 200, "{body}");
            assert!(!body.to_string().contains(password), "{body}");
        }
    };
    rotate("an-old-Passw0rd").await;
    for node in &b_nodes {
        let wf = api
            .run_wait("Graph.PowerOff.Node", Some(node), fast(), LIMIT)
            .await;
        assert_eq!(wf["status"], "failed", "{wf:#}");
        assert!(wf.to_string().contains("authentication failed"), "{wf:#}");
    }
    rotate(PASSWORD_B).await;
    for node in &b_nodes {
        let wf = api
            .run_wait("Graph.PowerOff.Node", Some(node), fast(), LIMIT)
            .await;
        assert_eq!(wf["status"], "succeeded", "{wf:#}");
    }
    for i in 3..6 {
        assert_eq!(rack_b.power_state(i).await, "Off");
    }

    // Deleting: rack-a with its nodes, rack-b keeping its nodes without the OBM.
    let (code, gone) = api
        .send(
            "DELETE",
            &format!("/api/2.0/endpoints/{a}?nodes=delete"),
            None,
        )
        .await;
    assert_eq!(code, 200, "{gone}");
    assert_eq!(
        gone["nodesDeleted"].as_array().map(Vec::len),
        Some(3),
        "{gone}"
    );
    let (code, gone) = api
        .send("DELETE", &format!("/api/2.0/endpoints/{b}"), None)
        .await;
    assert_eq!(code, 200, "{gone}");
    assert_eq!(
        gone["nodesDetached"].as_array().map(Vec::len),
        Some(3),
        "{gone}"
    );
    let (_, nodes) = api.get("/api/2.0/nodes").await;
    let nodes = nodes.as_array().expect("nodes");
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().all(|n| n["obms"] == json!([])), "{nodes:#?}");
    let (_, eps) = api.get("/api/2.0/endpoints").await;
    assert_eq!(eps, json!([]));
    assert!(!server.logs().contains(PASSWORD_B));
}
