//! The gRPC API end to end: the real binary with `--grpc-listen`, a tonic client generated
//! from the same proto, every RPC, error codes, and `Watch` seeing every transition in order.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use metalgraph::api::grpc::pb;
use pb::definitions_client::DefinitionsClient;
use pb::nodes_client::NodesClient;
use pb::workflows_client::WorkflowsClient;
use support::Server;
use tonic::Code;

const GRAPH: &str = r#"
injectableName: Grpc.Demo
options: {defaults: {greeting: null}}
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Wait, optionOverrides: {duration: 200ms}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Wait, optionOverrides: {duration: 100ms}, waitOn: {a: succeeded}}
  - {label: d, taskName: Task.Noop, waitOn: {b: succeeded, c: succeeded}}
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn options(greeting: &str) -> prost_types::Struct {
    let v = serde_json::json!({"defaults": {"greeting": greeting}});
    metalgraph::api::grpc::to_pb_struct(v.as_object().unwrap())
}

/// Reads a Watch stream to its end, as `label:state` / `wf:status` strings per workflow.
async fn collect(
    mut stream: tonic::Streaming<pb::WatchEvent>,
    skip_snapshot: bool,
) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    while let Some(ev) = stream.message().await.unwrap() {
        if skip_snapshot && ev.snapshot {
            continue;
        }
        match ev.event.unwrap() {
            pb::watch_event::Event::Workflow(w) => {
                out.entry(w.workflow_id).or_default().push(format!(
                    "wf:{}",
                    pb::WorkflowStatus::try_from(w.status)
                        .unwrap()
                        .as_str_name()
                ))
            }
            pb::watch_event::Event::Task(t) => out.entry(t.workflow_id).or_default().push(format!(
                "{}:{}",
                t.label,
                pb::TaskState::try_from(t.state).unwrap().as_str_name()
            )),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_and_watch() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(dir.path(), "sled", &["--grpc-listen", &addr]);
    let ch = server.grpc(port).await;
    let mut defs = DefinitionsClient::new(ch.clone());
    let mut wfs = WorkflowsClient::new(ch.clone());
    let mut nodes = NodesClient::new(ch.clone());

    // Definitions.
    let put = defs
        .put_graph(pb::PutGraphRequest {
            definition: Some(pb::put_graph_request::Definition::Text(GRAPH.into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.tasks.len(), 4);
    assert_eq!(put.tasks[3].wait_on.len(), 2);
    let got = defs
        .get_graph(pb::GetGraphRequest {
            name: "Grpc.Demo".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.source, pb::Source::User as i32);
    // A typed graph round-trips through PutGraph.
    let mut typed = got.clone();
    typed.injectable_name = "Grpc.Typed".into();
    defs.put_graph(pb::PutGraphRequest {
        definition: Some(pb::put_graph_request::Definition::Graph(typed)),
    })
    .await
    .unwrap();
    let all = defs
        .list_graphs(pb::ListGraphsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(all.graphs.iter().any(|g| g.injectable_name == "Grpc.Typed"));
    assert!(all.next_page_token.is_empty(), "one page holds them all");
    // Page by page, two at a time: the same graphs, in name order.
    let mut paged = Vec::new();
    let mut token = String::new();
    loop {
        let page = defs
            .list_graphs(pb::ListGraphsRequest {
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.graphs.len() <= 2);
        paged.extend(page.graphs.into_iter().map(|g| g.injectable_name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let names: Vec<String> = all
        .graphs
        .iter()
        .map(|g| g.injectable_name.clone())
        .collect();
    assert_eq!(paged, names);
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    let e = defs
        .list_tasks(pb::ListTasksRequest {
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let tasks = defs
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        tasks
            .tasks
            .iter()
            .any(|t| t.injectable_name == "Task.Noop" && t.source == pb::Source::Library as i32)
    );
    let noop = defs
        .get_task(pb::GetTaskRequest {
            name: "Task.Noop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(noop.implements_task, "noop");
    defs.put_task(pb::PutTaskRequest {
        definition: Some(pb::put_task_request::Definition::Text(
            "{injectableName: Task.Grpc.Noop, implementsTask: noop}".into(),
        )),
    })
    .await
    .unwrap();
    defs.delete_task(pb::DeleteTaskRequest {
        name: "Task.Grpc.Noop".into(),
    })
    .await
    .unwrap();
    // A typed definition names its template dialect, and reads back with it; an unknown
    // dialect is refused naming it.
    let typed = |dialect: &str| pb::TaskDefinition {
        injectable_name: "Task.Grpc.Dialect".into(),
        implements_task: "noop".into(),
        options: None,
        template_dialect: dialect.into(),
        ..Default::default()
    };
    let stored = defs
        .put_task(pb::PutTaskRequest {
            definition: Some(pb::put_task_request::Definition::Task(typed("rackhd"))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.template_dialect, "rackhd");
    let e = defs
        .put_task(pb::PutTaskRequest {
            definition: Some(pb::put_task_request::Definition::Task(typed("handlebars"))),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("\"handlebars\""), "{e}");
    defs.delete_task(pb::DeleteTaskRequest {
        name: "Task.Grpc.Dialect".into(),
    })
    .await
    .unwrap();
    defs.delete_graph(pb::DeleteGraphRequest {
        name: "Grpc.Typed".into(),
    })
    .await
    .unwrap();

    // Error codes.
    let e = defs
        .get_graph(pb::GetGraphRequest {
            name: "Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = defs
        .put_graph(pb::PutGraphRequest {
            definition: Some(pb::put_graph_request::Definition::Text(
                "{injectableName: Bad, tasks: [{label: a, taskName: Task.Noop, waitOn: {zz: succeeded}}]}".into(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("task 'a'") && e.message().contains("waitOn.zz"),
        "{}",
        e.message()
    );
    let e = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Demo".into(),
            node: String::new(),
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("greeting"), "{}", e.message());
    let e = defs
        .delete_graph(pb::DeleteGraphRequest {
            name: "Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Nodes: the password is write-only.
    let node = nodes
        .create_node(pb::CreateNodeRequest {
            node: Some(pb::Node {
                id: "grpc-node".into(),
                name: "grpc-node".into(),
                identifiers: vec!["02:00:00:00:20:01".into()],
                obms: vec![pb::Obm {
                    service: "sim-obm-service".into(),
                    config: Some(pb::ObmConfig {
                        host: "sim".into(),
                        user: "admin".into(),
                        password: "hunter2".into(),
                        ..Default::default()
                    }),
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let cfg = node.obms[0].config.clone().unwrap();
    assert!(cfg.password.is_empty() && cfg.password_set);
    let updated = nodes
        .update_obm(pb::UpdateObmRequest {
            id: "grpc-node".into(),
            obm: Some(pb::Obm {
                service: "sim-obm-service".into(),
                config: Some(pb::ObmConfig {
                    host: "sim".into(),
                    user: "root".into(),
                    ..Default::default()
                }),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        updated.obms[0].config.as_ref().unwrap().password_set,
        "an OBM update without a password keeps it"
    );
    let listed = nodes
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{listed:?}").contains("grpc-node") && !format!("{listed:?}").contains("hunter2")
    );
    let e = nodes
        .get_node(pb::GetNodeRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Run on the node and watch it from the start: every transition, in order, none missing.
    let all_watch = wfs
        .watch(pb::WatchRequest {
            workflow_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let all_task = tokio::spawn(async move {
        let mut s = all_watch;
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        // Read until three workflows have finished.
        let mut finished = 0;
        while finished < 3 {
            let ev = tokio::time::timeout(Duration::from_secs(30), s.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if let Some(pb::watch_event::Event::Workflow(w)) = &ev.event {
                let st = pb::WorkflowStatus::try_from(w.status).unwrap();
                seen.entry(w.workflow_id.clone())
                    .or_default()
                    .push(format!("wf:{}", st.as_str_name()));
                if matches!(
                    st,
                    pb::WorkflowStatus::Succeeded
                        | pb::WorkflowStatus::Failed
                        | pb::WorkflowStatus::Cancelled
                ) {
                    finished += 1;
                }
            } else if let Some(pb::watch_event::Event::Task(t)) = &ev.event {
                seen.entry(t.workflow_id.clone()).or_default().push(format!(
                    "{}:{}",
                    t.label,
                    pb::TaskState::try_from(t.state).unwrap().as_str_name()
                ));
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let wf = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Demo".into(),
            node: "grpc-node".into(),
            options: Some(options("hi")),
        })
        .await
        .unwrap()
        .into_inner();
    let one = wfs
        .watch(pb::WatchRequest {
            workflow_id: wf.instance_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let busy = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Demo".into(),
            node: "grpc-node".into(),
            options: Some(options("hi")),
        })
        .await
        .unwrap_err();
    assert_eq!(busy.code(), Code::AlreadyExists, "{busy}");
    assert!(busy.message().contains(&wf.instance_id), "{busy}");
    // Two more unbound workflows in parallel.
    let w2 = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Demo".into(),
            node: String::new(),
            options: Some(options("2")),
        })
        .await
        .unwrap()
        .into_inner();
    let w3 = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Demo".into(),
            node: String::new(),
            options: Some(options("3")),
        })
        .await
        .unwrap()
        .into_inner();
    let single = collect(one, false).await;
    let events = &single[&wf.instance_id];
    assert_eq!(
        events.last().unwrap(),
        "wf:WORKFLOW_STATUS_SUCCEEDED",
        "{events:?}"
    );
    // The watch of one workflow: its snapshot (pending), then every change to the end.
    // (A change committed between subscribing and reading the snapshot may show twice.)
    let done: std::collections::BTreeSet<&String> = events
        .iter()
        .filter(|e| e.ends_with("TASK_STATE_SUCCEEDED"))
        .collect();
    assert_eq!(done.len(), 4, "{events:?}");
    let seen = all_task.await.unwrap();
    for w in [&wf.instance_id, &w2.instance_id, &w3.instance_id] {
        let evs = seen.get(w).unwrap_or_else(|| panic!("no events for {w}"));
        let want = [
            "wf:WORKFLOW_STATUS_PENDING",
            "wf:WORKFLOW_STATUS_RUNNING",
            "a:TASK_STATE_RUNNING",
            "a:TASK_STATE_SUCCEEDED",
        ];
        assert_eq!(&evs[..4], &want, "{w}: {evs:?}");
        for label in ["b", "c", "d"] {
            let r = evs
                .iter()
                .position(|e| e == &format!("{label}:TASK_STATE_RUNNING"))
                .unwrap();
            let s = evs
                .iter()
                .position(|e| e == &format!("{label}:TASK_STATE_SUCCEEDED"))
                .unwrap();
            assert!(r < s, "{w}: {evs:?}");
        }
        assert_eq!(
            evs.last().unwrap(),
            "wf:WORKFLOW_STATUS_SUCCEEDED",
            "{w}: {evs:?}"
        );
        assert_eq!(evs.len(), 11, "every transition exactly once: {evs:?}");
    }
    let got = wfs
        .get_workflow(pb::GetWorkflowRequest {
            id: wf.instance_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status, pb::WorkflowStatus::Succeeded as i32);
    assert_eq!(got.tasks.len(), 4);
    let listed = wfs
        .list_workflows(pb::ListWorkflowsRequest {
            active: Some(false),
            node: "grpc-node".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.workflows.len(), 1);
    // Pages: a full page names the next; the next, past the end, is empty and names none.
    let first = wfs
        .list_workflows(pb::ListWorkflowsRequest {
            node: "grpc-node".into(),
            status: pb::WorkflowStatus::Succeeded as i32,
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.workflows[0].instance_id, wf.instance_id);
    assert!(!first.next_page_token.is_empty());
    let rest = wfs
        .list_workflows(pb::ListWorkflowsRequest {
            node: "grpc-node".into(),
            page_size: 1,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (rest.workflows.len(), rest.next_page_token.as_str()),
        (0, "")
    );
    let too_big = wfs
        .list_workflows(pb::ListWorkflowsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .expect_err("a page of 5000");
    assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        too_big.message(),
        "a page holds 1 to 1000 workflows, not 5000"
    );

    // Watching a finished workflow sends its final state and ends.
    let again = wfs
        .watch(pb::WatchRequest {
            workflow_id: wf.instance_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let snap = collect(again, false).await;
    assert_eq!(snap[&wf.instance_id].len(), 5);

    // Cancel.
    let slow = "{injectableName: Grpc.Slow, tasks: [{label: s, taskName: Task.Wait, optionOverrides: {duration: 1h}}]}";
    defs.put_graph(pb::PutGraphRequest {
        definition: Some(pb::put_graph_request::Definition::Text(slow.into())),
    })
    .await
    .unwrap();
    let s = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Slow".into(),
            node: String::new(),
            options: None,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = wfs
        .cancel_workflow(pb::CancelWorkflowRequest {
            id: s.instance_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Cancel answers once the workflow has ended.
    assert_eq!(c.status, pb::WorkflowStatus::Cancelled as i32);
    assert_eq!(c.tasks[0].state, pb::TaskState::Cancelled as i32);
    let e = wfs
        .cancel_workflow(pb::CancelWorkflowRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}

fn peers_dir() -> std::path::PathBuf {
    std::env::var_os("METALGRAPH_PEERS")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/metalgraph-peers")
        })
}

/// Clients metalgraph did not write: Python grpcio code generated from our proto runs a graph
/// and watches it finish; `buf curl` lists the services through reflection and calls health.
/// Polls a workflow until it has finished.
async fn finished(wfs: &mut WorkflowsClient<support::Grpc>, id: &str) -> pb::Workflow {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let w = wfs
            .get_workflow(pb::GetWorkflowRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        let running = [pb::WorkflowStatus::Pending, pb::WorkflowStatus::Running];
        if !running.iter().any(|s| *s as i32 == w.status) {
            return w;
        }
        assert!(std::time::Instant::now() < deadline, "{w:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_workflow_runs_from_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = Server::start(
        dir.path(),
        "sled",
        &["--grpc-listen", &format!("127.0.0.1:{port}")],
    );
    let ch = server.grpc(port).await;
    let graph = r#"
injectableName: Grpc.Rerun
options: {defaults: {ready: false}}
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Evaluate.Condition, optionOverrides: {when: "{{ options.ready }}"}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Noop, waitOn: {b: succeeded}}
"#;
    DefinitionsClient::new(ch.clone())
        .put_graph(pb::PutGraphRequest {
            definition: Some(pb::put_graph_request::Definition::Text(graph.into())),
        })
        .await
        .unwrap();
    let mut wfs = WorkflowsClient::new(ch.clone());
    let old = wfs
        .run_graph(pb::RunGraphRequest {
            name: "Grpc.Rerun".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let old = finished(&mut wfs, &old.instance_id).await;
    assert_eq!(old.status, pb::WorkflowStatus::Failed as i32);
    assert_eq!(old.rerun_of, "");
    let state = |w: &pb::Workflow, i: usize| pb::TaskState::try_from(w.tasks[i].state).unwrap();

    let ready = serde_json::json!({"defaults": {"ready": true}});
    let rerun = wfs
        .rerun_workflow(pb::RerunWorkflowRequest {
            id: old.instance_id.clone(),
            options: Some(metalgraph::api::grpc::to_pb_struct(
                ready.as_object().unwrap(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rerun.rerun_of, old.instance_id);
    assert_eq!(state(&rerun, 0), pb::TaskState::Succeeded);
    let end = finished(&mut wfs, &rerun.instance_id).await;
    assert_eq!(end.status, pb::WorkflowStatus::Succeeded as i32, "{end:?}");
    assert_eq!(end.rerun_of, old.instance_id);
    // `a` was taken over from the old workflow; `b` and `c` ran in the rerun.
    assert_eq!(
        (end.tasks[0].attempts, &end.tasks[0].started_at),
        (old.tasks[0].attempts, &old.tasks[0].started_at)
    );
    for t in &end.tasks[1..] {
        assert_eq!(t.attempts, 1, "{t:?}");
        let (started, created) = (t.started_at.unwrap(), end.created_at.unwrap());
        assert!(
            (started.seconds, started.nanos) >= (created.seconds, created.nanos),
            "{t:?}"
        );
    }
    assert_eq!(
        wfs.get_workflow(pb::GetWorkflowRequest {
            id: old.instance_id.clone()
        })
        .await
        .unwrap()
        .into_inner(),
        old,
        "the old workflow is left as it was"
    );

    // Errors: an unknown id, a workflow that succeeded, options that are not layers.
    let rerun_of = |id: &str, options: Option<prost_types::Struct>| pb::RerunWorkflowRequest {
        id: id.into(),
        options,
    };
    let e = wfs
        .rerun_workflow(rerun_of("nope", None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    let e = wfs
        .rerun_workflow(rerun_of(&end.instance_id, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(e.message().contains("succeeded"), "{e}");
    let flat = serde_json::json!({"ready": true});
    let e = wfs
        .rerun_workflow(rerun_of(
            &old.instance_id,
            Some(metalgraph::api::grpc::to_pb_struct(
                flat.as_object().unwrap(),
            )),
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("options.ready"), "{e}");

    // Rerunning needs the role running does.
    let (code, viewer) = server
        .api()
        .send(
            "POST",
            "/api/2.0/tokens",
            Some(serde_json::json!({"name": "grpc-viewer", "role": "viewer"})),
        )
        .await;
    assert_eq!(code, 201, "{viewer}");
    let as_viewer = server.grpc_as(port, viewer["token"].as_str()).await;
    let e = WorkflowsClient::new(as_viewer)
        .rerun_workflow(rerun_of(&old.instance_id, None))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("needs role operator"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_clients_python_grpcio_and_buf_curl() {
    let peers = peers_dir();
    let python = peers.join("venv/bin/python");
    let buf = peers.join("npm-tools/node_modules/.bin/buf");
    assert!(
        python.exists() && buf.exists(),
        "the gRPC peers are missing under {}: run scripts/install-peers.sh",
        peers.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(dir.path(), "sled", &["--grpc-listen", &addr]);
    server.grpc(port).await;
    let ca = dir.path().join("tls/ca.pem");
    let token = server.token.clone().expect("the admin token");
    let bearer = format!("Authorization: Bearer {token}");

    let out = tempfile::tempdir().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/grpc_client.py");
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let run = tokio::process::Command::new(&python)
        .args([script, proto, out.path().to_str().unwrap(), &addr])
        .env("METALGRAPH_CA_CERT", &ca)
        .env("METALGRAPH_TOKEN", &token)
        .output()
        .await
        .unwrap();
    assert!(
        run.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(report["status"], "WORKFLOW_STATUS_SUCCEEDED", "{report}");
    assert_eq!(report["missing"], "NOT_FOUND", "{report}");
    let events: Vec<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        events.last(),
        Some(&"wf:WORKFLOW_STATUS_SUCCEEDED"),
        "{events:?}"
    );
    assert!(
        events.contains(&"second:TASK_STATE_SUCCEEDED"),
        "{events:?}"
    );

    // Over TLS, trusting the server's CA; the token rides as a header, on the calls and on
    // the reflection requests that describe them.
    let url = format!("https://{addr}");
    let buf_curl = || {
        let mut cmd = tokio::process::Command::new(&buf);
        cmd.args(["curl", "--protocol", "grpc", "--cacert"])
            .arg(&ca)
            .args(["-H", &bearer, "--reflect-header", &bearer]);
        cmd
    };
    let list = buf_curl()
        .args(["--list-services", &url])
        .output()
        .await
        .unwrap();
    let services = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "buf curl failed: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    for s in [
        "metalgraph.v1.Definitions",
        "metalgraph.v1.Workflows",
        "metalgraph.v1.Nodes",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(s), "{s} missing from {services}");
    }
    let health = buf_curl()
        .args(["-d", "{}", &format!("{url}/grpc.health.v1.Health/Check")])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&health.stdout).contains("SERVING"),
        "{}",
        String::from_utf8_lossy(&health.stdout)
    );
    let graphs = buf_curl()
        .args([
            "-d",
            r#"{"name": "Graph.PowerOn.Node"}"#,
            &format!("{url}/metalgraph.v1.Definitions/GetGraph"),
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&graphs.stdout).into_owned()
        + &String::from_utf8_lossy(&graphs.stderr);
    assert!(
        text.contains("Graph.PowerOn.Node") && text.contains("SOURCE_LIBRARY"),
        "{text}"
    );
}
