//! The peer: OpenStack TaskFlow running the same chain and fan-out shapes with its SQLite
//! persistence on (`scripts/bench/taskflow_peer.py`), in the venv `scripts/bench.sh`
//! prepares, timed by its own clock around `engine.run()` and reported back as JSON.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Deserialize;

/// The peer's script, in this repository.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench/taskflow_peer.py")
}

/// Where `scripts/bench.sh` puts the peer's venv:
/// `${METALGRAPH_PEERS:-$HOME/.cache/metalgraph-peers}/bench-venv`.
pub fn venv() -> PathBuf {
    let peers = std::env::var_os("METALGRAPH_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            Path::new(&home).join(".cache/metalgraph-peers")
        });
    peers.join("bench-venv")
}

/// The venv's Python, if the venv exists.
pub fn python() -> Option<PathBuf> {
    let python = venv().join("bin/python");
    python.exists().then_some(python)
}

/// What the peer measured.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct PeerResult {
    pub taskflow: String,
    pub sqlalchemy: String,
    pub python: String,
    pub sqlite_journal_mode: String,
    pub sqlite_synchronous: String,
    #[serde(default)]
    pub chain_tasks: usize,
    #[serde(default)]
    pub chain_wall_s: f64,
    #[serde(default)]
    pub fanout_flows: usize,
    #[serde(default)]
    pub fanout_tasks: usize,
    #[serde(default)]
    pub fanout_wall_s: f64,
    #[serde(default)]
    pub fanout_engine: String,
}

impl PeerResult {
    pub fn chain_per_task(&self) -> Duration {
        Duration::from_secs_f64(self.chain_wall_s / self.chain_tasks.max(1) as f64)
    }

    pub fn fanout_per_task(&self) -> Duration {
        Duration::from_secs_f64(self.fanout_wall_s / self.fanout_tasks.max(1) as f64)
    }

    pub fn fanout_tasks_per_sec(&self) -> f64 {
        self.fanout_tasks as f64 / self.fanout_wall_s
    }
}

/// Runs the peer: a chain of `chain` tasks and `flows` fan-out flows of `width + 2` tasks,
/// with its SQLite files in `dir`.
pub fn run(
    python: &Path,
    dir: &Path,
    chain: usize,
    flows: usize,
    width: usize,
) -> anyhow::Result<PeerResult> {
    std::fs::create_dir_all(dir)?;
    let out = Command::new(python)
        .arg(script())
        .arg("--dir")
        .arg(dir)
        .args(["--chain", &chain.to_string()])
        .args(["--fanout-flows", &flows.to_string()])
        .args(["--fanout-width", &width.to_string()])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the TaskFlow peer failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the TaskFlow peer printed no JSON")?;
    serde_json::from_str(line).with_context(|| format!("cannot read the peer's output {line:?}"))
}
