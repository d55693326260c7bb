//! Real PXE and HTTP boots against the real binary: QEMU (TCG) boots SeaBIOS with the iPXE
//! NIC ROM, and OVMF with EDK2's own PXE and with its HTTP Boot, on a tap in a network
//! namespace where `metalgraph serve` is the only DHCP, TFTP and HTTP server (`--dhcp
//! full`). Root only.
//!
//! Topology (one namespace per test run, named after the process):
//!
//! ```text
//!   host ── veth 10.N.254.1/30 ── 10.N.254.2 (management API)
//!                                 br0 10.N.0.1/24 + fd00:N::1/64 (DHCP, TFTP, node-facing API)
//!                                  └── tap0 ── QEMU
//! ```
//!
//! dnsmasq runs beside it for IPv6 router advertisements only (`--port=0`, an `ra-only`
//! range: no DNS, no DHCP, no TFTP); without an RA, iPXE waits ~13 s for IPv6
//! autoconfiguration at each "Configuring (net0 ...)".
//!
//! The scenarios run once each, in order, against one server: (1) BIOS: a registered node
//! runs RackHD's Graph.InstallCentOS; DHCP's profile URL carries the node's capability, so
//! its waiting task's profile holds the callback and an install script URL that carries
//! the capability on: iPXE fetches the kickstart rendered for the node (a 200 only for
//! the proven node, since it holds the callback), then GETs the notification URL with the
//! task's token, and the workflow succeeds. The installer kernel does not run: the profile
//! does what it would. (2) UEFI: Graph.InstallOS.PXE through EDK2's PXE,
//! `snponly.efi` over our TFTP (with EDK2's aborted tsize probe), then iPXE. (3) An unknown
//! VM becomes a node with a `pxe` catalog and a discovery workflow. Then that server stops
//! (SIGTERM, an ordered shutdown) and a second one starts in the same namespace with
//! `--tftp-listen off`: (4) UEFI HTTP Boot (OVMF with its PXE switched off) runs
//! Graph.InstallOS.PXE: DHCP answers the HTTPClient with `snponly.efi`'s URL under
//! `/boot/`, the firmware downloads it over HTTP, then iPXE goes on as in (2).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Api;

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const IPXE_DIR: &str = "/usr/lib/ipxe";
/// How long one boot may take under TCG (they take 6–15 s on two cores).
const BOOT_LIMIT: Duration = Duration::from_secs(120);

/// The profile the VMs get: it proves the script is ours (node, task), shows what iPXE
/// runs on, and reports to the notification URL with GET, the only method stock iPXE has.
/// Lines stay short: the serial console wraps at 80 columns.
const TEST_PROFILE: &str = "#!ipxe\n\
# metalgraph pxe_boot test profile\n\
echo PROFILE-OK task={{ task.label }}\n\
echo node={{ node.id }}\n\
echo platform=${platform} chip=${net0/chip}\n\
imgfetch {{ notification.url }} && echo NOTIFY-SENT || echo NOTIFY-FAILED\n";

/// The profile of the RackHD install scenario: it fetches the install script the task names
/// (the kickstart, rendered for the node with its callback), then calls back as the
/// kickstart's %post would, with GET.
const RACKHD_PROFILE: &str = "#!ipxe\n\
# metalgraph pxe_boot RackHD install profile\n\
echo PROFILE-OK task={{ task.label }}\n\
echo node={{ node.id }}\n\
echo platform=${platform} chip=${net0/chip}\n\
imgfetch --name ks {{ options.installScriptUri }} && echo KS-OK || echo KS-FAILED\n\
imgfetch {{ notification.url }} && echo NOTIFY-SENT || echo NOTIFY-FAILED\n";

/// Whether the tools and firmware are here; fails naming what is missing unless
/// `METALGRAPH_SKIP_PEER_TESTS=1`.
fn require() -> bool {
    let mut missing: Vec<String> = ["qemu-system-x86_64", "ip", "ethtool", "dnsmasq"]
        .into_iter()
        .filter(|b| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(str::to_owned)
        .collect();
    for f in [
        OVMF_CODE,
        OVMF_VARS,
        &format!("{IPXE_DIR}/snponly.efi"),
        &format!("{IPXE_DIR}/undionly.kpxe"),
    ] {
        if !Path::new(f).exists() {
            missing.push(f.to_owned());
        }
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if missing.is_empty() && root {
        return true;
    }
    let why = format!(
        "missing {missing:?}{} (scripts/install-peers.sh installs them; see pxe/tests/PACKAGES)",
        if root { "" } else { " and not root" }
    );
    if std::env::var("METALGRAPH_SKIP_PEER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: {why}");
        return false;
    }
    panic!("{why}; set METALGRAPH_SKIP_PEER_TESTS=1 to skip");
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespace, its links and every process started in it; all removed on drop.
struct Net {
    ns: String,
    host_veth: String,
    /// The second octet of this run's 10.N.0.0/16.
    n: u32,
    children: Vec<Child>,
    /// The index of the running `metalgraph serve` in `children`.
    metalgraph: usize,
    /// The file its log goes to.
    log: &'static str,
    dir: tempfile::TempDir,
}

/// How a `metalgraph serve` of the run is started.
#[derive(Debug, Clone, Copy)]
struct Serve {
    /// Its data directory, under the run's directory.
    data: &'static str,
    /// Its log file, under the run's directory.
    log: &'static str,
    /// Whether it serves TFTP (the default with DHCP on) or runs with `--tftp-listen off`.
    tftp: bool,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let n = 200 + pid % 50;
        let tag = pid % 1_000_000;
        let net = Net {
            ns: format!("mgboot-{tag}"),
            host_veth: format!("mgbh{tag}"),
            n,
            children: Vec::new(),
            metalgraph: 0,
            log: "metalgraph.log",
            dir: tempfile::tempdir().unwrap(),
        };
        // A namespace left by a killed earlier run of the same pid would break setup.
        let _ = Command::new("ip").args(["netns", "del", &net.ns]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &net.host_veth])
            .output();
        let (ns, hv, peer) = (&net.ns, &net.host_veth, format!("mgbn{tag}"));
        run(&["ip", "netns", "add", ns]);
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        run(&["ip", "-n", ns, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.{n}.0.1/24"),
            "dev",
            "br0",
        ]);
        // nodad: the address must be usable at once for dnsmasq to construct RAs from it.
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("fd00:{n}::1/64"),
            "dev",
            "br0",
            "nodad",
        ]);
        run(&["ip", "-n", ns, "link", "set", "br0", "up"]);
        run(&[
            "ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap",
        ]);
        run(&["ip", "-n", ns, "link", "set", "tap0", "master", "br0"]);
        run(&["ip", "-n", ns, "link", "set", "tap0", "up"]);
        // Partial checksums would reach raw-socket clients unfinished (COOKBOOK section 4).
        run(&[
            "ip", "netns", "exec", ns, "ethtool", "-K", "br0", "tx", "off",
        ]);
        run(&[
            "ip", "link", "add", hv, "type", "veth", "peer", "name", &peer,
        ]);
        run(&["ip", "link", "set", &peer, "netns", ns]);
        run(&["ip", "addr", "add", &format!("10.{n}.254.1/30"), "dev", hv]);
        run(&["ip", "link", "set", hv, "up"]);
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("10.{n}.254.2/30"),
            "dev",
            &peer,
        ]);
        run(&["ip", "-n", ns, "link", "set", &peer, "up"]);
        net
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command run inside the namespace (`ip netns exec` execs it, so the child's pid is
    /// the program's own and killing the child kills the program).
    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// dnsmasq as an IPv6 router-advertisement source only.
    fn start_ra(&mut self) {
        let child = self
            .exec("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--port=0",
                "--no-resolv",
                "--no-hosts",
                "--interface=br0",
                "--bind-interfaces",
                "--enable-ra",
                "--dhcp-range=::,constructor:br0,ra-only",
                "--user=root",
            ])
            .arg(format!("--pid-file={}", self.path("dnsmasq.pid").display()))
            .arg(format!(
                "--log-facility={}",
                self.path("dnsmasq.log").display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// `metalgraph serve` inside the namespace as the only DHCP/TFTP/HTTP server (DHCP and
    /// HTTP only without TFTP); returns the management API once it listens.
    fn start_metalgraph(&mut self, serve: Serve) -> Api {
        let n = self.n;
        std::fs::create_dir_all(self.path("templates")).unwrap();
        std::fs::write(self.path("templates/qemu-test.ipxe"), TEST_PROFILE).unwrap();
        std::fs::write(self.path("templates/qemu-rackhd.ipxe"), RACKHD_PROFILE).unwrap();
        self.log = serve.log;
        let log = std::fs::File::create(self.path(serve.log)).unwrap();
        let mut cmd = self.exec(env!("CARGO_BIN_EXE_metalgraph"));
        cmd.arg("serve")
            .args(["--listen", &format!("10.{n}.254.2:8080")])
            .args(["--node-listen", &format!("10.{n}.0.1:8090")])
            .arg("--data-dir")
            .arg(self.path(serve.data))
            .arg("--templates-dir")
            .arg(self.path("templates"))
            .args(["--dhcp", "full", "--dhcp-interface", "br0"])
            .args(["--dhcp-pool", &format!("10.{n}.0.100-10.{n}.0.150")])
            .args(["--boot-address", &format!("10.{n}.0.1")])
            .args(["--tftp-root", IPXE_DIR]);
        if !serve.tftp {
            cmd.args(["--tftp-listen", "off"]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.metalgraph = self.children.len();
        self.children.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        while !seen
            .iter()
            .any(|l: &String| l.contains("node-facing listening"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => seen.push(line),
                Err(_) => panic!(
                    "metalgraph did not start: {seen:?}\n{}",
                    self.read(self.log)
                ),
            }
        }
        assert!(
            seen.iter()
                .any(|l| l.contains("dhcp listening on 0.0.0.0:67")),
            "{seen:?}"
        );
        assert_eq!(
            seen.iter().any(|l| l.contains("tftp listening on")),
            serve.tftp,
            "TFTP should run: {}; {seen:?}",
            serve.tftp
        );
        Api::from_data_dir(
            &format!("https://10.{n}.254.2:8080"),
            &self.path(serve.data),
        )
    }

    /// Ends the running `metalgraph serve` with SIGTERM and checks that it exits cleanly
    /// (an ordered shutdown with DHCP, and TFTP if it runs, serving).
    async fn terminate_metalgraph(&mut self) {
        let t0 = Instant::now();
        let server = &mut self.children[self.metalgraph];
        run(&["kill", "-TERM", &server.id().to_string()]);
        let status = loop {
            if let Some(status) = server.try_wait().unwrap() {
                break status;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no exit within 20 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status}\n{}", self.read(self.log));
    }

    /// Starts a VM on tap0 booting from the network, its serial console in `serial`.
    fn start_vm(&mut self, firmware: Firmware, mac: &str, serial: &str) -> usize {
        let mut cmd = self.exec("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-smp", "1", "-nographic", "-vga", "none"])
            .args(["-monitor", "none", "-no-reboot", "-boot", "n"])
            .arg("-serial")
            .arg(format!("file:{}", self.path(serial).display()))
            .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
        match firmware {
            // Without graphics=off, SeaBIOS does not mirror its console (and iPXE's) to
            // the serial port.
            Firmware::Bios { uuid } => {
                cmd.args(["-machine", "pc,graphics=off", "-m", "256"])
                    .args(["-smbios", &format!("type=1,uuid={uuid}")])
                    .args(["-device", &format!("e1000,netdev=n0,mac={mac}")]);
            }
            // romfile= drops the iPXE option ROM, so EDK2's own PXE boots first (or, for
            // HTTP Boot, its HTTP Boot).
            Firmware::Uefi | Firmware::UefiHttp => {
                let vars = self.path(&format!("{serial}.vars.fd"));
                std::fs::copy(OVMF_VARS, &vars).unwrap();
                cmd.args(["-machine", "q35", "-m", "512"])
                    .args([
                        "-drive",
                        &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                    ])
                    .arg("-drive")
                    .arg(format!(
                        "if=pflash,format=raw,unit=1,file={}",
                        vars.display()
                    ))
                    .args([
                        "-device",
                        &format!("virtio-net-pci,netdev=n0,mac={mac},romfile="),
                    ]);
                if matches!(firmware, Firmware::UefiHttp) {
                    // OVMF's switches for its PXE boot options: without them it tries PXE
                    // over IPv4 and IPv6 first, which a server without TFTP cannot serve
                    // and which take a minute or two to give up (docs/network-boot.md).
                    // This is a machine set to boot over HTTP, as a BIOS setup would.
                    for knob in ["IPv4PXESupport", "IPv6PXESupport"] {
                        cmd.args([
                            "-fw_cfg",
                            &format!("name=opt/org.tianocore/{knob},string=n"),
                        ]);
                    }
                }
            }
        }
        let out = std::fs::File::create(self.path(&format!("{serial}.qemu.out"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    fn stop(&mut self, child: usize) {
        let c = &mut self.children[child];
        let _ = c.kill();
        let _ = c.wait();
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// A serial log without escape sequences and carriage returns.
    fn serial(&self, name: &str) -> String {
        let raw = self.read(name).replace('\r', "");
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI: ESC [ params final-byte
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                }
                continue;
            }
            out.push(c);
        }
        out
    }

    /// Everything a failure message needs.
    fn evidence(&self, serial: &str) -> String {
        let log = self.read(self.log);
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- serial {serial}:\n{}\n--- metalgraph log (last lines):\n{}",
            self.serial(serial),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        // Deleting the namespace deletes the peer and so the pair; this covers a failed setup.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .output();
    }
}

#[derive(Debug, Clone, Copy)]
enum Firmware {
    /// SeaBIOS with the e1000's iPXE ROM.
    Bios { uuid: &'static str },
    /// OVMF with EDK2's PXE.
    Uefi,
    /// OVMF with EDK2's HTTP Boot, its PXE switched off.
    UefiHttp,
}

/// Registers a node for `mac` (simulated BMC) and runs Graph.InstallOS.PXE on it with the
/// test profile; returns the node and workflow ids once the install task waits.
async fn install_workflow(api: &Api, name: &str, mac: &str) -> (String, String) {
    install_graph(
        api,
        name,
        mac,
        "Graph.InstallOS.PXE",
        "wait-installed",
        json!({
            "defaults": {"kernel": "http://unused/vmlinuz", "initrd": "http://unused/initrd"},
            "wait-installed": {"profile": "qemu-test.ipxe"},
        }),
    )
    .await
}

/// Registers a node for `mac` (simulated BMC) and runs `graph` on it with `options`;
/// returns the node and workflow ids once task `waits` runs.
async fn install_graph(
    api: &Api,
    name: &str,
    mac: &str,
    graph: &str,
    waits: &str,
    options: Value,
) -> (String, String) {
    let node = api
        .create_node(json!({
            "name": name,
            "identifiers": [mac],
            "obms": [{"service": "sim-obm-service", "config": {"host": "sim"}}],
        }))
        .await;
    let id = api.run(graph, Some(&node), options).await;
    api.wait_task(&id, waits, "running", Duration::from_secs(20))
        .await;
    (node, id)
}

/// Polls until `check` returns a value, or panics with the boot's evidence.
async fn until<T>(
    net: &Net,
    serial: &str,
    what: &str,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + BOOT_LIMIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {BOOT_LIMIT:?}\n{}",
            net.evidence(serial)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn finished(api: &Api, id: &str) -> Option<Value> {
    let (_, v) = api.get(&format!("/api/2.0/workflows/{id}")).await;
    matches!(
        v["status"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
    .then_some(v)
}

/// Boots a VM with `firmware` for the node of workflow `id` until the workflow ends and,
/// if it succeeded, until iPXE has printed what its callback got back; stops the VM, checks
/// that the workflow succeeded, and returns the seconds from the VM's start to its end.
async fn boot_to_end(
    net: &mut Net,
    api: &Api,
    id: &str,
    firmware: Firmware,
    mac: &str,
    serial: &str,
) -> f32 {
    let t0 = Instant::now();
    let vm = net.start_vm(firmware, mac, serial);
    let end = until(net, serial, "the install workflow's end", async || {
        finished(api, id).await
    })
    .await;
    let secs = t0.elapsed().as_secs_f32();
    if end["status"] == "succeeded" {
        // The callback is answered once its task's end is committed, so the workflow can be
        // seen finished before iPXE prints what it got back: wait for that line.
        until(net, serial, "iPXE's report of its callback", async || {
            let s = net.serial(serial);
            (s.contains("NOTIFY-SENT") || s.contains("NOTIFY-FAILED")).then_some(())
        })
        .await;
    }
    net.stop(vm);
    assert_eq!(
        end["status"],
        "succeeded",
        "{end:#}\n{}",
        net.evidence(serial)
    );
    secs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_firmware_boots_through_metalgraph() {
    if !require() {
        return;
    }
    let mut net = Net::new();
    net.start_ra();
    let api = net.start_metalgraph(Serve {
        data: "data",
        log: "metalgraph.log",
        tftp: true,
    });
    let n = net.n;

    // (1) BIOS: SeaBIOS runs the e1000's iPXE ROM, which DHCP answers with the profile URL;
    // the node runs RackHD's CentOS install graph.
    let mac = format!("52:54:00:{n:02x}:00:01");
    let (node, id) = install_graph(
        &api,
        "vm-bios",
        &mac,
        "Graph.InstallCentOS",
        "install-os",
        json!({"install-os": {"version": "9-stream", "profile": "qemu-rackhd.ipxe"}}),
    )
    .await;
    let bios = Firmware::Bios {
        uuid: "27946b59-9e44-4fa7-8e91-000000000001",
    };
    let bios_secs = boot_to_end(&mut net, &api, &id, bios, &mac, "bios.log").await;
    let serial = net.serial("bios.log");
    assert!(
        serial.contains(&format!(
            "PROFILE-OK task=install-os\nnode={node}\nplatform=pcbios chip=82540em"
        )) && serial.contains("KS-OK")
            && serial.contains("NOTIFY-SENT"),
        "{}",
        net.evidence("bios.log")
    );
    // The profile URL DHCP handed out carried the node's capability, which is what let
    // the profile hold the callback; the DHCP log shows the boot file without it.
    let log = net.read("metalgraph.log");
    assert!(
        log.contains("profile served") && log.contains("proof=Some(Capability)"),
        "{}",
        net.evidence("bios.log")
    );
    assert!(!log.contains("&cap="), "a capability in the log:\n{log}");

    // (2) UEFI: EDK2's PXE gets snponly.efi over our TFTP, which runs iPXE over SNP.
    let mac = format!("52:54:00:{n:02x}:00:02");
    let (node, id) = install_workflow(&api, "vm-uefi", &mac).await;
    let uefi_secs = boot_to_end(&mut net, &api, &id, Firmware::Uefi, &mac, "uefi.log").await;
    let serial = net.serial("uefi.log");
    assert!(
        serial.contains("NBP filename is snponly.efi")
            && serial.contains(&format!(
                "PROFILE-OK task=wait-installed\nnode={node}\nplatform=efi chip=SNP"
            ))
            && serial.contains("NOTIFY-SENT"),
        "{}",
        net.evidence("uefi.log")
    );
    assert!(
        net.read("metalgraph.log")
            .contains("TFTP transfer complete peer="),
        "{}",
        net.evidence("uefi.log")
    );

    // (3) An unknown machine: DHCP answers it, the profile endpoint makes it a node with
    // what iPXE reported and runs the discovery graph, and the machine boots locally.
    let mac = format!("52:54:00:{n:02x}:00:03");
    let uuid = "27946b59-9e44-4fa7-8e91-000000000003";
    let t0 = Instant::now();
    let vm = net.start_vm(Firmware::Bios { uuid }, &mac, "unknown.log");
    let node = until(
        &net,
        "unknown.log",
        "the unknown VM's enrolment",
        async || {
            let (_, nodes) = api.get("/api/2.0/nodes").await;
            nodes.as_array()?.iter().find_map(|n| {
                let ids = n["identifiers"].as_array()?;
                ids.iter()
                    .any(|i| i == mac.as_str())
                    .then(|| n["id"].as_str().unwrap_or_default().to_owned())
            })
        },
    )
    .await;
    let discovery = until(
        &net,
        "unknown.log",
        "the discovery workflow's end",
        async || {
            let (_, wfs) = api.get(&format!("/api/2.0/workflows?node={node}")).await;
            wfs.as_array()?
                .iter()
                .find(|w| w["name"] == "Graph.Discovery.Pxe" && w["status"] == "succeeded")
                .cloned()
        },
    )
    .await;
    until(&net, "unknown.log", "the local boot", async || {
        net.serial("unknown.log")
            .contains("metalgraph: booting from local disk")
            .then_some(())
    })
    .await;
    let unknown_secs = t0.elapsed().as_secs_f32();
    net.stop(vm);
    let (_, n_view) = api.get(&format!("/api/2.0/nodes/{node}")).await;
    assert_eq!(n_view["identifiers"], json!([mac, uuid]), "{n_view:#}");
    let (code, catalog) = api
        .get(&format!("/api/2.0/nodes/{node}/catalogs/pxe"))
        .await;
    assert_eq!(code, 200, "{catalog}");
    assert_eq!(
        catalog["data"],
        json!({"macs": [mac], "uuid": uuid, "platform": "pcbios", "buildarch": "i386"}),
        "{catalog:#}"
    );
    assert_eq!(discovery["tasks"][0]["label"], "discovered");

    // Ordered shutdown with DHCP and TFTP running: SIGTERM ends the process cleanly.
    net.terminate_metalgraph().await;

    // (4) UEFI HTTP Boot from a metalgraph without TFTP (a server of its own, in the same
    // namespace): EDK2's HTTP Boot asks DHCP as HTTPClient, gets option 60 HTTPClient and
    // snponly.efi's URL on the node-facing listener, downloads it over HTTP, and the iPXE
    // in it asks again as iPXE and gets the profile URL, as over PXE.
    let api = net.start_metalgraph(Serve {
        data: "data-http",
        log: "metalgraph-http.log",
        tftp: false,
    });
    let mac = format!("52:54:00:{n:02x}:00:04");
    let (node, id) = install_workflow(&api, "vm-http", &mac).await;
    let http_secs = boot_to_end(&mut net, &api, &id, Firmware::UefiHttp, &mac, "http.log").await;
    let url = format!("http://10.{n}.0.1:8090/boot/snponly.efi");
    let serial = net.serial("http.log");
    assert!(
        serial.contains("Start HTTP Boot over IPv4")
            && serial.contains(&format!("URI: {url}"))
            && !serial.contains("Start PXE")
            && serial.contains(&format!(
                "PROFILE-OK task=wait-installed\nnode={node}\nplatform=efi chip=SNP"
            ))
            && serial.contains("NOTIFY-SENT"),
        "{}",
        net.evidence("http.log")
    );
    // From metalgraph's side: DHCP answered the firmware as HTTPClient (x86-64, 16) with
    // the URL, the binary went out over HTTP to the address DHCP leased, iPXE was answered
    // with the profile URL, whose capability let the profile hold the callback; and there
    // was no TFTP at all.
    let log = net.read("metalgraph-http.log");
    let lines = |what: &[&str]| {
        log.lines()
            .filter(|l| what.iter().all(|w| l.contains(w)))
            .count()
    };
    assert!(
        lines(&["network boot serving", "tftp=None", "mode=Full"]) == 1
            && lines(&[
                "answered",
                &format!("mac={mac}"),
                "reply=Some(Ack)",
                &format!("boot_file=\"{url}\""),
                "firmware=Http arch=Some(16)",
            ]) >= 1
            && lines(&[
                "boot file served over HTTP",
                "file=snponly.efi",
                "method=GET",
                "status=200",
                &format!("peer=Some(10.{n}.0."),
            ]) >= 1
            && lines(&[
                "answered",
                &format!("mac={mac}"),
                "boot_file=\"http://",
                "/api/2.0/profiles\"",
                "firmware=Ipxe",
            ]) >= 1
            && lines(&["profile served", "proof=Some(Capability)"]) >= 1,
        "{}",
        net.evidence("http.log")
    );
    assert!(
        !log.contains("TFTP") && !log.contains("firmware=Pxe"),
        "a TFTP transfer or a PXE answer without TFTP:\n{log}"
    );
    net.terminate_metalgraph().await;

    eprintln!(
        "pxe_boot: BIOS install {bios_secs:.1} s, UEFI install {uefi_secs:.1} s, unknown VM \
         enrolled and booted locally {unknown_secs:.1} s, UEFI HTTP Boot install without TFTP \
         {http_secs:.1} s"
    );
}
