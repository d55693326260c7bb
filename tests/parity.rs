//! One rule, two protocols: the same operations sent over HTTP and over gRPC to one real
//! binary must meet the same rules, with the HTTP status and the gRPC code that the one
//! mapping of each protocol gives, and the same message.

mod support;

use std::time::Duration;

use metalgraph::api::grpc::pb;
use pb::definitions_client::DefinitionsClient;
use pb::nodes_client::NodesClient;
use pb::workflows_client::WorkflowsClient;
use serde_json::{Value, json};
use support::{Api, Server};
use tonic::Code;

const HOLD: &str = "{injectableName: Parity.Hold, tasks: [{label: h, taskName: Task.Wait, optionOverrides: {duration: 1h}}]}";
const QUICK: &str = "{injectableName: Parity.Quick, tasks: [{label: q, taskName: Task.Noop}]}";

struct Clients {
    api: Api,
    nodes: NodesClient<support::Grpc>,
    workflows: WorkflowsClient<support::Grpc>,
    definitions: DefinitionsClient<support::Grpc>,
}

/// An operation both protocols offer.
#[derive(Debug, Clone)]
enum Op {
    CreateNode(Value),
    GetNode(String),
    DeleteNode(String),
    SetObm(String, Value),
    Run(String, Option<String>),
    Cancel(String),
    DeleteGraph(String),
}

/// What one protocol answered: success, or the code and message of the error.
#[derive(Debug, PartialEq)]
enum Answer {
    Ok,
    Err(u16, String),
}

fn obm_pb(v: &Value) -> pb::Obm {
    let c = &v["config"];
    pb::Obm {
        service: v["service"].as_str().unwrap_or_default().into(),
        config: Some(pb::ObmConfig {
            host: c["host"].as_str().unwrap_or_default().into(),
            port: c["port"].as_u64().unwrap_or_default() as u32,
            user: c["user"].as_str().unwrap_or_default().into(),
            password: c["password"].as_str().unwrap_or_default().into(),
            system_id: c["systemId"].as_str().unwrap_or_default().into(),
            ..Default::default()
        }),
    }
}

fn node_pb(v: &Value) -> pb::Node {
    pb::Node {
        id: v["id"].as_str().unwrap_or_default().into(),
        name: v["name"].as_str().unwrap_or_default().into(),
        obms: v["obms"]
            .as_array()
            .map(|o| o.iter().map(obm_pb).collect())
            .unwrap_or_default(),
        ..Default::default()
    }
}

impl Clients {
    async fn http(&self, op: &Op) -> Answer {
        let (code, body) = match op {
            Op::CreateNode(n) => {
                self.api
                    .send("POST", "/api/2.0/nodes", Some(n.clone()))
                    .await
            }
            Op::GetNode(id) => self.api.get(&format!("/api/2.0/nodes/{id}")).await,
            Op::DeleteNode(id) => {
                self.api
                    .send("DELETE", &format!("/api/2.0/nodes/{id}"), None)
                    .await
            }
            Op::SetObm(id, obm) => {
                self.api
                    .send(
                        "PUT",
                        &format!("/api/2.0/nodes/{id}/obm"),
                        Some(obm.clone()),
                    )
                    .await
            }
            Op::Run(graph, node) => {
                let body = json!({"name": graph, "node": node});
                self.api
                    .send("POST", "/api/2.0/workflows", Some(body))
                    .await
            }
            Op::Cancel(id) => {
                let body = json!({"command": "cancel"});
                let path = format!("/api/2.0/workflows/{id}/action");
                self.api.send("PUT", &path, Some(body)).await
            }
            Op::DeleteGraph(name) => {
                let path = format!("/api/2.0/workflows/graphs/{name}");
                self.api.send("DELETE", &path, None).await
            }
        };
        if code < 300 {
            Answer::Ok
        } else {
            let message = body["error"]["message"].as_str().unwrap_or_default();
            Answer::Err(code, message.to_owned())
        }
    }

    async fn grpc(&mut self, op: &Op) -> Result<(), tonic::Status> {
        match op.clone() {
            Op::CreateNode(n) => {
                let node = Some(node_pb(&n));
                self.nodes
                    .create_node(pb::CreateNodeRequest { node })
                    .await?;
            }
            Op::GetNode(id) => {
                self.nodes.get_node(pb::GetNodeRequest { id }).await?;
            }
            Op::DeleteNode(id) => {
                self.nodes.delete_node(pb::DeleteNodeRequest { id }).await?;
            }
            Op::SetObm(id, obm) => {
                let obm = Some(obm_pb(&obm));
                self.nodes
                    .update_obm(pb::UpdateObmRequest { id, obm })
                    .await?;
            }
            Op::Run(name, node) => {
                let req = pb::RunGraphRequest {
                    name,
                    node: node.unwrap_or_default(),
                    options: None,
                };
                self.workflows.run_graph(req).await?;
            }
            Op::Cancel(id) => {
                let req = pb::CancelWorkflowRequest { id };
                self.workflows.cancel_workflow(req).await?;
            }
            Op::DeleteGraph(name) => {
                let req = pb::DeleteGraphRequest { name };
                self.definitions.delete_graph(req).await?;
            }
        }
        Ok(())
    }
}

fn redfish(host: &str, password: Option<&str>) -> Value {
    let mut config = json!({"host": host, "user": "admin"});
    if let Some(p) = password {
        config["password"] = json!(p);
    }
    json!({"service": "redfish-obm-service", "config": config})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_protocols_keep_the_same_rules() {
    let data = tempfile::tempdir().unwrap();
    let port = metalgraph_testkit::free_tcp_port();
    let grpc = format!("127.0.0.1:{port}");
    let server = Server::start(data.path(), "sled", &["--grpc-listen", &grpc]);
    let channel = server.grpc(port).await;
    let mut c = Clients {
        api: server.api(),
        nodes: NodesClient::new(channel.clone()),
        workflows: WorkflowsClient::new(channel.clone()),
        definitions: DefinitionsClient::new(channel),
    };
    for g in [HOLD, QUICK] {
        let (code, body) = c.api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert_eq!(code, 201, "{body}");
    }
    // A node with a running workflow, and a finished workflow.
    c.api
        .create_node(json!({"id": "busy", "name": "busy"}))
        .await;
    let running = c.api.run("Parity.Hold", Some("busy"), json!({})).await;
    let finished = c.api.run("Parity.Quick", None, json!({})).await;
    c.api.wait(&finished, Duration::from_secs(30)).await;
    // Two nodes alike, one for each protocol's changes, each with two OBMs.
    for id in ["twin-http", "twin-grpc"] {
        let ipmi = json!({"service": "ipmi-obm-service", "config": {"host": "10.0.1.1", "password": "ipmi-pw"}});
        c.api
            .create_node(json!({"id": id, "name": id, "obms": [redfish("https://10.0.0.1", Some("pw")), ipmi]}))
            .await;
    }

    // (what, operation with `{twin}` for the protocol's own node, HTTP status, gRPC code)
    let twin = "{twin}";
    let cases: Vec<(&str, Op, u16, Code)> = vec![
        (
            "a node needs a name",
            Op::CreateNode(json!({"id": "nameless"})),
            400,
            Code::InvalidArgument,
        ),
        (
            "a node id is unique",
            Op::CreateNode(json!({"id": "busy", "name": "again"})),
            409,
            Code::AlreadyExists,
        ),
        (
            "a systemId is never a URL",
            Op::CreateNode(
                json!({"name": "evil", "obms": [{"service": "redfish-obm-service", "config": {"host": "https://10.0.0.1", "systemId": "http://attacker:9/x"}}]}),
            ),
            400,
            Code::InvalidArgument,
        ),
        (
            "an unknown node",
            Op::GetNode("nope".into()),
            404,
            Code::NotFound,
        ),
        (
            "a busy node runs nothing else",
            Op::Run("Parity.Quick".into(), Some("busy".into())),
            409,
            Code::AlreadyExists,
        ),
        (
            "an unknown graph",
            Op::Run("Parity.Nope".into(), None),
            404,
            Code::NotFound,
        ),
        (
            "a run on an unknown node",
            Op::Run("Parity.Quick".into(), Some("nope".into())),
            404,
            Code::NotFound,
        ),
        (
            "a finished workflow cannot be cancelled",
            Op::Cancel(finished.clone()),
            409,
            Code::FailedPrecondition,
        ),
        (
            "an unknown workflow",
            Op::Cancel("nope".into()),
            404,
            Code::NotFound,
        ),
        (
            "a busy node cannot be deleted",
            Op::DeleteNode("busy".into()),
            409,
            Code::FailedPrecondition,
        ),
        (
            "a library graph cannot be deleted",
            Op::DeleteGraph("Graph.PowerOn.Node".into()),
            409,
            Code::FailedPrecondition,
        ),
        (
            "an OBM moved to another BMC needs its password again",
            Op::SetObm(twin.into(), redfish("https://10.0.0.9", None)),
            400,
            Code::InvalidArgument,
        ),
        (
            "an OBM kept on its BMC keeps its password",
            Op::SetObm(twin.into(), redfish("https://10.0.0.1", None)),
            200,
            Code::Ok,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, op, status, code) in cases {
        let for_twin = |id: &str| match &op {
            Op::SetObm(t, obm) if t == twin => Op::SetObm(id.into(), obm.clone()),
            other => other.clone(),
        };
        let http = c.http(&for_twin("twin-http")).await;
        let grpc = c.grpc(&for_twin("twin-grpc")).await;
        let http_right = match &http {
            Answer::Ok => status < 300,
            Answer::Err(got, _) => *got == status,
        };
        if !http_right {
            wrong.push(format!("{what}: HTTP answered {http:?}, expected {status}"));
        }
        match (&grpc, code) {
            (Ok(()), Code::Ok) => {}
            (Err(s), code) if s.code() == code => {
                if let Answer::Err(_, m) = &http
                    && m != s.message()
                {
                    wrong.push(format!(
                        "{what}: messages differ: HTTP {m:?}, gRPC {:?}",
                        s.message()
                    ));
                }
            }
            (got, _) => wrong.push(format!("{what}: gRPC answered {got:?}, expected {code:?}")),
        }
    }
    assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));

    // The OBM each protocol set is the same: the password kept, the other OBM kept.
    for id in ["twin-http", "twin-grpc"] {
        let (_, node) = c.api.get(&format!("/api/2.0/nodes/{id}")).await;
        let obms = node["obms"].as_array().unwrap();
        assert_eq!(obms.len(), 2, "{id}: {node}");
        assert_eq!(obms[0]["service"], "redfish-obm-service", "{id}: {node}");
        assert_eq!(obms[0]["config"]["passwordSet"], true, "{id}: {node}");
        assert_eq!(obms[1]["service"], "ipmi-obm-service", "{id}: {node}");
    }
    let (_, wf) = c.api.get(&format!("/api/2.0/workflows/{running}")).await;
    assert_eq!(wf["status"], "running", "{wf}");
}
