//! Real DHCP clients against our DHCP server across veth pairs in network namespaces made
//! for each test (root only): busybox udhcpc and ISC dhclient get leases from full mode,
//! nmap's broadcast-dhcp-discover sees the boot file, and proxy mode runs beside Kea, which
//! hands out the address while we hand out the boot file.
//!
//! The server must run inside a namespace, so the test binary re-executes itself there
//! (`ip netns exec NS <this binary> helper_pxe_server --ignored`), with the server's
//! settings in `METALGRAPH_PXE_HELPER`; the helper prints `READY` once bound.
//! Namespaces are named per process and test and removed by a guard on drop.

mod common;

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use metalgraph_pxe::{DhcpMode, FullOptions, MemPlanner, PxeOptions, PxeService};
use tokio_util::sync::CancellationToken;

const HELPER_ENV: &str = "METALGRAPH_PXE_HELPER";
const PXE_VENDOR: &str = "PXEClient:Arch:00000:UNDI:002001";

/// Runs inside a namespace when re-executed by a test; does nothing otherwise.
#[test]
#[ignore = "helper: started inside a network namespace by the other tests in this file"]
fn helper_pxe_server() {
    let Ok(spec) = std::env::var(HELPER_ENV) else {
        return;
    };
    let get = |key: &str| {
        spec.split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
    };
    tracing_subscriber::fmt()
        .with_env_filter("metalgraph_pxe=debug")
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let boot: Ipv4Addr = get("boot").unwrap().parse().unwrap();
    let mode = match get("mode").as_deref() {
        Some("proxy") => DhcpMode::Proxy,
        _ => {
            let pool = get("pool").unwrap();
            let (a, b) = pool.split_once('-').unwrap();
            DhcpMode::Full(FullOptions::new(a.parse().unwrap(), b.parse().unwrap()))
        }
    };
    let mut options = PxeOptions::new(mode, boot);
    options.interface = get("iface");
    let planner = Arc::new(MemPlanner::new(format!(
        "http://{boot}:8090/api/2.0/profiles"
    )));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let service = PxeService::bind(options, planner).await.unwrap();
        println!("READY {:?}", service.dhcp_addr());
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        // The parent kills this process; as a fallback, stop after a minute.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            c.cancel();
        });
        service.run(cancel).await;
    });
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ns_exec(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    c
}

/// Namespaces, links and processes of one test; all removed on drop.
struct Net {
    namespaces: Vec<String>,
    children: Vec<Child>,
    dir: tempfile::TempDir,
    tag: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Net {
    fn new() -> Net {
        let tag = format!(
            "{}{}",
            std::process::id() % 100_000,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Net {
            namespaces: Vec::new(),
            children: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
            tag,
        }
    }

    /// A namespace named after this test run, with loopback up.
    fn ns(&mut self, role: &str) -> String {
        let name = format!("mgpxe-{}-{role}", self.tag);
        run("ip", &["netns", "add", &name]);
        self.namespaces.push(name.clone());
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// A veth pair between two namespaces; returns the interface names (at most 15 bytes).
    fn veth(&self, a_ns: &str, b_ns: &str, role: &str) -> (String, String) {
        let (a, b) = (
            format!("mg{role}a{}", self.tag),
            format!("mg{role}b{}", self.tag),
        );
        run(
            "ip",
            &["link", "add", &a, "type", "veth", "peer", "name", &b],
        );
        run("ip", &["link", "set", &a, "netns", a_ns]);
        run("ip", &["link", "set", &b, "netns", b_ns]);
        for (ns, i) in [(a_ns, &a), (b_ns, &b)] {
            run("ip", &["-n", ns, "link", "set", i, "up"]);
        }
        (a, b)
    }

    /// Turns off transmit checksum offload: otherwise replies reach raw-socket clients
    /// (udhcpc, dhclient) in the other namespace with a partial UDP checksum and are
    /// silently dropped.
    fn tx_off(&self, ns: &str, iface: &str) {
        run(
            "ip",
            &["netns", "exec", ns, "ethtool", "-K", iface, "tx", "off"],
        );
    }

    /// Starts our DHCP server in `ns` and waits until it is bound.
    fn start_server(&mut self, ns: &str, spec: &str) -> PathBuf {
        let log = self
            .dir
            .path()
            .join(format!("server-{}.log", self.children.len()));
        let exe = std::env::current_exe().unwrap();
        let mut child = ns_exec(ns, &[exe.to_str().unwrap()])
            .args([
                "helper_pxe_server",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER_ENV, spec)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                // libtest prints "test NAME ... " before the output, on the same line.
                Some(Ok(l)) if l.contains("READY") => break,
                Some(Ok(_)) => continue,
                _ => panic!("the server did not start: {}", read(&log)),
            }
        }
        // Keep draining stdout so the helper never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        log
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// nmap's broadcast-dhcp-discover, patched to announce itself as a PXE client (option 60):
/// the stock script sends no vendor class, and we answer only boot clients.
fn nmap_pxe_script(dir: &Path) -> PathBuf {
    let stock = std::fs::read_to_string("/usr/share/nmap/scripts/broadcast-dhcp-discover.nse")
        .expect("nmap's broadcast-dhcp-discover script");
    let patched = stock.replacen(
        "local options = {}",
        &format!(
            "local options = {{}}\n  table.insert(options, {{number = 60, type = \"string\", value = \"{PXE_VENDOR}\"}})"
        ),
        1,
    );
    assert_ne!(stock, patched, "nmap's script changed; update the patch");
    let path = dir.join("broadcast-dhcp-discover-pxe.nse");
    std::fs::write(&path, patched).unwrap();
    path
}

fn nmap_discover(net: &Net, ns: &str, iface: &str) -> String {
    let script = nmap_pxe_script(net.dir.path());
    let o = ns_exec(ns, &["nmap", "-e", iface, "--script"])
        .arg(&script)
        .args(["--script-args", "broadcast-dhcp-discover.timeout=2"])
        .output()
        .unwrap();
    text(&o)
}

#[test]
fn full_mode_serves_udhcpc_dhclient_and_nmap_over_veth() {
    if !common::require(&["ip", "ethtool", "busybox", "dhclient", "nmap"], true) {
        return;
    }
    let started = Instant::now();
    let mut net = Net::new();
    let (s, c) = (net.ns("s"), net.ns("c"));
    let (vs, vc) = net.veth(&s, &c, "f");
    run("ip", &["-n", &s, "addr", "add", "10.77.0.1/24", "dev", &vs]);
    net.tx_off(&s, &vs);
    let log = net.start_server(
        &s,
        &format!("mode=full;iface={vs};boot=10.77.0.1;pool=10.77.0.100-10.77.0.150"),
    );

    // busybox udhcpc announcing itself as a PXE client gets a lease.
    let o = ns_exec(
        &c,
        &[
            "busybox", "udhcpc", "-i", &vc, "-n", "-q", "-f", "-t", "3", "-T", "1",
        ],
    )
    .args(["-s", "/bin/true", "-V", PXE_VENDOR])
    .output()
    .unwrap();
    let out = text(&o);
    assert!(
        out.contains("lease of 10.77.0.100 obtained from 10.77.0.1"),
        "udhcpc: {out}\nserver: {}",
        read(&log)
    );

    // The same client without the PXE vendor class is ignored by design.
    let o = ns_exec(
        &c,
        &[
            "busybox", "udhcpc", "-i", &vc, "-n", "-q", "-f", "-t", "1", "-T", "1",
        ],
    )
    .args(["-s", "/bin/true"])
    .output()
    .unwrap();
    assert!(
        !o.status.success(),
        "a non-PXE client must get no lease: {}",
        text(&o)
    );
    assert!(
        read(&log).contains("not a network-boot client"),
        "{}",
        read(&log)
    );

    // ISC dhclient, in the foreground, until it is bound.
    let conf = net.path("dhclient.conf");
    std::fs::write(
        &conf,
        format!("send vendor-class-identifier \"{PXE_VENDOR}\";\n"),
    )
    .unwrap();
    let (leases, pid) = (net.path("dhclient.leases"), net.path("dhclient.pid"));
    let mut dhclient = ns_exec(
        &c,
        &["dhclient", "-d", "-1", "-v", "-sf", "/bin/true", "-cf"],
    )
    .arg(&conf)
    .arg("-lf")
    .arg(&leases)
    .arg("-pf")
    .arg(&pid)
    .arg(&vc)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut seen = String::new();
    let mut bound = false;
    for line in BufReader::new(dhclient.stderr.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("bound to 10.77.0.") {
            bound = true;
            break;
        }
        if line.contains("No DHCPOFFERS") || line.contains("exiting") {
            break;
        }
    }
    let _ = dhclient.kill();
    let _ = dhclient.wait();
    assert!(bound, "dhclient: {seen}\nserver: {}", read(&log));
    assert!(
        read(&leases).contains("filename \"undionly.kpxe\""),
        "{}",
        read(&leases)
    );

    // nmap sees the offer with its boot file.
    run(
        "ip",
        &["-n", &c, "addr", "add", "10.77.0.200/24", "dev", &vc],
    );
    let out = nmap_discover(&net, &c, &vc);
    assert!(
        out.contains("Bootfile Name: undionly.kpxe"),
        "nmap: {out}\nserver: {}",
        read(&log)
    );
    assert!(out.contains("Server Identifier: 10.77.0.1"), "nmap: {out}");
    assert!(out.contains("IP Offered: 10.77.0.1"), "nmap: {out}");
    eprintln!("full mode over veth: {:?}", started.elapsed());
}

#[test]
fn proxy_mode_beside_kea_gives_the_boot_file_while_kea_gives_the_address() {
    if !common::require(&["ip", "ethtool", "nmap", "kea-dhcp4"], true) {
        return;
    }
    let started = Instant::now();
    let mut net = Net::new();
    // One link shared by three parties: a bridge in the server namespace, with the
    // client's veth and Kea's veth attached.
    let (s, k, c) = (net.ns("s"), net.ns("k"), net.ns("c"));
    run("ip", &["-n", &s, "link", "add", "br0", "type", "bridge"]);
    let (sc, vc) = net.veth(&s, &c, "c");
    let (sk, vk) = net.veth(&s, &k, "k");
    for port in [&sc, &sk] {
        run("ip", &["-n", &s, "link", "set", port, "master", "br0"]);
        net.tx_off(&s, port);
    }
    run(
        "ip",
        &["-n", &s, "addr", "add", "10.77.0.1/24", "dev", "br0"],
    );
    run("ip", &["-n", &s, "link", "set", "br0", "up"]);
    net.tx_off(&s, "br0");
    run("ip", &["-n", &k, "addr", "add", "10.77.0.2/24", "dev", &vk]);
    net.tx_off(&k, &vk);

    // Kea: addresses only, no boot options.
    let kea_dir = net.path("kea");
    std::fs::create_dir_all(&kea_dir).unwrap();
    let kea_log = kea_dir.join("kea.log");
    let kea_conf = kea_dir.join("kea.json");
    std::fs::write(
        &kea_conf,
        format!(
            r#"{{ "Dhcp4": {{
  "interfaces-config": {{ "interfaces": [ "{vk}" ], "dhcp-socket-type": "raw" }},
  "lease-database": {{ "type": "memfile", "persist": false }},
  "valid-lifetime": 600, "authoritative": true,
  "subnet4": [ {{ "id": 1, "subnet": "10.77.0.0/24", "pools": [ {{ "pool": "10.77.0.160 - 10.77.0.199" }} ] }} ],
  "loggers": [ {{ "name": "kea-dhcp4", "output_options": [ {{ "output": "{}" }} ], "severity": "INFO" }} ] }} }}"#,
            kea_log.display()
        ),
    )
    .unwrap();
    let kea = ns_exec(&k, &["kea-dhcp4", "-c"])
        .arg(&kea_conf)
        .env("KEA_PIDFILE_DIR", &kea_dir)
        .env("KEA_LOCKFILE_DIR", &kea_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    net.children.push(kea);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !read(&kea_log).contains("DHCP4_STARTED") {
        assert!(
            Instant::now() < deadline,
            "Kea did not start: {}",
            read(&kea_log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let log = net.start_server(&s, "mode=proxy;iface=br0;boot=10.77.0.1");

    run(
        "ip",
        &["-n", &c, "addr", "add", "10.77.0.250/24", "dev", &vc],
    );
    let out = nmap_discover(&net, &c, &vc);
    // Two responses: Kea's with an address and no boot file, ours with the boot file
    // and no address.
    assert!(
        out.contains("Response 2 of 2"),
        "nmap: {out}\nserver: {}\nkea: {}",
        read(&log),
        read(&kea_log)
    );
    let responses: Vec<&str> = out.split("Response ").skip(1).collect();
    let kea_offer = responses
        .iter()
        .find(|r| r.contains("Server Identifier: 10.77.0.2"))
        .unwrap_or_else(|| panic!("no offer from Kea: {out}"));
    assert!(kea_offer.contains("IP Offered: 10.77.0.1"), "{kea_offer}");
    assert!(!kea_offer.contains("Bootfile Name"), "{kea_offer}");
    let proxy_offer = responses
        .iter()
        .find(|r| {
            r.contains("Server Identifier: 10.77.0.1\n")
                || r.contains("Server Identifier: 10.77.0.1\r")
        })
        .unwrap_or_else(|| panic!("no proxy offer: {out}"));
    assert!(
        proxy_offer.contains("Bootfile Name: undionly.kpxe"),
        "{proxy_offer}"
    );
    assert!(
        proxy_offer.contains("Class Identifier: PXEClient"),
        "{proxy_offer}"
    );
    assert!(!proxy_offer.contains("IP Offered: 10."), "{proxy_offer}");
    eprintln!("proxy beside Kea: {:?}", started.elapsed());
}
