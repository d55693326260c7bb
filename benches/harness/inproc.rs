//! The in-process scenarios, chain and fan-out: the engine library, with the jobs and the
//! shipped library the binary uses, on a real store in a real directory, every transition
//! committed durably before it takes effect.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_engine::nodes::{Node, Obm, ObmConfig};
use metalgraph_engine::{
    Engine, EngineOptions, Event, Library, Numbered, RunRequest, TaskState, WorkflowStatus, keys,
};
use metalgraph_store::{Backend, Batch, Store};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::graphs;
use crate::metered::{Meter, Metered, MeteredStore};
use crate::util::{reset_peak_rss, rss};

/// A fresh multi-threaded runtime, one per scenario, so that nothing one scenario spawned
/// outlives it and runs during the next.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot build a tokio runtime")
}

/// A running engine on a metered store.
struct Running {
    engine: Engine,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), metalgraph_engine::Error>>,
    store: Arc<dyn Store>,
    meter: Arc<Meter>,
}

impl Running {
    async fn start(backend: Backend, dir: &Path, library: Library) -> anyhow::Result<Running> {
        let raw = {
            let dir = dir.to_owned();
            tokio::task::spawn_blocking(move || crate::util::open_store(backend, &dir)).await??
        };
        let (store, meter) = MeteredStore::wrap(raw);
        let opts = EngineOptions::new(store.clone(), metalgraph::server::jobs(), library);
        let stop = CancellationToken::new();
        let (engine, task) = Engine::start(opts, stop.clone());
        Ok(Running {
            engine,
            stop,
            task,
            store,
            meter,
        })
    }

    /// Stops the scheduler, then closes the store, as `metalgraph serve` does.
    async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        drop(self.engine);
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close()).await??;
        Ok(())
    }
}

/// What the chain scenario measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChainResult {
    pub tasks: usize,
    /// From the run request to the commit that finished the workflow.
    #[serde(with = "crate::util::secs")]
    pub wall: Duration,
    #[serde(with = "crate::util::secs")]
    pub per_task: Duration,
    /// The store commits made during the run.
    pub store: Metered,
}

/// One workflow of `n` sequential `noop` tasks, timed from `run` to the committed end.
pub fn chain(
    backend: Backend,
    dir: &Path,
    n: usize,
    limit: Duration,
) -> anyhow::Result<ChainResult> {
    runtime()?.block_on(async {
        let running = Running::start(backend, dir, graphs::library(&[graphs::chain(n)])?).await?;
        let mut events = running.engine.subscribe();
        let before = running.meter.snapshot();
        let start = Instant::now();
        let view = running
            .engine
            .run(RunRequest {
                graph: graphs::CHAIN.into(),
                ..RunRequest::default()
            })
            .await?;
        let id = view.instance_id;
        tokio::time::timeout(limit, wait_for(&running.engine, &mut events, &id))
            .await
            .with_context(|| format!("the chain of {n} tasks did not finish within {limit:?}"))??;
        let wall = start.elapsed();
        let store = running.meter.snapshot().since(&before);
        check_succeeded(&running.engine, &id, n).await?;
        running.shutdown().await?;
        Ok(ChainResult {
            tasks: n,
            wall,
            per_task: wall / u32::try_from(n.max(1)).unwrap_or(u32::MAX),
            store,
        })
    })
}

/// Waits for workflow `id` to end, by its terminal event or, if the event channel lagged,
/// by reading its state.
pub async fn wait_for(
    engine: &Engine,
    events: &mut tokio::sync::broadcast::Receiver<metalgraph_engine::Numbered>,
    id: &str,
) -> anyhow::Result<WorkflowStatus> {
    loop {
        match events.recv().await {
            Ok((_, ev)) => {
                if let Some(status) = ev.ended().filter(|_| ev.workflow_id() == id) {
                    return Ok(status);
                }
            }
            Err(RecvError::Lagged(_)) => {
                if let Some(v) = engine.get(id).await?
                    && v.status.is_terminal()
                {
                    return Ok(v.status);
                }
            }
            Err(RecvError::Closed) => bail!("the engine stopped while workflow {id} ran"),
        }
    }
}

/// Fails unless workflow `id` exists, succeeded, and has `tasks` tasks that all succeeded.
pub async fn check_succeeded(engine: &Engine, id: &str, tasks: usize) -> anyhow::Result<()> {
    let view = engine
        .get(id)
        .await?
        .with_context(|| format!("workflow {id} was lost"))?;
    if view.status != WorkflowStatus::Succeeded {
        bail!("workflow {id} ended {} ({:?})", view.status, view.error);
    }
    let ok = view
        .tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .count();
    if ok != tasks || view.tasks.len() != tasks {
        bail!(
            "workflow {id} has {ok} succeeded tasks of {}, expected {tasks}",
            view.tasks.len()
        );
    }
    Ok(())
}

/// What the fan-out scenario measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FanOutResult {
    pub workflows: usize,
    pub tasks_per_workflow: usize,
    pub tasks: usize,
    /// Writing every node record, in batches of 1,000 (not part of `wall`).
    #[serde(with = "crate::util::secs")]
    pub node_load: Duration,
    /// How many nodes were registered one commit each through `Nodes::create`, and how
    /// long that took (not part of `wall`).
    pub node_create_sample: usize,
    #[serde(with = "crate::util::secs")]
    pub node_create_time: Duration,
    /// From the first run request until every run request had returned.
    #[serde(with = "crate::util::secs")]
    pub accept_wall: Duration,
    /// From the first run request until the commit that finished the last workflow.
    #[serde(with = "crate::util::secs")]
    pub wall: Duration,
    pub tasks_per_sec: f64,
    /// Resident memory when the first run request was made, and the peak during the run.
    pub rss_before: Option<u64>,
    pub peak_rss: Option<u64>,
    /// Whether the peak was measured for this scenario alone (the kernel let us reset it).
    pub peak_is_scenario_only: bool,
    pub succeeded: usize,
    /// Workflows that were created but could not be read back afterwards.
    pub lost: usize,
    /// Whether the event stream lagged, so that the end was detected by polling the store.
    pub polled: bool,
    pub store: Metered,
}

/// How many run requests are in flight at once during the fan-out, like that many API
/// clients submitting work.
pub const FAN_OUT_CLIENTS: usize = 64;

/// The id of simulated node `i`.
pub fn node_id(i: usize) -> String {
    format!("sim-node-{i:05}")
}

fn sim_node(i: usize) -> Node {
    let id = node_id(i);
    Node {
        id: id.clone(),
        name: id,
        identifiers: Vec::new(),
        node_type: "compute".to_owned(),
        tags: vec!["bench".to_owned()],
        obms: vec![Obm {
            service: "sim-obm-service".to_owned(),
            config: ObmConfig {
                host: "sim".to_owned(),
                ..ObmConfig::default()
            },
        }],
        created_at: String::new(),
        updated_at: String::new(),
    }
}

/// Registers `count` simulated nodes: the first `sample` one commit each through
/// `Nodes::create` (the API's path), the rest written in batches of 1,000 records.
pub async fn load_nodes(
    engine: &Engine,
    store: Arc<dyn Store>,
    count: usize,
    sample: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let sample = sample.min(count);
    let start = Instant::now();
    for i in 0..sample {
        engine.nodes().create(sim_node(i)).await?;
    }
    let create_time = start.elapsed();
    let start = Instant::now();
    let mut i = sample;
    while i < count {
        let mut batch = Batch::new();
        for j in i..(i + 1000).min(count) {
            let node = sim_node(j);
            batch.put(keys::NODES, node.id.as_bytes(), serde_json::to_vec(&node)?);
        }
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.commit(batch)).await??;
        i += 1000;
    }
    Ok((create_time, start.elapsed()))
}

/// `workflows` workflows of the fan-out graph (`width + 2` tasks each), one per simulated
/// node, submitted by [`FAN_OUT_CLIENTS`] concurrent clients, timed until every one of
/// them has ended.
pub fn fan_out(
    backend: Backend,
    dir: &Path,
    workflows: usize,
    width: usize,
    limit: Duration,
) -> anyhow::Result<FanOutResult> {
    runtime()?.block_on(async {
        let lib = graphs::library(&[graphs::fan_out(width)])?;
        let running = Running::start(backend, dir, lib).await?;
        let (node_create_time, node_load) =
            load_nodes(&running.engine, running.store.clone(), workflows, 200).await?;
        let node_create_sample = workflows.min(200);

        let peak_is_scenario_only = reset_peak_rss();
        let rss_before = rss().map(|(now, _)| now);
        let events = running.engine.subscribe();
        let before = running.meter.snapshot();
        let start = Instant::now();
        let clients = submit(std::slice::from_ref(&running.engine), workflows);
        let (ids, accept_wall, polled) = tokio::time::timeout(
            limit,
            watch(clients, events, running.store.clone(), workflows, start),
        )
        .await
        .with_context(|| {
            format!("the fan-out of {workflows} workflows did not finish within {limit:?}")
        })??;
        let wall = start.elapsed();
        let peak_rss = rss().map(|(_, peak)| peak);
        let store_stats = running.meter.snapshot().since(&before);

        let tasks_per_workflow = width + 2;
        let (succeeded, lost) = tally(&running.engine, &ids, workflows, tasks_per_workflow).await;
        running.shutdown().await?;
        let tasks = workflows * tasks_per_workflow;
        Ok(FanOutResult {
            workflows,
            tasks_per_workflow,
            tasks,
            node_load,
            node_create_sample,
            node_create_time,
            accept_wall,
            wall,
            tasks_per_sec: tasks as f64 / wall.as_secs_f64(),
            rss_before,
            peak_rss,
            peak_is_scenario_only,
            succeeded,
            lost,
            polled,
            store: store_stats,
        })
    })
}

/// Submits `workflows` runs of the fan-out graph, run `i` on simulated node `i` through
/// `engines[i % engines.len()]` (round-robin when there are several replicas), from
/// [`FAN_OUT_CLIENTS`] concurrent clients. Each client returns the ids it created.
pub fn submit(engines: &[Engine], workflows: usize) -> JoinSet<anyhow::Result<Vec<String>>> {
    let next = Arc::new(AtomicUsize::new(0));
    let engines: Arc<[Engine]> = engines.into();
    let mut clients = JoinSet::new();
    for _ in 0..FAN_OUT_CLIENTS.min(workflows.max(1)) {
        let engines = engines.clone();
        let next = next.clone();
        clients.spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= workflows {
                    return Ok(ids);
                }
                let view = engines[i % engines.len()]
                    .run(RunRequest {
                        graph: graphs::FAN_OUT.into(),
                        node: Some(node_id(i)),
                        ..RunRequest::default()
                    })
                    .await
                    .with_context(|| format!("running the fan-out graph on {}", node_id(i)))?;
                ids.push(view.instance_id);
            }
        });
    }
    clients
}

/// Collects the `clients`' workflow ids and waits until `workflows` fan-out workflows have
/// ended by their terminal events in `events`, or, if the stream lagged, until `store`'s
/// `active` index is empty. Returns the ids, when the last run was accepted (since
/// `start`), and whether the end was found by polling.
pub async fn watch(
    mut clients: JoinSet<anyhow::Result<Vec<String>>>,
    mut events: broadcast::Receiver<Numbered>,
    store: Arc<dyn Store>,
    workflows: usize,
    start: Instant,
) -> anyhow::Result<(Vec<String>, Duration, bool)> {
    let mut ids = Vec::with_capacity(workflows);
    let mut accept_wall = None;
    let mut ended = 0usize;
    let mut polled = false;
    loop {
        if accept_wall.is_some() && (ended >= workflows || polled) {
            if !polled {
                break;
            }
            let store = store.clone();
            let active = tokio::task::spawn_blocking(move || {
                store.scan_prefix(keys::ACTIVE, b"").map(|v| v.len())
            })
            .await??;
            if active == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        tokio::select! {
            joined = clients.join_next(), if accept_wall.is_none() => match joined {
                Some(r) => ids.extend(r??),
                None => accept_wall = Some(start.elapsed()),
            },
            ev = events.recv(), if !polled => match ev.as_ref().map(|(_, ev)| &**ev) {
                Ok(Event::Workflow { graph, status, .. })
                    if graph == graphs::FAN_OUT && status.is_terminal() => ended += 1,
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => polled = true,
                Err(RecvError::Closed) => bail!("the engine stopped during the fan-out"),
            },
        }
    }
    Ok((ids, accept_wall.unwrap_or_default(), polled))
}

/// Reads every workflow of `ids` back: how many succeeded with all `tasks` tasks
/// succeeded, and how many were lost (unreadable, or of `workflows` never created).
pub async fn tally(
    engine: &Engine,
    ids: &[String],
    workflows: usize,
    tasks: usize,
) -> (usize, usize) {
    let mut succeeded = 0;
    let mut lost = 0;
    for id in ids {
        match check_succeeded(engine, id, tasks).await {
            Ok(()) => succeeded += 1,
            Err(_) if engine.get(id).await.ok().flatten().is_none() => lost += 1,
            Err(_) => {}
        }
    }
    (succeeded, lost + workflows.saturating_sub(ids.len()))
}
