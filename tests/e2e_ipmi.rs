//! End to end through the real binary against OpenIPMI's `ipmi_sim`, driven with the real
//! `ipmitool`: power and PXE-boot graphs on a node registered with an `ipmi-obm-service`
//! OBM, checked through the simulated chassis' state files, and a wrong password reported
//! as an authentication failure naming the BMC.
//!
//! Needs the peers from scripts/install-peers.sh.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::peers::{IPMI_PASSWORD, IpmiSim};
use support::{Api, Server};
use tempfile::TempDir;

const LIMIT: Duration = Duration::from_secs(60);

fn metalgraph() -> (Server, Api, TempDir) {
    let data = tempfile::tempdir().expect("a data dir");
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    (server, api, data)
}

fn ipmi_node(sim: &IpmiSim, password: &str) -> Value {
    json!({
        "name": "ipmi-node",
        "obms": [{"service": "ipmi-obm-service", "config": {
            "host": "127.0.0.1", "port": sim.port, "user": "admin", "password": password}}],
    })
}

fn fast() -> Value {
    json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "20s"}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_and_pxe_boot_graphs_through_ipmitool() {
    let sim = IpmiSim::start();
    let (_server, api, _data) = metalgraph();
    let node = api.create_node(ipmi_node(&sim, IPMI_PASSWORD)).await;
    let (_, shown) = api.get(&format!("/api/2.0/nodes/{node}")).await;
    assert_eq!(shown["obms"][0]["config"]["passwordSet"], true, "{shown}");
    assert!(!shown.to_string().contains(IPMI_PASSWORD));

    for (graph, file, want) in [
        ("Graph.PowerOn.Node", "power", "1"),
        ("Graph.Reboot.Node", "power", "1"),
        ("Graph.PowerOff.Node", "power", "0"),
        ("Graph.Set.Boot.Pxe", "boot", "pxe"),
    ] {
        let wf = api.run_wait(graph, Some(&node), fast(), LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{graph}: {wf:#}");
        assert_eq!(sim.state(file), want, "{graph}");
        if graph == "Graph.Reboot.Node" {
            // A real cycle of a powered-on chassis, not a power-on.
            assert_eq!(wf["context"]["reboot"]["previousState"], "On", "{wf:#}");
            let calls = sim.state("calls.log");
            assert!(calls.contains("set power 0"), "{calls}");
        }
    }
    let (_, wf) = api.get("/api/2.0/workflows").await;
    assert!(!wf.to_string().contains(IPMI_PASSWORD));
    assert!(!sim.state("calls.log").contains(IPMI_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_the_workflow_naming_the_bmc() {
    let sim = IpmiSim::start();
    let (_server, api, _data) = metalgraph();
    let wrong = "Wr0ng-ipmi-pw";
    let node = api.create_node(ipmi_node(&sim, wrong)).await;
    let wf = api
        .run_wait("Graph.PowerOn.Node", Some(&node), fast(), LIMIT)
        .await;
    assert_eq!(wf["status"], "failed", "{wf:#}");
    let error = wf["tasks"][0]["error"].as_str().expect("a task error");
    let want = format!(
        "IPMI authentication failed for admin@127.0.0.1:{} (check user and password)",
        sim.port
    );
    assert!(error.contains(&want), "{error}");
    assert!(error.contains(&node), "{error}");
    assert!(!wf.to_string().contains(wrong), "{wf}");
    assert_eq!(sim.state("power"), "", "nothing was switched");
}
