//! Chain and fan-out on PostgreSQL with replicas: `R` engines in one process, each with a
//! store of its own (its own connection pool, as separate processes would have) on one
//! database schema, each holding its share of the partitions under leases
//! (`Ownership::Leased`, default lease timings). The run starts once the partitions are
//! spread; runs are submitted round-robin through the replicas, and any replica's event
//! stream carries every replica's events (the sequencer numbers them into one log that
//! each replica follows).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use metalgraph_engine::ownership::{LeaseTimings, Leases, Ownership, PARTITIONS, SEQUENCER};
use metalgraph_engine::{Engine, EngineOptions, RunRequest};
use metalgraph_store::{Backend, Store};
use tokio_util::sync::CancellationToken;

use crate::graphs;
use crate::inproc::{check_succeeded, load_nodes, runtime, submit, tally, wait_for, watch};
use crate::metered::{Meter, Metered, MeteredStore};
use crate::util::{reset_peak_rss, rss};

/// How long the partitions may take to spread over the replicas. With the default
/// timings a replica looks for free partitions every 2 s, so a few rounds are enough.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// One replica's part of a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Share {
    /// Partitions held when the timed run began (of 64 and the sequencer's).
    pub partitions: usize,
    /// Whether it held the sequencer's partition (it numbered every replica's events).
    pub sequencer: bool,
    /// Its store's commits during the run: its workflows' steps, its runs' creations,
    /// lease renewals, and the sequencer's pages on the one that holds it.
    pub store: Metered,
}

/// What the chain on replicas measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicaChainResult {
    pub replicas: usize,
    pub tasks: usize,
    /// Which replica drove the chain (it was submitted through replica 0): one workflow
    /// runs on the one owner of its partition, whatever the number of replicas.
    pub owner: usize,
    /// From the run request to the commit that finished the workflow (its record's
    /// `finished_at`, in ms).
    #[serde(with = "crate::util::secs")]
    pub wall: Duration,
    #[serde(with = "crate::util::secs")]
    pub per_task: Duration,
    /// From the run request until replica 0's event stream showed the workflow's end.
    #[serde(with = "crate::util::secs")]
    pub seen: Duration,
    /// From starting the replicas until each held its share (not in the figures).
    #[serde(with = "crate::util::secs")]
    pub settle: Duration,
    /// Whether any partition changed hands during the run (it should not).
    pub moved: bool,
    pub shares: Vec<Share>,
    /// Every replica's commits summed.
    pub store: Metered,
}

/// What the fan-out on replicas measured.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReplicaFanOutResult {
    pub replicas: usize,
    pub workflows: usize,
    pub tasks_per_workflow: usize,
    pub tasks: usize,
    #[serde(with = "crate::util::secs")]
    pub settle: Duration,
    /// Registering the nodes (through replica 0; not in the figures).
    #[serde(with = "crate::util::secs")]
    pub node_load: Duration,
    /// From the first run request until every run request had returned.
    #[serde(with = "crate::util::secs")]
    pub accept_wall: Duration,
    /// From the first run request until replica 0's stream had shown every workflow's end.
    #[serde(with = "crate::util::secs")]
    pub wall: Duration,
    /// From the first run request to the last commit that finished a workflow (the
    /// latest `finished_at`): `wall` less the time the last events took to be numbered
    /// and followed.
    #[serde(with = "crate::util::secs")]
    pub committed_wall: Duration,
    pub tasks_per_sec: f64,
    /// The whole process's resident memory (all replicas) when the run began, and its peak.
    pub rss_before: Option<u64>,
    pub peak_rss: Option<u64>,
    /// Whether the peak was measured for this run alone (the kernel let us reset it).
    pub peak_is_scenario_only: bool,
    pub succeeded: usize,
    pub lost: usize,
    /// Whether the event stream lagged, so that the end was found by polling the store.
    pub polled: bool,
    pub moved: bool,
    pub shares: Vec<Share>,
    pub store: Metered,
}

/// One replica: an engine on its own store.
struct Replica {
    engine: Engine,
    leases: Arc<Leases>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), metalgraph_engine::Error>>,
    store: Arc<dyn Store>,
    meter: Arc<Meter>,
}

/// `R` replicas on one database.
struct Replicas {
    all: Vec<Replica>,
}

impl Replicas {
    /// Starts `n` replicas on the PostgreSQL schema of `dir`, each with the bench `graphs`,
    /// and waits until the partitions are spread. Returns them and how long that took.
    async fn start(
        dir: &Path,
        n: usize,
        graphs: &[serde_json::Value],
    ) -> anyhow::Result<(Replicas, Duration)> {
        if n == 0 {
            bail!("at least one replica is needed");
        }
        let library = graphs::library(graphs)?;
        let begun = Instant::now();
        let mut all = Vec::with_capacity(n);
        for i in 0..n {
            // A store of its own: its own connection pool, on the same schema (the
            // directory remembers which).
            let raw = {
                let dir = dir.to_owned();
                tokio::task::spawn_blocking(move || {
                    crate::util::open_store(Backend::Postgres, &dir)
                })
                .await??
            };
            let (store, meter) = MeteredStore::wrap(raw);
            let leases = Leases::new(
                store.clone(),
                format!("bench-replica-{i}"),
                LeaseTimings::default(),
            );
            let mut opts =
                EngineOptions::new(store.clone(), metalgraph::server::jobs(), library.clone());
            opts.ownership = Ownership::Leased(leases.clone());
            let stop = CancellationToken::new();
            let (engine, task) = Engine::start(opts, stop.clone());
            all.push(Replica {
                engine,
                leases,
                stop,
                task,
                store,
                meter,
            });
        }
        let replicas = Replicas { all };
        replicas.settle(begun).await?;
        Ok((replicas, begun.elapsed()))
    }

    /// Waits until the replicas between them hold every partition, none above its share
    /// (as `engine/tests/replicas.rs` does).
    async fn settle(&self, begun: Instant) -> anyhow::Result<()> {
        let all = PARTITIONS as usize + 1;
        let share = all.div_ceil(self.all.len());
        loop {
            let held = self.held();
            let total: usize = held.iter().map(Vec::len).sum();
            if total == all && held.iter().all(|h| h.len() <= share) {
                return Ok(());
            }
            if begun.elapsed() > SETTLE_LIMIT {
                let counts: Vec<usize> = held.iter().map(Vec::len).collect();
                bail!(
                    "the partitions did not spread over {} replicas within {SETTLE_LIMIT:?}: \
                     they hold {counts:?} of {all}",
                    self.all.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The partitions each replica holds now.
    fn held(&self) -> Vec<Vec<u32>> {
        self.all.iter().map(|r| r.leases.partitions()).collect()
    }

    fn first(&self) -> &Replica {
        &self.all[0]
    }

    fn engines(&self) -> Vec<Engine> {
        self.all.iter().map(|r| r.engine.clone()).collect()
    }

    fn meters(&self) -> Vec<Metered> {
        self.all.iter().map(|r| r.meter.snapshot()).collect()
    }

    /// Each replica's share of the run: the partitions it held at the start, and its
    /// commits since `before`.
    fn shares(&self, held: &[Vec<u32>], before: &[Metered]) -> Vec<Share> {
        self.all
            .iter()
            .zip(held)
            .zip(before)
            .map(|((r, held), before)| Share {
                partitions: held.len(),
                sequencer: held.contains(&SEQUENCER),
                store: r.meter.snapshot().since(before),
            })
            .collect()
    }

    /// Which replica holds partition `p` now.
    fn owner_of(&self, p: u32) -> anyhow::Result<usize> {
        self.all
            .iter()
            .position(|r| r.leases.partitions().contains(&p))
            .with_context(|| format!("no replica holds partition {p}"))
    }

    /// Stops every scheduler, then closes every store, as `metalgraph serve` does.
    async fn shutdown(self) -> anyhow::Result<()> {
        for r in &self.all {
            r.stop.cancel();
        }
        for r in self.all {
            r.task.await??;
            drop(r.engine);
            let store = r.store;
            tokio::task::spawn_blocking(move || store.close()).await??;
        }
        Ok(())
    }
}

/// Sums the replicas' commits.
fn total(shares: &[Share]) -> Metered {
    shares.iter().fold(Metered::default(), |sum, s| Metered {
        commits: sum.commits + s.store.commits,
        ops: sum.ops + s.store.ops,
        commit_time: sum.commit_time + s.store.commit_time,
    })
}

/// Now, in ms since the epoch: the engine's clock (`SystemClock`), which stamps
/// `finished_at`.
fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// One workflow of `n` sequential `noop` tasks on `replicas` replicas, submitted through
/// replica 0 and driven by the owner of its partition, timed from the run request to the
/// commit that finished it.
pub fn chain(
    dir: &Path,
    replicas: usize,
    n: usize,
    limit: Duration,
) -> anyhow::Result<ReplicaChainResult> {
    runtime()?.block_on(async {
        let (set, settle) = Replicas::start(dir, replicas, &[graphs::chain(n)]).await?;
        let held = set.held();
        let engine = &set.first().engine;
        let mut events = engine.subscribe();
        let before = set.meters();
        let start_ms = epoch_ms();
        let start = Instant::now();
        let view = engine
            .run(RunRequest {
                graph: graphs::CHAIN.into(),
                ..RunRequest::default()
            })
            .await?;
        let id = view.instance_id;
        tokio::time::timeout(limit, wait_for(engine, &mut events, &id))
            .await
            .with_context(|| {
                format!(
                    "the chain of {n} tasks on {replicas} replicas did not finish within {limit:?}"
                )
            })??;
        let seen = start.elapsed();
        let shares = set.shares(&held, &before);
        check_succeeded(engine, &id, n).await?;
        let (rec, _) = engine
            .load(&id)
            .await?
            .with_context(|| format!("workflow {id} was lost"))?;
        let finished = rec
            .finished_at
            .with_context(|| format!("workflow {id} has no finish time"))?;
        let wall = Duration::from_millis(finished.saturating_sub(start_ms));
        let owner = set.owner_of(rec.partition())?;
        let moved = set.held() != held;
        set.shutdown().await?;
        Ok(ReplicaChainResult {
            replicas,
            tasks: n,
            owner,
            wall,
            per_task: wall / u32::try_from(n.max(1)).unwrap_or(u32::MAX),
            seen,
            settle,
            moved,
            store: total(&shares),
            shares,
        })
    })
}

/// `workflows` workflows of the fan-out graph (`width + 2` tasks each), one per simulated
/// node, on `replicas` replicas: run `i` is submitted through replica `i % replicas` by
/// the same 64 concurrent clients as the one-process fan-out, timed until replica 0's
/// stream has shown every workflow's end.
pub fn fan_out(
    dir: &Path,
    replicas: usize,
    workflows: usize,
    width: usize,
    limit: Duration,
) -> anyhow::Result<ReplicaFanOutResult> {
    runtime()?.block_on(async {
        let (set, settle) = Replicas::start(dir, replicas, &[graphs::fan_out(width)]).await?;
        let first = set.first();
        let started = Instant::now();
        load_nodes(&first.engine, first.store.clone(), workflows, 200).await?;
        let node_load = started.elapsed();

        let peak_is_scenario_only = reset_peak_rss();
        let rss_before = rss().map(|(now, _)| now);
        let held = set.held();
        let events = first.engine.subscribe();
        let before = set.meters();
        let start_ms = epoch_ms();
        let start = Instant::now();
        let clients = submit(&set.engines(), workflows);
        let (ids, accept_wall, polled) = tokio::time::timeout(
            limit,
            watch(clients, events, first.store.clone(), workflows, start),
        )
        .await
        .with_context(|| {
            format!(
                "the fan-out of {workflows} workflows on {replicas} replicas did not finish \
                 within {limit:?}"
            )
        })??;
        let wall = start.elapsed();
        let peak_rss = rss().map(|(_, peak)| peak);
        let shares = set.shares(&held, &before);
        let moved = set.held() != held;

        let tasks_per_workflow = width + 2;
        let (succeeded, lost) = tally(&first.engine, &ids, workflows, tasks_per_workflow).await;
        let mut last_finish = start_ms;
        for id in &ids {
            if let Some((rec, _)) = first.engine.load(id).await?
                && let Some(at) = rec.finished_at
            {
                last_finish = last_finish.max(at);
            }
        }
        set.shutdown().await?;
        let tasks = workflows * tasks_per_workflow;
        Ok(ReplicaFanOutResult {
            replicas,
            workflows,
            tasks_per_workflow,
            tasks,
            settle,
            node_load,
            accept_wall,
            wall,
            committed_wall: Duration::from_millis(last_finish - start_ms),
            tasks_per_sec: tasks as f64 / wall.as_secs_f64(),
            rss_before,
            peak_rss,
            peak_is_scenario_only,
            succeeded,
            lost,
            polled,
            moved,
            store: total(&shares),
            shares,
        })
    })
}
