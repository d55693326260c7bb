//! Renders a [`Report`] as Markdown: a header describing the machine and the peer, then one
//! table per backend with metalgraph's figure, TaskFlow's where it ran the same shape, and
//! their ratio.

use std::fmt::Write as _;
use std::time::Duration;

use crate::boot::{self, BootResult, Protocol};
use crate::dhcp::{DhcpResult, Step};
use crate::history::{HistoryResult, Latency};
use crate::inproc::FanOutResult;
use crate::peer::PeerResult;
use crate::rack::{RackResult, Step as RackStep};
use crate::replicas::{ReplicaFanOutResult, Share};
use crate::suite::{BackendReport, Outcome, Report};
use crate::util::{fmt_count, fmt_dur, fmt_mib, sig3};

/// The report as Markdown.
pub fn markdown(r: &Report) -> String {
    let mut out = String::new();
    let m = &r.machine;
    let _ = writeln!(out, "### Machine\n");
    let _ = writeln!(out, "- CPU: {} × {}", m.cpus, m.cpu);
    let _ = writeln!(out, "- Memory: {:.1} GiB", m.memory_gib);
    let _ = writeln!(out, "- OS: {} (Linux {})", m.os, m.kernel);
    let _ = writeln!(
        out,
        "- Data directory: {} on {} ({}), mounted at {} with {}",
        m.fs_type, m.device, m.disk_kind, m.mount_point, m.mount_options
    );
    if !m.rustc.is_empty() {
        let _ = writeln!(out, "- Toolchain: {}", m.rustc);
    }
    match &r.peer {
        Outcome::Done(p) => {
            let _ = writeln!(
                out,
                "- Peer: TaskFlow {} (SQLAlchemy {}, Python {}), SQLite `journal_mode={}`, \
                 `synchronous={}`; chain of {} tasks, fan-out of {} flows ({} tasks, {} engine)",
                p.taskflow,
                p.sqlalchemy,
                p.python,
                p.sqlite_journal_mode,
                p.sqlite_synchronous,
                fmt_count(p.chain_tasks as u64),
                fmt_count(p.fanout_flows as u64),
                fmt_count(p.fanout_tasks as u64),
                p.fanout_engine,
            );
        }
        Outcome::Skipped(why) => {
            let _ = writeln!(out, "- Peer: TaskFlow skipped ({why})");
        }
        Outcome::Failed(e) => {
            let _ = writeln!(out, "- Peer: TaskFlow FAILED: {e}");
        }
    }
    let _ = writeln!(out, "- Whole run: {}", fmt_dur(r.total));
    for b in &r.backends {
        out.push('\n');
        backend_table(&mut out, b, r.peer.done());
    }
    if !r.replicas.is_empty() {
        out.push('\n');
        replicas_table(&mut out, r);
    }
    section(&mut out, "Boot files", &r.boot, boot_table);
    section(&mut out, "DHCP", &r.dhcp, dhcp_table);
    section(&mut out, "Rack power-on", &r.rack, rack_table);
    let problems = r.problems();
    if !problems.is_empty() {
        let _ = writeln!(out, "\n### Problems\n");
        for p in problems {
            let _ = writeln!(out, "- {p}");
        }
    }
    out
}

/// A scenario's section: its table when it ran, else a line saying why not (nothing when it
/// was not selected).
fn section<T>(out: &mut String, title: &str, outcome: &Outcome<T>, table: fn(&mut String, &T)) {
    match outcome {
        Outcome::Done(t) => {
            out.push('\n');
            table(out, t);
        }
        Outcome::Failed(e) => {
            let _ = writeln!(out, "\n### {title}\n\nFAILED: {e}");
        }
        Outcome::Skipped(why) if why != "not selected" => {
            let _ = writeln!(out, "\n### {title}\n\nskipped ({why})");
        }
        Outcome::Skipped(_) => {}
    }
}

/// The peers' versions, for a table's description: `name: version; ...`.
fn versions(v: &[(String, String)]) -> String {
    v.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `a / b` as a ratio of times, with how many times slower the slower one is.
fn ratio(metalgraph: Duration, peer: Duration) -> String {
    let r = metalgraph.as_secs_f64() / peer.as_secs_f64();
    if r < 1.0 {
        format!("{} (TaskFlow {}× slower)", sig3(r), sig3(1.0 / r))
    } else {
        format!("{} (metalgraph {}× slower)", sig3(r), sig3(r))
    }
}

fn row(out: &mut String, figure: &str, ours: &str, peer: &str, ratio: &str) {
    let _ = writeln!(out, "| {figure} | {ours} | {peer} | {ratio} |");
}

fn not_done<T>(o: &Outcome<T>) -> String {
    match o {
        Outcome::Done(_) => String::new(),
        Outcome::Skipped(why) => format!("skipped ({why})"),
        Outcome::Failed(e) => format!("FAILED: {}", e.lines().next().unwrap_or_default()),
    }
}

fn backend_table(out: &mut String, b: &BackendReport, peer: Option<&PeerResult>) {
    let _ = writeln!(out, "### `{}` backend\n", b.backend);
    let _ = writeln!(
        out,
        "| figure | metalgraph | TaskFlow (SQLite) | metalgraph / TaskFlow |"
    );
    let _ = writeln!(out, "|---|---|---|---|");

    let floor = b.fsync.done();
    match &b.fsync {
        Outcome::Done(f) => {
            for (what, syncs) in [
                ("fsync floor: 4 KiB append + `fdatasync`", &f.append),
                (
                    "fsync floor: 4 KiB over written space + `fdatasync`",
                    &f.overwrite,
                ),
            ] {
                let figure = format!(
                    "median {}, p99 {} ({} samples)",
                    fmt_dur(syncs.median),
                    fmt_dur(syncs.p99),
                    f.samples
                );
                row(out, what, &figure, "", "");
            }
        }
        other => row(out, "fsync floor", &not_done(other), "", ""),
    }

    match &b.chain {
        Outcome::Done(c) => {
            let peer_chain = peer.filter(|p| p.chain_tasks > 0);
            row(
                out,
                &format!(
                    "chain: {} sequential `noop` tasks, wall",
                    fmt_count(c.tasks as u64)
                ),
                &fmt_dur(c.wall),
                &peer_chain
                    .map(|p| {
                        format!(
                            "{} ({} tasks)",
                            fmt_dur(Duration::from_secs_f64(p.chain_wall_s)),
                            fmt_count(p.chain_tasks as u64)
                        )
                    })
                    .unwrap_or_default(),
                "",
            );
            let commits = c.store.commits as f64 / c.tasks as f64;
            let in_commit = c.store.commit_time / u32::try_from(c.tasks.max(1)).unwrap_or(u32::MAX);
            let vs_floor = floor
                .map(|f| {
                    let times = |s: &crate::fsync::Syncs| {
                        sig3(c.per_task.as_secs_f64() / s.median.as_secs_f64())
                    };
                    format!(
                        "{}× the append fsync median, {}× the overwrite one; ",
                        times(&f.append),
                        times(&f.overwrite)
                    )
                })
                .unwrap_or_default();
            row(
                out,
                "chain: time per task",
                &format!(
                    "**{}** ({vs_floor}{} commits per task, {} of it inside `commit`)",
                    fmt_dur(c.per_task),
                    sig3(commits),
                    fmt_dur(in_commit)
                ),
                &peer_chain
                    .map(|p| fmt_dur(p.chain_per_task()))
                    .unwrap_or_default(),
                &peer_chain
                    .map(|p| ratio(c.per_task, p.chain_per_task()))
                    .unwrap_or_default(),
            );
        }
        other => row(out, "chain", &not_done(other), "", ""),
    }

    match &b.fanout {
        Outcome::Done(f) => {
            let peer_fan = peer.filter(|p| p.fanout_tasks > 0);
            row(
                out,
                &format!(
                    "fan-out: {} workflows × {} tasks on {} simulated nodes, wall",
                    fmt_count(f.workflows as u64),
                    f.tasks_per_workflow,
                    fmt_count(f.workflows as u64)
                ),
                &format!(
                    "{} (all runs accepted after {})",
                    fmt_dur(f.wall),
                    fmt_dur(f.accept_wall)
                ),
                &peer_fan
                    .map(|p| {
                        format!(
                            "{} ({} flows, {} tasks)",
                            fmt_dur(Duration::from_secs_f64(p.fanout_wall_s)),
                            fmt_count(p.fanout_flows as u64),
                            fmt_count(p.fanout_tasks as u64)
                        )
                    })
                    .unwrap_or_default(),
                "",
            );
            let per_task = f.wall.div_f64(f.tasks.max(1) as f64);
            row(
                out,
                "fan-out: tasks per second",
                &format!(
                    "**{}** ({} per task; {} commits of {} ops in all)",
                    fmt_count(f.tasks_per_sec.round() as u64),
                    fmt_dur(per_task),
                    fmt_count(f.store.commits),
                    fmt_count(f.store.ops)
                ),
                &peer_fan
                    .map(|p| {
                        format!(
                            "{} ({} per task)",
                            sig3(p.fanout_tasks_per_sec()),
                            fmt_dur(p.fanout_per_task())
                        )
                    })
                    .unwrap_or_default(),
                &peer_fan
                    .map(|p| ratio(per_task, p.fanout_per_task()))
                    .unwrap_or_default(),
            );
            let peak = match (f.peak_rss, f.rss_before) {
                (Some(peak), Some(before)) => format!(
                    "**{}** peak RSS{} ({} when the run began)",
                    fmt_mib(peak),
                    if f.peak_is_scenario_only {
                        ""
                    } else {
                        " of the whole process"
                    },
                    fmt_mib(before)
                ),
                _ => "not available on this OS".into(),
            };
            row(out, "fan-out: memory", &peak, "", "");
            row(
                out,
                "fan-out: workflows succeeded / lost",
                &format!(
                    "{} / {}{}",
                    fmt_count(f.succeeded as u64),
                    f.lost,
                    if f.polled {
                        " (end found by polling: events lagged)"
                    } else {
                        ""
                    }
                ),
                "",
                "",
            );
            row(
                out,
                "fan-out setup (not in the figures): registering nodes",
                &format!(
                    "{} per node through `Nodes::create` ({} nodes); the other {} in batches of 1,000: {}",
                    fmt_dur(
                        f.node_create_time
                            .div_f64(f.node_create_sample.max(1) as f64)
                    ),
                    f.node_create_sample,
                    fmt_count(f.workflows.saturating_sub(f.node_create_sample) as u64),
                    fmt_dur(f.node_load)
                ),
                "",
                "",
            );
        }
        other => row(out, "fan-out", &not_done(other), "", ""),
    }

    match &b.recovery {
        Outcome::Done(r) => {
            row(
                out,
                &format!(
                    "recovery: {} unfinished workflows after SIGKILL, start → listening",
                    fmt_count(r.workflows as u64)
                ),
                &format!("**{}**", fmt_dur(r.to_listening)),
                "",
                "",
            );
            row(
                out,
                "recovery: start → API shows every task running again",
                &format!(
                    "{} (one listing of all: {}); {} recovered, {} lost",
                    fmt_dur(r.to_all_running),
                    fmt_dur(r.listing),
                    fmt_count(r.recovered as u64),
                    r.lost
                ),
                "",
                "",
            );
        }
        other => row(out, "recovery", &not_done(other), "", ""),
    }

    match &b.api {
        Outcome::Done(a) => {
            let load = format!(
                "wrk -t{} -c{} -d{}s",
                a.load.threads, a.load.connections, a.load.seconds
            );
            for (how, m) in [("TLS + token", &a.secure), ("--no-tls --no-auth", &a.plain)] {
                row(
                    out,
                    &format!("API, {how}: `GET /api/2.0/workflows/{{id}}` ({load})"),
                    &format!(
                        "**{} req/s**, p99 {} (p50 {}){}",
                        fmt_count(m.get.rps.round() as u64),
                        fmt_dur(m.get.p99),
                        fmt_dur(m.get.p50),
                        errors(m.get.errors)
                    ),
                    "",
                    "",
                );
                row(
                    out,
                    &format!(
                        "API, {how}: `POST /api/2.0/workflows` running a one-task graph ({load})"
                    ),
                    &format!(
                        "**{} req/s**, p99 {} (p50 {}){}; {} created, {} lost or not succeeded \
                         ({} stranded)",
                        fmt_count(m.run.rps.round() as u64),
                        fmt_dur(m.run.p99),
                        fmt_dur(m.run.p50),
                        errors(m.run.errors),
                        fmt_count(m.created),
                        m.lost,
                        m.stranded
                    ),
                    "",
                    "",
                );
            }
        }
        other => row(out, "API", &not_done(other), "", ""),
    }

    match &b.history {
        Outcome::Done(h) => history_rows(out, h),
        other => row(out, "history", &not_done(other), "", ""),
    }
}

/// PostgreSQL with replicas: one column per number of replicas, beside sled's and
/// PostgreSQL's one-process figures from the same run where they ran.
fn replicas_table(out: &mut String, r: &Report) {
    let _ = writeln!(out, "### `postgres` with replicas\n");
    let _ = writeln!(
        out,
        "Each replica is an engine in this one process with a PostgreSQL store of its own \
         (its own connection pool) on the same schema, holding partitions under leases \
         (default timings), spread before the run starts. The chain is submitted through \
         replica 0 and driven by the owner of its partition, one replica whatever their \
         number; its time per task runs from the request to the commit that finished it. \
         Fan-out runs go round-robin through the replicas; the wall ends when replica 0's \
         event stream has shown every workflow's end (events pass through the sequencer).\n"
    );
    let one = |name: &str| r.backends.iter().find(|b| b.backend == name);
    let (sled, pg) = (one("sled"), one("postgres"));
    let mut head = String::from("| figure | sled, one process | postgres, one process |");
    let mut rule = String::from("|---|---|---|");
    for rep in &r.replicas {
        let _ = write!(
            head,
            " {} replica{} |",
            rep.replicas,
            if rep.replicas == 1 { "" } else { "s" }
        );
        rule.push_str("---|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    let line = |out: &mut String, figure: &str, sole: [String; 2], each: Vec<String>| {
        let _ = writeln!(
            out,
            "| {figure} | {} | {} | {} |",
            sole[0],
            sole[1],
            each.join(" | ")
        );
    };
    let sole = |f: &dyn Fn(&BackendReport) -> String| -> [String; 2] {
        [
            sled.map(f).unwrap_or_default(),
            pg.map(f).unwrap_or_default(),
        ]
    };

    let chain_n = r
        .replicas
        .iter()
        .find_map(|x| x.chain.done().map(|c| c.tasks));
    if let Some(n) = chain_n {
        line(
            out,
            &format!(
                "chain: {} sequential `noop` tasks, time per task",
                fmt_count(n as u64)
            ),
            sole(&|b| {
                b.chain
                    .done()
                    .map(|c| format!("**{}**", fmt_dur(c.per_task)))
                    .unwrap_or_else(|| not_done(&b.chain))
            }),
            r.replicas
                .iter()
                .map(|x| match &x.chain {
                    Outcome::Done(c) => format!(
                        "**{}** (driven by replica {}; its end event seen {} after the \
                         commit; {} commits per task, all replicas){}",
                        fmt_dur(c.per_task),
                        c.owner,
                        fmt_dur(c.seen.saturating_sub(c.wall)),
                        sig3(c.store.commits as f64 / c.tasks.max(1) as f64),
                        if c.moved {
                            "; partitions moved during the run"
                        } else {
                            ""
                        }
                    ),
                    other => not_done(other),
                })
                .collect(),
        );
    }
    // A fan-out figure for the one-process columns and for each replica count.
    let sole_fan = |f: &dyn Fn(&FanOutResult) -> String| {
        sole(&|b: &BackendReport| match &b.fanout {
            Outcome::Done(x) => f(x),
            other => not_done(other),
        })
    };
    let each_fan = |f: &dyn Fn(&ReplicaFanOutResult) -> String| -> Vec<String> {
        r.replicas
            .iter()
            .map(|x| match &x.fanout {
                Outcome::Done(x) => f(x),
                other => not_done(other),
            })
            .collect()
    };
    let rate = |per_sec: f64, wall: Duration, tasks: usize| {
        format!(
            "**{}** ({} per task)",
            fmt_count(per_sec.round() as u64),
            fmt_dur(wall.div_f64(tasks.max(1) as f64))
        )
    };
    if let Some(f0) = r.replicas.iter().find_map(|x| x.fanout.done()) {
        line(
            out,
            &format!(
                "fan-out: {} workflows × {} tasks, tasks per second",
                fmt_count(f0.workflows as u64),
                f0.tasks_per_workflow
            ),
            sole_fan(&|f| rate(f.tasks_per_sec, f.wall, f.tasks)),
            each_fan(&|f| rate(f.tasks_per_sec, f.wall, f.tasks)),
        );
        line(
            out,
            "fan-out: wall (last finishing commit; all runs accepted after)",
            sole_fan(&|f| {
                format!(
                    "{} (accepted after {})",
                    fmt_dur(f.wall),
                    fmt_dur(f.accept_wall)
                )
            }),
            each_fan(&|f| {
                format!(
                    "{} ({}; accepted after {})",
                    fmt_dur(f.wall),
                    fmt_dur(f.committed_wall),
                    fmt_dur(f.accept_wall)
                )
            }),
        );
        line(
            out,
            "fan-out: commits per replica (partitions held; S: the sequencer's)",
            sole_fan(&|f| fmt_count(f.store.commits)),
            each_fan(&|f| shares(&f.shares, f.moved)),
        );
        let ended = |succeeded: usize, lost: usize, polled: bool| {
            format!(
                "{} / {lost}{}",
                fmt_count(succeeded as u64),
                if polled {
                    " (end found by polling: events lagged)"
                } else {
                    ""
                }
            )
        };
        line(
            out,
            "fan-out: workflows succeeded / lost",
            sole_fan(&|f| ended(f.succeeded, f.lost, f.polled)),
            each_fan(&|f| ended(f.succeeded, f.lost, f.polled)),
        );
        let peak = |p: Option<u64>| p.map(fmt_mib).unwrap_or_default();
        line(
            out,
            "fan-out: peak RSS of the process (all replicas in it)",
            sole_fan(&|f| peak(f.peak_rss)),
            each_fan(&|f| peak(f.peak_rss)),
        );
    }
    line(
        out,
        "setup (not in the figures): partitions spread after (chain / fan-out)",
        [String::new(), String::new()],
        r.replicas
            .iter()
            .map(|x| {
                let settle = |d: Option<Duration>| d.map(fmt_dur).unwrap_or_else(|| "–".into());
                format!(
                    "{} / {}",
                    settle(x.chain.done().map(|c| c.settle)),
                    settle(x.fanout.done().map(|f| f.settle))
                )
            })
            .collect(),
    );
}

/// Each replica's commits, with its partitions: `12,345 (22 S)`.
fn shares(shares: &[Share], moved: bool) -> String {
    let each: Vec<String> = shares
        .iter()
        .map(|s| {
            format!(
                "{} ({}{})",
                fmt_count(s.store.commits),
                s.partitions,
                if s.sequencer { " S" } else { "" }
            )
        })
        .collect();
    format!(
        "{}{}",
        each.join(" / "),
        if moved {
            "; partitions moved during the run"
        } else {
            ""
        }
    )
}

/// The history scenario: each figure on the large store, with the baseline's and their
/// ratio (flat is 1×).
fn history_rows(out: &mut String, h: &HistoryResult) {
    let (l, s) = (&h.large, &h.baseline);
    let size = format!(
        "{} workflows on {} nodes ({} on disk, loaded in {})",
        fmt_count(l.workflows as u64),
        fmt_count(l.nodes as u64),
        fmt_mib(l.disk_bytes),
        fmt_dur(l.load)
    );
    let times = |a: Duration, b: Duration| format!("{}×", sig3(a.as_secs_f64() / b.as_secs_f64()));
    let lat = |out: &mut String, figure: &str, a: &Latency, b: &Latency| {
        row(
            out,
            &format!("history: {figure}, p50 / p99"),
            &format!("**{}** / {}", fmt_dur(a.p50), fmt_dur(a.p99)),
            &format!(
                "{} / {} at {} workflows",
                fmt_dur(b.p50),
                fmt_dur(b.p99),
                fmt_count(s.workflows as u64)
            ),
            &format!("p50 {}", times(a.p50, b.p50)),
        );
    };
    row(
        out,
        &format!("history: `serve` start-up on {size}"),
        &format!("**{}**", fmt_dur(l.start)),
        &format!(
            "{} at {} workflows",
            fmt_dur(s.start),
            fmt_count(s.workflows as u64)
        ),
        &times(l.start, s.start),
    );
    row(
        out,
        "history: `serve` RSS at rest after the requests",
        &format!("**{}**", fmt_mib(l.rss_bytes)),
        &format!(
            "{} at {} workflows",
            fmt_mib(s.rss_bytes),
            fmt_count(s.workflows as u64)
        ),
        &format!("{}×", sig3(l.rss_bytes as f64 / s.rss_bytes as f64)),
    );
    lat(
        out,
        "`GET /workflows?$top=100`, first page",
        &l.first_page,
        &s.first_page,
    );
    lat(
        out,
        "`GET /workflows?$top=100&cursor=` half way down",
        &l.deep_page,
        &s.deep_page,
    );
    lat(
        out,
        "`GET /workflows?node=&$top=100`",
        &l.node_page,
        &s.node_page,
    );
    lat(out, "`GET /nodes?$top=100`", &l.nodes_page, &s.nodes_page);
    lat(out, "`GET /workflows/{id}`", &l.get_one, &s.get_one);
}

fn errors(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", {n} errors")
    }
}

/// Wall times of one server under one load: the median, and the spread over the rounds.
fn walls(w: &boot::Walls) -> String {
    let d = |s: f64| fmt_dur(Duration::from_secs_f64(s));
    if w.walls_s.len() > 1 {
        format!("{} ({}–{})", d(w.median()), d(w.min()), d(w.max()))
    } else {
        d(w.median())
    }
}

/// The boot-file scenario: one row per load, metalgraph beside the peer of its protocol.
fn boot_table(out: &mut String, b: &BootResult) {
    let _ = writeln!(out, "### Boot files\n");
    let versions = versions(&b.versions);
    let _ = writeln!(
        out,
        "Concurrent `curl` downloads on loopback, wall time from the first spawn to the last \
         exit; median of {} rounds (range in brackets). TFTP with `--tftp-blksize {}`. Speed \
         ratio = peer time / metalgraph time (above 1: metalgraph is faster). {}\n",
        b.rounds, b.blksize, versions
    );
    let _ = writeln!(out, "| load | metalgraph | peer | speed ratio (target) |");
    let _ = writeln!(out, "|---|---|---|---|");
    for l in &b.loads {
        let what = match l.load.protocol {
            Protocol::Tftp => "TFTP",
            Protocol::Http => "HTTP `/files/`",
        };
        let figure = format!(
            "{what}: {} × {}",
            l.load.clients,
            boot::fmt_size(l.load.bytes)
        );
        let (peer, speed) = match &l.peer_walls {
            Ok(w) => {
                let r = l.speed_ratio().unwrap_or(f64::NAN);
                let mark = if r >= l.load.target { "meets" } else { "BELOW" };
                (
                    format!("{}: {}", l.peer, walls(w)),
                    format!("**{}** (≥ {}: {mark})", sig3(r), l.load.target),
                )
            }
            Err(e) => (format!("{}: not run ({e})", l.peer), String::new()),
        };
        row(out, &figure, &walls(&l.metalgraph), &peer, &speed);
    }
}

/// One perfdhcp step: offered rate, ACKs per second, how many were lost, the delays.
fn step_text(s: &Step) -> String {
    format!(
        "{} offered → {} ACKs/s, {} % lost ({} drops{}), avg {} / {} ms, server CPU {} per ACK",
        fmt_count(u64::from(s.rate)),
        fmt_count(s.dora_per_sec().round() as u64),
        sig3(s.loss() * 100.0),
        fmt_count(s.drops()),
        if s.stats.rejected > 0 {
            format!(", {} rejected", fmt_count(s.stats.rejected))
        } else {
            String::new()
        },
        sig3(s.stats.offer_delay_ms),
        sig3(s.stats.ack_delay_ms),
        s.cpu_per_ack().map(fmt_dur).unwrap_or_default(),
    )
}

/// The DHCP scenario: one row per server, its highest sustained rate, the step at it and
/// the first step it failed, and the ratio to Kea.
fn dhcp_table(out: &mut String, d: &DhcpResult) {
    let _ = writeln!(out, "### DHCP\n");
    let versions = versions(&d.versions);
    let sz = &d.sizes;
    let _ = writeln!(
        out,
        "perfdhcp (a relay, {} clients) against each server across a veth pair between two \
         network namespaces; pool of {} addresses, {} s leases, a fresh server and lease store \
         for every {} s step. Sustained = the highest offered DORA/s with at most {} % of the \
         DISCOVERs not ending in an ACK (median of {} searches). Delays are DISCOVER→OFFER / \
         REQUEST→ACK; server CPU is the server process's user and system time during the \
         step over its ACKs. Ratio = metalgraph / Kea sustained (target ≥ 1). {}\n",
        fmt_count(u64::from(sz.clients)),
        fmt_count(u64::from(sz.pool)),
        d.lease_secs,
        sz.seconds,
        sig3(sz.max_loss * 100.0),
        sz.rounds,
        versions
    );
    let _ = writeln!(
        out,
        "| server | sustained DORA/s | at that rate | first failing rate | ratio to Kea |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for t in &d.targets {
        let Ok(searches) = &t.searches else {
            let e = t.searches.as_ref().err().cloned().unwrap_or_default();
            let _ = writeln!(out, "| {} | not run: {e} | | | |", t.name);
            continue;
        };
        let mut rates: Vec<u32> = searches.iter().map(|s| s.sustained()).collect();
        rates.sort_unstable();
        let sustained = t.sustained().unwrap_or(f64::NAN);
        let capped = searches.iter().all(|s| s.sustained() >= sz.max_rate);
        let figure = match rates.as_slice() {
            [] => "none".to_owned(),
            [one] => format!(
                "{}{}",
                if capped { "≥ " } else { "" },
                fmt_count(u64::from(*one))
            ),
            [lo, .., hi] => format!(
                "{}{} ({}–{})",
                if capped { "≥ " } else { "" },
                fmt_count(sustained.round() as u64),
                fmt_count(u64::from(*lo)),
                fmt_count(u64::from(*hi))
            ),
        };
        let median = t.median_search();
        let at = median
            .and_then(|s| s.best())
            .map(step_text)
            .unwrap_or_default();
        let fail = median
            .and_then(|s| s.first_failure())
            .map(step_text)
            .unwrap_or_default();
        let ratio = if t.kea {
            String::new()
        } else {
            d.ratio(t)
                .map(|r| {
                    let mark = if r >= 1.0 { "meets" } else { "BELOW" };
                    format!("**{}** ({mark})", sig3(r))
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "| {} | **{figure}** | {at} | {fail} | {ratio} |",
            t.name
        );
    }
}

/// The rack power-on: one row per stack, its wall time to the last machine served, each
/// step's p50 / p99 over every machine, its errors; and the ratio of the wall times.
fn rack_table(out: &mut String, r: &RackResult) {
    let _ = writeln!(out, "### Rack power-on\n");
    let versions = versions(&r.versions);
    let sz = &r.sizes;
    let _ = writeln!(
        out,
        "{} simulated machines power on at once across a veth pair between two network \
         namespaces, each doing DHCP (relayed DORA as a BIOS PXE ROM), TFTP of `undionly.kpxe` \
         ({}, {}), the iPXE profile over HTTP, then the {} kernel and the {} initrd the \
         profile names over HTTP. Wall = from the first DISCOVER to the last machine's last \
         byte, median of {} rounds (range in brackets), each on a freshly started stack. \
         Steps: p50 / p99 over every machine of every round. Ratio = the peer stack's wall / \
         this stack's (above 1: metalgraph is faster). {}\n",
        sz.machines,
        boot::fmt_size(r.boot_file_bytes),
        if r.boot_file_real {
            "Debian's"
        } else {
            "a stand-in: the ipxe package is not installed"
        },
        boot::fmt_size(sz.kernel_bytes),
        boot::fmt_size(sz.initrd_bytes),
        sz.rounds,
        versions
    );
    let steps: Vec<&str> = RackStep::ALL.iter().map(|s| s.label()).collect();
    let _ = writeln!(
        out,
        "| stack | wall to last machine | {} | errors | resent: DHCP / TFTP; UDP buffer drops: \
         server / client | ratio |",
        steps.join(" | ")
    );
    let _ = writeln!(out, "|---|---|{}---|---|---|", "---|".repeat(steps.len()));
    for stack in &r.stacks {
        if let Err(e) = &stack.rounds {
            let _ = writeln!(
                out,
                "| {} | not run: {e} |{}",
                stack.name,
                " |".repeat(steps.len() + 3)
            );
            continue;
        }
        let cells: Vec<String> = RackStep::ALL
            .iter()
            .map(|s| {
                let f = stack.step(*s);
                format!("{} / {}", fmt_dur(f.p50), fmt_dur(f.p99))
            })
            .collect();
        let errors = match stack.first_error() {
            None => "0".to_owned(),
            Some(first) => format!("**{}** (first: {first})", stack.errors()),
        };
        let (dhcp, tftp) = stack.resends();
        let drops = stack.udp_drops();
        let ratio = match r.ratio(stack) {
            Some(x) if !stack.peer => format!("**{}**", sig3(x)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {errors} | {} / {}; {} / {} | {ratio} |",
            stack.name,
            walls(&stack.walls()),
            cells.join(" | "),
            fmt_count(dhcp),
            fmt_count(tftp),
            fmt_count(drops.server),
            fmt_count(drops.client),
        );
    }
}
