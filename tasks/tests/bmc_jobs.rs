//! The provisioning jobs' contract, checked against the simulated BMC (no peer needed):
//! idempotency, cancellation, clear errors without a node or with an unknown OBM service,
//! secrets kept out of outputs and errors, the BMC's own upkeep (`obm.bmc`) and its refusal
//! over Redfish; and the shipped OBM task definitions and graphs.

mod bmc_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bmc_support::{World, obm};
use metalgraph_engine::definitions::{Definitions, Library, parse, validate_task};
use metalgraph_engine::model::Definition;
use metalgraph_engine::{Job, JobRegistry};
use metalgraph_store::MemStore;
use metalgraph_tasks::bmc::{Drivers, REDFISH_SERVICE, SIM_SERVICE};
use metalgraph_tasks::{
    BmcJob, BootDeviceJob, CatalogRedfishJob, ConfigMediaBuildJob, ConfigMediaSite, PowerJob,
    VirtualMediaEjectJob, VirtualMediaInsertJob, WaitNotificationJob, register_basic,
    register_config_media, register_provisioning,
};
use serde_json::json;

const SECRET: &str = "Sim-Secret-Passw0rd";

fn sim_node(world: &World, name: &str) -> metalgraph_engine::nodes::Node {
    world.node(name, obm(SIM_SERVICE, "sim", "admin", SECRET, None))
}

#[tokio::test]
async fn power_jobs_against_the_simulator() {
    let world = World::default();
    let node = sim_node(&world, "sim-power");
    let job = PowerJob::new(Arc::new(Drivers::default()));
    let run = |action: &str| {
        world.run(
            &job,
            json!({ "action": action, "pollInterval": "10ms", "waitTimeout": "5s" }),
            Some(&node),
        )
    };
    assert_eq!(run("status").await.unwrap(), json!({ "powerState": "Off" }));
    let out = run("on").await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(out["changed"], true);
    assert_eq!(run("on").await.unwrap()["changed"], false);
    assert_eq!(run("reboot").await.unwrap()["powerState"], "On");
    assert_eq!(run("soft-off").await.unwrap()["powerState"], "Off");
    assert_eq!(run("off").await.unwrap()["changed"], false);
    let out = run("status").await.unwrap();
    assert!(!out.to_string().contains(SECRET));
}

#[tokio::test]
async fn boot_and_media_jobs_are_idempotent() {
    let world = World::default();
    let node = sim_node(&world, "sim-media");
    let drivers = Arc::new(Drivers::default());
    let out = world
        .run(
            &BootDeviceJob::new(drivers.clone()),
            json!({ "device": "bios" }),
            Some(&node),
        )
        .await
        .unwrap();
    assert_eq!(out["readback"]["device"], "bios");
    let insert = VirtualMediaInsertJob::new(drivers.clone());
    let eject = VirtualMediaEjectJob::new(drivers.clone());
    let image = json!({ "image": "http://images/a.iso" });
    assert_eq!(
        world
            .run(&insert, image.clone(), Some(&node))
            .await
            .unwrap()["changed"],
        true
    );
    assert_eq!(
        world.run(&insert, image, Some(&node)).await.unwrap()["changed"],
        false
    );
    let out = world
        .run(
            &insert,
            json!({ "image": "http://images/b.iso" }),
            Some(&node),
        )
        .await
        .unwrap();
    assert_eq!(out["replaced"], "http://images/a.iso");
    assert_eq!(
        world.run(&eject, json!({}), Some(&node)).await.unwrap()["changed"],
        true
    );
    assert_eq!(
        world.run(&eject, json!({}), Some(&node)).await.unwrap()["changed"],
        false
    );

    let out = world
        .run(&CatalogRedfishJob::new(drivers), json!({}), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["source"], "redfish");
    assert_eq!(world.nodes().catalogs(&node.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn jobs_need_a_node_and_a_known_obm_service() {
    let world = World::default();
    let drivers = Arc::new(Drivers::default());
    let job = PowerJob::new(drivers.clone());
    let err = world
        .run(&job, json!({ "action": "on" }), None)
        .await
        .unwrap_err();
    assert!(
        err.message
            .contains("task under-test: obm.power needs a node"),
        "{err}"
    );
    let err = world
        .run(&WaitNotificationJob::default(), json!({}), None)
        .await
        .unwrap_err();
    assert!(
        err.message.contains("wait.notification needs a node"),
        "{err}"
    );

    let node = world.node(
        "odd",
        obm("snmp-obm-service", "10.0.0.1", "admin", SECRET, None),
    );
    let err = world
        .run(&job, json!({ "action": "on" }), Some(&node))
        .await
        .unwrap_err();
    assert!(
        err.message.contains(&format!(
            "node {} (odd): unknown OBM service 'snmp-obm-service'",
            node.id
        )),
        "{err}"
    );
    assert!(!err.message.contains(SECRET));

    let mut bare = sim_node(&world, "bare");
    bare.obms.clear();
    let err = world
        .run(&job, json!({ "action": "on" }), Some(&bare))
        .await
        .unwrap_err();
    assert!(err.message.contains("has no OBM settings"), "{err}");
}

#[tokio::test]
async fn bmc_errors_name_node_and_operation_without_the_secret() {
    let world = World::default();
    let mut o = obm(SIM_SERVICE, "sim", "admin", SECRET, None);
    o.config
        .extra
        .insert("fail".into(), json!("fan tray missing"));
    let node = world.node("broken", o);
    let err = world
        .run(
            &PowerJob::new(Arc::new(Drivers::default())),
            json!({ "action": "on" }),
            Some(&node),
        )
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        format!(
            "node {} (broken): read power state on BMC sim:{}: fan tray missing",
            node.id, node.id
        )
    );
}

#[tokio::test]
async fn cancellation_stops_a_waiting_power_job_promptly() {
    let world = World::default();
    // A power change that takes an hour to show.
    let mut o = obm(SIM_SERVICE, "sim", "admin", SECRET, None);
    o.config.extra.insert("delay".into(), json!("1h"));
    let node = world.node("slow", o);
    let job = PowerJob::new(Arc::new(Drivers::default()));
    let ctx = world.ctx(
        &job,
        json!({ "action": "on", "pollInterval": "10ms" }),
        Some(&node),
    );
    let cancel = ctx.cancel.clone();
    let started = Instant::now();
    let handle = tokio::spawn(job.run(ctx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let err = handle.await.unwrap().unwrap_err();
    assert!(err.message.contains("power on: cancelled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// Under paused time: the BMC's outage and the job's waits are exact.
#[tokio::test(start_paused = true)]
async fn bmc_job_clears_the_sel_and_waits_out_a_cold_reset() {
    use tokio::time::Instant;
    let world = World::default();
    // The simulated BMC applies power changes, and comes back from a cold reset, after
    // 30 s.
    let mut o = obm(SIM_SERVICE, "sim", "admin", SECRET, None);
    o.config.extra.insert("delay".into(), json!("30s"));
    let node = world.node("sim-bmc", o);
    let drivers = Arc::new(Drivers::default());
    let power = PowerJob::new(drivers.clone());
    let job = BmcJob::new(drivers);
    // Each power action logs an event.
    for action in ["on", "off"] {
        let options = json!({ "action": action });
        world.run(&power, options, Some(&node)).await.unwrap();
    }
    let clear = json!({ "action": "clear-sel" });
    let out = world.run(&job, clear.clone(), Some(&node)).await.unwrap();
    assert_eq!(out, json!({ "cleared": true, "entriesBefore": 2 }));
    let out = world.run(&job, clear, Some(&node)).await.unwrap();
    assert_eq!(out["entriesBefore"], 0);

    // The defaults: 5 s of grace, then a try every second until the BMC answers.
    let reset = json!({ "action": "reset-cold" });
    let started = Instant::now();
    let out = world.run(&job, reset.clone(), Some(&node)).await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(31),
        "the job waited until the BMC answered again: {took:?}"
    );
    assert_eq!(
        out,
        json!({ "reset": "cold", "acknowledged": true, "powerState": "Off" })
    );
    // The reset was recorded before it was sent, so that a restarted attempt only waits:
    // it finds the BMC answering after its grace, rather than down for 30 s again.
    let checkpoints = world.services.checkpoints.lock().unwrap().clone();
    assert_eq!(checkpoints.len(), 1, "{checkpoints:?}");
    assert_eq!(checkpoints[0]["issued"], "cold reset");
    let mut ctx = world.ctx(&job, reset, Some(&node));
    ctx.checkpoint = Some(checkpoints[0].clone());
    let started = Instant::now();
    let out = job.run(ctx).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(5), "not reset again");
    assert_eq!(out["acknowledged"], json!(null));
    assert_eq!(world.services.checkpoints.lock().unwrap().len(), 1);

    // A BMC that stays away fails the task when the wait is over, saying so.
    let mut o = obm(SIM_SERVICE, "sim", "admin", SECRET, None);
    o.config.extra.insert("delay".into(), json!("1h"));
    let gone = world.node("sim-gone", o);
    let started = Instant::now();
    let err = world
        .run(
            &job,
            json!({ "action": "reset-cold", "waitTimeout": "2m" }),
            Some(&gone),
        )
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(120));
    assert!(
        err.message.contains(&format!(
            "node {} (sim-gone): the BMC sim:{} did not answer within 120s after its cold reset",
            gone.id, gone.id
        )) && err
            .message
            .contains("the simulated BMC is restarting after a cold reset"),
        "{err}"
    );
}

#[tokio::test]
async fn bmc_job_over_redfish_is_refused_naming_ipmi() {
    let world = World::default();
    // Nothing listens there: the refusal is made without a request.
    let node = world.node(
        "redfish-node",
        obm(REDFISH_SERVICE, "https://127.0.0.1:1", "root", SECRET, None),
    );
    let job = BmcJob::new(Arc::new(Drivers::default()));
    let err = world
        .run(&job, json!({ "action": "clear-sel" }), Some(&node))
        .await
        .unwrap_err();
    assert!(
        err.message.contains(&format!(
            "node {} (redfish-node): clear SEL on BMC https://127.0.0.1:1",
            node.id
        )) && err.message.contains(
            "not supported: metalgraph clears a BMC's SEL only over IPMI, as RackHD's \
                 ipmi-obm-service did; give the node an ipmi-obm-service OBM for its BMC"
        ),
        "{err}"
    );
    assert!(!err.message.contains(SECRET));
}

#[tokio::test]
async fn wait_notification_returns_the_callback_and_takes_no_slot() {
    let world = World::default();
    let node = sim_node(&world, "waiter");
    *world.services.notification.lock().unwrap() = Some(json!({ "installed": true }));
    let job = WaitNotificationJob::default();
    assert!(!job.occupies_slot());
    let out = world.run(&job, json!({}), Some(&node)).await.unwrap();
    assert_eq!(out, json!({ "installed": true }));
}

fn graphs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../graphs")
}

fn registry() -> JobRegistry {
    let mut jobs = JobRegistry::new();
    register_basic(&mut jobs);
    register_provisioning(&mut jobs, Arc::new(Drivers::default()));
    register_config_media(&mut jobs, Arc::new(ConfigMediaSite::default()));
    metalgraph_tasks::rackhd::register(&mut jobs);
    jobs
}

#[test]
fn shipped_obm_task_definitions_are_valid() {
    let jobs = registry();
    let expected = [
        ("Task.Obm.Node.PowerOn", "obm.power", Some(("action", "on"))),
        (
            "Task.Obm.Node.PowerOff",
            "obm.power",
            Some(("action", "off")),
        ),
        (
            "Task.Obm.Node.Reboot",
            "obm.power",
            Some(("action", "reboot")),
        ),
        (
            "Task.Obm.Node.Reset",
            "obm.power",
            Some(("action", "reset")),
        ),
        (
            "Task.Obm.Node.SoftOff",
            "obm.power",
            Some(("action", "soft-off")),
        ),
        (
            "Task.Obm.Node.PowerStatus",
            "obm.power",
            Some(("action", "status")),
        ),
        (
            "Task.Obm.Node.PxeBoot",
            "obm.boot-device",
            Some(("device", "pxe")),
        ),
        (
            "Task.Obm.Node.SetBootCd",
            "obm.boot-device",
            Some(("device", "cd")),
        ),
        (
            "Task.Obm.Node.SetBootHdd",
            "obm.boot-device",
            Some(("device", "hdd")),
        ),
        ("Task.VirtualMedia.Insert", "virtual-media.insert", None),
        ("Task.VirtualMedia.Eject", "virtual-media.eject", None),
        ("Task.Redfish.Discovery", "discovery.redfish", None),
        ("Task.Catalog.Redfish", "catalog.redfish", None),
        ("Task.Wait.Notification", "wait.notification", None),
        (
            "Task.Obm.Node.SoftReset",
            "Task.Base.Obm.Node",
            Some(("action", "softReset")),
        ),
        (
            "Task.Obm.Node.ClearSEL",
            "Task.Base.Obm.Node",
            Some(("action", "clearSEL")),
        ),
        (
            "Task.Obm.Node.McResetCold",
            "Task.Base.Obm.Node",
            Some(("action", "mcResetCold")),
        ),
    ];
    for (name, job, option) in expected {
        let file = format!("{name}.yaml");
        let path = graphs_dir().join("tasks").join(&file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let defs = parse(&text, &file).unwrap_or_else(|p| panic!("{file}: {p:?}"));
        let [Definition::Task(def)] = defs.as_slice() else {
            panic!("{file} must hold exactly one task definition");
        };
        assert_eq!(def.injectable_name, name, "{file}");
        assert_eq!(def.implements_task, job, "{file}");
        if let Some((key, value)) = option {
            assert_eq!(def.options.get(key), Some(&json!(value)), "{file}");
        }
        if let Err(problems) = validate_task(def, &jobs) {
            panic!("{file}: {problems:?}");
        }
    }
}

#[tokio::test]
async fn shipped_obm_graphs_are_valid() {
    let mut files = Vec::new();
    for dir in [graphs_dir(), graphs_dir().join("tasks")] {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                files.push((name, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let library = Library::from_texts(files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .unwrap_or_else(|p| panic!("{p:?}"));
    let defs = Definitions::new(
        Arc::new(MemStore::new()),
        library.clone(),
        Arc::new(registry()),
    );
    let ours = [
        "Graph.PowerOn.Node",
        "Graph.PowerOff.Node",
        "Graph.Reboot.Node",
        "Graph.Set.Boot.Pxe",
        "Graph.Redfish.Discovery",
        "Graph.Catalog.Redfish",
        "Graph.InstallOS.VirtualMedia",
        "Graph.Reset.Soft.Node",
        "Graph.ClearSEL.Node",
        "Graph.McReset",
    ];
    for name in ours {
        let graph = library
            .graphs
            .get(name)
            .unwrap_or_else(|| panic!("graph {name} is not shipped"));
        let plan = defs
            .validate_graph(graph.clone())
            .await
            .unwrap_or_else(|p| panic!("{name}: {p:?}"));
        assert!(!plan.tasks.is_empty(), "{name}");
    }
    let install = defs
        .validate_graph(library.graphs["Graph.InstallOS.VirtualMedia"].clone())
        .await
        .unwrap();
    let labels: Vec<&str> = install.tasks.iter().map(|t| t.label.as_str()).collect();
    for label in [
        "eject-stale",
        "eject-stale-config",
        "insert-media",
        "no-config-media",
        "build-config",
        "insert-config",
        "boot-cd",
        "reboot",
        "wait-installed",
        "eject-media",
        "eject-config",
    ] {
        assert!(labels.contains(&label), "{labels:?}");
    }
}

/// Reads file `name` of an image with `isoinfo`.
fn iso_file(image: &str, name: &str) -> String {
    metalgraph_testkit::isoinfo(std::path::Path::new(image), &["-R", "-x", name])
}

#[tokio::test]
async fn config_media_renders_the_shipped_templates_for_each_kind() {
    let world = World::default();
    let node = world.node("rack1 U08", obm(SIM_SERVICE, "sim", "", "", None));
    let files = tempfile::tempdir().unwrap();
    let templates = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../templates");
    let api = metalgraph_engine::ApiUrls {
        base: "https://127.0.0.1:8080/api/2.0".to_owned(),
        node_base: "http://10.0.0.1:8090/api/2.0".to_owned(),
    };
    let site = |templates: Option<PathBuf>, api: metalgraph_engine::ApiUrls| {
        Arc::new(ConfigMediaSite::new(
            Some(files.path().to_owned()),
            templates,
            api,
        ))
    };
    let job = ConfigMediaBuildJob::new(site(Some(templates.clone()), api.clone()));
    let hash = "$6$salt$0123456789abcdef";
    let secrets = json!({ "rootPasswordHash": hash });

    let options = json!({ "kind": "kickstart", "secrets": secrets, "notify": "wait-installed" });
    let out = world.run(&job, options, Some(&node)).await.unwrap();
    assert!(!out.to_string().contains("token-of"), "{out}");
    assert_eq!(
        (out["label"].as_str(), out["files"].clone()),
        (Some("OEMDRV"), json!(["ks.cfg"]))
    );
    let url = out["url"].as_str().unwrap();
    assert!(
        url.starts_with("http://10.0.0.1:8090/files/config-media/task-1."),
        "{out}"
    );
    let path = out["path"].as_str().unwrap();
    assert_eq!(
        std::fs::metadata(path).unwrap().len(),
        out["size"].as_u64().unwrap()
    );
    let ks = iso_file(path, "/ks.cfg");
    assert!(
        ks.contains(&format!("\nrootpw --iscrypted {hash}\n")),
        "{ks}"
    );
    assert!(ks.contains("--hostname=rack1-u08\n"), "{ks}");
    // The callback of the workflow's wait-installed task, token included.
    let callback = format!(
        "'http://10.0.0.1:8090/api/2.0/notification?nodeId={}&token=token-of-wait-installed'",
        node.id
    );
    assert!(ks.contains(&callback), "{ks}");

    let out = world
        .run(
            &job,
            json!({ "kind": "nocloud", "secrets": secrets }),
            Some(&node),
        )
        .await
        .unwrap();
    let path = out["path"].as_str().unwrap();
    let user_data = iso_file(path, "/user-data");
    assert!(
        user_data.contains(&format!("hashed_passwd: \"{hash}\"")),
        "{user_data}"
    );
    assert!(iso_file(path, "/meta-data").contains("instance-id: \"wf-1\""));
    // The node has no MAC: DHCP on every Ethernet interface.
    assert!(iso_file(path, "/network-config").contains("name: \"e*\""));
    let left: Vec<_> = std::fs::read_dir(files.path().join("config-media"))
        .unwrap()
        .collect();
    assert_eq!(left.len(), 1, "the task's earlier image was replaced");

    // What is missing or wrong is named.
    for (job, options, node, why) in [
        (&job, json!({ "kind": "nocloud" }), None, "needs a node"),
        (
            &job,
            json!({ "kind": "kickstart", "files": { "ks.cfg": "nope.ks" } }),
            Some(&node),
            "option 'files.ks.cfg': no template \"nope.ks\"",
        ),
        (
            &ConfigMediaBuildJob::new(site(None, api.clone())),
            json!({ "kind": "nocloud" }),
            Some(&node),
            "needs a templates directory",
        ),
        (
            &ConfigMediaBuildJob::new(site(Some(templates.clone()), Default::default())),
            json!({ "kind": "nocloud" }),
            Some(&node),
            "needs the node-facing listener",
        ),
    ] {
        let e = world.run(job, options, node).await.unwrap_err();
        assert!(e.message.contains(why), "{why}: {e}");
    }
}
