//! The whole benchmark: which scenarios run at which sizes on which backends, in what
//! order, and the report they add up to. `main.rs` runs it at full size; the CI smoke test
//! (`tests/bench_smoke.rs`) runs the same code at tiny sizes so that it cannot rot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use metalgraph_store::Backend;

use crate::api::{self, ApiResult, Load};
use crate::boot::{self, BootResult, BootSizes};
use crate::dhcp::{self, DhcpResult, DhcpSizes};
use crate::fsync::{self, FsyncFloor};
use crate::history::{self, HistoryResult};
use crate::inproc::{self, ChainResult, FanOutResult};
use crate::machine::Machine;
use crate::peer::{self, PeerResult};
use crate::rack::{self, RackResult, RackSizes};
use crate::recovery::{self, RecoveryResult};
use crate::replicas::{self, ReplicaChainResult, ReplicaFanOutResult};
use crate::server::backend_name;

/// How big each scenario is.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sizes {
    pub fsync_samples: usize,
    pub chain: usize,
    pub fanout_workflows: usize,
    /// The fan-out graph is `first`, `width` parallel tasks, `last`.
    pub fanout_width: usize,
    pub recovery: usize,
    pub api: Load,
    pub peer_chain: usize,
    pub peer_fanout_flows: usize,
    /// The history scenario's large store: finished workflows and nodes.
    pub history_workflows: usize,
    pub history_nodes: usize,
    /// The boot-file scenario's loads.
    pub boot: BootSizes,
    /// The DHCP scenario's search.
    pub dhcp: DhcpSizes,
    /// The rack power-on scenario's machines and files.
    pub rack: RackSizes,
    /// The longest any one scenario may take before it counts as failed.
    #[serde(with = "crate::util::secs")]
    pub limit: Duration,
}

impl Sizes {
    /// The published figures: what the issue asks for.
    pub fn full() -> Sizes {
        Sizes {
            fsync_samples: 500,
            chain: 1000,
            fanout_workflows: 10_000,
            fanout_width: 8,
            recovery: 10_000,
            api: Load {
                threads: 2,
                connections: 16,
                seconds: 5,
            },
            // TaskFlow on SQLite takes about 0.1 s per task here, so its chain keeps the
            // same shape and its fan-out runs 100 flows (1,000 tasks); figures are per task.
            peer_chain: 1000,
            peer_fanout_flows: 100,
            history_workflows: 1_000_000,
            history_nodes: 100_000,
            boot: BootSizes::full(),
            dhcp: DhcpSizes::full(),
            rack: RackSizes::full(),
            limit: Duration::from_secs(1800),
        }
    }

    /// A run of a few minutes, for trying changes.
    pub fn quick() -> Sizes {
        Sizes {
            fsync_samples: 200,
            chain: 200,
            fanout_workflows: 1000,
            recovery: 1000,
            api: Load {
                threads: 2,
                connections: 16,
                seconds: 2,
            },
            peer_chain: 100,
            peer_fanout_flows: 20,
            history_workflows: 100_000,
            history_nodes: 10_000,
            boot: BootSizes::quick(),
            dhcp: DhcpSizes::quick(),
            rack: RackSizes::quick(),
            ..Sizes::full()
        }
    }

    /// The CI smoke test: every code path, tiny sizes.
    pub fn smoke() -> Sizes {
        Sizes {
            fsync_samples: 20,
            chain: 20,
            fanout_workflows: 50,
            fanout_width: 1,
            recovery: 50,
            api: Load {
                threads: 1,
                connections: 4,
                seconds: 1,
            },
            peer_chain: 10,
            peer_fanout_flows: 2,
            history_workflows: 2000,
            history_nodes: 200,
            boot: BootSizes::smoke(),
            dhcp: DhcpSizes::smoke(),
            rack: RackSizes::smoke(),
            limit: Duration::from_secs(300),
        }
    }
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Chain,
    FanOut,
    Recovery,
    Api,
    Peer,
    History,
    /// TFTP and `/files/` beside tftpd-hpa and nginx; not per backend.
    BootFiles,
    /// Full DHCP under perfdhcp beside Kea; once, with metalgraph on every backend.
    Dhcp,
    /// A rack of machines booting at once, against metalgraph and against dnsmasq,
    /// tftpd-hpa and nginx; once, on sled.
    Rack,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::Chain,
        Scenario::FanOut,
        Scenario::Recovery,
        Scenario::Api,
        Scenario::Peer,
        Scenario::History,
        Scenario::BootFiles,
        Scenario::Dhcp,
        Scenario::Rack,
    ];

    /// Whether the scenario runs once per store backend.
    pub fn per_backend(self) -> bool {
        !matches!(
            self,
            Scenario::Peer | Scenario::BootFiles | Scenario::Dhcp | Scenario::Rack
        )
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "chain" => Scenario::Chain,
            "fanout" | "fan-out" => Scenario::FanOut,
            "recovery" => Scenario::Recovery,
            "api" => Scenario::Api,
            "peer" | "taskflow" => Scenario::Peer,
            "history" => Scenario::History,
            "boot-files" | "boot" => Scenario::BootFiles,
            "dhcp" => Scenario::Dhcp,
            "rack" => Scenario::Rack,
            _ => return None,
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub sizes: Sizes,
    pub backends: Vec<Backend>,
    pub scenarios: Vec<Scenario>,
    /// Where the data directories go; their file system is what `fsync` measures.
    pub dir: PathBuf,
    /// The harness executable, to run the in-process scenarios (chain, fan-out) each in a
    /// process of its own, so that one scenario's heap and threads never show in the next
    /// one's figures (peak memory above all). `None` runs them in this process.
    pub isolate: Option<PathBuf>,
    /// With PostgreSQL among the backends: the numbers of replicas to run chain and
    /// fan-out on besides the one process (`--replicas 1,2,3`); empty for none.
    pub replicas: Vec<usize>,
}

/// A scenario's outcome.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "outcome", content = "result", rename_all = "lowercase")]
pub enum Outcome<T> {
    Done(T),
    Skipped(String),
    Failed(String),
}

impl<T> Outcome<T> {
    pub fn done(&self) -> Option<&T> {
        match self {
            Outcome::Done(t) => Some(t),
            _ => None,
        }
    }

    fn from(r: anyhow::Result<T>) -> Outcome<T> {
        match r {
            Ok(t) => Outcome::Done(t),
            Err(e) => Outcome::Failed(format!("{e:#}")),
        }
    }
}

/// One backend's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendReport {
    pub backend: &'static str,
    pub fsync: Outcome<FsyncFloor>,
    pub chain: Outcome<ChainResult>,
    pub fanout: Outcome<FanOutResult>,
    pub recovery: Outcome<RecoveryResult>,
    pub api: Outcome<ApiResult>,
    pub history: Outcome<HistoryResult>,
}

/// Chain and fan-out on PostgreSQL with some number of replicas in one process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaReport {
    pub replicas: usize,
    pub chain: Outcome<ReplicaChainResult>,
    pub fanout: Outcome<ReplicaFanOutResult>,
}

/// Everything one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub machine: Machine,
    pub sizes: Sizes,
    pub backends: Vec<BackendReport>,
    /// PostgreSQL with 1, 2, 3, ... replicas (`--replicas`), in that order.
    pub replicas: Vec<ReplicaReport>,
    pub peer: Outcome<PeerResult>,
    pub boot: Outcome<BootResult>,
    pub dhcp: Outcome<DhcpResult>,
    pub rack: Outcome<RackResult>,
    #[serde(with = "crate::util::secs")]
    pub total: Duration,
}

impl Report {
    /// Why this run must not be trusted: failed scenarios and lost workflows.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut failed = |what: String, e: Option<&String>| {
            if let Some(e) = e {
                out.push(format!("{what} failed: {e}"));
            }
        };
        for b in &self.backends {
            let name = b.backend;
            failed(format!("{name} fsync"), failed_of(&b.fsync));
            failed(format!("{name} chain"), failed_of(&b.chain));
            failed(format!("{name} fan-out"), failed_of(&b.fanout));
            failed(format!("{name} recovery"), failed_of(&b.recovery));
            failed(format!("{name} API"), failed_of(&b.api));
            failed(format!("{name} history"), failed_of(&b.history));
        }
        for r in &self.replicas {
            let n = r.replicas;
            failed(
                format!("postgres chain on {n} replicas"),
                failed_of(&r.chain),
            );
            failed(
                format!("postgres fan-out on {n} replicas"),
                failed_of(&r.fanout),
            );
        }
        failed("TaskFlow peer".into(), failed_of(&self.peer));
        failed("boot files".into(), failed_of(&self.boot));
        failed("DHCP".into(), failed_of(&self.dhcp));
        failed("rack power-on".into(), failed_of(&self.rack));
        if let Some(r) = self.rack.done() {
            for s in &r.stacks {
                if let Some(first) = s.first_error() {
                    out.push(format!(
                        "rack power-on, {}: {} machine boots failed; the first: {first}",
                        s.name,
                        s.errors()
                    ));
                }
            }
        }
        for b in &self.backends {
            if let Some(f) = b.fanout.done()
                && (f.lost > 0 || f.succeeded != f.workflows)
            {
                out.push(format!(
                    "{} fan-out: {} of {} workflows succeeded, {} lost",
                    b.backend, f.succeeded, f.workflows, f.lost
                ));
            }
            if let Some(r) = b.recovery.done()
                && (r.lost > 0 || r.recovered != r.workflows)
            {
                out.push(format!(
                    "{} recovery: {} of {} workflows running again, {} lost",
                    b.backend, r.recovered, r.workflows, r.lost
                ));
            }
            if let Some(a) = b.api.done() {
                for (how, m) in [("TLS + token", &a.secure), ("plain", &a.plain)] {
                    if m.lost > 0 {
                        out.push(format!(
                            "{} API ({how}): {} workflows lost or not succeeded, {} of them \
                             stranded (stored and active, but never run)",
                            b.backend, m.lost, m.stranded
                        ));
                    }
                }
            }
        }
        for r in &self.replicas {
            if let Some(f) = r.fanout.done()
                && (f.lost > 0 || f.succeeded != f.workflows)
            {
                out.push(format!(
                    "postgres fan-out on {} replicas: {} of {} workflows succeeded, {} lost",
                    r.replicas, f.succeeded, f.workflows, f.lost
                ));
            }
        }
        if self.machine.fsync_is_fake() {
            out.push(format!(
                "the data directory is on {}, where fsync does nothing; pass --dir on a real disk",
                self.machine.fs_type
            ));
        }
        out
    }
}

fn failed_of<T>(o: &Outcome<T>) -> Option<&String> {
    match o {
        Outcome::Failed(e) => Some(e),
        _ => None,
    }
}

/// Prints progress to stderr, so that stdout holds only the report.
fn say(msg: &str) {
    eprintln!("bench: {msg}");
}

/// Runs the plan. Each scenario gets a fresh directory under `plan.dir`; a failing scenario
/// is recorded and the rest still run.
pub fn run(plan: &Plan) -> Report {
    let start = Instant::now();
    let sizes = &plan.sizes;
    let wants = |s: Scenario| plan.scenarios.contains(&s);
    let _ = std::fs::create_dir_all(&plan.dir);
    let machine = Machine::describe(&plan.dir);
    let mut backends = Vec::new();
    let mut replica_runs = Vec::new();
    // Scenarios that are not per backend (the peer, boot files) alone need no backend pass.
    let backend_list: &[Backend] = if plan.scenarios.iter().any(|s| s.per_backend()) {
        &plan.backends
    } else {
        &[]
    };
    for &backend in backend_list {
        let name = backend_name(backend);
        let root = plan.dir.join(name);
        let _ = std::fs::create_dir_all(&root);
        let log = |what: &str| root.join(format!("{what}.log"));

        say(&format!(
            "[{name}] fsync floor ({} samples)",
            sizes.fsync_samples
        ));
        let fsync = Outcome::from(
            fsync::measure(&root.join("fsync"), sizes.fsync_samples).map_err(Into::into),
        );
        let chain = if wants(Scenario::Chain) {
            say(&format!("[{name}] chain of {} tasks", sizes.chain));
            let dir = root.join("chain");
            timed(|| match &plan.isolate {
                Some(exe) => in_child(
                    exe,
                    "chain",
                    backend,
                    &dir,
                    sizes.chain,
                    0,
                    sizes.limit,
                    None,
                ),
                None => inproc::chain(backend, &dir, sizes.chain, sizes.limit),
            })
        } else {
            not_selected()
        };
        let fanout = if wants(Scenario::FanOut) {
            say(&format!(
                "[{name}] fan-out: {} workflows of {} tasks",
                sizes.fanout_workflows,
                sizes.fanout_width + 2
            ));
            let dir = root.join("fanout");
            let (n, width) = (sizes.fanout_workflows, sizes.fanout_width);
            timed(|| match &plan.isolate {
                Some(exe) => in_child(exe, "fanout", backend, &dir, n, width, sizes.limit, None),
                None => inproc::fan_out(backend, &dir, n, width, sizes.limit),
            })
        } else {
            not_selected()
        };
        if backend == Backend::Postgres {
            for &r in &plan.replicas {
                replica_runs.push(run_replicas(plan, &root, r));
            }
        }
        let recovery = if wants(Scenario::Recovery) {
            say(&format!(
                "[{name}] recovery of {} workflows after SIGKILL",
                sizes.recovery
            ));
            timed(|| {
                recovery::recovery(
                    backend,
                    &root.join("recovery"),
                    &log("recovery"),
                    sizes.recovery,
                    sizes.limit,
                )
            })
        } else {
            not_selected()
        };
        let api = if !wants(Scenario::Api) {
            not_selected()
        } else if !api::wrk_available() {
            say("wrk is not installed; skipping the API benchmark (scripts/bench.sh installs it)");
            Outcome::Skipped("wrk is not installed".into())
        } else {
            say(&format!(
                "[{name}] API under wrk, {} s per endpoint",
                sizes.api.seconds
            ));
            timed(|| {
                api::api(
                    backend,
                    &root.join("api"),
                    &log("api"),
                    sizes.api,
                    sizes.limit,
                )
            })
        };
        let history = if wants(Scenario::History) {
            say(&format!(
                "[{name}] history: {} finished workflows on {} nodes, beside {}",
                sizes.history_workflows,
                sizes.history_nodes,
                history::BASELINE_WORKFLOWS
            ));
            timed(|| {
                history::history(
                    backend,
                    &root.join("history"),
                    &log("history"),
                    sizes.history_workflows,
                    sizes.history_nodes,
                    sizes.limit,
                )
            })
        } else {
            not_selected()
        };
        // The stores are large; only the logs are worth keeping.
        for sub in ["chain", "fanout", "recovery", "api", "history"] {
            let _ = std::fs::remove_dir_all(root.join(sub));
        }
        for &r in &plan.replicas {
            for sub in ["chain", "fanout"] {
                let _ = std::fs::remove_dir_all(root.join(format!("{sub}-{r}-replicas")));
            }
        }
        backends.push(BackendReport {
            backend: name,
            fsync,
            chain,
            fanout,
            recovery,
            api,
            history,
        });
    }

    let peer = if !wants(Scenario::Peer) {
        not_selected()
    } else if let Some(python) = peer::python() {
        say(&format!(
            "TaskFlow peer: chain of {} tasks, {} fan-out flows of {} tasks",
            sizes.peer_chain,
            sizes.peer_fanout_flows,
            sizes.fanout_width + 2
        ));
        timed(|| {
            let dir = plan.dir.join("taskflow");
            let r = peer::run(
                &python,
                &dir,
                sizes.peer_chain,
                sizes.peer_fanout_flows,
                sizes.fanout_width,
            );
            let _ = std::fs::remove_dir_all(&dir);
            r
        })
    } else {
        let venv = peer::venv();
        say(&format!(
            "no TaskFlow venv at {}; skipping the peer (scripts/bench.sh creates it)",
            venv.display()
        ));
        Outcome::Skipped(format!("no venv at {}", venv.display()))
    };

    let boot = if !wants(Scenario::BootFiles) {
        not_selected()
    } else if !boot::curl_available() {
        say(
            "curl is not installed; skipping the boot-file scenario (scripts/install-peers.sh installs it)",
        );
        Outcome::Skipped("curl is not installed".into())
    } else {
        let loads: Vec<String> = sizes
            .boot
            .loads
            .iter()
            .map(|l| {
                format!(
                    "{} × {:?} of {}",
                    l.clients,
                    l.protocol,
                    boot::fmt_size(l.bytes)
                )
            })
            .collect();
        say(&format!(
            "boot files against tftpd-hpa and nginx: {}, {} rounds",
            loads.join(", "),
            sizes.boot.rounds
        ));
        let dir = plan.dir.join("boot-files");
        let r = timed(|| {
            boot::boot_files(
                &dir,
                &plan.dir.join("boot-files.log"),
                &sizes.boot,
                sizes.limit,
            )
        });
        // The files are large; the daemons' logs are worth keeping.
        for big in ["root", "metalgraph"] {
            let _ = std::fs::remove_dir_all(dir.join(big));
        }
        r
    };

    let dhcp = if !wants(Scenario::Dhcp) {
        not_selected()
    } else if let Some(why) = dhcp::unavailable() {
        say(&format!("skipping the DHCP scenario: {why}"));
        Outcome::Skipped(why)
    } else {
        let d = &sizes.dhcp;
        say(&format!(
            "DHCP: perfdhcp against metalgraph ({}) and Kea, pool of {}, {} s steps from {} DORA/s, {} rounds",
            plan.backends
                .iter()
                .map(|b| backend_name(*b))
                .collect::<Vec<_>>()
                .join(", "),
            d.pool,
            d.seconds,
            d.start_rate,
            d.rounds
        ));
        let dir = plan.dir.join("dhcp");
        timed(|| {
            dhcp::dhcp(
                &dir,
                &plan.dir.join("dhcp.log"),
                &plan.backends,
                d,
                sizes.limit,
            )
        })
    };

    let rack = if !wants(Scenario::Rack) {
        not_selected()
    } else if let Some(why) = rack::unavailable() {
        say(&format!("skipping the rack power-on scenario: {why}"));
        Outcome::Skipped(why)
    } else {
        let r = &sizes.rack;
        say(&format!(
            "rack power-on: {} machines (DHCP, TFTP, profile, {} kernel and {} initrd) against \
             metalgraph and dnsmasq + tftpd-hpa + nginx, {} rounds",
            r.machines,
            boot::fmt_size(r.kernel_bytes),
            boot::fmt_size(r.initrd_bytes),
            r.rounds
        ));
        let dir = plan.dir.join("rack");
        let result = timed(|| rack::rack(&dir, &plan.dir.join("rack.log"), r, sizes.limit));
        // The boot files are large; the daemons' logs are worth keeping.
        let _ = std::fs::remove_dir_all(dir.join("root"));
        result
    };

    Report {
        machine,
        sizes: sizes.clone(),
        backends,
        replicas: replica_runs,
        peer,
        boot,
        dhcp,
        rack,
        total: start.elapsed(),
    }
}

/// Chain and fan-out (those selected) on `n` PostgreSQL replicas, each scenario on a fresh
/// schema under `root`.
fn run_replicas(plan: &Plan, root: &Path, n: usize) -> ReplicaReport {
    let sizes = &plan.sizes;
    let wants = |s: Scenario| plan.scenarios.contains(&s);
    let chain = if wants(Scenario::Chain) {
        say(&format!(
            "[postgres] chain of {} tasks on {n} replicas",
            sizes.chain
        ));
        let dir = root.join(format!("chain-{n}-replicas"));
        timed(|| match &plan.isolate {
            Some(exe) => in_child(
                exe,
                "replica-chain",
                Backend::Postgres,
                &dir,
                sizes.chain,
                0,
                sizes.limit,
                Some(n),
            ),
            None => replicas::chain(&dir, n, sizes.chain, sizes.limit),
        })
    } else {
        not_selected()
    };
    let fanout = if wants(Scenario::FanOut) {
        say(&format!(
            "[postgres] fan-out: {} workflows of {} tasks on {n} replicas",
            sizes.fanout_workflows,
            sizes.fanout_width + 2
        ));
        let dir = root.join(format!("fanout-{n}-replicas"));
        let (w, width) = (sizes.fanout_workflows, sizes.fanout_width);
        timed(|| match &plan.isolate {
            Some(exe) => in_child(
                exe,
                "replica-fanout",
                Backend::Postgres,
                &dir,
                w,
                width,
                sizes.limit,
                Some(n),
            ),
            None => replicas::fan_out(&dir, n, w, width, sizes.limit),
        })
    } else {
        not_selected()
    };
    ReplicaReport {
        replicas: n,
        chain,
        fanout,
    }
}

fn not_selected<T>() -> Outcome<T> {
    Outcome::Skipped("not selected".into())
}

/// Runs one scenario, logging how long it took.
fn timed<T>(f: impl FnOnce() -> anyhow::Result<T>) -> Outcome<T> {
    let start = Instant::now();
    let r = f();
    match &r {
        Ok(_) => say(&format!("  done in {:.1} s", start.elapsed().as_secs_f64())),
        Err(e) => say(&format!(
            "  FAILED after {:.1} s: {e:#}",
            start.elapsed().as_secs_f64()
        )),
    }
    Outcome::from(r)
}

/// The flag that makes the harness run one in-process scenario and print its result as
/// JSON: `--child chain|fanout BACKEND DIR N WIDTH LIMIT_SECS`, or
/// `--child replica-chain|replica-fanout postgres DIR N WIDTH LIMIT_SECS REPLICAS`.
pub const CHILD_FLAG: &str = "--child";

/// Runs one in-process scenario in a child process (`exe --child ...`) and reads its result.
#[allow(clippy::too_many_arguments)]
fn in_child<T: serde::de::DeserializeOwned>(
    exe: &Path,
    scenario: &str,
    backend: Backend,
    dir: &Path,
    n: usize,
    width: usize,
    limit: Duration,
    replicas: Option<usize>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let out = std::process::Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(scenario)
        .arg(backend_name(backend))
        .arg(dir)
        .arg(n.to_string())
        .arg(width.to_string())
        .arg(limit.as_secs().to_string())
        .args(replicas.map(|r| r.to_string()))
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "the {scenario} process failed ({}): {}",
            out.status,
            text.trim()
        );
    }
    serde_json::from_str(text.trim())
        .with_context(|| format!("cannot read the {scenario} process's result {text:?}"))
}

/// The child side of [`in_child`]: runs the scenario named in `args` (what follows
/// [`CHILD_FLAG`]) and returns its result as JSON.
pub fn run_child(args: &[String]) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let (scenario, backend, dir, n, width, limit, count) = match args {
        [scenario, backend, dir, n, width, limit] => {
            (scenario, backend, dir, n, width, limit, None)
        }
        [scenario, backend, dir, n, width, limit, count] => (
            scenario,
            backend,
            dir,
            n,
            width,
            limit,
            Some(count.parse::<usize>().context("REPLICAS")?),
        ),
        _ => anyhow::bail!(
            "{CHILD_FLAG} wants: chain|fanout BACKEND DIR N WIDTH LIMIT_SECS, or \
             replica-chain|replica-fanout postgres DIR N WIDTH LIMIT_SECS REPLICAS"
        ),
    };
    let backend: Backend = backend.parse().map_err(anyhow::Error::msg)?;
    let dir = Path::new(dir);
    let n: usize = n.parse().context("N")?;
    let width: usize = width.parse().context("WIDTH")?;
    let limit = Duration::from_secs(limit.parse().context("LIMIT_SECS")?);
    Ok(match (scenario.as_str(), count) {
        ("chain", None) => serde_json::to_string(&inproc::chain(backend, dir, n, limit)?)?,
        ("fanout", None) => {
            serde_json::to_string(&inproc::fan_out(backend, dir, n, width, limit)?)?
        }
        ("replica-chain", Some(r)) if backend == Backend::Postgres => {
            serde_json::to_string(&replicas::chain(dir, r, n, limit)?)?
        }
        ("replica-fanout", Some(r)) if backend == Backend::Postgres => {
            serde_json::to_string(&replicas::fan_out(dir, r, n, width, limit)?)?
        }
        (other, r) => {
            anyhow::bail!("unknown child scenario {other:?} on {backend:?} ({r:?} replicas)")
        }
    })
}

/// The default base directory for data: cargo's per-target scratch directory, which is on
/// the same disk as the checkout (unlike `/tmp`, which is often a tmpfs).
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).to_owned()
}
