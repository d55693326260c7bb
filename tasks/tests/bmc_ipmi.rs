//! The IPMI driver and the power and boot jobs against a real peer, OpenIPMI's `ipmi_sim`,
//! driven with the real `ipmitool`. The simulated chassis keeps its state in files through
//! a chassis-control script, so the tests read power and boot device from there rather
//! than through the driver under test.
//!
//! Needs the peers from scripts/install-peers.sh.

mod bmc_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bmc_support::{IPMI_PASSWORD, IpmiSim, World, free_udp_port, obm};
use metalgraph_engine::Job;
use metalgraph_engine::nodes::Node;
use metalgraph_tasks::bmc::{DriverOptions, Drivers, IPMI_SERVICE};
use metalgraph_tasks::{BootDeviceJob, PowerJob, VirtualMediaInsertJob};
use serde_json::json;

fn node(world: &World, sim: &IpmiSim, password: &str) -> Node {
    world.node(
        "ipmi-node",
        obm(IPMI_SERVICE, &sim.host(), "admin", password, None),
    )
}

fn power(action: &str) -> serde_json::Value {
    json!({ "action": action, "pollInterval": "100ms", "waitTimeout": "20s" })
}

/// A reboot whose attempt the engine restarts (a crash after the cycle was issued) is not
/// issued again: the machine would reboot twice, and a one-shot boot override set before it
/// would be used up by the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_reboot_is_not_issued_twice() {
    let sim = IpmiSim::start();
    let world = World::default();
    let node = node(&world, &sim, IPMI_PASSWORD);
    let job = PowerJob::new(Arc::new(Drivers::default()));
    world.run(&job, power("on"), Some(&node)).await.unwrap();

    let before = sim.calls().lines().count();
    world.run(&job, power("reboot"), Some(&node)).await.unwrap();
    let recorded = world.services.checkpoints.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0]["issued"], "reboot");
    assert_eq!(recorded[0]["previousState"], "On");
    let calls: Vec<String> = sim
        .calls()
        .lines()
        .skip(before)
        .map(str::to_owned)
        .collect();
    assert!(calls.iter().any(|l| l == "set power 0"), "{calls:?}");

    // The restarted attempt finds the checkpoint: it only waits for the machine to be on.
    let before = sim.calls().lines().count();
    let mut ctx = world.ctx(&job, power("reboot"), Some(&node));
    ctx.attempt = 2;
    ctx.checkpoint = Some(recorded[0].clone());
    let out = job.run(ctx).await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(out["previousState"], "On");
    let calls: Vec<String> = sim
        .calls()
        .lines()
        .skip(before)
        .map(str::to_owned)
        .collect();
    assert!(
        calls.iter().all(|l| l.starts_with("get ")),
        "the restarted attempt changed the chassis: {calls:?}"
    );
    assert_eq!(world.services.checkpoints.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_and_boot_device_through_ipmitool() {
    let sim = IpmiSim::start();
    let world = World::default();
    let node = node(&world, &sim, IPMI_PASSWORD);
    let drivers = Arc::new(Drivers::default());
    let job = PowerJob::new(drivers.clone());

    let out = world.run(&job, power("status"), Some(&node)).await.unwrap();
    assert_eq!(out, json!({ "powerState": "Off" }));

    let out = world.run(&job, power("on"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");
    assert_eq!(sim.state("power"), "1");

    let out = world.run(&job, power("on"), Some(&node)).await.unwrap();
    assert_eq!(out["changed"], false);

    // reboot = `chassis power cycle`: ipmi_sim powers off at once and on again later.
    let before = sim.calls().lines().count();
    let out = world.run(&job, power("reboot"), Some(&node)).await.unwrap();
    assert_eq!(out["powerState"], "On");
    let after: Vec<String> = sim
        .calls()
        .lines()
        .skip(before)
        .map(str::to_owned)
        .collect();
    assert!(after.iter().any(|l| l == "set power 0"), "{after:?}");
    // The job waited for power to come back.
    assert!(after.iter().any(|l| l == "set power 1"), "{after:?}");
    assert_eq!(sim.state("power"), "1");

    world.run(&job, power("reset"), Some(&node)).await.unwrap();
    assert_eq!(sim.state("power"), "1");

    world
        .run(&job, power("soft-off"), Some(&node))
        .await
        .unwrap();
    assert_eq!(sim.state("power"), "0");
    assert!(sim.calls().contains("set shutdown 1"));

    world.run(&job, power("on"), Some(&node)).await.unwrap();
    world.run(&job, power("off"), Some(&node)).await.unwrap();
    assert_eq!(sim.state("power"), "0");

    let boot = BootDeviceJob::new(drivers.clone());
    let out = world
        .run(&boot, json!({ "device": "pxe" }), Some(&node))
        .await
        .unwrap();
    assert_eq!(sim.state("boot"), "pxe");
    assert_eq!(out["readback"]["device"], "pxe", "{out}");
    assert_eq!(out["readback"]["raw"], "Force PXE");

    let out = world
        .run(
            &boot,
            json!({ "device": "cd", "persistent": true, "uefi": true }),
            Some(&node),
        )
        .await
        .unwrap();
    assert_eq!(sim.state("boot"), "cdrom");
    assert_eq!(out["readback"]["device"], "cd", "{out}");

    // The password never reached the chassis (nor, see the unit test in bmc/ipmi.rs,
    // ipmitool's command line).
    assert!(!sim.calls().contains(IPMI_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_a_clear_authentication_error() {
    let sim = IpmiSim::start();
    let world = World::default();
    let wrong = "Wr0ng-ipmi-pw";
    let node = node(&world, &sim, wrong);
    let err = world
        .run(
            &PowerJob::new(Arc::new(Drivers::default())),
            power("on"),
            Some(&node),
        )
        .await
        .unwrap_err();
    eprintln!("wrong IPMI password: {err}");
    let want = format!(
        "IPMI authentication failed for admin@127.0.0.1:{} (check user and password)",
        sim.port
    );
    assert!(err.message.contains(&want), "{err}");
    assert!(err.message.contains(&node.id), "{err}");
    assert!(!err.message.contains(wrong), "{err}");
    assert_eq!(sim.state("power"), "", "nothing was switched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_bmc_and_virtual_media_are_clear_errors() {
    let world = World::default();
    // Nothing listens on this port.
    let port = free_udp_port();
    let node = world.node(
        "ghost",
        obm(
            IPMI_SERVICE,
            &format!("127.0.0.1:{port}"),
            "admin",
            IPMI_PASSWORD,
            None,
        ),
    );
    let drivers = Arc::new(Drivers::new(DriverOptions {
        ipmi_timeout: Duration::from_secs(30),
        ..DriverOptions::default()
    }));
    let err = world
        .run(
            &PowerJob::new(drivers.clone()),
            power("status"),
            Some(&node),
        )
        .await
        .unwrap_err();
    eprintln!("unreachable IPMI BMC: {err}");
    assert!(
        err.message
            .contains("BMC unreachable: no IPMI answer from 127.0.0.1"),
        "{err}"
    );

    let err = world
        .run(
            &VirtualMediaInsertJob::new(drivers.clone()),
            json!({ "image": "http://x/boot.iso" }),
            Some(&node),
        )
        .await
        .unwrap_err();
    assert!(
        err.message
            .contains("not supported: IPMI has no standard virtual media"),
        "{err}"
    );

    // ipmitool is killed when the bound expires.
    let drivers = Drivers::new(DriverOptions {
        ipmi_timeout: Duration::from_millis(300),
        ..DriverOptions::default()
    });
    let bmc = drivers.for_node(&node).unwrap();
    let started = Instant::now();
    let err = bmc.power_state().await.unwrap_err().to_string();
    assert!(err.contains("no answer within 300ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}
