//! End to end through the real binary against OpenIPMI's `ipmi_sim`, driven with the real
//! `ipmitool`: power and PXE-boot graphs on a node registered with an `ipmi-obm-service`
//! OBM, checked through the simulated chassis' state files; RackHD's `Graph.ClearSEL.Node`
//! and `Graph.McReset`, checked with ipmitool; and a wrong password reported as an
//! authentication failure naming the BMC.
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
async fn rackhd_clear_sel_and_mc_reset_graphs_through_ipmitool() {
    let sim = IpmiSim::start();
    let (_server, api, _data) = metalgraph();
    let node = api.create_node(ipmi_node(&sim, IPMI_PASSWORD)).await;
    sim.add_sel_entries(3);
    assert_eq!(sim.sel_entries(), 3);

    let wf = api
        .run_wait("Graph.ClearSEL.Node", Some(&node), fast(), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(
        wf["context"]["clearsel"],
        json!({"cleared": true, "entriesBefore": 3}),
        "{wf:#}"
    );
    assert_eq!(sim.sel_entries(), 0);
    // `sel list` lists nothing (it says "SEL has no entries" on stderr).
    assert_eq!(
        sim.ipmitool(&["sel", "list"]).trim(),
        "",
        "the SEL is empty"
    );

    // A short grace: ipmi_sim takes the reset and answers on at once.
    let options = json!({"defaults": {"pollInterval": "100ms", "waitTimeout": "20s",
                                      "resetGrace": "500ms"}});
    let wf = api
        .run_wait("Graph.McReset", Some(&node), options, LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    let out = &wf["context"]["mc-reset"];
    assert_eq!(out["reset"], "cold", "{wf:#}");
    assert_eq!(out["acknowledged"], true, "{wf:#}");
    assert_eq!(out["powerState"], "Off", "{wf:#}");
    // The BMC answers afterwards, and the node's power was not touched.
    let status = sim.ipmitool(&["chassis", "power", "status"]);
    assert_eq!(status.trim(), "Chassis Power is off");
    assert!(!sim.calls().contains("set power"), "{}", sim.calls());
    let (_, wf) = api.get("/api/2.0/workflows").await;
    assert!(!wf.to_string().contains(IPMI_PASSWORD));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipmi_endpoint_lists_its_system_discovers_one_node_and_drives_it() {
    let sim = IpmiSim::start();
    let (_server, api, _data) = metalgraph();
    let (code, ep) = api
        .send(
            "POST",
            "/api/2.0/endpoints",
            Some(
                json!({"name": "rack-ipmi-07", "service": "ipmi", "url": sim.host(),
                        "user": "admin", "password": IPMI_PASSWORD}),
            ),
        )
        .await;
    assert_eq!(code, 201, "{ep}");
    let id = ep["id"].as_str().unwrap().to_owned();

    let (code, systems) = api.get(&format!("/api/2.0/endpoints/{id}/systems")).await;
    assert_eq!(code, 200, "{systems}");
    assert_eq!(systems.as_array().map(Vec::len), Some(1), "{systems}");
    assert_eq!(systems[0]["powerState"], "Off", "{systems}");
    assert_eq!(systems[0]["name"], "rack-ipmi-07");
    assert!(systems[0]["node"].is_null());

    // Discovery twice: one node, found again by its endpoint the second time.
    for _ in 0..2 {
        let (code, wf) = api
            .send("POST", &format!("/api/2.0/endpoints/{id}/discover"), None)
            .await;
        assert_eq!(code, 201, "{wf}");
        let wf = api.wait(wf["instanceId"].as_str().unwrap(), LIMIT).await;
        assert_eq!(wf["status"], "succeeded", "{wf:#}");
    }
    let (_, nodes) = api.get("/api/2.0/nodes").await;
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:#?}");
    let node = nodes[0]["id"].as_str().unwrap();
    assert_eq!(nodes[0]["obms"][0]["service"], "ipmi-obm-service");
    assert_eq!(nodes[0]["obms"][0]["config"]["endpoint"], id.as_str());

    let wf = api
        .run_wait("Graph.PowerOn.Node", Some(node), fast(), LIMIT)
        .await;
    assert_eq!(wf["status"], "succeeded", "{wf:#}");
    assert_eq!(sim.state("power"), "1");
    let (_, systems) = api
        .get(&format!("/api/2.0/systems?endpoint={id}&powerState=on"))
        .await;
    assert_eq!(systems["systems"][0]["node"], node, "{systems:#}");
    assert!(!systems.to_string().contains(IPMI_PASSWORD));
}
