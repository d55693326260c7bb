//! A rack powering on: N simulated machines that each do what a BIOS PXE boot does — DHCP
//! (DISCOVER, OFFER, REQUEST, ACK), `undionly.kpxe` over TFTP, the iPXE profile over HTTP,
//! then the kernel and the initrd the profile names over HTTP — all at once, against
//! metalgraph (`serve --dhcp full` with its TFTP server and node-facing listener) and, in
//! the same run, against the stack operators would otherwise assemble: dnsmasq for DHCP,
//! tftpd-hpa and nginx. Server and machines sit on either side of a veth pair between two
//! network namespaces this scenario creates.
//!
//! The machines are tasks of this harness, on a runtime whose threads live in the client
//! namespace. DHCP goes through a relay, as perfdhcp's does: every request carries `giaddr`
//! [`CLIENT_ADDR`], the server answers that address on port 67, and one socket there hands
//! each reply to its machine by `xid`. The client namespace has a `local` route over the
//! pool, so a machine sends from the address it leased without configuring it: its TFTP and
//! HTTP traffic comes from its lease, and the server's replies find their way back.
//!
//! Each step of each machine is timed and checked: the ACK names `undionly.kpxe` on the
//! server, the TFTP download is byte for byte the file served, the profile is the rack
//! profile (metalgraph's rendered for this machine's node) and names the kernel and initrd
//! it should, and the kernel and initrd arrive whole (their size; their content is compared
//! byte for byte once per round by a probe before the machines start). A step that fails is
//! an error of that machine, counted and reported; the machine stops there, as a real one
//! would.
//!
//! Root only. Every round starts its stack afresh (an empty lease store); the daemons run in
//! process groups of their own, killed when dropped; the namespaces go when the scenario
//! ends, whatever happened.

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable as _, Encodable as _};
use metalgraph_store::Backend;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpSocket, UdpSocket};
use tokio::sync::mpsc;

use crate::boot::{Daemon, Listen, Walls, is_root, start_nginx, start_tftpd_hpa, version_line};
use crate::dhcp::{NODE_PORT, start_dhcp_daemon, start_full_dhcp};
use crate::netns::{self, CLIENT_ADDR, NETMASK, Netns, SERVER_ADDR};
use crate::server::Server;

/// The pool both DHCP servers lease from, and the client namespace's `local` route that
/// lets a machine send from its lease: 10.77.16.0–10.77.31.255.
const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 16, 0);
const POOL_LEN: u32 = 4096;
const POOL_ROUTE: &str = "10.77.16.0/20";
/// The most machines a rack may have: the pool, less some slack.
pub const MAX_MACHINES: usize = 4000;
/// The lease time both DHCP servers give, seconds.
const LEASE_SECS: u32 = 3600;
/// The vendor class a BIOS PXE ROM sends (option 60); metalgraph answers network-boot
/// clients only.
const PXE_VENDOR_CLASS: &[u8] = b"PXEClient:Arch:00000:UNDI:002001";
/// The boot file, its TFTP block size (what PXE ROMs ask for: a full Ethernet frame), and
/// where Debian's `ipxe` package keeps it.
const BOOT_FILE: &str = "undionly.kpxe";
const TFTP_BLKSIZE: u16 = 1468;
const IPXE_BOOT_FILE: &str = "/usr/lib/ipxe/undionly.kpxe";
/// The size of the stand-in written when the `ipxe` package is missing (the real file is
/// about 70 KB).
const STAND_IN_BOOT_FILE_BYTES: u64 = 70_000;
/// The files the profile boots, the profile's template (metalgraph) and static file (nginx).
const KERNEL: &str = "vmlinuz";
const INITRD: &str = "initrd.img";
const PROFILE_TEMPLATE: &str = "rack.ipxe";
const PROFILE_FILE: &str = "boot.ipxe";
/// A line every rack profile holds, so that a machine knows it got one.
const PROFILE_MARK: &str = "# metalgraph bench: rack profile";
/// The port of nginx (metalgraph's node-facing listener is on [`NODE_PORT`]; TFTP is on 69
/// for both).
const NGINX_PORT: u16 = 8080;
/// A machine resends a DHCP request after [`DHCP_TIMEOUT`], TFTP after [`TFTP_TIMEOUT`],
/// and gives up after that many tries; an HTTP request may take [`HTTP_TIMEOUT`].
const DHCP_TIMEOUT: Duration = Duration::from_secs(2);
const DHCP_TRIES: u32 = 4;
const TFTP_TIMEOUT: Duration = Duration::from_secs(1);
const TFTP_TRIES: u32 = 8;
const HTTP_TIMEOUT: Duration = Duration::from_secs(120);
/// The client runtime's worker threads (the machine has two cores, shared with the server).
const CLIENT_THREADS: usize = 2;

/// How big the rack and its boot files are.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RackSizes {
    pub machines: usize,
    pub kernel_bytes: u64,
    pub initrd_bytes: u64,
    /// Power-ons per stack, alternating which stack goes first.
    pub rounds: usize,
    /// When given, metalgraph also runs with `--tftp-max-transfers` this many, as a stack
    /// of its own (`--rack-tftp-transfers N`): what another cap than the default (256)
    /// does, e.g. the 64 that was the default before it.
    pub tftp_transfers: Option<usize>,
}

impl RackSizes {
    /// What the issue asks for: 200 machines; an installer-sized kernel and initrd.
    pub fn full() -> RackSizes {
        RackSizes {
            machines: 200,
            kernel_bytes: 8 << 20,
            initrd_bytes: 32 << 20,
            rounds: 3,
            tftp_transfers: None,
        }
    }

    pub fn quick() -> RackSizes {
        RackSizes {
            rounds: 1,
            ..RackSizes::full()
        }
    }

    /// Ten machines and small files: the code path, not a figure.
    pub fn smoke() -> RackSizes {
        RackSizes {
            machines: 10,
            kernel_bytes: 256 << 10,
            initrd_bytes: 1 << 20,
            rounds: 1,
            tftp_transfers: None,
        }
    }
}

/// The steps of a machine's boot, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    Dora,
    Tftp,
    Profile,
    /// The kernel, then the initrd.
    Files,
}

impl Step {
    pub const ALL: [Step; 4] = [Step::Dora, Step::Tftp, Step::Profile, Step::Files];

    pub fn label(self) -> &'static str {
        match self {
            Step::Dora => "DHCP DORA",
            Step::Tftp => "TFTP undionly.kpxe",
            Step::Profile => "HTTP profile",
            Step::Files => "HTTP kernel + initrd",
        }
    }
}

/// One machine's power-on.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MachineRun {
    /// The time of each step it completed, in [`Step::ALL`]'s order (seconds).
    pub steps_s: Vec<f64>,
    /// The step that failed and why, if one did.
    pub error: Option<(Step, String)>,
    /// DHCP requests and TFTP packets sent again after a timeout.
    pub dhcp_resends: u32,
    pub tftp_resends: u32,
}

/// One power-on of the whole rack against one stack.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundResult {
    /// From the first machine's DISCOVER to the last machine's last byte (or failure).
    pub wall_s: f64,
    pub machines: Vec<MachineRun>,
    pub udp_drops: UdpDrops,
}

/// UDP datagrams the kernel dropped during a power-on because a socket's receive buffer
/// was full (`RcvbufErrors` of `/proc/net/snmp`), in each namespace: where a burst of
/// requests was lost before a server (or the machines) could read it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct UdpDrops {
    pub server: u64,
    pub client: u64,
}

/// A step's latency over every machine of every round that completed it.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepFigures {
    #[serde(with = "crate::util::secs")]
    pub p50: Duration,
    #[serde(with = "crate::util::secs")]
    pub p99: Duration,
    pub completed: usize,
    pub errors: usize,
}

/// One stack's rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StackResult {
    pub name: String,
    pub peer: bool,
    /// The rounds, or why this stack did not run.
    pub rounds: Result<Vec<RoundResult>, String>,
}

impl StackResult {
    fn runs(&self) -> impl Iterator<Item = &MachineRun> {
        self.rounds.iter().flatten().flat_map(|r| &r.machines)
    }

    /// The wall times of the rounds.
    pub fn walls(&self) -> Walls {
        Walls {
            walls_s: self.rounds.iter().flatten().map(|r| r.wall_s).collect(),
        }
    }

    /// The median wall time over the rounds.
    pub fn median_wall(&self) -> Option<f64> {
        let w = self.walls();
        (!w.walls_s.is_empty()).then(|| w.median())
    }

    /// `step`'s latency percentiles and its errors.
    pub fn step(&self, step: Step) -> StepFigures {
        let index = Step::ALL.iter().position(|s| *s == step).unwrap_or(0);
        let mut times: Vec<Duration> = self
            .runs()
            .filter_map(|m| m.steps_s.get(index))
            .map(|s| Duration::from_secs_f64(*s))
            .collect();
        times.sort_unstable();
        StepFigures {
            p50: crate::util::quantile(&times, 0.5),
            p99: crate::util::quantile(&times, 0.99),
            completed: times.len(),
            errors: self
                .runs()
                .filter(|m| m.error.as_ref().is_some_and(|(s, _)| *s == step))
                .count(),
        }
    }

    /// Machines that failed a step, over every round.
    pub fn errors(&self) -> usize {
        self.runs().filter(|m| m.error.is_some()).count()
    }

    /// The first failure, for the report.
    pub fn first_error(&self) -> Option<String> {
        self.runs()
            .find_map(|m| m.error.as_ref())
            .map(|(step, why)| format!("{}: {why}", step.label()))
    }

    /// UDP datagrams dropped on full receive buffers, over every round.
    pub fn udp_drops(&self) -> UdpDrops {
        self.rounds
            .iter()
            .flatten()
            .fold(UdpDrops::default(), |a, r| UdpDrops {
                server: a.server + r.udp_drops.server,
                client: a.client + r.udp_drops.client,
            })
    }

    /// DHCP requests and TFTP packets resent after a timeout, over every round.
    pub fn resends(&self) -> (u64, u64) {
        self.runs().fold((0, 0), |(d, t), m| {
            (d + u64::from(m.dhcp_resends), t + u64::from(m.tftp_resends))
        })
    }
}

/// What the scenario measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RackResult {
    pub sizes: RackSizes,
    /// The size of `undionly.kpxe`, and whether it is Debian's or a stand-in.
    pub boot_file_bytes: u64,
    pub boot_file_real: bool,
    pub stacks: Vec<StackResult>,
    /// dnsmasq's, tftpd-hpa's and nginx's versions.
    pub versions: Vec<(String, String)>,
}

impl RackResult {
    /// The peer stack's median wall time over `stack`'s (above 1: `stack` is faster).
    pub fn ratio(&self, stack: &StackResult) -> Option<f64> {
        let peer = self.stacks.iter().find(|s| s.peer)?.median_wall()?;
        Some(peer / stack.median_wall()?)
    }
}

/// Whether this machine can run the scenario: root (namespaces) and `ip`; the reason if
/// not. The peers are optional: without them metalgraph runs alone.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root, for network namespaces".into());
    }
    if version_line("ip", &["-V"]).is_none() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    None
}

/// The stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stack {
    /// metalgraph on sled, with `--tftp-max-transfers` when given (else its default).
    Metalgraph { tftp_transfers: Option<usize> },
    /// dnsmasq (DHCP only), tftpd-hpa, nginx.
    Peer,
}

impl Stack {
    fn name(self) -> String {
        match self {
            Stack::Metalgraph {
                tftp_transfers: None,
            } => "metalgraph (sled)".to_owned(),
            Stack::Metalgraph {
                tftp_transfers: Some(n),
            } => format!("metalgraph (sled, `--tftp-max-transfers {n}`)"),
            Stack::Peer => "dnsmasq + tftpd-hpa + nginx".to_owned(),
        }
    }
}

/// The `i`th machine's MAC: locally administered, unicast.
fn mac(i: usize) -> [u8; 6] {
    [0x02, 0x00, 0x6d, 0x67, (i >> 8) as u8, i as u8]
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What the machines of one round should find at one stack.
struct Target {
    /// Each machine's profile URL: where iPXE would be sent for it.
    profiles: Vec<String>,
    /// A line each machine's profile must hold besides [`PROFILE_MARK`] (metalgraph: the
    /// node it was rendered for); none for the static profile.
    marks: Vec<String>,
    kernel_url: String,
    initrd_url: String,
}

/// The files the machines must receive, shared by the client tasks.
struct Reference {
    boot_file: Vec<u8>,
    kernel: u64,
    initrd: u64,
}

/// A stack started for one round; dropping it stops what is still running.
enum Running {
    Metalgraph { server: Server, data: PathBuf },
    Peer(Vec<Daemon>),
}

/// The scenario's fixed surroundings.
struct Bench<'a> {
    net: Netns,
    dir: &'a Path,
    log: &'a Path,
    sizes: &'a RackSizes,
    limit: Duration,
    /// The TFTP root and files directory of both stacks: `undionly.kpxe`, the kernel, the
    /// initrd and the peer's static profile.
    root: PathBuf,
    /// metalgraph's templates directory: the rack profile.
    templates: PathBuf,
    reference: Arc<Reference>,
}

impl Bench<'_> {
    fn start(&self, stack: Stack, data: &Path) -> anyhow::Result<(Running, Target)> {
        let ns = Some(self.net.server.as_str());
        let at = |port| Listen {
            netns: ns,
            addr: SocketAddrV4::new(SERVER_ADDR, port),
        };
        let pool = format!(
            "{POOL_FIRST}-{}",
            Ipv4Addr::from(u32::from(POOL_FIRST) + POOL_LEN - 1)
        );
        match stack {
            Stack::Metalgraph { tftp_transfers } => {
                let mut extra: Vec<OsString> = Vec::new();
                if let Some(n) = tftp_transfers {
                    extra.extend(["--tftp-max-transfers".into(), n.to_string().into()]);
                }
                for (flag, path) in [
                    ("--files-dir", &self.root),
                    ("--templates-dir", &self.templates),
                ] {
                    extra.push(flag.into());
                    extra.push(path.into());
                }
                let server = start_full_dhcp(
                    &self.net,
                    Backend::Sled,
                    data,
                    self.log,
                    &pool,
                    &self.root,
                    &extra,
                    self.limit,
                )?;
                for kind in ["tftp", "node-facing"] {
                    server.listener(kind, self.limit)?;
                }
                // Every machine is a node that always boots the rack profile. The
                // management API listens on the server namespace's loopback.
                let api = server.api()?;
                let machines = self.sizes.machines;
                let ids = netns::block_on_in(&self.net.server, 1, async || {
                    let mut ids = Vec::with_capacity(machines);
                    for i in 0..machines {
                        let m = mac_string(mac(i));
                        let node = serde_json::json!({
                            "name": format!("rack-{i:04}"),
                            "identifiers": [m],
                            "tags": [format!("boot-profile={PROFILE_TEMPLATE}")],
                        });
                        ids.push(api.create_node(&node).await.context("registering a node")?);
                    }
                    Ok(ids)
                })?;
                let node_base = format!("http://{SERVER_ADDR}:{NODE_PORT}/api/2.0");
                let files = format!("http://{SERVER_ADDR}:{NODE_PORT}/files");
                let profiles = (0..machines)
                    .map(|i| {
                        let m: metalgraph_pxe::MacAddr = mac_string(mac(i)).parse()?;
                        Ok(metalgraph::boot::profile_url(&node_base, &[m], None))
                    })
                    .collect::<anyhow::Result<_>>()?;
                let target = Target {
                    profiles,
                    marks: ids
                        .iter()
                        .map(|id| format!("metalgraph.node={id}"))
                        .collect(),
                    kernel_url: format!("{files}/{KERNEL}"),
                    initrd_url: format!("{files}/{INITRD}"),
                };
                let running = Running::Metalgraph {
                    server,
                    data: data.to_owned(),
                };
                Ok((running, target))
            }
            Stack::Peer => {
                let conf = data.join("dnsmasq.conf");
                std::fs::write(&conf, self.dnsmasq_config(data))?;
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", &self.net.server, "dnsmasq", "-k", "-C"])
                    .arg(&conf);
                let dnsmasq = start_dhcp_daemon("dnsmasq", cmd, &data.join("dnsmasq.out"))?;
                let tftpd = start_tftpd_hpa(&self.root, at(69), data)?;
                let nginx = start_nginx(&self.root, at(NGINX_PORT), data)?;
                let files = format!("http://{SERVER_ADDR}:{NGINX_PORT}/files");
                let target = Target {
                    profiles: vec![format!("{files}/{PROFILE_FILE}"); self.sizes.machines],
                    marks: Vec::new(),
                    kernel_url: format!("{files}/{KERNEL}"),
                    initrd_url: format!("{files}/{INITRD}"),
                };
                Ok((Running::Peer(vec![dnsmasq, tftpd, nginx]), target))
            }
        }
    }

    /// dnsmasq as a DHCP server only (`port=0`: no DNS; no TFTP): the same pool, lease time
    /// and netmask as metalgraph, `undionly.kpxe` on this host as the boot file,
    /// authoritative, no ping before an offer (metalgraph does not probe either, and the
    /// client namespace answers for the whole pool), leases in the round's directory,
    /// logging to a file as metalgraph does.
    fn dnsmasq_config(&self, data: &Path) -> String {
        let last = Ipv4Addr::from(u32::from(POOL_FIRST) + POOL_LEN - 1);
        format!(
            "port=0\ninterface={iface}\nbind-interfaces\nuser=root\n\
             dhcp-range={POOL_FIRST},{last},{NETMASK},{LEASE_SECS}\n\
             dhcp-authoritative\nno-ping\ndhcp-lease-max={max}\n\
             dhcp-boot={BOOT_FILE},,{SERVER_ADDR}\n\
             dhcp-leasefile={leases}\nlog-facility={log}\n",
            iface = self.net.server_if,
            max = POOL_LEN,
            leases = data.join("dnsmasq.leases").display(),
            log = data.join("dnsmasq.log").display(),
        )
    }

    /// One power-on of the rack against `stack`, on a stack started afresh.
    fn round(&self, stack: Stack, n: usize) -> anyhow::Result<RoundResult> {
        let data = self.dir.join(format!("round-{n}"));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let (running, target) = self.start(stack, &data)?;
        let target = Arc::new(target);
        let reference = self.reference.clone();
        let (root, machines) = (self.root.clone(), self.sizes.machines);
        let server_pid = match &running {
            Running::Metalgraph { server, .. } => server.pid(),
            Running::Peer(daemons) => daemons[0].pid(),
        };
        let server_drops = netns::udp_rcvbuf_errors(&server_pid.to_string());
        let result = netns::block_on_in(&self.net.client, CLIENT_THREADS, async || {
            probe(&root, &target).await?;
            // This thread is in the client namespace.
            let client_drops = netns::udp_rcvbuf_errors("thread-self");
            let mut r = power_on(machines, target, reference).await?;
            r.udp_drops.client = netns::udp_rcvbuf_errors("thread-self") - client_drops;
            r.udp_drops.server = netns::udp_rcvbuf_errors(&server_pid.to_string()) - server_drops;
            Ok(r)
        });
        match running {
            Running::Metalgraph { server, data } => {
                server.terminate(Duration::from_secs(10))?;
                let result = result?;
                // Every ACK follows its lease's durable commit.
                let store = crate::util::open_store(Backend::Sled, &data)
                    .context("opening the stopped server's store")?;
                let leases = store.scan_prefix(metalgraph::boot::LEASES, b"")?.len();
                let acked = result
                    .machines
                    .iter()
                    .filter(|m| !m.steps_s.is_empty())
                    .count();
                ensure!(
                    leases >= acked,
                    "{acked} machines got an ACK but the store holds {leases} leases"
                );
                drop(store);
                let _ = std::fs::remove_dir_all(&data);
                Ok(result)
            }
            Running::Peer(daemons) => {
                drop(daemons);
                result
            }
        }
    }
}

/// Before the timed run: the kernel and initrd downloaded once from the client side and
/// compared byte for byte with the files served (the machines then check sizes only, so
/// that comparing is not part of their times).
async fn probe(root: &Path, target: &Target) -> anyhow::Result<()> {
    for (url, name) in [(&target.kernel_url, KERNEL), (&target.initrd_url, INITRD)] {
        let mut body = Vec::new();
        http_get(CLIENT_ADDR, url, Some(&mut body))
            .await
            .with_context(|| format!("probe: GET {url}"))?;
        let original = tokio::fs::read(root.join(name)).await?;
        ensure!(
            body == original,
            "probe: {url} ({} bytes) differs from the file served ({} bytes)",
            body.len(),
            original.len()
        );
    }
    Ok(())
}

/// The machines, all at once: the relay socket, then one task per machine; the wall time
/// runs until the last one is done.
async fn power_on(
    machines: usize,
    target: Arc<Target>,
    reference: Arc<Reference>,
) -> anyhow::Result<RoundResult> {
    let relay = Relay::bind().await?;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..machines {
        let (relay, target, reference) = (relay.clone(), target.clone(), reference.clone());
        tasks.spawn(async move { (i, boot(i, &relay, &target, &reference).await) });
    }
    let mut runs = vec![MachineRun::default(); machines];
    while let Some(joined) = tasks.join_next().await {
        let (i, run) = joined.context("a machine's task panicked")?;
        runs[i] = run;
    }
    let wall = start.elapsed();
    relay.stop();
    Ok(RoundResult {
        wall_s: wall.as_secs_f64(),
        machines: runs,
        udp_drops: UdpDrops::default(),
    })
}

/// One machine's boot, step after step until one fails.
async fn boot(i: usize, relay: &Relay, target: &Target, reference: &Reference) -> MachineRun {
    let mut run = MachineRun::default();
    let mut t = Instant::now();
    let done = |run: &mut MachineRun, t: &mut Instant| {
        run.steps_s.push(t.elapsed().as_secs_f64());
        *t = Instant::now();
    };
    // The xid: distinct per machine, and not a small number a stray packet might carry.
    let xid = 0x6d67_0000 ^ (i as u32);
    let lease = match relay.dora(mac(i), xid, &mut run.dhcp_resends).await {
        Ok(l) => l,
        Err(e) => return run.failed(Step::Dora, e),
    };
    done(&mut run, &mut t);
    let got = tftp_get(
        lease.addr,
        SocketAddrV4::new(lease.next_server, 69),
        BOOT_FILE,
        &mut run.tftp_resends,
    )
    .await
    .and_then(|bytes| {
        ensure!(
            bytes == reference.boot_file,
            "{} bytes that differ from the {} bytes served",
            bytes.len(),
            reference.boot_file.len()
        );
        Ok(())
    });
    if let Err(e) = got {
        return run.failed(Step::Tftp, e);
    }
    done(&mut run, &mut t);
    let (kernel, initrd) = match fetch_profile(lease.addr, target, i).await {
        Ok(urls) => urls,
        Err(e) => return run.failed(Step::Profile, e),
    };
    done(&mut run, &mut t);
    for (url, size) in [(&kernel, reference.kernel), (&initrd, reference.initrd)] {
        match http_get(lease.addr, url, None).await {
            Ok(n) if n == size => {}
            Ok(n) => {
                return run.failed(
                    Step::Files,
                    anyhow::anyhow!("{url}: {n} bytes where {size} were served"),
                );
            }
            Err(e) => return run.failed(Step::Files, e.context(url.clone())),
        }
    }
    done(&mut run, &mut t);
    run
}

impl MachineRun {
    fn failed(mut self, step: Step, e: anyhow::Error) -> MachineRun {
        self.error = Some((step, format!("{e:#}")));
        self
    }
}

/// Fetches machine `i`'s profile and checks it ([`read_profile`]); returns the kernel and
/// initrd URLs it names, which the machine fetches next.
async fn fetch_profile(
    from: Ipv4Addr,
    target: &Target,
    i: usize,
) -> anyhow::Result<(String, String)> {
    let url = &target.profiles[i];
    let mut body = Vec::new();
    http_get(from, url, Some(&mut body))
        .await
        .with_context(|| format!("GET {url}"))?;
    let text = String::from_utf8(body).with_context(|| format!("{url}: not UTF-8"))?;
    read_profile(
        &text,
        target.marks.get(i).map(String::as_str),
        &target.kernel_url,
        &target.initrd_url,
    )
    .with_context(|| format!("{url}: {:?}", text.chars().take(300).collect::<String>()))
}

/// Checks a profile: an iPXE script holding [`PROFILE_MARK`] and `mark` (when given), whose
/// `kernel` and `initrd` commands name `kernel` and `initrd`. Returns those URLs as the
/// script has them.
pub fn read_profile(
    text: &str,
    mark: Option<&str>,
    kernel: &str,
    initrd: &str,
) -> anyhow::Result<(String, String)> {
    ensure!(
        text.starts_with("#!ipxe\n") && text.lines().any(|l| l == PROFILE_MARK),
        "not the rack profile"
    );
    if let Some(mark) = mark {
        ensure!(text.contains(mark), "the profile lacks {mark:?}");
    }
    // The first `http://` word of the `kernel` and `initrd` commands, as iPXE reads them.
    let url_of = |command: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(command))
            .flat_map(str::split_whitespace)
            .find(|w| w.starts_with("http://"))
            .map(str::to_owned)
    };
    let got_kernel = url_of("kernel ").context("no kernel URL")?;
    let got_initrd = url_of("initrd ").context("no initrd URL")?;
    ensure!(
        got_kernel == kernel && got_initrd == initrd,
        "it boots {got_kernel} and {got_initrd}, not {kernel} and {initrd}"
    );
    Ok((got_kernel, got_initrd))
}

/// The rack profile: metalgraph's template (rendered per node, with the node's id on the
/// kernel's command line) or the peer's static file, booting the same kernel and initrd
/// from `files`.
pub fn profile(files: &str, node: &str) -> String {
    format!(
        "#!ipxe\n{PROFILE_MARK}\n\
         kernel {files}/{KERNEL} initrd={INITRD} console=ttyS0{node}\n\
         initrd --name {INITRD} {files}/{INITRD}\nboot\n"
    )
}

/// What a machine leased.
struct Lease {
    addr: Ipv4Addr,
    next_server: Ipv4Addr,
}

/// The relay's socket on [`CLIENT_ADDR`]:67, and the machines waiting for replies by
/// `xid`. Cheap to clone.
#[derive(Clone)]
struct Relay {
    socket: Arc<UdpSocket>,
    waiting: Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<v4::Message>>>>,
    reader: Arc<tokio::task::JoinHandle<()>>,
}

impl Relay {
    async fn bind() -> anyhow::Result<Relay> {
        let socket = UdpSocket::bind(SocketAddrV4::new(CLIENT_ADDR, 67))
            .await
            .context("binding the relay's port 67")?;
        // The whole rack's OFFERs arrive within milliseconds; the default buffer holds
        // about a hundred. Root may raise it past the system's maximum.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, 4 << 20);
        let socket = Arc::new(socket);
        let waiting: Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<v4::Message>>>> = Arc::default();
        let (s, w) = (socket.clone(), waiting.clone());
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, _)) = s.recv_from(&mut buf).await {
                // A reply that does not decode reaches no machine, which then resends.
                let Ok(msg) = v4::Message::from_bytes(&buf[..n]) else {
                    continue;
                };
                let waiting = w.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(tx) = waiting.get(&msg.xid()) {
                    let _ = tx.send(msg);
                }
            }
        });
        Ok(Relay {
            socket,
            waiting,
            reader: Arc::new(reader),
        })
    }

    fn stop(&self) {
        self.reader.abort();
    }

    /// DISCOVER, OFFER, REQUEST, ACK for `mac`, as a BIOS PXE ROM behind the relay.
    async fn dora(&self, mac: [u8; 6], xid: u32, resends: &mut u32) -> anyhow::Result<Lease> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(xid, tx);
        let lease = self.exchange(mac, xid, &mut rx, resends).await;
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&xid);
        lease
    }

    async fn exchange(
        &self,
        mac: [u8; 6],
        xid: u32,
        rx: &mut mpsc::UnboundedReceiver<v4::Message>,
        resends: &mut u32,
    ) -> anyhow::Result<Lease> {
        let discover = request(mac, xid, MessageType::Discover, &[]);
        let offer = self
            .send_until(&discover, MessageType::Offer, rx, resends)
            .await
            .context("DISCOVER")?;
        let addr = offer.yiaddr();
        let in_pool = u32::from(addr).wrapping_sub(u32::from(POOL_FIRST)) < POOL_LEN;
        ensure!(in_pool, "offered {addr}, outside the pool");
        let Some(DhcpOption::ServerIdentifier(server)) =
            offer.opts().get(OptionCode::ServerIdentifier)
        else {
            bail!("the OFFER of {addr} has no server identifier");
        };
        let req = request(
            mac,
            xid,
            MessageType::Request,
            &[
                DhcpOption::RequestedIpAddress(addr),
                DhcpOption::ServerIdentifier(*server),
            ],
        );
        let ack = self
            .send_until(&req, MessageType::Ack, rx, resends)
            .await
            .context("REQUEST")?;
        ensure!(
            ack.yiaddr() == addr,
            "offered {addr} but acknowledged {}",
            ack.yiaddr()
        );
        let file = match ack.opts().get(OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(f)) => String::from_utf8_lossy(f).into_owned(),
            _ => String::from_utf8_lossy(ack.fname().unwrap_or_default()).into_owned(),
        };
        let file = file.trim_end_matches('\0');
        ensure!(
            file == BOOT_FILE,
            "the ACK's boot file is {file:?}, not {BOOT_FILE}"
        );
        let next_server = ack.siaddr();
        ensure!(
            next_server == SERVER_ADDR,
            "the ACK's next server is {next_server}, not {SERVER_ADDR}"
        );
        Ok(Lease { addr, next_server })
    }

    /// Sends `packet` to the server until a reply of type `want` comes (resending after
    /// each [`DHCP_TIMEOUT`]); a NAK fails at once.
    async fn send_until(
        &self,
        packet: &[u8],
        want: MessageType,
        rx: &mut mpsc::UnboundedReceiver<v4::Message>,
        resends: &mut u32,
    ) -> anyhow::Result<v4::Message> {
        for attempt in 0..DHCP_TRIES {
            if attempt > 0 {
                *resends += 1;
            }
            self.socket
                .send_to(packet, SocketAddrV4::new(SERVER_ADDR, 67))
                .await?;
            let deadline = tokio::time::Instant::now() + DHCP_TIMEOUT;
            loop {
                let reply = match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(reply)) => reply,
                    Ok(None) => bail!("the relay stopped"),
                    Err(_) => break,
                };
                match reply.opts().msg_type() {
                    Some(t) if t == want => return Ok(reply),
                    Some(MessageType::Nak) => {
                        let why = match reply.opts().get(OptionCode::Message) {
                            Some(DhcpOption::Message(m)) => m.clone(),
                            _ => String::new(),
                        };
                        bail!("NAK {why}");
                    }
                    // A late answer to an earlier request: keep waiting.
                    _ => {}
                }
            }
        }
        bail!(
            "no {want:?} after {DHCP_TRIES} tries {} s apart",
            DHCP_TIMEOUT.as_secs()
        )
    }
}

/// A DHCP request of `kind` from `mac`, relayed: what a BIOS PXE ROM sends (vendor class,
/// client architecture 0, a machine identifier) and `extra`.
fn request(mac: [u8; 6], xid: u32, kind: MessageType, extra: &[DhcpOption]) -> Vec<u8> {
    let mut msg = v4::Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        CLIENT_ADDR,
        &mac,
    );
    msg.set_hops(1);
    let mut uuid = vec![0u8; 17];
    uuid[11..].copy_from_slice(&mac);
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(PXE_VENDOR_CLASS.to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(
        v4::Architecture::X86_Bios,
    ));
    opts.insert(DhcpOption::ClientMachineIdentifier(uuid));
    opts.insert(DhcpOption::MaxMessageSize(1260));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::ServerIdentifier,
        OptionCode::TFTPServerName,
        OptionCode::BootfileName,
        OptionCode::ClassIdentifier,
    ]));
    for o in extra {
        opts.insert(o.clone());
    }
    msg.to_vec()
        .expect("a request built from typed options encodes")
}

/// Downloads `file` from the TFTP server at `server`, from `local` (the machine's lease),
/// asking for [`TFTP_BLKSIZE`] as a PXE ROM does. Lock-step: each block is acknowledged;
/// the last packet sent goes again after [`TFTP_TIMEOUT`] without an answer, at most
/// [`TFTP_TRIES`] times in a row. Returns the file.
async fn tftp_get(
    local: Ipv4Addr,
    server: SocketAddrV4,
    file: &str,
    resends: &mut u32,
) -> anyhow::Result<Vec<u8>> {
    const RRQ: u16 = 1;
    const DATA: u16 = 3;
    const ACK: u16 = 4;
    const ERROR: u16 = 5;
    const OACK: u16 = 6;
    let ack = |block: u16| [ACK.to_be_bytes(), block.to_be_bytes()].concat();
    let socket = UdpSocket::bind(SocketAddrV4::new(local, 0)).await?;
    let mut last: Vec<u8> = RRQ.to_be_bytes().to_vec();
    for word in [
        file,
        "octet",
        "blksize",
        &TFTP_BLKSIZE.to_string(),
        "tsize",
        "0",
    ] {
        last.extend_from_slice(word.as_bytes());
        last.push(0);
    }
    // The server answers from a port of its own (the transfer's), which the rest goes to.
    let mut peer = std::net::SocketAddr::V4(server);
    let mut fixed = false;
    let mut blksize = 512usize;
    let mut next: u16 = 1;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let mut tries = 0;
    'send: loop {
        tries += 1;
        if tries > TFTP_TRIES {
            bail!(
                "no answer from {peer} after {TFTP_TRIES} tries {} s apart (block {next})",
                TFTP_TIMEOUT.as_secs()
            );
        }
        if tries > 1 {
            *resends += 1;
        }
        socket.send_to(&last, peer).await?;
        let deadline = tokio::time::Instant::now() + TFTP_TIMEOUT;
        loop {
            let (n, from) =
                match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                    Ok(got) => got?,
                    Err(_) => continue 'send,
                };
            if fixed && from != peer {
                continue;
            }
            let packet = &buf[..n];
            ensure!(n >= 4, "a {n}-byte TFTP packet from {from}");
            let op = u16::from_be_bytes([packet[0], packet[1]]);
            let arg = u16::from_be_bytes([packet[2], packet[3]]);
            match op {
                OACK if !fixed => {
                    let words: Vec<&[u8]> = packet[2..].split(|b| *b == 0).collect();
                    for pair in words.chunks(2) {
                        if let [name, value] = pair
                            && name.eq_ignore_ascii_case(b"blksize")
                        {
                            blksize = std::str::from_utf8(value)?.parse()?;
                        }
                    }
                    (peer, fixed) = (from, true);
                    last = ack(0);
                    tries = 0;
                    continue 'send;
                }
                DATA if arg == next => {
                    (peer, fixed) = (from, true);
                    let data = &packet[4..];
                    out.extend_from_slice(data);
                    last = ack(arg);
                    next = next.wrapping_add(1);
                    if data.len() < blksize {
                        socket.send_to(&last, peer).await?;
                        return Ok(out);
                    }
                    tries = 0;
                    continue 'send;
                }
                ERROR => bail!(
                    "TFTP error {arg} from {from}: {}",
                    String::from_utf8_lossy(&packet[4..]).trim_end_matches('\0')
                ),
                // A duplicate of a block already acknowledged: the resend of our ACK after
                // a timeout covers a lost one; answering each duplicate would double the
                // traffic (the Sorcerer's Apprentice).
                _ => {}
            }
        }
    }
}

/// `GET url` from `local` on a connection of its own (HTTP/1.1, `Connection: close`, as
/// iPXE's user agent), failing unless the answer is `200` with a `Content-Length` and that
/// many bytes. The body goes to `body` when given (else it is counted and dropped). Returns
/// its length.
async fn http_get(local: Ipv4Addr, url: &str, body: Option<&mut Vec<u8>>) -> anyhow::Result<u64> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: not an http:// URL"))?;
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let server: SocketAddrV4 = host
        .parse()
        .with_context(|| format!("{url}: the host is not IPv4:PORT"))?;
    let path = if path.is_empty() { "/" } else { path };
    tokio::time::timeout(HTTP_TIMEOUT, async {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddrV4::new(local, 0).into())?;
        let mut stream = socket.connect(server.into()).await?;
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: iPXE/1.21.1 (metalgraph bench)\r\n\
                     Connection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
        let mut reader = BufReader::with_capacity(64 << 10, stream);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let status = line.split_whitespace().nth(1).unwrap_or_default().to_owned();
        let mut length: Option<u64> = None;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                bail!("the connection closed inside the headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse()?);
            }
        }
        ensure!(status == "200", "status {status}");
        let length = length.context("no Content-Length")?;
        let mut limited = (&mut reader).take(length);
        let got = match body {
            Some(body) => limited.read_to_end(body).await? as u64,
            None => tokio::io::copy_buf(&mut limited, &mut tokio::io::sink()).await?,
        };
        ensure!(
            got == length,
            "the connection closed after {got} of {length} bytes"
        );
        Ok(got)
    })
    .await
    .with_context(|| format!("no complete answer within {HTTP_TIMEOUT:?}"))?
}

/// The boot file both stacks serve: Debian's `undionly.kpxe` when the `ipxe` package is
/// installed, else a stand-in of its size. Returns whether it is the real one.
fn place_boot_file(root: &Path) -> anyhow::Result<bool> {
    let dest = root.join(BOOT_FILE);
    if Path::new(IPXE_BOOT_FILE).is_file() {
        std::fs::copy(IPXE_BOOT_FILE, &dest)?;
        return Ok(true);
    }
    crate::boot::write_pattern(&dest, STAND_IN_BOOT_FILE_BYTES)?;
    Ok(false)
}

/// The version in a program's version line (`Dnsmasq version 2.90  Copyright ...`,
/// `nginx version: nginx/1.22.1`, `tftp-hpa 5.2, with remap`): the first word that starts
/// with a digit, else the whole line.
fn version_number(line: &str) -> String {
    line.split(|c: char| c.is_whitespace() || c == '/')
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(|w| w.trim_end_matches(',').to_owned())
        .unwrap_or_else(|| line.to_owned())
}

/// Runs the scenario: the files, the namespaces, then each round a power-on against each
/// stack (the order alternating, so that neither always runs on a warmer machine).
pub fn rack(
    dir: &Path,
    log: &Path,
    sizes: &RackSizes,
    limit: Duration,
) -> anyhow::Result<RackResult> {
    if let Some(why) = unavailable() {
        bail!("{why}");
    }
    ensure!(
        (1..=MAX_MACHINES).contains(&sizes.machines),
        "a rack has 1 to {MAX_MACHINES} machines, not {}",
        sizes.machines
    );
    let root = dir.join("root");
    let templates = dir.join("templates");
    std::fs::create_dir_all(&root)?;
    std::fs::create_dir_all(&templates)?;
    let boot_file_real = place_boot_file(&root)?;
    crate::boot::write_pattern(&root.join(KERNEL), sizes.kernel_bytes)?;
    crate::boot::write_pattern(&root.join(INITRD), sizes.initrd_bytes)?;
    std::fs::write(
        templates.join(PROFILE_TEMPLATE),
        profile("{{ api.files }}", " metalgraph.node={{ node.id }}"),
    )?;
    std::fs::write(
        root.join(PROFILE_FILE),
        profile(&format!("http://{SERVER_ADDR}:{NGINX_PORT}/files"), ""),
    )?;
    let boot_file = std::fs::read(root.join(BOOT_FILE))?;
    let boot_file_bytes = boot_file.len() as u64;

    let mut versions = Vec::new();
    let mut missing = Vec::new();
    for (name, program, args) in [
        ("dnsmasq", "dnsmasq", &["-v"][..]),
        ("tftpd-hpa", "in.tftpd", &["-V"][..]),
        ("nginx", "nginx", &["-v"][..]),
    ] {
        match version_line(program, args) {
            Some(v) => versions.push((name.to_owned(), version_number(&v))),
            None => missing.push(program),
        }
    }
    let mut stacks = vec![(
        Stack::Metalgraph {
            tftp_transfers: None,
        },
        Ok(Vec::new()),
    )];
    if let Some(n) = sizes.tftp_transfers {
        stacks.push((
            Stack::Metalgraph {
                tftp_transfers: Some(n),
            },
            Ok(Vec::new()),
        ));
    }
    stacks.push((
        Stack::Peer,
        if missing.is_empty() {
            Ok(Vec::new())
        } else {
            eprintln!(
                "bench: {} not installed; metalgraph runs alone",
                missing.join(", ")
            );
            Err(format!(
                "not installed: {} (scripts/install-peers.sh installs them)",
                missing.join(", ")
            ))
        },
    ));

    let net = Netns::create()?;
    netns::run(
        "ip",
        &[
            "-n",
            &net.client,
            "route",
            "add",
            "local",
            POOL_ROUTE,
            "dev",
            "lo",
        ],
    )?;
    let bench = Bench {
        net,
        dir,
        log,
        sizes,
        limit,
        root,
        templates,
        reference: Arc::new(Reference {
            boot_file,
            kernel: sizes.kernel_bytes,
            initrd: sizes.initrd_bytes,
        }),
    };
    let mut n = 0;
    for round in 0..sizes.rounds {
        let mut order: Vec<usize> = (0..stacks.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (stack, outcome) = &mut stacks[i];
            let Ok(rounds) = outcome else { continue };
            n += 1;
            eprintln!(
                "bench:   {} machines power on against {}",
                sizes.machines,
                stack.name()
            );
            match bench.round(*stack, n) {
                Ok(r) => {
                    eprintln!(
                        "bench:     last machine done after {:.2} s; {} errors",
                        r.wall_s,
                        r.machines.iter().filter(|m| m.error.is_some()).count()
                    );
                    rounds.push(r);
                }
                // metalgraph failing is the scenario failing; the peer failing is noted.
                Err(e) if *stack != Stack::Peer => {
                    return Err(e.context(stack.name()));
                }
                Err(e) => *outcome = Err(format!("{e:#}")),
            }
        }
    }
    drop(bench);
    Ok(RackResult {
        sizes: sizes.clone(),
        boot_file_bytes,
        boot_file_real,
        stacks: stacks
            .into_iter()
            .map(|(s, rounds)| StackResult {
                name: s.name(),
                peer: s == Stack::Peer,
                rounds,
            })
            .collect(),
        versions,
    })
}
