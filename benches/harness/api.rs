//! The HTTP API under load: `wrk` on loopback against a real `metalgraph serve`, once on
//! `GET /api/2.0/workflows/{id}` (a read) and once on `POST /api/2.0/workflows` (running a
//! graph: one durable commit to create the workflow, then the scheduler runs it).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;

use crate::graphs;
use crate::inproc::runtime;
use crate::server::{Api, Server};

/// How `wrk` is run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub seconds: u32,
}

/// One `wrk` run, as `wrk --latency` reported it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub rps: f64,
    #[serde(with = "crate::util::secs")]
    pub p50: Duration,
    #[serde(with = "crate::util::secs")]
    pub p99: Duration,
    /// Non-2xx answers plus socket errors.
    pub errors: u64,
}

/// What the API scenario measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiResult {
    pub load: Load,
    /// With the defaults: TLS and a bearer token on every call.
    pub secure: Measured,
    /// The same binary with `--no-tls --no-auth`.
    pub plain: Measured,
}

/// One server's figures under `wrk`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measured {
    pub get: WrkResult,
    pub run: WrkResult,
    /// `201 Created` answers `wrk` read during the run benchmark.
    pub created: u64,
    /// Workflows the server holds afterwards, every one of which ended `succeeded`.
    pub stored: u64,
    /// Workflows still active, and no longer moving, well after the load stopped.
    pub stranded: u64,
    /// Workflows that did not end `succeeded` (or were answered 201 and are missing);
    /// includes the stranded ones.
    pub lost: u64,
}

/// How long the set of active workflows may stay unchanged before the ones left count as
/// stranded.
const STALL: Duration = Duration::from_secs(10);

/// Waits until no workflow is active, or until the active ones have not changed for
/// [`STALL`]; returns how many are left.
async fn settle(api: &Api, limit: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + limit;
    let mut last = usize::MAX;
    let mut since = Instant::now();
    loop {
        let active = api.workflows(Some(true)).await?.len();
        if active == 0 {
            return Ok(0);
        }
        if active != last {
            last = active;
            since = Instant::now();
        } else if since.elapsed() > STALL || Instant::now() > deadline {
            return Ok(active as u64);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `wrk` is on the PATH.
pub fn wrk_available() -> bool {
    Command::new("wrk")
        .arg("--version")
        .output()
        .is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty())
}

/// The Lua script for the run benchmark: POSTs the one-task graph (not bound to a node, so
/// there is no 409) and counts the 201 answers over every thread.
const RUN_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = '{"name": "Bench.One"}'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) created = 0 end
function response(status, headers, body)
  if status == 201 then created = created + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("created") end
  io.write(string.format("created: %d\n", total))
end
"#;

pub fn api(
    backend: Backend,
    dir: &Path,
    log: &Path,
    load: Load,
    limit: Duration,
) -> anyhow::Result<ApiResult> {
    let script = dir.with_extension("run.lua");
    std::fs::write(&script, RUN_SCRIPT)?;
    // The default (TLS, a token on every call), then the same binary with both off, on a
    // fresh data directory: the difference is what security costs.
    let secure = measure(backend, &dir.join("secure"), log, load, limit, &[], &script)?;
    let off = [
        ("METALGRAPH_SECURITY_TLS", "false".to_owned()),
        ("METALGRAPH_SECURITY_AUTH", "false".to_owned()),
    ];
    let plain = measure(backend, &dir.join("plain"), log, load, limit, &off, &script)?;
    let _ = std::fs::remove_file(&script);
    Ok(ApiResult {
        load,
        secure,
        plain,
    })
}

fn measure(
    backend: Backend,
    dir: &Path,
    log: &Path,
    load: Load,
    limit: Duration,
    env: &[(&str, String)],
    script: &Path,
) -> anyhow::Result<Measured> {
    runtime()?.block_on(async {
        let (server, _) = Server::start(backend, dir, log, env, limit)?;
        let api = server.api()?;
        api.put_graph(&graphs::one()).await?;
        let id = api.run(graphs::ONE).await?;
        wait_finished(&api, &id, limit).await?;

        let base = format!("{}/api/2.0", server.base);
        let (get, _) = {
            let url = format!("{base}/workflows/{id}");
            let token = server.token.clone();
            tokio::task::spawn_blocking(move || wrk(load, &url, token.as_deref(), None)).await??
        };
        let (run, created) = {
            let url = format!("{base}/workflows");
            let script = script.to_owned();
            let token = server.token.clone();
            tokio::task::spawn_blocking(move || wrk(load, &url, token.as_deref(), Some(&script)))
                .await??
        };
        let created = created.context("wrk did not report the 201 count")?;

        // Every workflow the run benchmark created must end succeeded, none lost. Workflows
        // still active once nothing has moved for `STALL` are stranded: stored, but never
        // run.
        let stranded = settle(&api, limit).await?;
        let all = api.workflows(None).await?;
        let succeeded = all.iter().filter(|w| w["status"] == "succeeded").count() as u64;
        // `wrk` stops reading at the deadline, so the server may have created a few
        // workflows whose answers were never counted; fewer than counted would be a loss.
        let stored = all.len() as u64 - 1;
        let lost = created.saturating_sub(stored) + (all.len() as u64 - succeeded);
        server.terminate(Duration::from_secs(30))?;
        Ok(Measured {
            get,
            run,
            created,
            stored,
            stranded,
            lost,
        })
    })
}

async fn wait_finished(api: &Api, id: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let w = api.workflow(id).await?;
        match w["status"].as_str() {
            Some("succeeded") => return Ok(()),
            Some("failed" | "cancelled") => bail!("workflow {id} ended {}", w["status"]),
            _ if Instant::now() > deadline => bail!("workflow {id} did not finish"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Runs `wrk --latency` and parses what it prints; with a script, also the `created:` line
/// the script writes.
fn wrk(
    load: Load,
    url: &str,
    token: Option<&str>,
    script: Option<&Path>,
) -> anyhow::Result<(WrkResult, Option<u64>)> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", load.threads));
    if let Some(token) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    cmd.arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.seconds))
        .arg("--latency");
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(url);
    let out = cmd.output().context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk failed: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).map_err(|e| e.context(format!("cannot read wrk's output:\n{text}")))
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(text: &str) -> anyhow::Result<(WrkResult, Option<u64>)> {
    let mut requests = None;
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    let mut created = None;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => p50 = Some(parse_latency(v)?),
            ["99%", v] => p99 = Some(parse_latency(v)?),
            [n, "requests", "in", ..] => requests = Some(n.parse::<u64>()?),
            ["Requests/sec:", v] => rps = Some(v.parse::<f64>()?),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>()?,
            ["created:", n] => created = Some(n.parse::<u64>()?),
            ["Socket", "errors:", rest @ ..] => {
                // `Socket errors: connect 0, read 0, write 0, timeout 0`
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        errors += n.trim_end_matches(',').parse::<u64>()?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok((
        WrkResult {
            requests: requests.context("no request count")?,
            rps: rps.context("no Requests/sec")?,
            p50: p50.context("no 50% latency")?,
            p99: p99.context("no 99% latency")?,
            errors,
        },
        created,
    ))
}

/// `wrk` latencies: `812.00us`, `1.23ms`, `2.00s`, `1.5m`.
fn parse_latency(v: &str) -> anyhow::Result<Duration> {
    let split = v
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("latency {v:?} has no unit"))?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse()?;
    let secs = match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("latency {v:?} has an unknown unit"),
    };
    Ok(Duration::from_secs_f64(secs))
}
