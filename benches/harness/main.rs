//! metalgraph's benchmark harness: `cargo bench --bench harness` (or `scripts/bench.sh`,
//! which installs `wrk` and the TaskFlow peer first). Drives the real engine on real stores
//! and the real binary, prints a Markdown report on stdout, and writes it with the raw
//! figures (JSON) under `target/tmp/`. See BENCHMARKS.md for what each figure means.
//!
//! Flags (after `--`): `--quick` (smaller sizes), `--smoke` (the CI smoke test's sizes),
//! `--backends sled,file,postgres`, `--replicas 1,2,3` (chain and fan-out on PostgreSQL with
//! that many replicas in one process as well; needs postgres among the backends; none by
//! default), `--only chain,fanout,recovery,api,peer,history,boot-files,dhcp,rack`, `--dir DIR`
//! (where data directories go; its disk is what is measured), and size overrides `--chain N`, `--fanout N`,
//! `--recovery N`, `--api-secs N`, `--peer-chain N`, `--peer-flows N`, `--boot-rounds N`,
//! `--dhcp-rounds N`, `--dhcp-secs N`, `--rack N` (machines), `--rack-kernel-mib N`,
//! `--rack-initrd-mib N`, `--rack-rounds N`, `--rack-tftp-transfers N` (0: none).

mod api;
mod boot;
mod dhcp;
mod fsync;
mod graphs;
mod history;
mod inproc;
mod machine;
mod metered;
mod netns;
mod peer;
mod rack;
mod recovery;
mod replicas;
mod report;
mod server;
mod suite;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;

use crate::suite::{Plan, Scenario, Sizes};

fn parse_args(args: &[String]) -> anyhow::Result<(Plan, bool)> {
    let mut sizes = if args.iter().any(|a| a == "--smoke") {
        Sizes::smoke()
    } else if args.iter().any(|a| a == "--quick") {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let mut backends = vec![Backend::Sled, Backend::File];
    let mut scenarios = Scenario::ALL.to_vec();
    let mut dir = None;
    let mut replicas = Vec::new();
    let mut keep = false;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{arg} needs a value"))
        };
        let number = |v: String| -> anyhow::Result<usize> {
            v.replace('_', "")
                .parse()
                .with_context(|| format!("{arg} {v}: not a number"))
        };
        match arg.as_str() {
            // `cargo bench` passes `--bench`; the rest are ours.
            "--bench" | "--quick" | "--smoke" => {}
            "--keep" => keep = true,
            "--backends" => {
                backends = value()?
                    .split(',')
                    .map(|b| b.parse::<Backend>().map_err(anyhow::Error::msg))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--only" => {
                scenarios = value()?
                    .split(',')
                    .map(|s| Scenario::parse(s).with_context(|| format!("unknown scenario {s:?}")))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--replicas" => {
                replicas = value()?
                    .split(',')
                    .map(|r| number(r.to_owned()))
                    .collect::<anyhow::Result<_>>()?;
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            "--chain" => sizes.chain = number(value()?)?,
            "--fanout" => sizes.fanout_workflows = number(value()?)?,
            "--recovery" => sizes.recovery = number(value()?)?,
            "--api-secs" => sizes.api.seconds = u32::try_from(number(value()?)?)?,
            "--peer-chain" => sizes.peer_chain = number(value()?)?,
            "--peer-flows" => sizes.peer_fanout_flows = number(value()?)?,
            "--history" => sizes.history_workflows = number(value()?)?,
            "--history-nodes" => sizes.history_nodes = number(value()?)?,
            "--boot-rounds" => sizes.boot.rounds = number(value()?)?.max(1),
            "--dhcp-rounds" => sizes.dhcp.rounds = number(value()?)?.max(1),
            "--dhcp-secs" => sizes.dhcp.seconds = u32::try_from(number(value()?)?.max(1))?,
            "--rack" => sizes.rack.machines = number(value()?)?,
            "--rack-kernel-mib" => {
                sizes.rack.kernel_bytes = u64::try_from(number(value()?)?)? << 20
            }
            "--rack-initrd-mib" => {
                sizes.rack.initrd_bytes = u64::try_from(number(value()?)?)? << 20
            }
            "--rack-rounds" => sizes.rack.rounds = number(value()?)?.max(1),
            "--rack-tftp-transfers" => {
                sizes.rack.tftp_transfers = Some(number(value()?)?).filter(|n| *n > 0)
            }
            "-h" | "--help" => {
                println!("{}", HELP);
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{HELP}"),
        }
    }
    // More replicas than leased partitions (64 and the sequencer's) would hold nothing.
    let most = metalgraph_engine::ownership::PARTITIONS as usize + 1;
    if let Some(r) = replicas.iter().find(|r| !(1..=most).contains(*r)) {
        bail!("--replicas {r}: each count must be from 1 to {most}");
    }
    if !replicas.is_empty() && !backends.contains(&Backend::Postgres) {
        bail!("--replicas runs chain and fan-out on PostgreSQL: add postgres to --backends");
    }
    let base = dir.unwrap_or_else(suite::default_dir);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let plan = Plan {
        sizes,
        backends,
        scenarios,
        dir: base.join(format!("metalgraph-bench-{stamp}")),
        isolate: std::env::current_exe().ok(),
        replicas,
    };
    Ok((plan, keep))
}

const HELP: &str = "usage: cargo bench --bench harness -- [--quick | --smoke] [--backends sled,file,postgres] \
[--replicas 1,2,3 (with postgres; default none)] [--only chain,fanout,recovery,api,peer,history,boot-files,dhcp,rack] [--dir DIR] [--keep] [--chain N] [--fanout N] \
[--recovery N] [--api-secs N] [--peer-chain N] [--peer-flows N] [--history N] [--history-nodes N] [--boot-rounds N] \
[--dhcp-rounds N] [--dhcp-secs N] [--rack N] [--rack-kernel-mib N] [--rack-initrd-mib N] [--rack-rounds N] \
[--rack-tftp-transfers N]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(suite::CHILD_FLAG) {
        return match suite::run_child(&args[1..]) {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let (plan, keep) = match parse_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    eprintln!("bench: data under {}", plan.dir.display());
    let report = suite::run(&plan);
    let text = report::markdown(&report);
    println!("{text}");

    let out = suite::default_dir();
    let json = serde_json::to_string_pretty(&report).unwrap_or_default();
    for (name, body) in [
        ("metalgraph-bench.md", &text),
        ("metalgraph-bench.json", &json),
    ] {
        let path = out.join(name);
        match std::fs::write(&path, body) {
            Ok(()) => eprintln!("bench: wrote {}", path.display()),
            Err(e) => eprintln!("bench: cannot write {}: {e}", path.display()),
        }
    }
    if keep {
        eprintln!("bench: kept {}", plan.dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&plan.dir);
    }
    if report.problems().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
