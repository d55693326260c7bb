//! The Redfish driver and the provisioning jobs against a real peer, sushy-tools'
//! `sushy-emulator` (fake driver, three systems, started per test), plus small axum fakes
//! for faults sushy cannot produce (a 500 with ExtendedInfo, a BMC that never answers, a
//! SessionService).
//!
//! Needs the peers from scripts/install-peers.sh.

mod bmc_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use bmc_support::{Sushy, SushyOptions, World, obm, system_mac, system_uuid};
use metalgraph_tasks::bmc::{
    Bmc, BootDevice, DriverOptions, Drivers, MediaSlot, PowerAction, PowerState, REDFISH_SERVICE,
};
use metalgraph_tasks::{
    BootDeviceJob, CatalogRedfishJob, DiscoveryRedfishJob, PowerJob, VirtualMediaEjectJob,
    VirtualMediaInsertJob,
};
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn drivers() -> Arc<Drivers> {
    Arc::new(Drivers::default())
}

/// Fast polling, so tests against the instant emulator take milliseconds per action.
fn power(action: &str) -> Value {
    json!({ "action": action, "pollInterval": "100ms", "waitTimeout": "30s" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_actions_reach_the_state_sushy_reports() {
    let sushy = Sushy::start(SushyOptions {
        systems: 3,
        instant: true,
        ..Default::default()
    })
    .await;
    let world = World::default();
    let uuid = system_uuid(0);
    let node = world.node(
        "n0",
        obm(
            REDFISH_SERVICE,
            &sushy.base,
            "admin",
            "password",
            Some(&uuid),
        ),
    );
    let job = PowerJob::new(drivers());

    let out = world.run(&job, power("status"), Some(&node)).await.unwrap();
    assert_eq!(out, json!({ "powerState": "Off" }));

    let out = world.run(&job, power("on"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(out["changed"], true);
    assert_eq!(sushy.power_state(0).await, "On");
    // The other systems are untouched.
    assert_eq!(sushy.power_state(1).await, "Off");

    // Already on: succeeds without acting.
    let out = world.run(&job, power("on"), Some(&node)).await.unwrap();
    assert_eq!(out["changed"], false, "{out}");

    let out = world.run(&job, power("reboot"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(out["changed"], true);
    assert_eq!(sushy.power_state(0).await, "On");

    world.run(&job, power("reset"), Some(&node)).await.unwrap();
    assert_eq!(sushy.power_state(0).await, "On");

    world
        .run(&job, power("soft-off"), Some(&node))
        .await
        .unwrap();
    assert_eq!(sushy.power_state(0).await, "Off");

    world.run(&job, power("on"), Some(&node)).await.unwrap();
    let out = world.run(&job, power("off"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "Off");
    assert_eq!(sushy.power_state(0).await, "Off");

    // Rebooting a node that is off powers it on.
    let out = world.run(&job, power("reboot"), Some(&node)).await.unwrap();
    assert_eq!(out["previousState"], "Off");
    assert_eq!(sushy.power_state(0).await, "On");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_on_waits_for_the_delayed_emulator() {
    // The stock emulator applies a power change a random 1-11 s after the request
    // (counted from the current whole second, so the real wait can be far shorter). The
    // delay is pinned to 3 s here, so the change shows 2 to 3 s after the request and the
    // assertions below cannot race it.
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        delay_secs: Some(3),
        ..Default::default()
    })
    .await;
    let world = World::default();
    // One system and no systemId: the driver picks the only one.
    let node = world.node("n0", obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", None));
    let job = PowerJob::new(drivers());
    let started = Instant::now();
    let out = world
        .run(
            &job,
            json!({ "action": "on", "pollInterval": "250ms", "waitTimeout": "60s" }),
            Some(&node),
        )
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(out["powerState"], "On");
    assert!(
        took >= Duration::from_millis(1900),
        "the job must have waited for the delayed power change, took {took:?}"
    );
    assert_eq!(sushy.power_state(0).await, "On");

    // A bound shorter than the delay fails with a message that says what was seen.
    let out = world
        .run(
            &job,
            json!({ "action": "off", "pollInterval": "100ms", "waitTimeout": "300ms" }),
            Some(&node),
        )
        .await
        .unwrap_err();
    assert!(
        out.message
            .contains("did not report power Off within 300ms")
            && out.message.contains("last reported On"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_override_reads_back_from_sushy() {
    let sushy = Sushy::start(SushyOptions {
        systems: 3,
        instant: true,
        ..Default::default()
    })
    .await;
    let world = World::default();
    // The system's name: sushy redirects it (307) to the id.
    let node = world.node(
        "n1",
        obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", Some("node-1")),
    );
    let job = BootDeviceJob::new(drivers());

    let out = world
        .run(&job, json!({ "device": "cd" }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["device"], "cd");
    assert_eq!(out["readback"]["device"], "cd");
    let sys = sushy.get(&sushy.system_path(1)).await;
    assert_eq!(sys["Boot"]["BootSourceOverrideTarget"], "Cd");

    let out = world
        .run(
            &job,
            json!({ "device": "pxe", "persistent": true, "uefi": true }),
            Some(&node),
        )
        .await
        .unwrap();
    assert_eq!(out["readback"]["device"], "pxe");
    assert_eq!(out["readback"]["uefi"], true);
    let sys = sushy.get(&sushy.system_path(1)).await;
    assert_eq!(sys["Boot"]["BootSourceOverrideTarget"], "Pxe");
    assert_eq!(sys["Boot"]["BootSourceOverrideMode"], "UEFI");
    assert_eq!(sys["Boot"]["BootSourceOverrideEnabled"], "Continuous");
    // System 0 was not touched.
    let sys0 = sushy.get(&sushy.system_path(0)).await;
    assert_ne!(sys0["Boot"]["BootSourceOverrideTarget"], "Pxe");
}

/// Serves `/boot.iso` and `/other.iso`, counting downloads.
async fn image_server() -> (String, Arc<AtomicUsize>) {
    let downloads = Arc::new(AtomicUsize::new(0));
    let iso = || {
        get(|State(n): State<Arc<AtomicUsize>>| async move {
            n.fetch_add(1, Ordering::SeqCst);
            vec![0x42u8; 64 * 1024]
        })
    };
    let app = Router::new()
        .route("/boot.iso", iso())
        .route("/other.iso", iso())
        .with_state(downloads.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), downloads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_media_insert_and_eject_are_idempotent() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        ..Default::default()
    })
    .await;
    let (images, downloads) = image_server().await;
    let world = World::default();
    let uuid = system_uuid(0);
    let node = world.node(
        "n0",
        obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", Some(&uuid)),
    );
    let d = drivers();
    let insert = VirtualMediaInsertJob::new(d.clone());
    let eject = VirtualMediaEjectJob::new(d.clone());
    let cd = format!("{}/VirtualMedia/Cd", sushy.system_path(0));
    let boot_iso = format!("{images}/boot.iso");

    // Ejecting an empty drive succeeds without acting.
    let out = world.run(&eject, json!({}), Some(&node)).await.unwrap();
    assert_eq!(out["changed"], false);

    let out = world
        .run(&insert, json!({ "image": boot_iso }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["changed"], true, "{out}");
    let media = sushy.get(&cd).await;
    assert_eq!(media["Image"], boot_iso.as_str());
    assert_eq!(media["Inserted"], true);
    assert_eq!(
        downloads.load(Ordering::SeqCst),
        1,
        "sushy downloads the image once"
    );

    // The same image again: nothing to do, no second download.
    let out = world
        .run(&insert, json!({ "image": boot_iso }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["changed"], false, "{out}");
    assert_eq!(downloads.load(Ordering::SeqCst), 1);

    // A different image replaces the first.
    let other = format!("{images}/other.iso");
    let out = world
        .run(&insert, json!({ "image": other }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["replaced"], boot_iso.as_str(), "{out}");
    assert_eq!(sushy.get(&cd).await["Image"], other.as_str());

    let out = world.run(&eject, json!({}), Some(&node)).await.unwrap();
    assert_eq!(out["changed"], true);
    let media = sushy.get(&cd).await;
    assert_eq!(media["Inserted"], false, "{media}");
    let out = world.run(&eject, json!({}), Some(&node)).await.unwrap();
    assert_eq!(out["changed"], false);

    // An image the BMC cannot fetch: sushy's own complaint reaches the error.
    let err = world
        .run(
            &insert,
            json!({ "image": format!("{images}/missing.iso") }),
            Some(&node),
        )
        .await
        .unwrap_err();
    assert!(
        err.message.contains("insert virtual media") && err.message.contains("HTTP 400"),
        "{err}"
    );

    // The secondary slot is sushy's Floppy (it takes USB stick images); the CD drive is
    // left alone.
    let floppy = format!("{}/VirtualMedia/Floppy", sushy.system_path(0));
    world
        .run(&insert, json!({ "image": boot_iso }), Some(&node))
        .await
        .unwrap();
    let out = world
        .run(
            &insert,
            json!({ "image": other, "slot": "secondary" }),
            Some(&node),
        )
        .await
        .unwrap();
    assert_eq!(
        (out["changed"].clone(), out["slot"].clone()),
        (json!(true), json!("secondary"))
    );
    let media = sushy.get(&floppy).await;
    assert_eq!(
        (media["Image"].as_str(), media["Inserted"].as_bool()),
        (Some(other.as_str()), Some(true)),
        "{media}"
    );
    assert_eq!(sushy.get(&cd).await["Image"], boot_iso.as_str());
    let out = world
        .run(&eject, json!({ "slot": "secondary" }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["ejected"], other.as_str(), "{out}");
    assert_eq!(sushy.get(&floppy).await["Inserted"], false);
    assert_eq!(sushy.get(&cd).await["Inserted"], true, "the CD stays in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_with_one_virtual_media_device_has_no_secondary_slot() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        cd_only: true,
        ..Default::default()
    })
    .await;
    let world = World::default();
    let node = world.node(
        "n0",
        obm(
            REDFISH_SERVICE,
            &sushy.base,
            "admin",
            "pw",
            Some(&system_uuid(0)),
        ),
    );
    let d = drivers();
    let insert = VirtualMediaInsertJob::new(d.clone());
    let eject = VirtualMediaEjectJob::new(d.clone());
    let image = "http://127.0.0.1:9/config.iso";
    let err = world
        .run(
            &insert,
            json!({ "image": image, "slot": "secondary" }),
            Some(&node),
        )
        .await
        .unwrap_err();
    assert!(
        err.message.contains("read virtual media (secondary)")
            && err.message.contains("no second virtual media device")
            && err.message.contains("only Cd (CD, DVD)"),
        "{err}"
    );
    // Nothing can be in a device that does not exist: ejecting it succeeds.
    let out = world
        .run(&eject, json!({ "slot": "secondary" }), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["device"], false, "{out}");
    assert_eq!(sushy.cd(0).await["Inserted"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_creates_one_node_per_system_and_no_duplicates() {
    let password = "Disc0very-Secret";
    let sushy = Sushy::start(SushyOptions {
        systems: 3,
        instant: true,
        auth: Some(("admin".to_owned(), password.to_owned())),
        ..Default::default()
    })
    .await;
    let world = World::default();
    let job = DiscoveryRedfishJob::new(drivers());
    let options = json!({ "uri": sushy.base, "username": "admin", "password": password });

    let out = world.run(&job, options.clone(), None).await.unwrap();
    let text = out.to_string();
    assert!(
        !text.contains(password),
        "the password leaked into the output: {text}"
    );
    let ids: Vec<String> = out["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3, "{out}");
    let nodes = world.nodes().list().await.unwrap();
    assert_eq!(nodes.len(), 3);
    for i in 0..3 {
        let node = world
            .nodes()
            .by_identifier(&system_mac(i))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no node for system {i}"));
        assert!(
            node.identifiers.contains(&system_uuid(i)),
            "{:?}",
            node.identifiers
        );
        let obm = node.obm().unwrap();
        assert_eq!(obm.service, REDFISH_SERVICE);
        assert_eq!(
            obm.config.system_id.as_deref(),
            Some(system_uuid(i).as_str())
        );
        assert_eq!(obm.config.user.as_deref(), Some("admin"));
        assert_eq!(obm.config.password.as_ref().unwrap().expose(), password);
        assert_eq!(node.name, format!("node-{i}"));
        let catalogs = world.nodes().catalogs(&node.id).await.unwrap();
        assert_eq!(catalogs.len(), 1);
        assert_eq!(catalogs[0]["source"], "redfish");
        assert_eq!(catalogs[0]["data"]["macs"], json!([system_mac(i)]));
        // The public view never shows the password.
        assert!(!node.public().to_string().contains(password));
    }

    // A second run updates the same nodes.
    let again = world.run(&job, options, None).await.unwrap();
    let mut ids2: Vec<String> = again["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let mut ids1 = ids.clone();
    ids1.sort();
    ids2.sort();
    assert_eq!(ids1, ids2);
    assert!(
        again["systems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["created"] == false)
    );
    assert_eq!(world.nodes().list().await.unwrap().len(), 3);

    // The discovered OBM drives the node.
    let node = world.nodes().get(&ids[0]).await.unwrap().unwrap();
    let out = world
        .run(&PowerJob::new(drivers()), power("on"), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["powerState"], "On");

    // Wrong password: a clear error without the password in it.
    let wrong = "Wr0ng-Secret-Value";
    let err = world
        .run(
            &job,
            json!({ "uri": sushy.base, "username": "admin", "password": wrong }),
            None,
        )
        .await
        .unwrap_err();
    assert!(err.message.contains("401"), "{err}");
    assert!(
        !err.message.contains(wrong) && !err.message.contains(password),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_is_stored_despite_broken_links() {
    let sushy = Sushy::start(SushyOptions {
        systems: 2,
        instant: true,
        ..Default::default()
    })
    .await;
    let world = World::default();
    let uuid = system_uuid(1);
    let node = world.node(
        "n1",
        obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", Some(&uuid)),
    );
    let out = world
        .run(&CatalogRedfishJob::new(drivers()), json!({}), Some(&node))
        .await
        .unwrap();
    assert_eq!(out["macs"], json!([system_mac(1)]), "{out}");
    let catalogs = world.nodes().catalogs(&node.id).await.unwrap();
    assert_eq!(catalogs.len(), 1);
    let data = &catalogs[0]["data"];
    assert_eq!(data["id"], uuid.as_str());
    assert_eq!(data["name"], "node-1");
    assert_eq!(
        data["ethernetInterfaces"][0]["MACAddress"],
        system_mac(1).as_str()
    );
    assert!(!data["managers"].as_array().unwrap().is_empty(), "{data}");
    // sushy's fake driver answers 501/404/500 for Processors, Memory, Storage and the
    // like; those are recorded, not fatal.
    let errors = data["errors"].as_array().unwrap();
    assert!(!errors.is_empty(), "{data}");
    assert!(
        errors
            .iter()
            .all(|e| e["resource"].is_string() && e["error"].is_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_right_and_wrong_credentials() {
    let password = "Rightful-Passw0rd";
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        auth: Some(("admin".to_owned(), password.to_owned())),
        ..Default::default()
    })
    .await;
    let world = World::default();
    let job = PowerJob::new(drivers());
    let good = world.node(
        "good",
        obm(REDFISH_SERVICE, &sushy.base, "admin", password, None),
    );
    let out = world.run(&job, power("on"), Some(&good)).await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(
        sushy
            .get_as(&sushy.system_path(0), Some(("admin", password)))
            .await["PowerState"],
        "On"
    );

    let wrong = "Not-The-Passw0rd";
    let bad = world.node(
        "bad",
        obm(REDFISH_SERVICE, &sushy.base, "admin", wrong, None),
    );
    for action in ["status", "off"] {
        let err = world
            .run(&job, power(action), Some(&bad))
            .await
            .unwrap_err();
        let msg = &err.message;
        eprintln!("wrong Basic credentials: {msg}");
        assert!(
            msg.contains(
                "Redfish authentication failed for user admin (HTTP 401; check user and password)"
            ),
            "{msg}"
        );
        assert!(
            msg.contains(&bad.id) && msg.contains(&sushy.base),
            "names node and BMC: {msg}"
        );
        assert!(!msg.contains(wrong), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_self_signed_needs_verify_ssl_false() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        tls: true,
        ..Default::default()
    })
    .await;
    assert!(sushy.base.starts_with("https://"));
    let world = World::default();
    let d = drivers();
    let job = PowerJob::new(d.clone());

    let mut insecure = obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", None);
    insecure.config.verify_ssl = Some(false);
    let node = world.node("insecure", insecure);
    let out = world.run(&job, power("on"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");

    // Verification is the default, and the self-signed certificate fails it.
    let strict = world.node(
        "strict",
        obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", None),
    );
    let err = world
        .run(&job, power("status"), Some(&strict))
        .await
        .unwrap_err();
    eprintln!("self-signed certificate: {err}");
    assert!(
        err.message.contains("TLS certificate not accepted")
            && err.message.contains("verifySSL: false"),
        "{err}"
    );
    // Port given separately from a bare host: https is implied.
    let mut split = obm(REDFISH_SERVICE, "127.0.0.1", "admin", "pw", None);
    split.config.port = sushy.base.rsplit(':').next().unwrap().parse().ok();
    split.config.verify_ssl = Some(false);
    let node = world.node("split", split);
    let out = world.run(&job, power("status"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sushy_killed_mid_operation_gives_a_clear_error() {
    // The delayed emulator, pinned so that power on takes two to three seconds to show:
    // the kill below always lands while the job is still polling.
    let mut sushy = Sushy::start(SushyOptions {
        systems: 1,
        delay_secs: Some(3),
        ..Default::default()
    })
    .await;
    let world = World::default();
    let node = world.node("n0", obm(REDFISH_SERVICE, &sushy.base, "admin", "pw", None));
    let job = PowerJob::new(drivers());
    let run = world.run(
        &job,
        json!({ "action": "on", "pollInterval": "100ms", "waitTimeout": "4s" }),
        Some(&node),
    );
    let killer = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        sushy.proc.kill();
    };
    let (result, ()) = tokio::join!(run, killer);
    let err = result.unwrap_err();
    eprintln!("killed mid-operation: {err}");
    assert!(
        err.message.contains("did not report power On within 4s")
            && err.message.contains("BMC unreachable"),
        "{err}"
    );

    // A fresh call to the dead BMC says it is unreachable, naming node and endpoint.
    let err = world
        .run(&job, power("status"), Some(&node))
        .await
        .unwrap_err();
    assert!(err.message.contains("BMC unreachable"), "{err}");
    assert!(
        err.message.contains(&node.id) && err.message.contains(&sushy.base),
        "{err}"
    );
}

/// A fake Redfish service with one system whose Reset action fails with a 500 and an
/// ExtendedInfo message; counts the POSTs it receives.
async fn failing_bmc() -> (String, Arc<AtomicUsize>) {
    let posts = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/redfish/v1/",
            get(|| async {
                axum::Json(json!({ "Systems": { "@odata.id": "/redfish/v1/Systems" } }))
            }),
        )
        .route(
            "/redfish/v1/Systems",
            get(|| async {
                axum::Json(json!({ "Members": [{ "@odata.id": "/redfish/v1/Systems/1" }] }))
            }),
        )
        .route(
            "/redfish/v1/Systems/1",
            get(|| async {
                axum::Json(json!({
                    "@odata.id": "/redfish/v1/Systems/1",
                    "Id": "1",
                    "PowerState": "Off",
                    "Actions": { "#ComputerSystem.Reset": {
                        "target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
                        "ResetType@Redfish.AllowableValues": ["On", "ForceOff", "ForceRestart"]
                    } }
                }))
            }),
        )
        .route(
            "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset",
            post(|State(n): State<Arc<AtomicUsize>>| async move {
                n.fetch_add(1, Ordering::SeqCst);
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({ "error": {
                        "code": "Base.1.0.GeneralError",
                        "message": "A general error has occurred.",
                        "@Message.ExtendedInfo": [{
                            "MessageId": "Base.1.0.InternalError",
                            "Message": "The power supply unit 2 reported a fault."
                        }]
                    } })),
                )
            }),
        )
        .with_state(posts.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), posts)
}

#[tokio::test]
async fn a_bmc_error_message_reaches_the_job_error() {
    let (base, posts) = failing_bmc().await;
    let world = World::default();
    let node = world.node("n0", obm(REDFISH_SERVICE, &base, "admin", "pw", None));
    let err = world
        .run(&PowerJob::new(drivers()), power("on"), Some(&node))
        .await
        .unwrap_err();
    eprintln!("500 with ExtendedInfo: {err}");
    assert!(
        err.message.contains("HTTP 500")
            && err
                .message
                .contains("The power supply unit 2 reported a fault.")
            && err.message.contains("power on"),
        "{err}"
    );
    // An action is never retried blindly.
    assert_eq!(posts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hanging_bmc_times_out_within_the_bound() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let drivers = Arc::new(Drivers::new(DriverOptions {
        request_timeout: Duration::from_secs(1),
        ..DriverOptions::default()
    }));
    let world = World::default();
    let node = world.node(
        "n0",
        obm(
            REDFISH_SERVICE,
            &format!("http://{addr}"),
            "admin",
            "pw",
            None,
        ),
    );
    let started = Instant::now();
    let err = world
        .run(&PowerJob::new(drivers), power("status"), Some(&node))
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("hanging BMC after {took:?}: {err}");
    assert!(err.message.contains("no answer within 1s"), "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn unknown_systems_and_ambiguous_services_are_named() {
    let (base, _) = failing_bmc().await;
    let d = drivers();
    let mut cfg = obm(REDFISH_SERVICE, &base, "admin", "pw", Some("nope")).config;
    let bmc = d.redfish("n9", &cfg).unwrap();
    let err = bmc.power_state().await.unwrap_err().to_string();
    assert!(
        err.contains("no ComputerSystem has the id, name or UUID 'nope' (found: 1)"),
        "{err}"
    );
    cfg.system_id = Some("/redfish/v1/Systems/1".to_owned());
    let bmc = d.redfish("n9", &cfg).unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
}

/// A fake Redfish service that only accepts session tokens, hands out a new one per login
/// and expires the first token after one use, so the driver must log in again.
async fn session_bmc() -> (String, Arc<AtomicUsize>) {
    let logins = Arc::new(AtomicUsize::new(0));
    let authorized = |headers: &HeaderMap, logins: &AtomicUsize| {
        let token = headers.get("X-Auth-Token").and_then(|v| v.to_str().ok());
        // Only the latest token is valid.
        token == Some(format!("token-{}", logins.load(Ordering::SeqCst)).as_str())
    };
    let uses = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/redfish/v1/",
            get(|| async {
                axum::Json(json!({
                    "Systems": { "@odata.id": "/redfish/v1/Systems" },
                    "SessionService": { "@odata.id": "/redfish/v1/SessionService" },
                    "Links": { "Sessions": { "@odata.id": "/redfish/v1/SessionService/Sessions" } }
                }))
            }),
        )
        .route(
            "/redfish/v1/SessionService/Sessions",
            post(
                |State((logins, _)): State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
                 axum::Json(body): axum::Json<Value>| async move {
                    if body["UserName"] != "admin" || body["Password"] != "s3ssion-pw" {
                        return (
                            StatusCode::UNAUTHORIZED,
                            HeaderMap::new(),
                            "bad credentials",
                        )
                            .into_response();
                    }
                    let n = logins.fetch_add(1, Ordering::SeqCst) + 1;
                    let mut h = HeaderMap::new();
                    h.insert("X-Auth-Token", format!("token-{n}").parse().unwrap());
                    (StatusCode::CREATED, h, "{}").into_response()
                },
            ),
        )
        .route(
            "/redfish/v1/Systems",
            get(
                move |State((logins, uses)): State<(Arc<AtomicUsize>, Arc<AtomicUsize>)>,
                      headers: HeaderMap| async move {
                    // The first token expires after its first use.
                    let first_use_done = uses.fetch_add(1, Ordering::SeqCst) >= 1;
                    if !authorized(&headers, &logins)
                        || (first_use_done && logins.load(Ordering::SeqCst) == 1)
                    {
                        return StatusCode::UNAUTHORIZED.into_response();
                    }
                    axum::Json(json!({ "Members": [{ "@odata.id": "/redfish/v1/Systems/1" }] }))
                        .into_response()
                },
            ),
        )
        .with_state((logins.clone(), uses));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), logins)
}

#[tokio::test]
async fn sessions_log_in_and_log_in_again_on_401() {
    let (base, logins) = session_bmc().await;
    let d = drivers();
    let mut cfg = obm(REDFISH_SERVICE, &base, "admin", "s3ssion-pw", None).config;
    cfg.extra.insert("auth".into(), json!("session"));
    let bmc = d.redfish("n1", &cfg).unwrap();
    assert_eq!(bmc.systems().await.unwrap(), vec!["/redfish/v1/Systems/1"]);
    assert_eq!(logins.load(Ordering::SeqCst), 1);
    // The token is reused by a new driver of the same endpoint, refused, and renewed.
    let bmc = d.redfish("n1", &cfg).unwrap();
    assert_eq!(bmc.systems().await.unwrap(), vec!["/redfish/v1/Systems/1"]);
    assert_eq!(logins.load(Ordering::SeqCst), 2);

    cfg.password = Some(metalgraph_engine::nodes::Secret("wrong-s3ssion".into()));
    let other = Drivers::default();
    let err = other
        .redfish("n1", &cfg)
        .unwrap()
        .systems()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Redfish session login failed for user admin"),
        "{err}"
    );
    assert!(!err.contains("wrong-s3ssion"), "{err}");
}

#[tokio::test]
async fn driver_level_operations_against_sushy() {
    let sushy = Sushy::start(SushyOptions {
        systems: 1,
        instant: true,
        ..Default::default()
    })
    .await;
    let d = drivers();
    let cfg = obm(
        REDFISH_SERVICE,
        &sushy.base,
        "admin",
        "pw",
        Some(&system_uuid(0)),
    )
    .config;
    let bmc = d.redfish("n0", &cfg).unwrap();
    bmc.power_action(PowerAction::On).await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
    bmc.set_boot_device(BootDevice::Hdd, false, Some(false))
        .await
        .unwrap();
    let b = bmc.boot_override().await.unwrap();
    assert_eq!(b.device, Some(BootDevice::Hdd));
    assert_eq!(b.uefi, Some(false));
    let m = bmc.virtual_media_status(MediaSlot::Primary).await.unwrap();
    assert!(!m.inserted);
    assert_eq!(bmc.endpoint(), sushy.base);
}
