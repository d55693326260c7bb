//! The IPMI driver and the power and boot jobs against a real peer, OpenIPMI's `ipmi_sim`,
//! driven with the real `ipmitool`. The simulated chassis keeps its state in files through
//! a chassis-control script, so the tests read power and boot device from there rather
//! than through the driver under test.
//!
//! Needs the peers from scripts/install-peers.sh.

mod bmc_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bmc_support::{Proc, World, free_udp_port, obm};
use metalgraph_engine::nodes::Node;
use metalgraph_tasks::bmc::{DriverOptions, Drivers, IPMI_SERVICE};
use metalgraph_tasks::{BootDeviceJob, PowerJob, VirtualMediaInsertJob};
use serde_json::json;
use tempfile::TempDir;

const PASSWORD: &str = "ipmi-Passw0rd";

/// ipmi_sim calls this with `get power boot`, `set power 1`, `set boot pxe`, ... and it
/// keeps the chassis state in files, logging every call.
const CHASSIS_CONTROL: &str = r#"#!/bin/sh
D="$1"; op="$2"; shift 2; mkdir -p "$D"
echo "$op $*" >> "$D/calls.log"
case "$op" in
get) while [ -n "$1" ]; do
       case "$1" in
         power) echo "power:$(cat "$D/power" 2>/dev/null || echo 0)";;
         boot)  echo "boot:$(cat "$D/boot" 2>/dev/null || echo default)";;
         *) echo "invalid parm $1"; exit 1;;
       esac; shift; done;;
set) while [ -n "$1" ]; do
       p="$1"; v="$2"; shift 2
       case "$p" in
         power) echo "$v" > "$D/power";;
         reset) echo 1 > "$D/power";;
         shutdown) echo 0 > "$D/power";;
         boot) echo "$v" > "$D/boot";;
         identify) :;;
         *) echo "invalid parm $p"; exit 1;;
       esac; done;;
check) exit 0;;
*) echo "unknown op $op"; exit 1;;
esac
"#;

/// One simulated BMC: an `ipmi_sim` process on its own UDP port.
struct IpmiSim {
    proc: Proc,
    port: u16,
    chassis: PathBuf,
    _dir: TempDir,
}

impl IpmiSim {
    fn start() -> IpmiSim {
        assert!(
            which("ipmi_sim") && which("ipmitool"),
            "ipmi_sim or ipmitool is missing; run scripts/install-peers.sh (as root) first"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let chassis = d.join("chassis");
        std::fs::create_dir_all(&chassis).unwrap();
        std::fs::create_dir_all(d.join("state")).unwrap();
        let script = d.join("chassiscontrol.sh");
        std::fs::write(&script, CHASSIS_CONTROL).unwrap();
        make_executable(&script);
        let port = free_udp_port();
        let lan = format!(
            "name \"bmc0\"\n\
             set_working_mc 0x20\n\
             startlan 1\n\
             \x20 addr 127.0.0.1 {port}\n\
             \x20 priv_limit admin\n\
             \x20 allowed_auths_callback none md2 md5 straight\n\
             \x20 allowed_auths_user none md2 md5 straight\n\
             \x20 allowed_auths_operator none md2 md5 straight\n\
             \x20 allowed_auths_admin none md2 md5 straight\n\
             \x20 guid a1234567000000000000000000000000\n\
             endlan\n\
             chassis_control \"{} {}\"\n\
             user 1 true  \"\"      \"\"         user  10 none md2 md5 straight\n\
             user 2 true  \"admin\" \"{PASSWORD}\" admin 10 none md2 md5 straight\n",
            script.display(),
            chassis.display()
        );
        std::fs::write(d.join("lan.conf"), lan).unwrap();
        std::fs::write(
            d.join("sim.emu"),
            "mc_setbmc 0x20\n\
             mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\n\
             sel_enable 0x20 1000 0x0a\n\
             mc_enable 0x20\n",
        )
        .unwrap();
        let mut cmd = Command::new("ipmi_sim");
        cmd.arg("-c")
            .arg(d.join("lan.conf"))
            .arg("-f")
            .arg(d.join("sim.emu"))
            .arg("-s")
            .arg(d.join("state"))
            .arg("-n");
        let proc = Proc::spawn(cmd, &d.join("ipmi_sim.log"));
        let sim = IpmiSim {
            proc,
            port,
            chassis,
            _dir: dir,
        };
        sim.wait_ready();
        sim
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("ipmitool")
                .args([
                    "-I",
                    "lanplus",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                ])
                .args(["-U", "admin", "-E", "-C", "3", "-N", "1", "-R", "1"])
                .args(["chassis", "power", "status"])
                .env("IPMI_PASSWORD", PASSWORD)
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ipmi_sim did not come up on udp {}; log:\n{}",
                self.port,
                self.proc.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The chassis state file (`power`: 1 or 0, `boot`: pxe, cdrom, ...).
    fn state(&self, file: &str) -> String {
        std::fs::read_to_string(self.chassis.join(file))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    fn calls(&self) -> String {
        self.state("calls.log")
    }
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn node(world: &World, sim: &IpmiSim, password: &str) -> Node {
    world.node(
        "ipmi-node",
        obm(IPMI_SERVICE, &sim.host(), "admin", password, None),
    )
}

fn power(action: &str) -> serde_json::Value {
    json!({ "action": action, "pollInterval": "100ms", "waitTimeout": "20s" })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_and_boot_device_through_ipmitool() {
    let sim = IpmiSim::start();
    let world = World::default();
    let node = node(&world, &sim, PASSWORD);
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
    assert!(!sim.calls().contains(PASSWORD));
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
            PASSWORD,
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
