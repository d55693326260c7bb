//! DHCP throughput: `perfdhcp` against metalgraph's full DHCP mode (`serve --dhcp full`)
//! and against Kea (`kea-dhcp4`, memfile leases with persistence) in the same run, with the
//! same pool and lease time, across a veth pair between two network namespaces this
//! scenario creates: perfdhcp in one, the server in the other. For each server it searches
//! the highest offered rate of DORA exchanges (DISCOVER, OFFER, REQUEST, ACK) per second
//! that loses at most 1 % of them.
//!
//! Root only (network namespaces). Each step of the search starts its server afresh on an
//! empty lease store, so every step measures the same thing: new clients getting new,
//! durable leases. Every process runs in a process group of its own, killed when it is
//! dropped; the namespaces (and with them the veth pair) are removed when the scenario
//! ends, whatever happened.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;

use crate::boot::{Daemon, is_root, version_line};
use crate::netns::{NETMASK, Netns, SERVER_ADDR, SUBNET, Transport, wait_for_port};
use crate::server::{Server, backend_name};

/// The port of metalgraph's node-facing listener, on [`SERVER_ADDR`].
pub const NODE_PORT: u16 = 8090;
/// The pool's first address; it holds [`DhcpSizes::pool`] addresses from there.
const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 0);
/// The lease time both servers give (metalgraph's default).
pub const LEASE_SECS: u32 = 3600;
/// The vendor class perfdhcp sends (option 60): metalgraph answers network-boot clients
/// only, so every simulated client is a BIOS PXE ROM. Kea gets the same packets.
const PXE_VENDOR_CLASS: &str = "PXEClient:Arch:00000:UNDI:002001";
/// The boot file both servers hand out (metalgraph's for a BIOS PXE ROM; Kea is told to send
/// the same, so that the replies are alike).
const BOOT_FILE: &str = "undionly.kpxe";

/// How big the search is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DhcpSizes {
    /// The first offered rate (DORA/s); it doubles after every passing step until one fails,
    /// then the search bisects between the last pass and the first failure.
    pub start_rate: u32,
    /// The highest rate tried; a server that passes it is reported as "at least" that.
    pub max_rate: u32,
    /// Bisection stops once the failing rate is within this fraction of the passing one.
    pub precision: f64,
    /// Seconds of traffic per step (perfdhcp `-p`).
    pub seconds: u32,
    /// Distinct simulated clients (perfdhcp `-R`); fewer than the pool, so no step runs out
    /// of addresses.
    pub clients: u32,
    /// Addresses in the pool, from 10.77.1.0 up.
    pub pool: u32,
    /// Searches per server, alternating which server runs first; the figure is the median.
    /// A failing step is run once more at once, and fails only if that run fails too: on
    /// a machine shared with other work, a stall of a few hundred milliseconds loses more
    /// than 1 % of a step, and one such stall would otherwise end a search early.
    pub rounds: usize,
    /// A step passes when at most this fraction of the DISCOVERs sent did not end in an ACK.
    pub max_loss: f64,
}

impl DhcpSizes {
    /// What the issue asks for: the largest pool of a /16 (64,000 addresses), 60,000
    /// clients, five-second steps.
    pub fn full() -> DhcpSizes {
        DhcpSizes {
            start_rate: 1000,
            max_rate: 64_000,
            precision: 0.08,
            seconds: 5,
            clients: 60_000,
            pool: 64_000,
            rounds: 3,
            max_loss: 0.01,
        }
    }

    pub fn quick() -> DhcpSizes {
        DhcpSizes {
            seconds: 3,
            rounds: 1,
            ..DhcpSizes::full()
        }
    }

    /// One step per server at a low rate: the code path, not a figure.
    pub fn smoke() -> DhcpSizes {
        DhcpSizes {
            start_rate: 50,
            max_rate: 50,
            precision: 0.5,
            seconds: 1,
            clients: 200,
            pool: 256,
            rounds: 1,
            max_loss: 0.01,
        }
    }

    fn pool_last(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(POOL_FIRST) + self.pool.max(1) - 1)
    }
}

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `metalgraph serve --dhcp full` on this store backend.
    Metalgraph(Backend),
    /// `kea-dhcp4` with the memfile lease backend.
    Kea,
}

impl Target {
    pub fn name(self) -> String {
        match self {
            Target::Metalgraph(b) => format!("metalgraph ({})", backend_name(b)),
            Target::Kea => "Kea (memfile)".to_owned(),
        }
    }
}

/// What perfdhcp reported for one step.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PerfdhcpStats {
    pub discovers: u64,
    pub offers: u64,
    pub requests: u64,
    pub acks: u64,
    /// NAKs and other answers without a usable lease ("rejected leases").
    pub rejected: u64,
    /// Average DISCOVER → OFFER and REQUEST → ACK delays, milliseconds.
    pub offer_delay_ms: f64,
    pub ack_delay_ms: f64,
}

/// One step: `rate` DORA/s offered for `seconds`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Step {
    pub rate: u32,
    pub seconds: u32,
    pub stats: PerfdhcpStats,
    /// CPU time (user and system, every thread) the server used while perfdhcp ran.
    pub server_cpu_s: f64,
    /// metalgraph: the leases in its store once it stopped, read back by the harness.
    pub stored_leases: Option<u64>,
    /// Whether at most `max_loss` of the DISCOVERs ended without an ACK, and perfdhcp kept
    /// up with the rate (it sent at least 97 % of the DISCOVERs asked for).
    pub passed: bool,
}

impl Step {
    /// ACKs received per second of the step.
    pub fn dora_per_sec(&self) -> f64 {
        self.stats.acks as f64 / f64::from(self.seconds.max(1))
    }

    /// The fraction of DISCOVERs sent that did not end in an ACK.
    pub fn loss(&self) -> f64 {
        if self.stats.discovers == 0 {
            return 1.0;
        }
        1.0 - self.stats.acks as f64 / self.stats.discovers as f64
    }

    /// The server's CPU time per ACK.
    pub fn cpu_per_ack(&self) -> Option<Duration> {
        (self.stats.acks > 0)
            .then(|| Duration::from_secs_f64(self.server_cpu_s / self.stats.acks as f64))
    }

    /// The DISCOVERs and REQUESTs that got no answer.
    pub fn drops(&self) -> u64 {
        self.stats.discovers.saturating_sub(self.stats.offers)
            + self.stats.requests.saturating_sub(self.stats.acks)
    }
}

/// One search for one server.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Search {
    pub steps: Vec<Step>,
}

impl Search {
    /// The highest passing step.
    pub fn best(&self) -> Option<&Step> {
        self.steps
            .iter()
            .filter(|s| s.passed)
            .max_by_key(|s| s.rate)
    }

    /// The lowest failing step above the highest passing one (a rate whose first run
    /// failed and whose second passed counts as passing).
    pub fn first_failure(&self) -> Option<&Step> {
        let passed = self.best().map(|s| s.rate);
        self.steps
            .iter()
            .filter(|s| !s.passed && passed.is_none_or(|p| s.rate > p))
            .min_by_key(|s| s.rate)
    }

    /// The highest rate that passed (0 if none did).
    pub fn sustained(&self) -> u32 {
        self.best().map_or(0, |s| s.rate)
    }

    /// The next rate to try, or `None` when the search is over.
    fn next_rate(&self, sizes: &DhcpSizes) -> Option<u32> {
        let lo = self.best().map(|s| s.rate);
        let hi = self.first_failure().map(|s| s.rate);
        match (lo, hi) {
            (None, None) => Some(sizes.start_rate.min(sizes.max_rate)),
            // Nothing passed: halve down to a floor of 1/16 of the start.
            (None, Some(hi)) => {
                let next = hi / 2;
                (next >= (sizes.start_rate / 16).max(1)).then_some(next)
            }
            (Some(lo), None) => {
                (lo < sizes.max_rate).then(|| lo.saturating_mul(2).min(sizes.max_rate))
            }
            (Some(lo), Some(hi)) => {
                let gap = f64::from(hi - lo) / f64::from(hi);
                let next = lo + (hi - lo) / 2;
                (gap > sizes.precision && next > lo && next < hi).then_some(next)
            }
        }
    }
}

/// One server's searches, one per round.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetResult {
    pub name: String,
    pub kea: bool,
    /// The searches, or why this server did not run.
    pub searches: Result<Vec<Search>, String>,
}

impl TargetResult {
    /// The median over the rounds of the highest passing rate.
    pub fn sustained(&self) -> Option<f64> {
        let searches = self.searches.as_ref().ok()?;
        let mut rates: Vec<u32> = searches.iter().map(Search::sustained).collect();
        rates.sort_unstable();
        Some(match rates.len() {
            0 => return None,
            n if n % 2 == 1 => f64::from(rates[n / 2]),
            n => (f64::from(rates[n / 2 - 1]) + f64::from(rates[n / 2])) / 2.0,
        })
    }

    /// The search whose passing rate is the median (for its details in the report).
    pub fn median_search(&self) -> Option<&Search> {
        let searches = self.searches.as_ref().ok()?;
        let mut sorted: Vec<&Search> = searches.iter().collect();
        sorted.sort_by_key(|s| s.sustained());
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }
}

/// What the scenario measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DhcpResult {
    pub sizes: DhcpSizes,
    pub lease_secs: u32,
    pub targets: Vec<TargetResult>,
    /// perfdhcp's and Kea's versions.
    pub versions: Vec<(String, String)>,
}

impl DhcpResult {
    /// metalgraph's sustained rate over Kea's, per metalgraph target (above 1: faster).
    pub fn ratio(&self, target: &TargetResult) -> Option<f64> {
        let kea = self.targets.iter().find(|t| t.kea)?.sustained()?;
        let ours = target.sustained()?;
        (kea > 0.0).then(|| ours / kea)
    }
}

/// Whether this machine can run the scenario: root (namespaces), `ip` and perfdhcp; the
/// reason if not.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root, for network namespaces".into());
    }
    if version_line("ip", &["-V"]).is_none() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    if version_line("perfdhcp", &["-v"]).is_none() {
        return Some(
            "perfdhcp is not installed (Debian: kea-admin; scripts/bench.sh installs it)".into(),
        );
    }
    None
}

/// A running server for one step; dropping it stops it.
enum Running {
    Metalgraph(Server),
    Kea(Daemon),
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Metalgraph(s) => s.pid(),
            Running::Kea(d) => d.pid(),
        }
    }

    /// The CPU time the server has used so far (all its threads), from `/proc/PID/stat`.
    fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // Fields after the command name, which is in parentheses and may hold spaces:
        // utime and stime are the 14th and 15th fields of the whole line.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        f.iter().sum::<f64>() / clock_ticks()
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Running::Metalgraph(s) => s.terminate(Duration::from_secs(10)),
            Running::Kea(d) => {
                drop(d);
                Ok(())
            }
        }
    }
}

/// The scenario's fixed surroundings.
struct Bench<'a> {
    net: Netns,
    dir: &'a Path,
    log: &'a Path,
    sizes: &'a DhcpSizes,
    limit: Duration,
    /// An empty directory for metalgraph's TFTP root (DHCP needs one; nothing fetches it).
    tftp_root: PathBuf,
}

impl Bench<'_> {
    fn start(&self, target: Target, step: usize) -> anyhow::Result<Running> {
        let data = self.dir.join(format!("step-{step}"));
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        match target {
            Target::Metalgraph(backend) => {
                let pool = format!("{POOL_FIRST}-{}", self.sizes.pool_last());
                let server = start_full_dhcp(
                    &self.net,
                    backend,
                    &data,
                    self.log,
                    &pool,
                    &self.tftp_root,
                    &[],
                    self.limit,
                )?;
                Ok(Running::Metalgraph(server))
            }
            Target::Kea => {
                let conf = data.join("kea-dhcp4.json");
                std::fs::write(&conf, self.kea_config(&data).to_string())?;
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &self.net.server, "kea-dhcp4", "-c"])
                    .arg(&conf)
                    .env("KEA_PIDFILE_DIR", &data)
                    .env("KEA_LOCKFILE_DIR", &data);
                let d = start_dhcp_daemon("kea-dhcp4", cmd, &data.join("kea-dhcp4.out"))?;
                Ok(Running::Kea(d))
            }
        }
    }

    /// Kea's configuration: the same pool, lease time and boot file as metalgraph, UDP
    /// sockets (the traffic is relayed), and leases in a memfile CSV that Kea appends each
    /// lease to as it grants it (`persist`), without the lease file cleanup during the run
    /// (`lfc-interval` 0). Logging at INFO to a file, like metalgraph's.
    fn kea_config(&self, data: &Path) -> serde_json::Value {
        let path = |name: &str| data.join(name).display().to_string();
        serde_json::json!({ "Dhcp4": {
            "interfaces-config": {
                "interfaces": [self.net.server_if],
                "dhcp-socket-type": "udp",
            },
            "lease-database": {
                "type": "memfile",
                "persist": true,
                "name": path("kea-leases4.csv"),
                "lfc-interval": 0,
            },
            "valid-lifetime": LEASE_SECS,
            "authoritative": true,
            "next-server": SERVER_ADDR.to_string(),
            "boot-file-name": BOOT_FILE,
            "subnet4": [{
                "id": 1,
                "subnet": SUBNET,
                "pools": [{ "pool": format!("{POOL_FIRST} - {}", self.sizes.pool_last()) }],
                "option-data": [{ "name": "subnet-mask", "data": NETMASK }],
            }],
            "loggers": [{
                "name": "kea-dhcp4",
                "output_options": [{ "output": path("kea-dhcp4.log") }],
                "severity": "INFO",
            }],
        }})
    }

    /// One step: a fresh server, perfdhcp at `rate` for the step's seconds, the server
    /// stopped.
    fn step(&self, target: Target, rate: u32, n: usize) -> anyhow::Result<Step> {
        let server = self.start(target, n)?;
        let cpu_before = server.cpu_seconds();
        let stats = self.perfdhcp(rate);
        let server_cpu_s = server.cpu_seconds() - cpu_before;
        let stopped = server.stop();
        let stats = stats?;
        stopped?;
        let data = self.dir.join(format!("step-{n}"));
        let stored_leases = match target {
            Target::Metalgraph(backend) => {
                let store = crate::util::open_store(backend, &data)
                    .context("opening the stopped server's store")?;
                let leases = store.scan_prefix(metalgraph::boot::LEASES, b"")?.len() as u64;
                // Every ACK follows its lease's commit. perfdhcp's clients are new until it
                // has used all of them, so until then each ACK is a lease of its own.
                if stats.discovers <= u64::from(self.sizes.clients) && leases < stats.acks {
                    bail!(
                        "{} ACKs were received but the store holds {leases} leases",
                        stats.acks
                    );
                }
                Some(leases)
            }
            Target::Kea => None,
        };
        let _ = std::fs::remove_dir_all(&data);
        let expected = u64::from(rate) * u64::from(self.sizes.seconds);
        let mut step = Step {
            rate,
            seconds: self.sizes.seconds,
            stats,
            server_cpu_s,
            stored_leases,
            passed: false,
        };
        step.passed = step.loss() <= self.sizes.max_loss
            && step.stats.discovers as f64 >= 0.97 * expected as f64;
        Ok(step)
    }

    /// Runs perfdhcp in the client namespace and reads its statistics. It waits half a
    /// second after the period for replies still on their way (`-W`).
    fn perfdhcp(&self, rate: u32) -> anyhow::Result<PerfdhcpStats> {
        let vendor: String = PXE_VENDOR_CLASS
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.net.client, "perfdhcp", "-4"])
            .args(["-l", &self.net.client_if])
            .args(["-r", &rate.to_string()])
            .args(["-R", &self.sizes.clients.to_string()])
            .args(["-p", &self.sizes.seconds.to_string()])
            .args(["-W", "500000"])
            .args(["-o", &format!("60,{vendor}")])
            .arg(SERVER_ADDR.to_string())
            .stdin(Stdio::null())
            .output()
            .context("cannot run perfdhcp")?;
        let text = String::from_utf8_lossy(&out.stdout);
        // Exit status 3 means "some exchanges were dropped", which the figures show.
        if !matches!(out.status.code(), Some(0 | 3)) {
            bail!(
                "perfdhcp failed ({}): {}{}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_perfdhcp(&text).with_context(|| format!("cannot read perfdhcp's output:\n{text}"))
    }
}

/// `metalgraph serve --dhcp full` in `net`'s server namespace on `backend`: DHCP on the
/// server's veth leasing `pool` (FIRST-LAST) in the 10.77.0.0/16 subnet, the boot address
/// and the node-facing listener (port 8090) on [`SERVER_ADDR`], TFTP serving `tftp_root`,
/// and `extra` arguments. Returns once DHCP has bound port 67.
#[allow(clippy::too_many_arguments)]
pub fn start_full_dhcp(
    net: &Netns,
    backend: Backend,
    data: &Path,
    log: &Path,
    pool: &str,
    tftp_root: &Path,
    extra: &[OsString],
    limit: Duration,
) -> anyhow::Result<Server> {
    let args: Vec<OsString> = [
        "--node-listen",
        &format!("{SERVER_ADDR}:{NODE_PORT}"),
        "--dhcp",
        "full",
        "--dhcp-interface",
        &net.server_if,
        "--dhcp-pool",
        pool,
        "--dhcp-netmask",
        NETMASK,
        "--boot-address",
        &SERVER_ADDR.to_string(),
        "--tftp-root",
    ]
    .into_iter()
    .map(OsString::from)
    .chain([tftp_root.as_os_str().to_owned()])
    .chain(extra.iter().cloned())
    .collect();
    let (server, _) = Server::start_in(Some(&net.server), backend, data, log, &[], &args, limit)?;
    server.listener("dhcp", limit)?;
    wait_for_port(
        server.pid(),
        Transport::Udp,
        67,
        "metalgraph",
        Duration::from_secs(10),
    )?;
    Ok(server)
}

/// Starts a peer DHCP server (`cmd`, which runs it in the foreground in the server
/// namespace, writing to `out`) and waits until it has bound port 67; on failure the error
/// holds what it wrote.
pub fn start_dhcp_daemon(name: &'static str, cmd: Command, out: &Path) -> anyhow::Result<Daemon> {
    let mut d = Daemon::spawn(name, cmd, out)?;
    wait_for_port(d.pid(), Transport::Udp, 67, name, Duration::from_secs(10)).with_context(
        || {
            let _ = d.check_running();
            std::fs::read_to_string(out).unwrap_or_default()
        },
    )?;
    Ok(d)
}

/// Clock ticks per second, the unit of `/proc/PID/stat`'s CPU times (`getconf CLK_TCK`;
/// 100 on Linux unless told otherwise).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        version_line("getconf", &["CLK_TCK"])
            .and_then(|v| v.parse().ok())
            .unwrap_or(100.0)
    })
}

/// Reads the two exchange sections of perfdhcp's final report.
pub fn parse_perfdhcp(text: &str) -> Option<PerfdhcpStats> {
    let section = |title: &str| -> Option<(u64, u64, u64, f64)> {
        let heading = format!("***Statistics for: {title}***");
        let body = &text[text.find(&heading)? + heading.len()..];
        let body = body.find("***").map_or(body, |end| &body[..end]);
        let field = |name: &str| {
            body.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim().trim_end_matches("ms").trim().to_owned())
        };
        Some((
            field("sent packets:")?.parse().ok()?,
            field("received packets:")?.parse().ok()?,
            field("rejected leases:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            field("avg delay:")
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN),
        ))
    };
    let (discovers, offers, rejected_do, offer_delay_ms) = section("DISCOVER-OFFER")?;
    let (requests, acks, rejected_ra, ack_delay_ms) =
        section("REQUEST-ACK").unwrap_or((0, 0, 0, f64::NAN));
    Some(PerfdhcpStats {
        discovers,
        offers,
        requests,
        acks,
        rejected: rejected_do + rejected_ra,
        offer_delay_ms,
        ack_delay_ms,
    })
}

/// Runs the scenario: the namespaces, then for each round a search per server, in lockstep
/// (each server's next step in turn, the order alternating), so that load on the machine
/// falls on every server alike.
pub fn dhcp(
    dir: &Path,
    log: &Path,
    backends: &[Backend],
    sizes: &DhcpSizes,
    limit: Duration,
) -> anyhow::Result<DhcpResult> {
    if let Some(why) = unavailable() {
        bail!("{why}");
    }
    std::fs::create_dir_all(dir)?;
    let tftp_root = dir.join("tftp-root");
    std::fs::create_dir_all(&tftp_root)?;
    let mut versions = Vec::new();
    if let Some(v) = version_line("perfdhcp", &["-v"]) {
        // perfdhcp prints `VERSION: 2.2.0`.
        let v = v.trim_start_matches("VERSION:").trim().to_owned();
        versions.push(("perfdhcp".to_owned(), v));
    }
    let mut targets: Vec<Target> = backends.iter().map(|b| Target::Metalgraph(*b)).collect();
    let kea = version_line("kea-dhcp4", &["-V"]);
    match &kea {
        Some(v) => {
            versions.push(("kea-dhcp4".to_owned(), v.clone()));
            targets.push(Target::Kea);
        }
        None => eprintln!("bench: kea-dhcp4 is not installed; metalgraph runs alone"),
    }
    let bench = Bench {
        net: Netns::create()?,
        dir,
        log,
        sizes,
        limit,
        tftp_root,
    };
    let mut results: Vec<(Target, Result<Vec<Search>, String>)> =
        targets.iter().map(|t| (*t, Ok(Vec::new()))).collect();
    let mut n = 0;
    for round in 0..sizes.rounds {
        let mut searches: Vec<Search> = vec![Search::default(); results.len()];
        let mut order: Vec<usize> = (0..results.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        loop {
            let mut any = false;
            for &i in &order {
                let (target, outcome) = &mut results[i];
                if outcome.is_err() {
                    continue;
                }
                let Some(rate) = searches[i].next_rate(sizes) else {
                    continue;
                };
                any = true;
                for attempt in 0..2 {
                    n += 1;
                    eprintln!("bench:   {} at {rate} DORA/s", target.name());
                    match bench.step(*target, rate, n) {
                        Ok(step) => {
                            let passed = step.passed;
                            eprintln!(
                                "bench:     {} ACKs/s, {:.2} % lost{}",
                                step.dora_per_sec().round(),
                                step.loss() * 100.0,
                                match (passed, attempt) {
                                    (true, _) => "",
                                    (false, 0) => " (fails; once more)",
                                    (false, _) => " (fails)",
                                }
                            );
                            searches[i].steps.push(step);
                            if passed {
                                break;
                            }
                        }
                        // metalgraph failing is the scenario failing; Kea failing is noted.
                        Err(e) if matches!(target, Target::Metalgraph(_)) => {
                            return Err(e.context(target.name()));
                        }
                        Err(e) => {
                            *outcome = Err(format!("{e:#}"));
                            break;
                        }
                    }
                }
            }
            if !any {
                break;
            }
        }
        for (i, search) in searches.into_iter().enumerate() {
            if let Ok(all) = &mut results[i].1 {
                all.push(search);
            }
        }
    }
    drop(bench);
    Ok(DhcpResult {
        sizes: sizes.clone(),
        lease_secs: LEASE_SECS,
        targets: results
            .into_iter()
            .map(|(t, searches)| TargetResult {
                name: t.name(),
                kea: t == Target::Kea,
                searches,
            })
            .collect(),
        versions,
    })
}
