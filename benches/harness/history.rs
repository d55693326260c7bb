//! The history scenario: a store holding many nodes and finished workflows — a year of a
//! datacentre — written directly (batched, not timed), then a real `metalgraph serve` on it:
//! its start-up time, its RSS at rest, and the latency of the lists an operator uses
//! (`GET /workflows?$top=100`: the first page, a deep page through a cursor, one node's;
//! `GET /nodes?$top=100`; `GET /workflows/{id}`). The same is measured on a small store
//! (1,000 workflows), so that flatness shows as a ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_engine::nodes::{Node, Obm, ObmConfig};
use metalgraph_engine::workflow::{TaskRecord, WorkflowRecord};
use metalgraph_engine::{Engine, EngineOptions, RunRequest, keys};
use metalgraph_store::{Backend, Batch, MemStore, Store};
use tokio_util::sync::CancellationToken;

use crate::graphs;
use crate::inproc::runtime;
use crate::server::Server;

/// The small store every large one is compared with.
pub const BASELINE_WORKFLOWS: usize = 1000;
const BASELINE_NODES: usize = 100;

/// How many requests each latency is the p50/p99 of.
const SAMPLES: usize = 200;

/// p50 and p99 of one request kind.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Latency {
    #[serde(with = "crate::util::secs")]
    pub p50: Duration,
    #[serde(with = "crate::util::secs")]
    pub p99: Duration,
}

/// One store's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryRun {
    pub workflows: usize,
    pub nodes: usize,
    /// Writing the records and their indexes (not part of any figure).
    #[serde(with = "crate::util::secs")]
    pub load: Duration,
    /// The store's size on disk.
    pub disk_bytes: u64,
    /// From spawning `serve` to its listening line (recovery included).
    #[serde(with = "crate::util::secs")]
    pub start: Duration,
    /// `serve`'s RSS after the requests.
    pub rss_bytes: u64,
    pub first_page: Latency,
    pub deep_page: Latency,
    pub node_page: Latency,
    pub nodes_page: Latency,
    pub get_one: Latency,
}

/// What the history scenario measured: the baseline and the large store.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HistoryResult {
    pub baseline: HistoryRun,
    pub large: HistoryRun,
}

pub fn history(
    backend: Backend,
    dir: &Path,
    log: &Path,
    workflows: usize,
    nodes: usize,
    limit: Duration,
) -> anyhow::Result<HistoryResult> {
    let template = runtime()?.block_on(template())?;
    let baseline = one(
        backend,
        &dir.join("baseline"),
        log,
        &template,
        BASELINE_WORKFLOWS,
        BASELINE_NODES,
        limit,
    )?;
    let large = one(
        backend,
        &dir.join("large"),
        log,
        &template,
        workflows,
        nodes,
        limit,
    )?;
    Ok(HistoryResult { baseline, large })
}

/// A finished three-task workflow, run by the engine itself, whose records every seeded
/// workflow copies.
async fn template() -> anyhow::Result<(WorkflowRecord, Vec<TaskRecord>)> {
    let lib = graphs::library(&[graphs::fan_out(1)])?;
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let opts = EngineOptions::new(store, metalgraph::server::jobs(), lib);
    let stop = CancellationToken::new();
    let (engine, task) = Engine::start(opts, stop.clone());
    let view = engine
        .run(RunRequest {
            graph: graphs::FAN_OUT.to_owned(),
            ..RunRequest::default()
        })
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let (rec, tasks) = engine
            .load(&view.instance_id)
            .await?
            .context("the template workflow is gone")?;
        if rec.status.is_terminal() {
            break (rec, tasks);
        }
        if Instant::now() > deadline {
            bail!("the template workflow did not finish");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    stop.cancel();
    task.await??;
    Ok(records)
}

fn node_id(i: usize) -> String {
    format!("node-{i:06}")
}

/// The `i`th seeded workflow's id: a UUID's shape, unique and sortable.
fn workflow_id(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", i, i)
}

/// Writes `nodes` nodes and `workflows` finished workflows spread over the last 29 days
/// (so that retention keeps them all: at most 50 per node, none older than 30 days), then
/// builds the indexes as the engine would.
fn seed(
    backend: Backend,
    dir: &Path,
    template: &(WorkflowRecord, Vec<TaskRecord>),
    workflows: usize,
    nodes: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        workflows <= nodes * 50,
        "{workflows} workflows on {nodes} nodes would pass the per-node retention of 50"
    );
    let store = crate::util::open_store(backend, dir)?;
    let mut batch = Batch::new();
    let flush = |batch: &mut Batch, force: bool| -> anyhow::Result<()> {
        if force || batch.ops.len() >= 4000 {
            store.commit(std::mem::take(batch))?;
        }
        Ok(())
    };
    for i in 0..nodes {
        let node = Node {
            id: node_id(i),
            name: node_id(i),
            identifiers: vec![format!(
                "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
                i >> 24 & 0xff,
                i >> 16 & 0xff,
                i >> 8 & 0xff,
                i & 0xff
            )],
            node_type: "compute".into(),
            tags: vec![format!("rack-{:03}", i % 500)],
            obms: vec![Obm {
                service: "sim-obm-service".into(),
                config: ObmConfig {
                    host: format!("bmc-{i:06}"),
                    ..ObmConfig::default()
                },
            }],
            created_at: metalgraph_engine::clock::now_rfc3339(),
            updated_at: metalgraph_engine::clock::now_rfc3339(),
        };
        batch.put(
            keys::NODE_IDENTS,
            node.identifiers[0].as_bytes().to_vec(),
            node.id.as_bytes().to_vec(),
        );
        batch.put(
            keys::NODES,
            node.id.as_bytes().to_vec(),
            serde_json::to_vec(&node)?,
        );
        flush(&mut batch, false)?;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let span = 29 * 86_400_000u64;
    let (rec, tasks) = template;
    // The workflows share one plan record, as the engine's would.
    let plans = metalgraph_engine::plans::Shared::default();
    for i in 0..workflows {
        let mut w = rec.clone();
        w.id = workflow_id(i);
        w.node = Some(node_id(i % nodes));
        w.created_at = now - span + (i as u64 * span) / workflows as u64;
        w.finished_at = Some(w.created_at + 1000);
        plans.write(&mut batch, &w.id, &mut w.plan, true);
        metalgraph_engine::workflow::write_workflow(&mut batch, &w);
        for (j, t) in tasks.iter().enumerate() {
            metalgraph_engine::workflow::write_task(&mut batch, &w.id, j, t);
        }
        // The plan's record is committed before a workflow shares it.
        flush(&mut batch, i == 0)?;
        plans.stored(&w.plan);
    }
    flush(&mut batch, true)?;
    metalgraph_engine::history::build_indexes(&store)?;
    store.close()?;
    Ok(())
}

fn one(
    backend: Backend,
    dir: &Path,
    log: &Path,
    template: &(WorkflowRecord, Vec<TaskRecord>),
    workflows: usize,
    nodes: usize,
    limit: Duration,
) -> anyhow::Result<HistoryRun> {
    let started = Instant::now();
    seed(backend, dir, template, workflows, nodes)?;
    let load = started.elapsed();
    let disk_bytes = du(dir);
    runtime()?.block_on(async {
        let (server, start) = Server::start(backend, dir, log, &[], limit)?;
        let http = server.http()?;
        let base = format!("{}/api/2.0", server.base);
        // A cursor half way down the list, as a client following `Link` would hold it
        // after half a million workflows.
        let mid = workflows / 2;
        let created = {
            let v: serde_json::Value = http
                .get(format!("{base}/workflows/{}", workflow_id(mid)))
                .send()
                .await?
                .json()
                .await?;
            let at = v["createdAt"].as_str().context("no createdAt")?.to_owned();
            metalgraph_engine::clock::parse_rfc3339(&at).context("a bad createdAt")?
        };
        let cursor = format!("{created:016x}.{}", workflow_id(mid));
        let node = node_id(nodes / 2);
        let first_page = measure(&http, &format!("{base}/workflows?$top=100"), 100).await?;
        let deep_page = measure(
            &http,
            &format!("{base}/workflows?$top=100&cursor={cursor}"),
            100,
        )
        .await?;
        let per_node = (workflows / nodes).min(100);
        let node_page = measure(
            &http,
            &format!("{base}/workflows?node={node}&$top=100"),
            per_node,
        )
        .await?;
        let nodes_page = measure(&http, &format!("{base}/nodes?$top=100"), 100.min(nodes)).await?;
        let get_one = measure(&http, &format!("{base}/workflows/{}", workflow_id(mid)), 0).await?;
        let rss_bytes = crate::util::rss_of(server.pid()).context("cannot read serve's RSS")?;
        server.terminate(limit)?;
        Ok(HistoryRun {
            workflows,
            nodes,
            load,
            disk_bytes,
            start,
            rss_bytes,
            first_page,
            deep_page,
            node_page,
            nodes_page,
            get_one,
        })
    })
}

/// The p50 and p99 of [`SAMPLES`] sequential GETs of `url`, each checked: a 200 with
/// `items` entries (a list) or any 200 (`items` = 0, a single object).
async fn measure(http: &reqwest::Client, url: &str, items: usize) -> anyhow::Result<Latency> {
    let mut took = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let start = Instant::now();
        let resp = http.get(url).send().await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        took.push(start.elapsed());
        if !status.is_success() {
            bail!("GET {url}: {status} {body}");
        }
        if items > 0 && body.as_array().map(Vec::len) != Some(items) {
            bail!(
                "GET {url}: expected {items} items, got {:?}",
                body.as_array().map(Vec::len)
            );
        }
    }
    took.sort();
    Ok(Latency {
        p50: took[SAMPLES / 2],
        p99: took[SAMPLES * 99 / 100],
    })
}

/// The bytes under `dir`.
fn du(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}
