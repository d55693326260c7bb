//! The engine's public handle: a cheap, cloneable [`Engine`] through which callers run,
//! cancel, read and delete workflows, reach definitions and nodes, and deliver node
//! callbacks.
//!
//! Every method that touches the store is `async` and does that work on tokio's blocking
//! pool, so no caller can stall the async runtime on a disk read or an `fsync`. Workflow
//! state changes only in the scheduler (`scheduler/`); this handle sends it messages and,
//! where a caller must know the change is durable, waits for the scheduler's answer, which
//! comes after the commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalgraph_store::{Batch, Store};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::batches::Batches;
use crate::clock::{Clock, SystemClock};
use crate::definitions::{Definitions, Library, MAX_SUBGRAPH_DEPTH};
use crate::endpoints::Endpoints;
use crate::error::{Error, blocking};
use crate::events::{EventLog, Numbered};
use crate::history::{ListFilter, Page, Records};
use crate::job::{
    BoxFuture, Callback, JobContext, JobError, JobRegistry, JobResult, JobServices, Options,
};
use crate::keys;
use crate::model::{RunOptions, TaskState, WorkflowStatus};
use crate::nodes::Nodes;
use crate::notify::{NodeCap, NodeCaps, Waiter, Waiters};
use crate::ownership::Ownership;
use crate::retention::{Retention, Sweep, SweepState};
use crate::scheduler::inbox;
use crate::scheduler::{Msg, Runtime};
use crate::seal::Sealer;
use crate::workflow::{
    Event, ParentRef, TaskRecord, TaskTokens, WorkflowRecord, WorkflowView, context_of,
    load_records, write_created_task, write_workflow,
};

/// Base URLs templates can render (`api.base`, `api.nodeBase`).
#[derive(Debug, Clone, Default)]
pub struct ApiUrls {
    /// The management API, e.g. `http://127.0.0.1:8080/api/2.0`.
    pub base: String,
    /// The node-facing API, e.g. `http://10.0.0.1:8090/api/2.0`, empty when off.
    pub node_base: String,
}

impl ApiUrls {
    /// The `api` variable of files rendered for nodes (profiles, templates, configuration
    /// media): `base`, `nodeBase` (without a trailing slash) and `files`, the node-facing
    /// URL of the files directory (`http://10.0.0.1:8090/files`; empty when the node-facing
    /// API is off or its base does not end in `/api/2.0`).
    pub fn node_vars(&self) -> Value {
        let node_base = self.node_base.trim_end_matches('/');
        let files = node_base
            .strip_suffix("/api/2.0")
            .map(|root| format!("{root}/files"))
            .unwrap_or_default();
        json!({"base": self.base, "nodeBase": node_base, "files": files})
    }

    /// RackHD's names for the same places, as its templates use them: `api` (`server`, the
    /// node-facing origin; `base`, its `/api/current`; `templates`, `profiles` and `files`)
    /// and `file` (`server`: the files directory, where RackHD kept OS repositories). They
    /// are node-facing URLs, or the management API's when the node-facing API is off.
    pub fn rackhd_vars(&self) -> (Value, Value) {
        let node_base = self.node_base.trim_end_matches('/');
        let base = if node_base.is_empty() {
            self.base.trim_end_matches('/')
        } else {
            node_base
        };
        let root = base.strip_suffix("/api/2.0").unwrap_or(base);
        let current = format!("{root}/api/current");
        let files = format!("{root}/files");
        (
            json!({
                "server": root,
                "base": current,
                "templates": format!("{current}/templates"),
                "profiles": format!("{current}/profiles"),
                "files": files,
            }),
            json!({"server": files}),
        )
    }
}

/// How an engine is built.
pub struct EngineOptions {
    pub store: Arc<dyn Store>,
    pub jobs: JobRegistry,
    pub library: Library,
    /// The most slot-occupying jobs that run at once; further ready tasks wait.
    pub max_running_jobs: usize,
    /// How long a cancelled or timed-out job gets to clean up before it is dropped.
    pub cancel_grace: Duration,
    pub api: ApiUrls,
    pub clock: Arc<dyn Clock>,
    /// The most tasks a graph may have.
    pub max_tasks_per_graph: usize,
    /// Which finished workflows are removed in the background; `None` keeps them all.
    pub retention: Option<Retention>,
    /// Seals stored secrets (OBM passwords; the binary's webhook secrets); `None` stores
    /// them as given. `metalgraph serve` always has one (`<data-dir>/secret.key`).
    pub sealer: Option<Arc<Sealer>>,
    /// Who drives which workflows: this process all of them (the default), or partitions
    /// under leases when replicas share the store (`ownership.rs`).
    pub ownership: Ownership,
}

impl EngineOptions {
    pub fn new(store: Arc<dyn Store>, jobs: JobRegistry, library: Library) -> Self {
        Self {
            store,
            jobs,
            library,
            max_running_jobs: 256,
            cancel_grace: Duration::from_secs(5),
            api: ApiUrls::default(),
            clock: Arc::new(SystemClock),
            max_tasks_per_graph: crate::definitions::DEFAULT_MAX_TASKS_PER_GRAPH,
            retention: None,
            sealer: None,
            ownership: Ownership::Sole,
        }
    }
}

/// A request to run a graph.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    pub graph: String,
    pub node: Option<String>,
    pub options: RunOptions,
}

/// Where a new workflow comes from.
pub(crate) enum Origin {
    /// A caller's run request.
    Run,
    /// A `graph.run` task's subgraph, under its key in `children` (`{task id}/{retry}`).
    Child(ParentRef, String),
    /// A rerun of the failed or cancelled workflow whose records these are.
    Rerun(Box<(WorkflowRecord, Vec<TaskRecord>)>),
}

struct Inner {
    store: Arc<dyn Store>,
    defs: Definitions,
    nodes: Nodes,
    tx: mpsc::UnboundedSender<Msg>,
    /// Every committed event with its number, to subscribers (see [`Engine::subscribe`]
    /// and [`Engine::events_since`]).
    events: broadcast::Sender<Numbered>,
    /// The retained events; read from the store during recovery.
    log: Mutex<EventLog>,
    clock: Arc<dyn Clock>,
    /// False once the scheduler has stopped.
    running: AtomicBool,
    /// Why the scheduler stopped, when it stopped on a failure.
    failure: Mutex<Option<String>>,
    /// Cancelled once the scheduler has stopped, for whatever reason.
    stopped: CancellationToken,
    /// Cancelled once recovery has loaded every unfinished workflow (or the scheduler
    /// stopped): a workflow created before that could be loaded twice.
    recovered: CancellationToken,
    waiters: Arc<Waiters>,
    /// The key of node capabilities (see [`crate::notify`]).
    caps: NodeCaps,
    shutdown: CancellationToken,
    retention: Option<Retention>,
    sealer: Option<Arc<Sealer>>,
    /// Where the next retention sweep goes on.
    sweep: Mutex<SweepState>,
    /// The plans each graph stored lately, which workflows with an equal plan share.
    plans: crate::plans::Shared,
    batches: Batches,
    ownership: Ownership,
    wake: Wake,
}

/// What wakes the replica's background work early (each also runs on a timer).
#[derive(Default)]
pub(crate) struct Wake {
    /// The scheduler: requests were committed to the inbox.
    pub(crate) inbox: Arc<tokio::sync::Notify>,
    /// The sequencer: events were staged.
    pub(crate) staged: Arc<tokio::sync::Notify>,
    /// The log's follower: events were numbered.
    pub(crate) numbered: Arc<tokio::sync::Notify>,
}

impl Inner {
    /// Retains a committed event and sends it to every subscriber, under the log's lock so
    /// that a stream that reads the retained events and then subscribes misses none.
    fn publish(&self, n: u64, ev: Arc<Event>) {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.push(n, ev.clone());
        let _ = self.events.send((n, ev));
    }
}

/// A cheap, cloneable handle on a running engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

/// The capacity of the event channel; a watcher that falls further behind is told it
/// lagged and must re-read state from the store.
const EVENT_CAPACITY: usize = 1 << 16;

impl Engine {
    /// Starts an engine. Returns at once; the scheduler first recovers every unfinished
    /// workflow from the store, then schedules until `shutdown` is cancelled. The returned
    /// handle completes when the scheduler has stopped (running jobs dropped, their tasks
    /// left `running` in the store so that the next start resumes them), with the store
    /// failure that stopped it, if one did.
    pub fn start(
        opts: EngineOptions,
        shutdown: CancellationToken,
    ) -> (Engine, tokio::task::JoinHandle<Result<(), Error>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let jobs = Arc::new(opts.jobs);
        let defs = Definitions::new(opts.store.clone(), opts.library, jobs.clone())
            .with_max_tasks(opts.max_tasks_per_graph);
        let inner = Arc::new(Inner {
            store: opts.store.clone(),
            nodes: match &opts.ownership {
                Ownership::Sole => Nodes::new(opts.store.clone()),
                Ownership::Leased(_) => Nodes::new(opts.store.clone()).shared(),
            }
            .with_sealer(opts.sealer.clone()),
            defs,
            tx,
            events,
            log: Mutex::new(EventLog::default()),
            clock: opts.clock.clone(),
            running: AtomicBool::new(true),
            failure: Mutex::new(None),
            stopped: CancellationToken::new(),
            recovered: CancellationToken::new(),
            waiters: Arc::new(Waiters::default()),
            caps: match &opts.sealer {
                Some(sealer) => NodeCaps::from_sealer(sealer),
                None => NodeCaps::random(),
            },
            shutdown: shutdown.clone(),
            retention: opts.retention,
            sealer: opts.sealer.clone(),
            sweep: Mutex::new(SweepState::default()),
            plans: Default::default(),
            batches: Batches::new(opts.store.clone()),
            ownership: opts.ownership.clone(),
            wake: Wake::default(),
        });
        let engine = Engine { inner };
        let mut runtime = Runtime::new(
            engine.clone(),
            opts.store.clone(),
            jobs,
            opts.clock,
            opts.api,
            opts.max_running_jobs,
            opts.cancel_grace,
            rx,
            shutdown.clone(),
        );
        if let Ownership::Leased(leases) = &opts.ownership {
            let (ticks, rx) = mpsc::unbounded_channel();
            runtime.lease(opts.ownership.clone(), rx, engine.inner.wake.inbox.clone());
            let w = &engine.inner.wake;
            tokio::spawn(crate::ownership::keep(
                leases.clone(),
                ticks,
                shutdown.clone(),
            ));
            tokio::spawn(crate::sequencer::sequence(
                opts.store.clone(),
                opts.ownership.clone(),
                w.staged.clone(),
                w.numbered.clone(),
                shutdown.clone(),
            ));
            tokio::spawn(crate::sequencer::follow(
                engine.clone(),
                opts.store,
                w.numbered.clone(),
                shutdown,
            ));
        }
        if let Some(policy) = opts.retention {
            tokio::spawn(sweep_periodically(engine.clone(), policy));
        }
        {
            let (this, stop) = (engine.clone(), engine.inner.shutdown.clone());
            tokio::spawn(async move {
                // Batches start workflows: not before recovery has loaded the unfinished ones.
                this.inner.recovered.cancelled().await;
                this.run_batches(stop).await;
            });
        }
        let this = engine.clone();
        let leases = match &opts.ownership {
            Ownership::Leased(l) => Some(l.clone()),
            Ownership::Sole => None,
        };
        let handle = tokio::spawn(async move {
            let res = runtime.run().await;
            // Its scheduler stopped: a replica hands its partitions to the others at once.
            if let Some(leases) = leases
                && let Err(e) = blocking(move || leases.release_all()).await
            {
                warn!(error = %e, "releasing the partitions failed; the others take them when their leases run out");
            }
            if let Err(e) = &res {
                *this.inner.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
            this.inner.running.store(false, Ordering::SeqCst);
            this.inner.stopped.cancel();
            this.inner.recovered.cancel();
            res
        });
        (engine, handle)
    }

    /// Who drives which workflows: this process all of them, or its partitions' leases.
    pub fn ownership(&self) -> &Ownership {
        &self.inner.ownership
    }

    /// Whether this process runs the work one process must do for all replicas (batches,
    /// retention sweeps, webhook deliveries): always when it owns the store alone, else
    /// while it holds the sequencer's partition.
    pub fn leads(&self) -> bool {
        self.inner.ownership.owns(crate::ownership::SEQUENCER)
    }

    pub fn definitions(&self) -> &Definitions {
        &self.inner.defs
    }

    /// The bulk runs (`batches.rs`).
    pub fn batches(&self) -> Batches {
        self.inner.batches.clone()
    }

    /// The registered endpoints (`endpoints.rs`).
    pub fn endpoints(&self) -> &Endpoints {
        self.inner.nodes.endpoints()
    }

    pub fn nodes(&self) -> &Nodes {
        &self.inner.nodes
    }

    /// Ok while the engine schedules; otherwise why not: the store failure that stopped the
    /// scheduler, or that it is shutting down.
    pub fn health(&self) -> Result<(), String> {
        if let Some(why) = self
            .inner
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(format!(
                "the scheduler stopped after a store failure: {why}"
            ));
        }
        if !self.inner.running.load(Ordering::SeqCst) || self.inner.tx.is_closed() {
            return Err("the scheduler has stopped".into());
        }
        if self.inner.shutdown.is_cancelled() {
            return Err("the engine is shutting down".into());
        }
        Ok(())
    }

    /// Resolves once the scheduler has stopped (shutdown, or a store failure: see
    /// [`Engine::health`]).
    pub async fn stopped(&self) {
        self.inner.stopped.cancelled().await
    }

    /// The store backend's name (`sled`, `file`, ...), for health reports.
    pub fn store_backend(&self) -> &'static str {
        self.inner.store.backend()
    }

    /// False once the scheduler has stopped (shutdown, or a store failure).
    pub fn is_healthy(&self) -> bool {
        self.health().is_ok()
    }

    /// Events of every committed transition, in commit order.
    pub fn subscribe(&self) -> broadcast::Receiver<Numbered> {
        self.inner.events.subscribe()
    }

    pub(crate) fn publish(&self, n: u64, ev: Arc<Event>) {
        self.inner.publish(n, ev);
    }

    /// Installs the event log read from the store (recovery does, before it loads any
    /// workflow).
    pub(crate) fn restore_events(&self, log: EventLog) {
        *self.inner.log.lock().unwrap_or_else(|p| p.into_inner()) = log;
    }

    /// The id of the store's event log: event numbers are this log's, so streams carry it
    /// in their event ids. Waits until recovery has read the log.
    pub async fn event_log_id(&self) -> String {
        self.inner.recovered.cancelled().await;
        let log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        log.id.clone()
    }

    /// The first `limit` retained events numbered above `after` (from the first retained
    /// one when `after` is `None`), and a receiver of the events published from now on:
    /// with a limit that cut nothing off, nothing falls between the two. Events are numbered
    /// from 1 in the store's log, across restarts; at most
    /// [`EVENT_RETENTION`](crate::EVENT_RETENTION) of the latest are retained. Waits until
    /// recovery has read the log.
    pub async fn events_since(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> (Vec<Numbered>, broadcast::Receiver<Numbered>) {
        self.inner.recovered.cancelled().await;
        let log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.inner.events.subscribe();
        (log.since(after, limit), rx)
    }

    /// How many retained events numbered above `after` match `filter`.
    pub async fn count_events_after(&self, after: u64, filter: &crate::EventFilter) -> u64 {
        self.inner.recovered.cancelled().await;
        let log = self.inner.log.lock().unwrap_or_else(|p| p.into_inner());
        log.count(after, filter)
    }

    /// The key that seals stored secrets, if the engine has one; the binary seals its own
    /// secrets (webhook secrets) with it.
    pub fn sealer(&self) -> Option<Arc<Sealer>> {
        self.inner.sealer.clone()
    }

    /// The store the engine writes to; the binary keeps keyspaces of its own in it.
    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// The number of the latest event (0 when there is none). Waits until recovery has
    /// read the log.
    pub async fn last_event(&self) -> u64 {
        self.inner.recovered.cancelled().await;
        self.inner
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last
    }

    /// Called by the scheduler once recovery has loaded every unfinished workflow.
    pub(crate) fn mark_recovered(&self) {
        self.inner.recovered.cancel();
    }

    /// Wakes the sequencer: this replica staged events.
    pub(crate) fn staged(&self) {
        self.inner.wake.staged.notify_one();
    }

    pub(crate) fn sender(&self) -> mpsc::UnboundedSender<Msg> {
        self.inner.tx.clone()
    }

    fn send(&self, msg: Msg) -> Result<(), Error> {
        self.inner
            .tx
            .send(msg)
            .map_err(|_| Error::Unavailable("the engine has stopped".into()))
    }

    /// Sends a message that carries a reply and waits for the answer, which the scheduler
    /// gives after committing what the message changed.
    async fn ask(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<(), Error>>) -> Msg,
    ) -> Result<(), Error> {
        let (reply, rx) = oneshot::channel();
        self.send(msg(reply))?;
        rx.await
            .map_err(|_| Error::Unavailable("the engine has stopped".into()))?
    }

    /// Runs a graph: plans it (400 on missing options), then creates the workflow in one
    /// commit that also takes the node's lock (409 when the node is busy).
    pub async fn run(&self, req: RunRequest) -> Result<WorkflowView, Error> {
        self.create(req, Origin::Run).await
    }

    /// Reruns a failed or cancelled workflow from where it stopped (see `rerun.rs`): a new
    /// workflow of the same graph on the same node, with the old run's options under
    /// `overrides`, whose `rerunOf` names the old one. Its tasks that succeeded before (and
    /// wait only on such tasks) are created succeeded with their outputs; the others run
    /// again. Created like any run, in one commit that takes the node's lock (409 when the
    /// node is busy). A workflow that is not failed or cancelled, or is a subgraph, is a
    /// conflict; the old workflow is left unchanged.
    pub async fn rerun(&self, id: &str, overrides: RunOptions) -> Result<WorkflowView, Error> {
        let (old, old_tasks) = self.load(id).await?.ok_or_else(|| Error::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        })?;
        crate::rerun::check(&old)?;
        let req = RunRequest {
            graph: old.plan.graph.clone(),
            node: old.node.clone(),
            options: crate::rerun::options(&old.options, overrides),
        };
        self.create(req, Origin::Rerun(Box::new((old, old_tasks))))
            .await
    }

    pub(crate) async fn create(
        &self,
        req: RunRequest,
        origin: Origin,
    ) -> Result<WorkflowView, Error> {
        self.create_as(req, origin, crate::new_id()).await
    }

    /// [`Self::create`] with the workflow's id chosen by the caller (a batch commits it
    /// before it asks). An id already used is a conflict.
    pub(crate) async fn create_as(
        &self,
        req: RunRequest,
        origin: Origin,
        id: String,
    ) -> Result<WorkflowView, Error> {
        self.inner.recovered.cancelled().await;
        if let Err(why) = self.health() {
            return Err(Error::Unavailable(why));
        }
        let inner = self.inner.clone();
        // Planning, the commit and the hand-over to the scheduler happen together on the
        // blocking pool, which runs to its end even when the caller stops waiting (an HTTP
        // client that disconnects drops its request's future): a committed workflow is
        // always scheduled.
        blocking(move || {
            let parent = match &origin {
                Origin::Child(p, key) => Some((p, key)),
                Origin::Run | Origin::Rerun(_) => None,
            };
            let mut plan = inner
                .defs
                .plan_blocking(&req.graph, &req.options, req.node.as_deref())?;
            if parent.is_some() {
                // A subgraph's options were rendered in its parent's task: for the child
                // they are data, never templates again.
                plan.mark_run_options_as_data(&req.options);
            }
            if let Some(node) = &req.node
                && inner.nodes.current_blocking(node)?.is_none()
            {
                return Err(Error::NotFound {
                    kind: "node",
                    id: node.clone(),
                });
            }
            let (depth, parent_partition) = match &parent {
                None => (0, None),
                Some((p, _)) => {
                    let parent_rec = load_records(inner.store.as_ref(), &p.workflow_id)?;
                    let depth = parent_rec.as_ref().map_or(0, |(r, _)| r.depth) + 1;
                    if depth > MAX_SUBGRAPH_DEPTH {
                        return Err(Error::BadRequest(format!(
                            "subgraph {} would nest {depth} levels deep; at most \
                             {MAX_SUBGRAPH_DEPTH} are allowed",
                            req.graph
                        )));
                    }
                    (depth, parent_rec.map(|(r, _)| r.partition()))
                }
            };
            // A subgraph is driven with its parent, a node's workflows by the node's owner.
            let partition = parent_partition.unwrap_or_else(|| {
                crate::ownership::partition_of(req.node.as_deref().unwrap_or(&id))
            });
            let now = inner.clock.now_ms();
            let mut rec = WorkflowRecord {
                depth,
                id: id.clone(),
                deadline: plan.timeout_ms.map(|t| now.saturating_add(t)),
                plan,
                node: req.node.clone(),
                status: WorkflowStatus::Pending,
                options: req.options,
                created_at: now,
                finished_at: None,
                stop: None,
                parent: parent.map(|(p, _)| p.clone()),
                error: None,
                rerun_of: None,
                partition: Some(partition),
                task_key: Some(crate::new_token()),
            };
            let tokens = TaskTokens::new(rec.task_key.as_deref().unwrap_or_default());
            let mut tasks: Vec<TaskRecord> = (0..rec.plan.tasks.len())
                .map(|i| TaskRecord::created(&id, &tokens, i))
                .collect();
            if let Origin::Rerun(old) = &origin {
                let (old, old_tasks) = old.as_ref();
                rec.rerun_of = Some(old.id.clone());
                crate::rerun::take_over(old, old_tasks, &rec.plan, &mut tasks);
            }
            // A plan shared with earlier workflows may be being removed (`plans.rs`): then
            // the commit is refused and tried again with a record of its own.
            let mut share = true;
            let leased = matches!(inner.ownership, Ownership::Leased(_));
            loop {
                let mut batch = Batch::new();
                // Precondition 0: the node lock (top-level workflows) or the child slot; then
                // that the id is new; then, when the plan is shared, that its record stays.
                match (&parent, &req.node) {
                    (None, Some(node)) => {
                        batch.require_absent(keys::NODE_LOCKS, node.as_bytes());
                        batch.put(keys::NODE_LOCKS, node.as_bytes(), id.as_bytes().to_vec());
                    }
                    (Some((_, child_key)), _) => {
                        batch.require_absent(keys::CHILDREN, child_key.as_bytes());
                        batch.put(keys::CHILDREN, child_key.as_bytes(), id.as_bytes().to_vec());
                    }
                    (None, None) => {}
                }
                batch.require_absent(keys::WORKFLOWS, id.as_bytes());
                let shared = inner.plans.write(&mut batch, &id, &mut rec.plan, share);
                write_workflow(&mut batch, &rec);
                crate::history::index(&mut batch, &rec);
                for (i, t) in tasks.iter().enumerate() {
                    write_created_task(&mut batch, &rec, i, t);
                }
                batch.put(
                    keys::ACTIVE,
                    id.as_bytes(),
                    partition.to_string().into_bytes(),
                );
                if leased {
                    // The owner of the partition, this replica or another, loads it from there.
                    let load = inbox::Request::Load(id.clone());
                    inbox::put(&mut batch, partition, now, &load);
                }
                match inner.store.commit(batch) {
                    Ok(()) => {
                        inner.plans.stored(&rec.plan);
                        break;
                    }
                    Err(metalgraph_store::Error::Conflict { index, .. }) if Some(index) == shared => {
                        share = false;
                        continue;
                    }
                    Err(metalgraph_store::Error::Conflict { index, .. })
                        if index == usize::from(!matches!((&parent, &req.node), (None, None))) =>
                    {
                        return Err(Error::AlreadyExists(format!("workflow {id} already exists")));
                    }
                    Err(metalgraph_store::Error::Conflict { .. }) => {
                        return Err(match (&parent, &req.node) {
                            (None, Some(node)) => Error::NodeBusy {
                                node: node.clone(),
                                workflow: inner
                                    .nodes
                                    .active_workflow_blocking(node)?
                                    .unwrap_or_default(),
                            },
                            _ => Error::Conflict("a subgraph for this task already exists".into()),
                        });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let view = WorkflowView::build(&rec, &tasks);
            info!(workflow_id = %rec.id, graph = %rec.plan.graph, node = ?rec.node, "workflow created");
            // The workflow is durable from here on: if the scheduler has just stopped, the
            // next start recovers it, so the caller is still told it was created.
            if leased {
                inner.wake.inbox.notify_one();
                return Ok(view);
            }
            let msg = Msg::Load {
                rec: Box::new(rec),
                tasks,
                recovering: false,
            };
            if inner.tx.send(msg).is_err() {
                warn!(workflow_id = %id, "scheduler stopped; the workflow resumes on the next start");
            }
            Ok(view)
        })
        .await
    }

    /// Asks the scheduler to cancel a workflow and returns once the request is committed,
    /// without waiting for the workflow's end ([`Self::cancel`] waits).
    pub(crate) async fn request_cancel(&self, id: &str) -> Result<(), Error> {
        let (current, _) = self.load(id).await?.ok_or_else(|| Error::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        })?;
        if current.status.is_terminal() {
            return Err(Error::Conflict(format!(
                "workflow {id} already finished ({})",
                current.status
            )));
        }
        let wf = id.to_owned();
        if let Ownership::Leased(_) = &self.inner.ownership {
            // Through the owner's inbox, wherever it runs: accepted once committed.
            let p = current.partition();
            let (store, clock) = (self.inner.store.clone(), self.inner.clock.clone());
            blocking(move || {
                let mut batch = Batch::new();
                inbox::put(&mut batch, p, clock.now_ms(), &inbox::Request::Cancel(wf));
                store.commit(batch).map_err(Error::from)
            })
            .await?;
            self.inner.wake.inbox.notify_one();
            return Ok(());
        }
        self.ask(|reply| Msg::Cancel { id: wf, reply }).await
    }

    /// Cancels a workflow: running jobs are signalled, pending tasks skipped. Returns once
    /// the workflow has ended `cancelled`, that is once its running jobs have stopped (each
    /// gets the cancel grace period to clean up). Cancelling a finished workflow is a
    /// conflict; cancelling one being cancelled waits for the same end.
    pub async fn cancel(&self, id: &str) -> Result<WorkflowView, Error> {
        let not_found = || Error::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        };
        // Subscribe first, so that the end cannot slip between the request and the wait.
        let mut events = self.subscribe();
        self.request_cancel(id).await?;
        loop {
            let view = self.get(id).await?.ok_or_else(not_found)?;
            if view.status.is_terminal() {
                return Ok(view);
            }
            loop {
                match events.recv().await {
                    Ok((_, ev)) if ev.workflow_id() == id && ev.ended().is_some() => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => {
                        return Err(Error::Unavailable("the engine has stopped".into()));
                    }
                }
            }
        }
    }

    /// Reads a workflow as last committed.
    pub async fn get(&self, id: &str) -> Result<Option<WorkflowView>, Error> {
        Ok(self
            .load(id)
            .await?
            .map(|(rec, tasks)| WorkflowView::build(&rec, &tasks)))
    }

    /// Reads a workflow's records as last committed.
    pub async fn load(&self, id: &str) -> Result<Option<(WorkflowRecord, Vec<TaskRecord>)>, Error> {
        let (store, id) = (self.inner.store.clone(), id.to_owned());
        blocking(move || load_records(store.as_ref(), &id)).await
    }

    /// The subgraph a `graph.run` task started under `key` (`{task id}/{retry}`), if any.
    pub(crate) async fn child(&self, key: &str) -> Result<Option<String>, Error> {
        let (store, key) = (self.inner.store.clone(), key.to_owned());
        blocking(move || {
            Ok(store
                .get(keys::CHILDREN, key.as_bytes())?
                .map(|id| String::from_utf8_lossy(&id).into_owned()))
        })
        .await
    }

    /// Lists workflows, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<WorkflowView>, Error> {
        Ok(self.list_page(filter).await?.items)
    }

    /// One page of workflows, newest first, with the cursor of the next (see `history.rs`).
    /// Waits until recovery has run: a store from before the index is indexed then.
    pub async fn list_page(&self, filter: &ListFilter) -> Result<Page<WorkflowView>, Error> {
        let page = self.list_records(filter).await?;
        Ok(Page {
            items: page
                .items
                .iter()
                .map(|(rec, tasks)| WorkflowView::build(rec, tasks))
                .collect(),
            next: page.next,
        })
    }

    /// [`Engine::list_page`] with each workflow's records rather than its view.
    pub async fn list_records(&self, filter: &ListFilter) -> Result<Page<Records>, Error> {
        self.inner.recovered.cancelled().await;
        let (store, filter) = (self.inner.store.clone(), filter.clone());
        blocking(move || crate::history::list(store.as_ref(), &filter)).await
    }

    /// One retention sweep now, under the engine's policy (none: nothing is removed). The
    /// engine sweeps by itself every `interval`; this is for tests and operators.
    pub async fn sweep_history(&self) -> Result<Sweep, Error> {
        self.inner.recovered.cancelled().await;
        let Some(policy) = self.inner.retention else {
            return Ok(Sweep::default());
        };
        let (store, now) = (self.inner.store.clone(), self.inner.clock.now_ms());
        let this = self.clone();
        let started = std::time::Instant::now();
        let done = blocking(move || {
            let mut state = this.inner.sweep.lock().unwrap_or_else(|p| p.into_inner());
            crate::retention::sweep(store.as_ref(), &policy, now, &mut state)
        })
        .await?;
        let m = crate::metrics::metrics();
        m.retention_sweeps.inc();
        m.retention_removed.inc_by(done.removed as u64);
        info!(
            removed = done.removed,
            scanned = done.scanned,
            plans = done.plans,
            more = done.more,
            took_ms = started.elapsed().as_millis() as u64,
            "retention sweep"
        );
        Ok(done)
    }

    /// Deletes a finished workflow and its task records. A subgraph cannot be deleted while
    /// its parent workflow is unfinished: the parent may still read it.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let (store, id) = (self.inner.store.clone(), id.to_owned());
        blocking(move || crate::history::delete(store.as_ref(), &id).map(|_| ())).await
    }

    /// Delivers a node's callback to the task waiting for it and returns the task's label.
    /// The token must be the waiting task's; a wrong or stale token is refused exactly like
    /// a callback for a node on which nothing waits (not found), so that a caller cannot
    /// learn which nodes wait. Returns only once the task's success, with `body` as its
    /// output, is committed: an answer to the node means the callback survives any crash.
    pub async fn notify(
        &self,
        node: Option<&str>,
        token: &str,
        body: Value,
    ) -> Result<String, Error> {
        let w = match self.inner.waiters.find(node, token) {
            Ok(w) => w,
            // With replicas, the task may wait on another one.
            Err(e) => match &self.inner.ownership {
                Ownership::Sole => return Err(e),
                Ownership::Leased(_) => return self.notify_owner(node, token, body, e).await,
            },
        };
        let (wf, task_id, token) = (w.workflow_id.clone(), w.task_id.clone(), token.to_owned());
        self.ask(|reply| Msg::Notify {
            wf,
            task_id,
            token,
            body,
            reply,
        })
        .await
        // The task ended between the match and the scheduler's turn: nothing waits now.
        .map_err(|e| match e {
            Error::Conflict(_) | Error::NotFound { .. } => crate::notify::not_waiting(node),
            other => other,
        })?;
        info!(workflow_id = %w.workflow_id, label = %w.label, "node notification committed");
        Ok(w.label)
    }

    /// [`Self::notify`] for a task this replica does not drive: the task its owner
    /// published as waiting on `node` (see [`Self::waiting_task`]), when the token is its,
    /// delivered to the partition's owner through its inbox. Answers once the request is
    /// committed; `not_found` otherwise, as the owner would answer.
    async fn notify_owner(
        &self,
        node: Option<&str>,
        token: &str,
        body: Value,
        not_found: Error,
    ) -> Result<String, Error> {
        let Some(node) = node else {
            return Err(not_found);
        };
        let Some((w, partition)) = self.published_waiter(node).await else {
            return Err(not_found);
        };
        if !crate::notify::same_secret(&w.token, token) {
            return Err(not_found);
        }
        let request = inbox::Request::Notify {
            wf: w.workflow_id.clone(),
            task_id: w.task_id.clone(),
            token: w.token.clone(),
            body,
        };
        let (store, clock) = (self.inner.store.clone(), self.inner.clock.clone());
        blocking(move || {
            let mut batch = Batch::new();
            inbox::put(&mut batch, partition, clock.now_ms(), &request);
            store.commit(batch).map_err(Error::from)
        })
        .await?;
        self.inner.wake.inbox.notify_one();
        info!(workflow_id = %w.workflow_id, label = %w.label, "node notification committed for the partition's owner");
        Ok(w.label)
    }

    /// With replicas, publishes `w` under its node for the others (see [`Self::waiting_task`])
    /// and returns the guard that takes it back when the wait ends. One process publishes
    /// nothing.
    async fn publish_waiter(&self, w: &Waiter) -> Result<Option<Published>, JobError> {
        let (Ownership::Leased(_), Some(node)) = (&self.inner.ownership, &w.node) else {
            return Ok(None);
        };
        let value = serde_json::to_vec(w).expect("a waiter serialises");
        let (store, key, put) = (self.inner.store.clone(), node.clone(), value.clone());
        blocking(move || {
            let mut batch = Batch::new();
            batch.put(keys::WAITING, key.into_bytes(), put);
            store.commit(batch).map_err(Error::from)
        })
        .await
        .map_err(|e| JobError::new(format!("publishing the wait for the node's callback: {e}")))?;
        Ok(Some(Published {
            store: self.inner.store.clone(),
            node: node.clone(),
            value,
        }))
    }

    /// The task waiting on `node` that another replica published, with its workflow's
    /// partition, if its record still says it runs with that token.
    async fn published_waiter(&self, node: &str) -> Option<(Waiter, u32)> {
        let (store, node) = (self.inner.store.clone(), node.to_owned());
        blocking(move || {
            let Some(raw) = store.get(keys::WAITING, node.as_bytes())? else {
                return Ok(None);
            };
            let w: Waiter = serde_json::from_slice(&raw).map_err(|e| {
                Error::Store(format!("the waiting task of {node} is unreadable: {e}"))
            })?;
            let Some((rec, tasks)) = load_records(store.as_ref(), &w.workflow_id)? else {
                return Ok(None);
            };
            let running = tasks.iter().any(|t| {
                t.id == w.task_id
                    && t.state == TaskState::Running
                    && crate::notify::same_secret(&t.token, &w.token)
            });
            Ok::<_, Error>(running.then(|| (w, rec.partition())))
        })
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "reading the published waiting task failed");
            None
        })
    }

    /// The workflow id and notification token of the task waiting on `node`, if one waits.
    /// Whoever is shown the token can complete the task: see [`Engine::waiting_task`],
    /// which comes with the capability a node-facing request must present.
    pub fn waiting_token(&self, node: &str) -> Option<(String, String)> {
        self.inner
            .waiters
            .waiting_on(node)
            .map(|w| (w.workflow_id, w.token))
    }

    /// The task waiting for `node`'s callback, if one waits, with its token and the node's
    /// capability for it (see [`crate::notify`]); templates served to the node render the
    /// token into the installer's callback when the request presents the capability.
    ///
    /// With replicas, a task another replica drives is found where it published itself.
    pub async fn waiting_task(&self, node: &str) -> Option<WaitingTask> {
        let w = match self.inner.waiters.waiting_on(node) {
            Some(w) => w,
            None => match &self.inner.ownership {
                Ownership::Sole => return None,
                Ownership::Leased(_) => self.published_waiter(node).await?.0,
            },
        };
        let cap = self
            .inner
            .caps
            .cap(node, &w.workflow_id, &w.task_id, &w.token);
        Some(WaitingTask {
            workflow_id: w.workflow_id,
            task_id: w.task_id,
            label: w.label,
            token: w.token,
            cap,
        })
    }

    /// The capability key, for the scheduler's rendering of `task.cap`.
    pub(crate) fn caps(&self) -> &NodeCaps {
        &self.inner.caps
    }

    /// The unfinished tasks of the top-level workflow running on `node` (running ones first,
    /// then pending ones, each in plan order), as last committed; empty when no workflow
    /// runs on it. The node-facing boot endpoints use it to find the node's network-boot
    /// work (a task with a `profile` option). Tasks of subgraphs are not included.
    pub async fn current_tasks(&self, node: &str) -> Result<Vec<NodeTask>, Error> {
        let Some(id) = self.inner.nodes.active_workflow(node).await? else {
            return Ok(Vec::new());
        };
        let Some((rec, tasks)) = self.load(&id).await? else {
            return Ok(Vec::new());
        };
        let context = context_of(&rec.plan, &tasks);
        let mut out: Vec<NodeTask> = rec
            .plan
            .tasks
            .iter()
            .zip(&tasks)
            .filter(|(_, t)| !t.state.is_terminal())
            .map(|(p, t)| NodeTask {
                workflow_id: rec.id.clone(),
                graph: rec.plan.graph.clone(),
                label: p.label.clone(),
                task_id: t.id.clone(),
                job: p.job.clone(),
                state: t.state,
                options: p.options.clone(),
                token: t.token.clone(),
                cap: self.inner.caps.cap(node, &rec.id, &t.id, &t.token),
                context: context.clone(),
                dialect: p.dialect,
                data: p.data.clone(),
            })
            .collect();
        // Stable: plan order is kept within each state.
        out.sort_by_key(|t| t.state != TaskState::Running);
        Ok(out)
    }
}

/// Sweeps every `policy.interval` until the engine stops; a sweep that hit its bound is
/// followed at once by the next.
async fn sweep_periodically(engine: Engine, policy: Retention) {
    let stopped = engine.inner.stopped.clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(policy.interval) => {}
            () = stopped.cancelled() => return,
        }
        while engine.leads() {
            match engine.sweep_history().await {
                Ok(s) if s.more && !stopped.is_cancelled() => tokio::task::yield_now().await,
                Ok(_) => break,
                Err(e) => {
                    warn!(error = %e, "retention sweep failed; trying again next interval");
                    break;
                }
            }
        }
    }
}

/// A waiting task published for the other replicas; dropping it takes it back, unless
/// another wait on the node has replaced it.
struct Published {
    store: Arc<dyn Store>,
    node: String,
    value: Vec<u8>,
}

impl Drop for Published {
    fn drop(&mut self) {
        let (store, node, value) = (
            self.store.clone(),
            std::mem::take(&mut self.node),
            std::mem::take(&mut self.value),
        );
        let take_back = move || {
            let mut batch = Batch::new();
            batch.require_equals(keys::WAITING, node.as_bytes().to_vec(), value);
            batch.delete(keys::WAITING, node.into_bytes());
            if let Err(e) = store.commit(batch)
                && !matches!(e, metalgraph_store::Error::Conflict { .. })
            {
                warn!(error = %e, "taking back a published wait failed; the next wait replaces it");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(take_back);
            }
            Err(_) => take_back(),
        }
    }
}

/// What the engine lends to jobs.
pub(crate) struct Services {
    engine: Engine,
}

impl Services {
    pub(crate) fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

impl JobServices for Services {
    fn run_subgraph(
        &self,
        ctx: &JobContext,
        graph_name: &str,
        options: Options,
    ) -> BoxFuture<'static, JobResult> {
        let engine = self.engine.clone();
        let ctx = ctx.clone();
        let graph = graph_name.to_owned();
        Box::pin(crate::subgraph::run_subgraph(engine, ctx, graph, options))
    }

    fn wait_notification(&self, ctx: &JobContext) -> BoxFuture<'static, JobResult> {
        let engine = self.engine.clone();
        let ctx = ctx.clone();
        Box::pin(async move {
            let waiter = Waiter {
                node: ctx.node.as_ref().map(|n| n.id.clone()),
                workflow_id: ctx.workflow_id.clone(),
                task_id: ctx.task_id.clone(),
                label: ctx.label.clone(),
                token: ctx.token.clone(),
            };
            let _published = engine.publish_waiter(&waiter).await?;
            let _waiting = engine.inner.waiters.register(waiter);
            // The scheduler ends the task when the node's callback is committed and then
            // cancels this wait; until then there is nothing to do but wait.
            ctx.cancel.cancelled().await;
            Err(JobError::new("stopped waiting for the node"))
        })
    }

    fn checkpoint(
        &self,
        ctx: &JobContext,
        value: Value,
    ) -> BoxFuture<'static, Result<(), JobError>> {
        let engine = self.engine.clone();
        let (wf, task_id, attempt) = (ctx.workflow_id.clone(), ctx.task_id.clone(), ctx.attempt);
        Box::pin(async move {
            engine
                .ask(|reply| Msg::Checkpoint {
                    wf,
                    task_id,
                    attempt,
                    value,
                    reply,
                })
                .await
                .map_err(|e| JobError::new(format!("could not record a checkpoint: {e}")))
        })
    }

    fn now_ms(&self) -> u64 {
        self.engine.inner.clock.now_ms()
    }

    fn nodes(&self) -> &Nodes {
        &self.engine.inner.nodes
    }

    fn callback(
        &self,
        ctx: &JobContext,
        label: &str,
    ) -> BoxFuture<'static, Result<Callback, JobError>> {
        let engine = self.engine.clone();
        let (wf, label) = (ctx.workflow_id.clone(), label.to_owned());
        let node = ctx.node.as_ref().map(|n| n.id.clone());
        Box::pin(async move {
            let unreadable = |e: Error| JobError::new(format!("workflow {wf} cannot be read: {e}"));
            let (rec, tasks) = engine
                .load(&wf)
                .await
                .map_err(unreadable)?
                .ok_or_else(|| JobError::new(format!("workflow {wf} no longer exists")))?;
            let (planned, task) = rec
                .plan
                .tasks
                .iter()
                .zip(&tasks)
                .find(|(p, _)| p.label == label)
                .ok_or_else(|| {
                    JobError::new(format!("the workflow has no task labelled '{label}'"))
                })?;
            if planned.job != "wait.notification" {
                return Err(JobError::new(format!(
                    "task '{label}' runs {}, not wait.notification: no node calls back for it",
                    planned.job
                )));
            }
            let cap = node.map(|n| {
                engine
                    .inner
                    .caps
                    .cap(&n, &wf, &task.id, &task.token)
                    .as_str()
                    .to_owned()
            });
            Ok(Callback {
                workflow_id: wf.clone(),
                task_id: task.id.clone(),
                token: task.token.clone(),
                cap,
            })
        })
    }
}

/// An unfinished task of a node's workflow, as [`Engine::current_tasks`] reports it.
#[derive(Debug, Clone)]
pub struct NodeTask {
    pub workflow_id: String,
    /// The workflow's graph.
    pub graph: String,
    pub label: String,
    pub task_id: String,
    pub job: String,
    /// `Running` or `Pending`.
    pub state: TaskState,
    /// The task's merged options, not yet rendered (the scheduler renders them when the
    /// task starts; a caller that needs rendered values renders them the same way).
    pub options: Map<String, Value>,
    /// The token the node's notification for this task must carry.
    pub token: String,
    /// The node's capability for this task: what a node-facing request must present (or
    /// prove otherwise) to be shown the token.
    pub cap: NodeCap,
    /// The outputs of the workflow's finished tasks by label (`context` in templates).
    pub context: Map<String, Value>,
    /// The template dialect of the options.
    pub dialect: crate::template::Dialect,
    /// Options that are data, never templates.
    pub data: Vec<String>,
}

/// A task waiting for its node's callback, as [`Engine::waiting_task`] reports it.
#[derive(Debug, Clone)]
pub struct WaitingTask {
    pub workflow_id: String,
    pub task_id: String,
    pub label: String,
    /// The token the callback must carry.
    pub token: String,
    /// The node's capability for this task.
    pub cap: NodeCap,
}
