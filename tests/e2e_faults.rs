//! Faults end to end through the real binary: a BMC (sushy) that dies in the middle of a
//! workflow, a Redfish service that answers 500 with `@Message.ExtendedInfo`, and one that
//! never answers. Each failing task ends within its graph-level timeout with an error that
//! says what happened, while the engine keeps serving and another node's workflow finishes
//! unaffected.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use support::peers::{Sushy, SushyOptions, system_uuid};
use support::{Api, Server};
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(60);

/// Power on, pause, power off. The power-off task has a timeout and one retry.
const CYCLE: &str = r#"
injectableName: Test.E2E.PowerCycle
tasks:
  - label: power-on
    taskName: Task.Obm.Node.PowerOn
    timeout: 10s
  - label: pause
    taskName: Task.Wait
    optionOverrides: { duration: 2s }
    waitOn: { power-on: succeeded }
  - label: power-off
    taskName: Task.Obm.Node.PowerOff
    waitOn: { pause: succeeded }
    timeout: 10s
    retries: { max: 1, backoff: 200ms }
"#;

/// One power-on that may take 4 s (long enough for the checks made while it hangs).
const QUICK_ON: &str = r#"
injectableName: Test.E2E.QuickOn
tasks:
  - label: power-on
    taskName: Task.Obm.Node.PowerOn
    timeout: 4s
"#;

fn metalgraph() -> (Server, Api, TempDir) {
    let data = tempfile::tempdir().expect("a data dir");
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    (server, api, data)
}

fn fast() -> Value {
    json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "20s"}})
}

async fn put_graphs(api: &Api) {
    for g in [CYCLE, QUICK_ON] {
        let (code, v) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert!(code == 201 || code == 200, "{v}");
    }
}

/// A node driven by the in-process simulated BMC.
async fn sim_node(api: &Api) -> String {
    api.create_node(json!({
        "name": "bystander",
        "obms": [{"service": "sim-obm-service", "config": {"host": "sim"}}],
    }))
    .await
}

fn redfish_node(name: &str, host: &str, system: &str) -> Value {
    json!({
        "name": name,
        "obms": [{"service": "redfish-obm-service", "config": {"host": host, "systemId": system}}],
    })
}

async fn assert_healthy(api: &Api) {
    let (code, v) = api.get("/api/2.0/health").await;
    assert_eq!(code, 200, "{v}");
}

fn task<'a>(wf: &'a Value, label: &str) -> &'a Value {
    wf["tasks"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["label"] == label))
        .unwrap_or_else(|| panic!("no task {label}: {wf}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_that_dies_mid_workflow_fails_its_task_clearly() {
    let mut sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        ..SushyOptions::default()
    })
    .await;
    let (_server, api, _data) = metalgraph();
    put_graphs(&api).await;
    let node = api
        .create_node(redfish_node("doomed", &sushy.base, &system_uuid(0)))
        .await;
    let bystander = sim_node(&api).await;

    let id = api.run("Test.E2E.PowerCycle", Some(&node), fast()).await;
    let other = api
        .run("Test.E2E.PowerCycle", Some(&bystander), fast())
        .await;
    api.wait_task(&id, "pause", "running", LIMIT).await;
    assert_eq!(sushy.power_state(0).await, "On");
    sushy.kill();
    let killed = Instant::now();
    assert_healthy(&api).await;

    let wf = api.wait(&id, LIMIT).await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let off = task(&wf, "power-off");
    assert_eq!(off["state"], "failed", "{wf:#}");
    assert_eq!(off["attempts"], 2, "the retry ran too: {wf:#}");
    let error = off["error"].as_str().unwrap();
    assert!(error.contains("BMC unreachable"), "{error}");
    assert!(error.contains(&sushy.base), "names the BMC: {error}");
    assert!(
        killed.elapsed() < Duration::from_secs(12),
        "within the task's timeout: {:?}",
        killed.elapsed()
    );

    let wf = api.wait(&other, LIMIT).await;
    assert_eq!(
        wf["status"], "succeeded",
        "the other node is unaffected: {wf:#}"
    );
    assert_healthy(&api).await;
}

/// A Redfish service with one system whose power actions fail with the BMC's own words.
fn failing_bmc() -> Router {
    let system = json!({
        "@odata.id": "/redfish/v1/Systems/1", "Id": "1", "Name": "broken", "PowerState": "Off",
        "Actions": {"#ComputerSystem.Reset": {
            "target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"}},
    });
    Router::new()
        .route(
            "/redfish/v1/",
            get(|| async { Json(json!({"Systems": {"@odata.id": "/redfish/v1/Systems"}})) }),
        )
        .route(
            "/redfish/v1/Systems",
            get(|| async { Json(json!({"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]})) }),
        )
        .route(
            "/redfish/v1/Systems/1",
            get(move || async move { Json(system) }),
        )
        .route(
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            post(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"error": {
                        "code": "Base.1.0.GeneralError",
                        "message": "A general error has occurred.",
                        "@Message.ExtendedInfo": [{
                            "MessageId": "Base.1.0.InternalError",
                            "Message": "Power supply PSU2 reports a fault."}],
                    }})),
                )
            }),
        )
}

/// A service that accepts connections and never answers.
fn hanging_bmc() -> Router {
    Router::new().fallback(std::future::pending::<()>)
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bmc_errors_and_hangs_end_in_clear_task_errors() {
    let (_server, api, _data) = metalgraph();
    put_graphs(&api).await;
    let failing = api
        .create_node(redfish_node("psu-fault", &serve(failing_bmc()).await, "1"))
        .await;
    let hanging = api
        .create_node(redfish_node("hung", &serve(hanging_bmc()).await, "1"))
        .await;
    let bystander = sim_node(&api).await;

    let started = Instant::now();
    let hung = api.run("Test.E2E.QuickOn", Some(&hanging), fast()).await;
    let wf = api
        .run_wait("Graph.PowerOn.Node", Some(&failing), fast(), LIMIT)
        .await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let error = task(&wf, "power-on")["error"].as_str().unwrap();
    assert!(
        error.contains("Power supply PSU2 reports a fault."),
        "{error}"
    );
    assert!(error.contains("500"), "{error}");

    // While the hung BMC holds its task, the engine serves and other nodes finish.
    let wf = api
        .run_wait("Graph.Reboot.Node", Some(&bystander), fast(), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_healthy(&api).await;
    let (_, still) = api.get(&format!("/api/2.0/workflows/{hung}")).await;
    assert_eq!(still["status"], "running", "{still:#}");

    let wf = api.wait(&hung, LIMIT).await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let on = task(&wf, "power-on");
    assert_eq!(on["state"], "timeout", "{wf:#}");
    assert_eq!(on["error"], "timed out after 4s", "{wf:#}");
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );
    assert_healthy(&api).await;
}
