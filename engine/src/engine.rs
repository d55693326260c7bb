//! The engine: a cheap [`Engine`] handle for callers and one scheduler task that owns every
//! running workflow and makes every state transition.
//!
//! The scheduler takes messages (a workflow was created, a job finished, a retry or deadline
//! fired, a cancel was asked), applies them to its in-memory copy of the workflows, and
//! collects the resulting writes in one store batch. Only after that batch is committed does
//! it act: start jobs, answer callers, publish events. Messages that arrive together are
//! committed together (group commit), which keeps every transition durable before it is
//! acted on while paying one `fsync` for many transitions.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalgraph_store::{Batch, Store};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, SystemClock, until};
use crate::definitions::{self, Definitions, Library, MAX_BACKOFF_MS, Plan};
use crate::job::{BoxFuture, Job, JobContext, JobRegistry, JobResult, JobServices, Options};
use crate::keys;
use crate::model::{Readiness, RunOptions, TaskState, WorkflowStatus};
use crate::nodes::{self, Node, Nodes};
use crate::template::Renderer;
use crate::workflow::{
    Event, ParentRef, StopReason, TaskRecord, WorkflowRecord, WorkflowView, context_of,
};

/// Why an engine operation failed. The binary maps each variant to an HTTP or gRPC status
/// in one place.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    /// A definition is invalid (HTTP 422).
    #[error("{0}")]
    Invalid(definitions::Problems),
    /// A request is wrong: a bad body or argument (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// Run options are wrong or missing; each problem names the graph, label and field
    /// (HTTP 400).
    #[error("{0}")]
    BadOptions(definitions::Problems),
    /// The request conflicts with current state: a busy node, a workflow still running or
    /// already finished, a library definition (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The engine is shutting down or stopped after a store failure (HTTP 503).
    #[error("{0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Store(String),
}

impl From<metalgraph_store::Error> for Error {
    fn from(e: metalgraph_store::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<definitions::Error> for Error {
    fn from(e: definitions::Error) -> Self {
        use definitions::Error as D;
        match e {
            D::Invalid(p) => Error::Invalid(p),
            D::BadOptions(p) => Error::BadOptions(p),
            D::NotFound { kind, name } => Error::NotFound { kind, id: name },
            e @ D::LibraryReadOnly { .. } => Error::Conflict(e.to_string()),
            D::Store(e) => e.into(),
            e @ D::Corrupt { .. } => Error::Store(e.to_string()),
        }
    }
}

impl From<nodes::Error> for Error {
    fn from(e: nodes::Error) -> Self {
        use nodes::Error as N;
        match e {
            N::NotFound(id) => Error::NotFound { kind: "node", id },
            e @ (N::IdentifierTaken { .. } | N::Exists(_) | N::Busy { .. } | N::Conflict(_)) => {
                Error::Conflict(e.to_string())
            }
            N::Store(e) => e.into(),
            e @ N::Corrupt(..) => Error::Store(e.to_string()),
        }
    }
}

/// Base URLs templates can render (`api.base`, `api.nodeBase`).
#[derive(Debug, Clone, Default)]
pub struct ApiUrls {
    /// The management API, e.g. `http://127.0.0.1:8080/api/2.0`.
    pub base: String,
    /// The node-facing API, e.g. `http://10.0.0.1:8090/api/2.0`, empty when off.
    pub node_base: String,
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

/// Filters for listing workflows.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `Some(true)`: only unfinished; `Some(false)`: only finished.
    pub active: Option<bool>,
    pub node: Option<String>,
}

struct Waiter {
    node: Option<String>,
    workflow_id: String,
    label: String,
    token: String,
    tx: oneshot::Sender<Value>,
}

struct Inner {
    store: Arc<dyn Store>,
    defs: Definitions,
    nodes: Nodes,
    tx: mpsc::UnboundedSender<Msg>,
    events: broadcast::Sender<Event>,
    clock: Arc<dyn Clock>,
    healthy: AtomicBool,
    waiters: Mutex<HashMap<String, Waiter>>,
    shutdown: CancellationToken,
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

/// The outcome of one job run, as the scheduler sees it.
#[derive(Debug)]
enum Outcome {
    Succeeded(Value),
    Failed(String),
    Timeout,
    Cancelled,
}

enum Msg {
    Load(Box<(WorkflowRecord, Vec<TaskRecord>)>),
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<(), Error>>,
    },
    JobDone {
        wf: String,
        idx: usize,
        attempt: u32,
        outcome: Outcome,
    },
    RetryDue {
        wf: String,
        idx: usize,
    },
    Deadline {
        wf: String,
    },
}

/// The capacity of the event channel; a watcher that falls further behind is told it
/// lagged and must re-read state from the store.
const EVENT_CAPACITY: usize = 1 << 16;

impl Engine {
    /// Starts an engine: recovers every unfinished workflow from the store, then schedules.
    /// Returns at once; the scheduler runs until `shutdown` is cancelled and the returned
    /// handle completes when it has stopped (running jobs dropped, their tasks left
    /// `running` in the store so that the next start resumes them).
    pub fn start(
        opts: EngineOptions,
        shutdown: CancellationToken,
    ) -> Result<(Engine, tokio::task::JoinHandle<()>), Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let jobs = Arc::new(opts.jobs);
        let defs = Definitions::new(opts.store.clone(), opts.library, jobs.clone());
        let inner = Arc::new(Inner {
            store: opts.store.clone(),
            nodes: Nodes::new(opts.store.clone()),
            defs,
            tx,
            events,
            clock: opts.clock.clone(),
            healthy: AtomicBool::new(true),
            waiters: Mutex::new(HashMap::new()),
            shutdown: shutdown.clone(),
        });
        let engine = Engine { inner };
        let mut sched = Scheduler {
            engine: engine.clone(),
            store: opts.store,
            jobs,
            clock: opts.clock,
            renderer: Renderer::new(),
            api: opts.api,
            max_running: opts.max_running_jobs.max(1),
            grace: opts.cancel_grace,
            rx,
            wfs: HashMap::new(),
            queue: VecDeque::new(),
            running_slots: 0,
            joins: JoinSet::new(),
            batch: Batch::new(),
            effects: Vec::new(),
            shutdown,
        };
        let recovered = sched.recover()?;
        info!(workflows = recovered, "engine started");
        let handle = tokio::spawn(async move { sched.run().await });
        Ok((engine, handle))
    }

    pub fn definitions(&self) -> &Definitions {
        &self.inner.defs
    }

    pub fn nodes(&self) -> &Nodes {
        &self.inner.nodes
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// False once the scheduler has stopped (shutdown, or a store failure).
    pub fn is_healthy(&self) -> bool {
        self.inner.healthy.load(Ordering::SeqCst) && !self.inner.tx.is_closed()
    }

    /// Events of every committed transition, in commit order.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Runs a graph: plans it (400 on missing options), then creates the workflow in one
    /// commit that also takes the node's lock (409 when the node is busy).
    pub async fn run(&self, req: RunRequest) -> Result<WorkflowView, Error> {
        self.create(req, None).await
    }

    async fn create(
        &self,
        req: RunRequest,
        parent: Option<(ParentRef, String)>,
    ) -> Result<WorkflowView, Error> {
        if !self.is_healthy() || self.inner.shutdown.is_cancelled() {
            return Err(Error::Unavailable("the engine is shutting down".into()));
        }
        let plan = self.inner.defs.plan(&req.graph, &req.options)?;
        if let Some(node) = &req.node
            && self.inner.nodes.get(node)?.is_none()
        {
            return Err(Error::NotFound {
                kind: "node",
                id: node.clone(),
            });
        }
        let now = self.inner.clock.now_ms();
        let id = crate::new_id();
        let rec = WorkflowRecord {
            id: id.clone(),
            deadline: plan.timeout_ms.map(|t| now + t),
            plan,
            node: req.node.clone(),
            status: WorkflowStatus::Pending,
            options: req.options,
            created_at: now,
            finished_at: None,
            stop: None,
            parent: parent.as_ref().map(|(p, _)| p.clone()),
            error: None,
        };
        let tasks: Vec<TaskRecord> = (0..rec.plan.tasks.len())
            .map(|i| TaskRecord::new(format!("{id}.{i}"), crate::new_token()))
            .collect();
        let mut batch = Batch::new();
        // Precondition 0: the node lock (top-level workflows) or the child slot (subgraphs).
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
        write_workflow(&mut batch, &rec);
        for (i, t) in tasks.iter().enumerate() {
            write_task(&mut batch, &id, i, t);
        }
        batch.put(keys::ACTIVE, id.as_bytes(), Vec::new());
        let view = WorkflowView::build(&rec, &tasks);
        let inner = self.inner.clone();
        // The commit and the hand-over to the scheduler happen together in the blocking task,
        // which runs to its end even when the caller stops waiting (an HTTP client that
        // disconnects drops its request's future): a committed workflow is always scheduled.
        let committed = tokio::task::spawn_blocking(move || {
            inner.store.commit(batch)?;
            info!(workflow_id = %rec.id, graph = %rec.plan.graph, node = ?rec.node, "workflow created");
            let _ = inner.events.send(Event::Workflow {
                workflow_id: rec.id.clone(),
                graph: rec.plan.graph.clone(),
                node: rec.node.clone(),
                status: rec.status,
                error: None,
            });
            // The workflow is durable from here on: if the scheduler has just stopped, the
            // next start recovers it, so the caller is still told it was created.
            let id = rec.id.clone();
            if inner.tx.send(Msg::Load(Box::new((rec, tasks)))).is_err() {
                warn!(workflow_id = %id, "scheduler stopped; the workflow resumes on the next start");
            }
            Ok::<(), metalgraph_store::Error>(())
        })
        .await
        .map_err(|e| Error::Store(e.to_string()))?;
        match committed {
            Ok(()) => {}
            Err(metalgraph_store::Error::Conflict { .. }) => {
                return Err(match (&parent, &req.node) {
                    (None, Some(node)) => {
                        let wf = self.inner.nodes.active_workflow(node)?.unwrap_or_default();
                        Error::Conflict(format!(
                            "node {node} is busy: workflow {wf} is running on it"
                        ))
                    }
                    _ => Error::Conflict("a subgraph for this task already exists".into()),
                });
            }
            Err(e) => return Err(e.into()),
        }
        Ok(view)
    }

    /// Cancels a workflow: running jobs are signalled, pending tasks skipped; the workflow
    /// ends `cancelled` once its running jobs have stopped. Cancelling a finished workflow is
    /// a conflict; cancelling one being cancelled is a no-op.
    pub async fn cancel(&self, id: &str) -> Result<WorkflowView, Error> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(Msg::Cancel {
                id: id.to_owned(),
                reply,
            })
            .map_err(|_| Error::Unavailable("the engine has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Unavailable("the engine has stopped".into()))??;
        self.get(id)?.ok_or_else(|| Error::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        })
    }

    /// Reads a workflow as last committed.
    pub fn get(&self, id: &str) -> Result<Option<WorkflowView>, Error> {
        Ok(self
            .load(id)?
            .map(|(rec, tasks)| WorkflowView::build(&rec, &tasks)))
    }

    /// Reads a workflow's records as last committed.
    pub fn load(&self, id: &str) -> Result<Option<(WorkflowRecord, Vec<TaskRecord>)>, Error> {
        load_records(self.inner.store.as_ref(), id)
    }

    /// Lists workflows, newest first.
    pub fn list(&self, filter: &ListFilter) -> Result<Vec<WorkflowView>, Error> {
        let store = self.inner.store.as_ref();
        let ids: Vec<String> = if filter.active == Some(true) {
            store
                .scan_prefix(keys::ACTIVE, b"")?
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect()
        } else {
            store
                .scan_prefix(keys::WORKFLOWS, b"")?
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect()
        };
        let mut out = Vec::new();
        for id in ids {
            let Some((rec, tasks)) = load_records(store, &id)? else {
                continue;
            };
            if filter.node.is_some() && rec.node != filter.node {
                continue;
            }
            if filter.active == Some(false) && !rec.status.is_terminal() {
                continue;
            }
            out.push((rec.created_at, WorkflowView::build(&rec, &tasks)));
        }
        out.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| a.1.instance_id.cmp(&b.1.instance_id))
        });
        Ok(out.into_iter().map(|(_, v)| v).collect())
    }

    /// Deletes a finished workflow and its task records.
    pub fn delete(&self, id: &str) -> Result<(), Error> {
        let store = self.inner.store.as_ref();
        let Some((rec, tasks)) = load_records(store, id)? else {
            return Err(Error::NotFound {
                kind: "workflow",
                id: id.to_owned(),
            });
        };
        if !rec.status.is_terminal() {
            return Err(Error::Conflict(format!(
                "workflow {id} is {}; cancel it before deleting it",
                rec.status
            )));
        }
        let mut batch = Batch::new();
        batch.require_absent(keys::ACTIVE, id.as_bytes());
        batch.delete(keys::WORKFLOWS, id.as_bytes());
        for i in 0..tasks.len() {
            batch.delete(keys::TASKS, keys::task_key(id, i));
        }
        store.commit(batch)?;
        Ok(())
    }

    /// Delivers a node's callback to the task waiting for it. The token must be the waiting
    /// task's; a wrong or stale token is refused with a conflict.
    pub fn notify(&self, node: Option<&str>, token: &str, body: Value) -> Result<String, Error> {
        let mut waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let found = waiters
            .iter()
            .find(|(_, w)| w.token == token && (node.is_none() || w.node.as_deref() == node))
            .map(|(k, _)| k.clone());
        let Some(key) = found else {
            let node_waits = waiters
                .values()
                .any(|w| node.is_some() && w.node.as_deref() == node);
            return Err(if node_waits {
                Error::Conflict("the notification token does not match the waiting task".into())
            } else {
                Error::NotFound {
                    kind: "waiting task for node",
                    id: node.unwrap_or("(any)").to_owned(),
                }
            });
        };
        let w = waiters.remove(&key).expect("key was just found");
        let label = w.label.clone();
        info!(workflow_id = %w.workflow_id, label = %w.label, "node notification received");
        let _ = w.tx.send(body);
        Ok(label)
    }

    /// The notification token of the task waiting on `node`, if one waits; templates served
    /// to the node render it into the installer's callback.
    pub fn waiting_token(&self, node: &str) -> Option<(String, String)> {
        let waiters = self.inner.waiters.lock().unwrap_or_else(|e| e.into_inner());
        waiters
            .values()
            .find(|w| w.node.as_deref() == Some(node))
            .map(|w| (w.workflow_id.clone(), w.token.clone()))
    }

    /// The unfinished tasks of the top-level workflow running on `node` (running ones first,
    /// then pending ones, each in plan order), as last committed; empty when no workflow
    /// runs on it. The node-facing boot endpoints use it to find the node's network-boot
    /// work (a task with a `profile` option). Tasks of subgraphs are not included.
    pub fn current_tasks(&self, node: &str) -> Result<Vec<NodeTask>, Error> {
        let Some(id) = self.inner.nodes.active_workflow(node)? else {
            return Ok(Vec::new());
        };
        let Some((rec, tasks)) = self.load(&id)? else {
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
                context: context.clone(),
            })
            .collect();
        // Stable: plan order is kept within each state.
        out.sort_by_key(|t| t.state != TaskState::Running);
        Ok(out)
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
    /// The outputs of the workflow's finished tasks by label (`context` in templates).
    pub context: Map<String, Value>,
}

fn load_records(
    store: &dyn Store,
    id: &str,
) -> Result<Option<(WorkflowRecord, Vec<TaskRecord>)>, Error> {
    let Some(raw) = store.get(keys::WORKFLOWS, id.as_bytes())? else {
        return Ok(None);
    };
    let rec: WorkflowRecord = serde_json::from_slice(&raw)
        .map_err(|e| Error::Store(format!("workflow {id} is unreadable: {e}")))?;
    let tasks = store
        .scan_prefix(keys::TASKS, &keys::task_prefix(id))?
        .into_iter()
        .map(|(k, v)| {
            serde_json::from_slice::<TaskRecord>(&v).map_err(|e| {
                Error::Store(format!(
                    "task {} is unreadable: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if tasks.len() != rec.plan.tasks.len() {
        return Err(Error::Store(format!(
            "workflow {id} has {} task records for {} planned tasks",
            tasks.len(),
            rec.plan.tasks.len()
        )));
    }
    Ok(Some((rec, tasks)))
}

fn write_workflow(batch: &mut Batch, rec: &WorkflowRecord) {
    batch.put(
        keys::WORKFLOWS,
        rec.id.as_bytes(),
        serde_json::to_vec(rec).unwrap_or_default(),
    );
}

fn write_task(batch: &mut Batch, wf: &str, idx: usize, t: &TaskRecord) {
    batch.put(
        keys::TASKS,
        keys::task_key(wf, idx),
        serde_json::to_vec(t).unwrap_or_default(),
    );
}

/// A workflow the scheduler drives.
struct Wf {
    rec: WorkflowRecord,
    tasks: Vec<TaskRecord>,
    node: Option<Node>,
    cancel: CancellationToken,
    /// Tokens of running jobs, by task index.
    running: HashMap<usize, CancellationToken>,
    /// Tasks queued to start (so they are not queued twice).
    queued: Vec<bool>,
    /// Running tasks found at recovery, to be started again keeping their deadline.
    restart: Vec<bool>,
    /// Task index by label, so that readiness checks do not search the plan (a linear
    /// search per dependency made long chains quadratic per transition).
    index: HashMap<String, usize>,
}

impl Wf {
    fn state_of(&self, label: &str) -> TaskState {
        self.index
            .get(label)
            .map(|&i| self.tasks[i].state)
            .unwrap_or(TaskState::Pending)
    }

    /// Whether a failure of task `idx` in `state` is handled: `ignoreFailure`, or another
    /// task waits on it with a state that matches.
    fn handled(&self, idx: usize, state: TaskState) -> bool {
        let t = &self.rec.plan.tasks[idx];
        t.ignore_failure
            || self
                .rec
                .plan
                .tasks
                .iter()
                .any(|o| o.wait_on.accepts(&t.label, state))
    }

    /// The final status, computed from the persisted task states and stop reason.
    fn outcome(&self) -> WorkflowStatus {
        if self.rec.stop == Some(StopReason::Cancel) {
            return WorkflowStatus::Cancelled;
        }
        if self.rec.stop == Some(StopReason::Deadline) {
            return WorkflowStatus::Failed;
        }
        let unhandled = self
            .tasks
            .iter()
            .enumerate()
            .any(|(i, t)| t.state.is_failure() && !self.handled(i, t.state));
        if unhandled {
            WorkflowStatus::Failed
        } else {
            WorkflowStatus::Succeeded
        }
    }
}

enum Effect {
    Spawn {
        wf: String,
        idx: usize,
        options: Options,
    },
    Reply(oneshot::Sender<Result<(), Error>>, Result<(), Error>),
    Event(Event),
    Timer(Instant, Msg),
    Cancel(CancellationToken),
}

struct Scheduler {
    engine: Engine,
    store: Arc<dyn Store>,
    jobs: Arc<JobRegistry>,
    clock: Arc<dyn Clock>,
    renderer: Renderer,
    api: ApiUrls,
    max_running: usize,
    grace: Duration,
    rx: mpsc::UnboundedReceiver<Msg>,
    wfs: HashMap<String, Wf>,
    /// Ready tasks waiting for a job slot, in order.
    queue: VecDeque<(String, usize)>,
    running_slots: usize,
    joins: JoinSet<()>,
    batch: Batch,
    effects: Vec<Effect>,
    shutdown: CancellationToken,
}

/// The most messages applied before one group commit.
const MAX_GROUP: usize = 512;

impl Scheduler {
    /// Loads every unfinished workflow and commits what recovery changes.
    fn recover(&mut self) -> Result<usize, Error> {
        let ids: Vec<String> = self
            .store
            .scan_prefix(keys::ACTIVE, b"")?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect();
        for id in &ids {
            match load_records(self.store.as_ref(), id)? {
                Some((rec, tasks)) => self.load(rec, tasks, true),
                None => {
                    warn!(workflow_id = %id, "active index names a missing workflow; dropping it");
                    self.batch.delete(keys::ACTIVE, id.as_bytes());
                }
            }
        }
        // A subgraph whose parent task is no longer running must not go on by itself.
        let orphans: Vec<String> = self
            .wfs
            .values()
            .filter_map(|w| {
                let p = w.rec.parent.as_ref()?;
                let parent_alive = self.wfs.get(&p.workflow_id).is_some_and(|pw| {
                    pw.rec.stop.is_none()
                        && pw
                            .tasks
                            .iter()
                            .any(|t| t.id == p.task_id && !t.state.is_terminal())
                });
                (!parent_alive).then(|| w.rec.id.clone())
            })
            .collect();
        for id in orphans {
            self.stop(
                &id,
                StopReason::Cancel,
                "its parent workflow no longer waits for it".into(),
            );
        }
        self.start_queued();
        self.flush_sync()?;
        Ok(ids.len())
    }

    async fn run(mut self) {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.apply(msg);
                    let mut n = 1;
                    while n < MAX_GROUP {
                        match self.rx.try_recv() {
                            Ok(m) => { self.apply(m); n += 1; }
                            Err(_) => break,
                        }
                    }
                    self.start_queued();
                    if let Err(e) = self.flush().await {
                        error!(error = %e, "store commit failed; the scheduler stops");
                        self.engine.inner.healthy.store(false, Ordering::SeqCst);
                        break;
                    }
                    // Finished jobs stay in the set until reaped; under steady load the
                    // `join_next` branch below rarely wins, so reap them here.
                    while self.joins.try_join_next().is_some() {}
                }
                Some(_) = self.joins.join_next(), if !self.joins.is_empty() => {}
            }
        }
        // Drop running jobs; their tasks stay `running` in the store and restart next time.
        self.joins.abort_all();
        while self.joins.join_next().await.is_some() {}
        self.engine.inner.healthy.store(false, Ordering::SeqCst);
        info!("scheduler stopped");
    }

    /// Commits the collected batch, then performs the effects.
    async fn flush(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            let store = self.store.clone();
            let res = tokio::task::spawn_blocking(move || store.commit(batch))
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
            if let Err(e) = res {
                for eff in self.effects.drain(..) {
                    if let Effect::Reply(tx, _) = eff {
                        let _ = tx.send(Err(Error::Store(e.to_string())));
                    }
                }
                return Err(e.into());
            }
        }
        self.perform();
        Ok(())
    }

    fn flush_sync(&mut self) -> Result<(), Error> {
        if !self.batch.is_empty() {
            self.store.commit(std::mem::take(&mut self.batch))?;
        }
        self.perform();
        Ok(())
    }

    fn perform(&mut self) {
        for eff in std::mem::take(&mut self.effects) {
            match eff {
                Effect::Spawn { wf, idx, options } => self.spawn_job(&wf, idx, options),
                Effect::Reply(tx, r) => {
                    let _ = tx.send(r);
                }
                Effect::Event(ev) => {
                    let _ = self.engine.inner.events.send(ev);
                }
                Effect::Timer(at, msg) => {
                    let tx = self.engine.inner.tx.clone();
                    self.joins.spawn(async move {
                        tokio::time::sleep_until(at).await;
                        let _ = tx.send(msg);
                    });
                }
                Effect::Cancel(token) => token.cancel(),
            }
        }
    }

    fn instant_at(&self, at_ms: u64) -> Instant {
        Instant::now() + until(self.clock.now_ms(), at_ms)
    }

    fn apply(&mut self, msg: Msg) {
        match msg {
            Msg::Load(b) => {
                let (rec, tasks) = *b;
                self.load(rec, tasks, false);
            }
            Msg::Cancel { id, reply } => {
                let res = if self.wfs.contains_key(&id) {
                    self.stop(&id, StopReason::Cancel, "cancelled by request".into());
                    Ok(())
                } else {
                    match load_records(self.store.as_ref(), &id) {
                        Ok(Some((rec, _))) => Err(Error::Conflict(format!(
                            "workflow {id} already finished ({})",
                            rec.status
                        ))),
                        Ok(None) => Err(Error::NotFound {
                            kind: "workflow",
                            id: id.clone(),
                        }),
                        Err(e) => Err(e),
                    }
                };
                self.effects.push(Effect::Reply(reply, res));
            }
            Msg::JobDone {
                wf,
                idx,
                attempt,
                outcome,
            } => self.job_done(&wf, idx, attempt, outcome),
            Msg::RetryDue { wf, idx } => {
                if let Some(w) = self.wfs.get_mut(&wf)
                    && w.tasks[idx].state == TaskState::Pending
                    && w.tasks[idx].retry_at.is_some()
                {
                    w.tasks[idx].retry_at = None;
                    self.advance(&wf);
                }
            }
            Msg::Deadline { wf } => {
                if self.wfs.contains_key(&wf) {
                    self.stop(
                        &wf,
                        StopReason::Deadline,
                        "the workflow's deadline passed".into(),
                    );
                }
            }
        }
    }

    fn load(&mut self, rec: WorkflowRecord, tasks: Vec<TaskRecord>, recovering: bool) {
        let id = rec.id.clone();
        let node = rec
            .node
            .as_deref()
            .and_then(|n| self.engine.inner.nodes.get(n).ok().flatten());
        let n = tasks.len();
        let index = rec
            .plan
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.label.clone(), i))
            .collect();
        let mut w = Wf {
            index,
            cancel: self.shutdown.child_token(),
            rec,
            tasks,
            node,
            running: HashMap::new(),
            queued: vec![false; n],
            restart: vec![false; n],
        };
        if let Some(d) = w.rec.deadline {
            self.effects.push(Effect::Timer(
                self.instant_at(d),
                Msg::Deadline { wf: id.clone() },
            ));
        }
        for i in 0..n {
            let t = &mut w.tasks[i];
            match t.state {
                TaskState::Running if recovering => {
                    if w.rec.stop.is_some() {
                        t.state = TaskState::Cancelled;
                        t.finished_at = Some(self.clock.now_ms());
                        write_task(&mut self.batch, &id, i, t);
                    } else {
                        w.restart[i] = true;
                        w.queued[i] = true;
                        self.queue.push_front((id.clone(), i));
                    }
                }
                TaskState::Pending => {
                    if let Some(at) = t.retry_at {
                        self.effects.push(Effect::Timer(
                            self.instant_at(at),
                            Msg::RetryDue {
                                wf: id.clone(),
                                idx: i,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        if recovering {
            debug!(workflow_id = %id, "workflow recovered");
        }
        self.wfs.insert(id.clone(), w);
        self.advance(&id);
    }

    /// Skips tasks that can no longer run, queues tasks that are ready, and finishes the
    /// workflow when every task is terminal.
    fn advance(&mut self, id: &str) {
        let now = self.clock.now_ms();
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        loop {
            let mut changed = false;
            for i in 0..w.tasks.len() {
                if w.tasks[i].state != TaskState::Pending || w.queued[i] {
                    continue;
                }
                let readiness = if w.rec.stop.is_some() {
                    Readiness::Never
                } else {
                    w.rec.plan.tasks[i].wait_on.decide(|l| w.state_of(l))
                };
                match readiness {
                    Readiness::Never => {
                        let t = &mut w.tasks[i];
                        t.state = TaskState::Skipped;
                        t.retry_at = None;
                        t.finished_at = Some(now);
                        write_task(&mut self.batch, id, i, t);
                        self.effects
                            .push(Effect::Event(task_event(id, i, &w.rec.plan, t)));
                        changed = true;
                    }
                    Readiness::Ready if w.tasks[i].retry_at.is_none() => {
                        w.queued[i] = true;
                        self.queue.push_back((id.to_owned(), i));
                    }
                    _ => {}
                }
            }
            if !changed {
                break;
            }
        }
        if w.tasks.iter().all(|t| t.state.is_terminal()) {
            self.finish_workflow(id);
        }
    }

    fn finish_workflow(&mut self, id: &str) {
        let Some(mut w) = self.wfs.remove(id) else {
            return;
        };
        let status = w.outcome();
        w.rec.status = status;
        w.rec.finished_at = Some(self.clock.now_ms());
        if status == WorkflowStatus::Failed && w.rec.error.is_none() {
            w.rec.error = Some("a task failed".into());
        }
        if status == WorkflowStatus::Succeeded {
            w.rec.error = None;
        }
        write_workflow(&mut self.batch, &w.rec);
        self.batch.delete(keys::ACTIVE, id.as_bytes());
        if let (Some(node), None) = (&w.rec.node, &w.rec.parent) {
            self.batch.delete(keys::NODE_LOCKS, node.as_bytes());
        }
        self.effects.push(Effect::Cancel(w.cancel.clone()));
        self.effects.push(Effect::Event(Event::Workflow {
            workflow_id: id.to_owned(),
            graph: w.rec.plan.graph.clone(),
            node: w.rec.node.clone(),
            status,
            error: w.rec.error.clone(),
        }));
        info!(workflow_id = %id, graph = %w.rec.plan.graph, %status, "workflow finished");
    }

    /// Stops a workflow early: records why, signals running jobs, skips pending tasks.
    fn stop(&mut self, id: &str, reason: StopReason, why: String) {
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        if w.rec.stop.is_some() {
            return;
        }
        w.rec.stop = Some(reason);
        w.rec.error = Some(why);
        write_workflow(&mut self.batch, &w.rec);
        for token in w.running.values() {
            self.effects.push(Effect::Cancel(token.clone()));
        }
        self.advance(id);
    }

    /// Starts queued tasks while job slots are free.
    fn start_queued(&mut self) {
        let mut deferred = VecDeque::new();
        while let Some((id, idx)) = self.queue.pop_front() {
            let Some(w) = self.wfs.get(&id) else { continue };
            let job = self.jobs.get(&w.rec.plan.tasks[idx].job).cloned();
            let slot = job.as_ref().is_none_or(|j| j.occupies_slot());
            if slot && self.running_slots >= self.max_running {
                deferred.push_back((id, idx));
                continue;
            }
            self.start_task(&id, idx, job, slot);
        }
        self.queue = deferred;
    }

    fn start_task(&mut self, id: &str, idx: usize, job: Option<Arc<dyn Job>>, slot: bool) {
        let now = self.clock.now_ms();
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        w.queued[idx] = false;
        let restart = std::mem::take(&mut w.restart[idx]);
        if w.rec.stop.is_some() {
            // Stopped while queued: a restarted task ends cancelled, a pending one skipped.
            if restart {
                let t = &mut w.tasks[idx];
                t.state = TaskState::Cancelled;
                t.finished_at = Some(now);
                write_task(&mut self.batch, id, idx, t);
            }
            self.advance(id);
            return;
        }
        if w.tasks[idx].state != TaskState::Pending && !restart {
            return;
        }
        let planned = &w.rec.plan.tasks[idx];
        // Render the options now, over the context as it stands.
        let rendered = match &job {
            None => Err(format!(
                "job {} is not available in this engine",
                planned.job
            )),
            Some(job) => {
                // Building the variables clones every finished task's output; only a task
                // whose options hold a template needs them.
                let vars = if !planned.options.values().any(holds_template) {
                    Value::Null
                } else {
                    json!({
                        "options": planned.options,
                        "context": context_of(&w.rec.plan, &w.tasks),
                        "node": w.node.as_ref().map(Node::template_view),
                        "task": {
                            "id": w.tasks[idx].id,
                            "label": planned.label,
                            "workflowId": id,
                            "token": w.tasks[idx].token,
                        },
                        "api": {"base": self.api.base, "nodeBase": self.api.node_base},
                    })
                };
                self.renderer
                    .render_options(&planned.options, &vars)
                    .and_then(|mut opts| {
                        job.schema().coerce(&mut opts);
                        job.schema()
                            .check(&opts, true)
                            .map(|()| opts)
                            .map_err(|(f, m)| format!("option '{f}' {m}"))
                    })
            }
        };
        let t = &mut w.tasks[idx];
        t.state = TaskState::Running;
        t.attempts += 1;
        t.error = None;
        if !restart || t.started_at.is_none() {
            t.started_at = Some(now);
        }
        if !restart || t.deadline.is_none() {
            t.deadline = planned.timeout_ms.map(|ms| now + ms);
        }
        write_task(&mut self.batch, id, idx, t);
        let first_start = w.rec.status == WorkflowStatus::Pending;
        if first_start {
            w.rec.status = WorkflowStatus::Running;
            write_workflow(&mut self.batch, &w.rec);
            self.effects.push(Effect::Event(Event::Workflow {
                workflow_id: id.to_owned(),
                graph: w.rec.plan.graph.clone(),
                node: w.rec.node.clone(),
                status: WorkflowStatus::Running,
                error: None,
            }));
        }
        self.effects.push(Effect::Event(task_event(
            id,
            idx,
            &w.rec.plan,
            &w.tasks[idx],
        )));
        let attempt = w.tasks[idx].attempts;
        match rendered {
            Ok(options) => {
                w.running.insert(idx, w.cancel.child_token());
                if slot {
                    self.running_slots += 1;
                }
                self.effects.push(Effect::Spawn {
                    wf: id.to_owned(),
                    idx,
                    options,
                });
            }
            Err(e) => {
                // The attempt fails before any job runs; it is still one durable attempt.
                let msg = e;
                w.running.insert(idx, w.cancel.child_token());
                if slot {
                    self.running_slots += 1;
                }
                self.job_done(id, idx, attempt, Outcome::Failed(msg));
            }
        }
    }

    fn spawn_job(&mut self, id: &str, idx: usize, options: Options) {
        let Some(w) = self.wfs.get(id) else { return };
        let Some(token) = w.running.get(&idx).cloned() else {
            return;
        };
        let planned = &w.rec.plan.tasks[idx];
        let Some(job) = self.jobs.get(&planned.job).cloned() else {
            return;
        };
        let t = &w.tasks[idx];
        let deadline = t.deadline.map(|d| self.instant_at(d));
        let ctx = JobContext {
            options,
            node: w.node.clone(),
            workflow_id: id.to_owned(),
            task_id: t.id.clone(),
            label: planned.label.clone(),
            attempt: t.attempts,
            retry: t.failures,
            token: t.token.clone(),
            cancel: token.clone(),
            services: Arc::new(Services {
                engine: self.engine.clone(),
            }),
        };
        let attempt = t.attempts;
        let tx = self.engine.inner.tx.clone();
        let wf = id.to_owned();
        let grace = self.grace;
        debug!(workflow_id = %wf, label = %planned.label, attempt, "job started");
        self.joins.spawn(async move {
            let outcome = supervise(job.run(ctx), token, deadline, grace).await;
            let _ = tx.send(Msg::JobDone {
                wf,
                idx,
                attempt,
                outcome,
            });
        });
    }

    fn job_done(&mut self, id: &str, idx: usize, attempt: u32, outcome: Outcome) {
        let now = self.clock.now_ms();
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        if w.tasks[idx].state != TaskState::Running || w.tasks[idx].attempts != attempt {
            return; // A stale result from an attempt that no longer counts.
        }
        if w.running.remove(&idx).is_some() {
            let slot = self
                .jobs
                .get(&w.rec.plan.tasks[idx].job)
                .is_none_or(|j| j.occupies_slot());
            if slot {
                self.running_slots = self.running_slots.saturating_sub(1);
            }
        }
        let planned = &w.rec.plan.tasks[idx];
        let label = planned.label.clone();
        let (retries, backoff) = (planned.retries, planned.backoff_ms);
        let stopping = w.rec.stop.is_some();
        let t = &mut w.tasks[idx];
        let (state, error) = match outcome {
            Outcome::Succeeded(v) => {
                t.output = Some(v);
                (TaskState::Succeeded, None)
            }
            Outcome::Cancelled => (TaskState::Cancelled, Some("cancelled".to_owned())),
            Outcome::Failed(e) => (TaskState::Failed, Some(e)),
            Outcome::Timeout => (
                TaskState::Timeout,
                Some(format!(
                    "timed out after {}",
                    fmt_ms(planned.timeout_ms.unwrap_or_default())
                )),
            ),
        };
        t.error = error.clone();
        if state.is_failure() && !stopping && t.failures < retries {
            // Retry after a backoff that doubles with each failure.
            let delay = backoff
                .saturating_mul(1u64 << t.failures.min(20))
                .min(MAX_BACKOFF_MS);
            t.failures += 1;
            t.state = TaskState::Pending;
            t.retry_at = Some(now + delay);
            t.deadline = None;
            write_task(&mut self.batch, id, idx, t);
            self.effects
                .push(Effect::Event(task_event(id, idx, &w.rec.plan, t)));
            self.effects.push(Effect::Timer(
                Instant::now() + Duration::from_millis(delay),
                Msg::RetryDue {
                    wf: id.to_owned(),
                    idx,
                },
            ));
            warn!(workflow_id = %id, label = %label, error = ?error, retry_in_ms = delay, "task failed; retrying");
            return;
        }
        if state.is_failure() {
            t.failures += 1;
        }
        t.state = state;
        t.finished_at = Some(now);
        write_task(&mut self.batch, id, idx, t);
        self.effects
            .push(Effect::Event(task_event(id, idx, &w.rec.plan, t)));
        if state.is_failure() {
            warn!(workflow_id = %id, label = %label, error = ?error, %state, "task failed");
            if !w.handled(idx, state) {
                let why = format!("task '{label}' {state}: {}", error.unwrap_or_default());
                self.stop(id, StopReason::Failure, why);
            }
        }
        self.advance(id);
    }
}

/// Whether an option value holds a template anywhere inside it.
fn holds_template(v: &Value) -> bool {
    match v {
        Value::String(s) => crate::template::is_template(s),
        Value::Array(items) => items.iter().any(holds_template),
        Value::Object(m) => m.values().any(holds_template),
        _ => false,
    }
}

fn fmt_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn task_event(id: &str, idx: usize, plan: &Plan, t: &TaskRecord) -> Event {
    Event::Task {
        workflow_id: id.to_owned(),
        label: plan.tasks[idx].label.clone(),
        index: idx,
        state: t.state,
        attempts: t.attempts,
        error: t.error.clone(),
    }
}

/// Runs a job under its deadline and cancellation token. A cancelled or timed-out job gets
/// `grace` to clean up before its future is dropped.
async fn supervise(
    fut: BoxFuture<'static, JobResult>,
    token: CancellationToken,
    deadline: Option<Instant>,
    grace: Duration,
) -> Outcome {
    tokio::pin!(fut);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    let timed_out = tokio::select! {
        biased;
        _ = token.cancelled() => false,
        r = &mut fut => {
            return match r {
                _ if token.is_cancelled() => Outcome::Cancelled,
                Ok(v) => Outcome::Succeeded(v),
                Err(e) => Outcome::Failed(e.message),
            };
        }
        _ = sleep => { token.cancel(); true }
    };
    let _ = tokio::time::timeout(grace, &mut fut).await;
    if timed_out {
        Outcome::Timeout
    } else {
        Outcome::Cancelled
    }
}

/// What the engine lends to jobs.
struct Services {
    engine: Engine,
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
        Box::pin(async move { run_subgraph(engine, ctx, graph, options).await })
    }

    fn wait_notification(&self, ctx: &JobContext) -> BoxFuture<'static, JobResult> {
        let engine = self.engine.clone();
        let ctx = ctx.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            {
                let mut waiters = engine
                    .inner
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                waiters.insert(
                    ctx.task_id.clone(),
                    Waiter {
                        node: ctx.node.as_ref().map(|n| n.id.clone()),
                        workflow_id: ctx.workflow_id.clone(),
                        label: ctx.label.clone(),
                        token: ctx.token.clone(),
                        tx,
                    },
                );
            }
            let res = tokio::select! {
                body = rx => body.map_err(|_| crate::job::JobError::new("notification channel closed")),
                _ = ctx.cancel.cancelled() => Err(crate::job::JobError::new("cancelled while waiting for the node")),
            };
            engine
                .inner
                .waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&ctx.task_id);
            res
        })
    }

    fn nodes(&self) -> &Nodes {
        &self.engine.inner.nodes
    }
}

async fn run_subgraph(
    engine: Engine,
    ctx: JobContext,
    graph: String,
    options: Options,
) -> JobResult {
    use crate::job::JobError;
    let child_key = format!("{}/{}", ctx.task_id, ctx.retry);
    let mut events = engine.subscribe();
    let existing = engine
        .inner
        .store
        .get(keys::CHILDREN, child_key.as_bytes())
        .map_err(|e| JobError::new(e.to_string()))?;
    let child_id = match existing {
        Some(id) => String::from_utf8_lossy(&id).into_owned(),
        None => {
            let mut run = RunOptions::new();
            if let Some(Value::Object(d)) = options.get("defaults") {
                run.insert("defaults".into(), d.clone());
                for (k, v) in &options {
                    if let (false, Value::Object(m)) = (k == "defaults", v) {
                        run.insert(k.clone(), m.clone());
                    }
                }
            } else if !options.is_empty() {
                run.insert("defaults".into(), options.clone());
            }
            let req = RunRequest {
                graph: graph.clone(),
                node: ctx.node.as_ref().map(|n| n.id.clone()),
                options: run,
            };
            let parent = ParentRef {
                workflow_id: ctx.workflow_id.clone(),
                task_id: ctx.task_id.clone(),
            };
            match engine.create(req, Some((parent, child_key.clone()))).await {
                Ok(v) => v.instance_id,
                Err(Error::Conflict(_)) => engine
                    .inner
                    .store
                    .get(keys::CHILDREN, child_key.as_bytes())
                    .ok()
                    .flatten()
                    .map(|id| String::from_utf8_lossy(&id).into_owned())
                    .ok_or_else(|| JobError::new("subgraph vanished"))?,
                Err(e) => return Err(JobError::new(format!("subgraph {graph}: {e}"))),
            }
        }
    };
    loop {
        if let Some(view) = engine
            .get(&child_id)
            .map_err(|e| JobError::new(e.to_string()))?
            && view.status.is_terminal()
        {
            return match view.status {
                WorkflowStatus::Succeeded => Ok(json!({
                    "workflowId": child_id,
                    "status": view.status,
                    "context": Value::Object(view.context),
                })),
                s => Err(JobError::new(format!(
                    "subgraph {graph} ({child_id}) ended {s}: {}",
                    view.error.unwrap_or_default()
                ))),
            };
        }
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(Event::Workflow { workflow_id, status, .. }) if workflow_id == child_id && status.is_terminal() => {}
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Err(JobError::new("engine stopped")),
            },
            _ = ctx.cancel.cancelled() => {
                let _ = engine.cancel(&child_id).await;
                return Err(JobError::new(format!("cancelled; subgraph {child_id} cancelled too")));
            }
        }
    }
}

/// `graph.run`: runs another graph as a subgraph; its outcome is the task's outcome.
pub struct GraphRunJob {
    schema: crate::job::OptionSchema,
}

impl Default for GraphRunJob {
    fn default() -> Self {
        use crate::job::{OptionKind, OptionSchema};
        Self {
            schema: OptionSchema::new()
                .required(
                    "graphName",
                    OptionKind::String,
                    "the graph to run as a subgraph",
                )
                .optional(
                    "graphOptions",
                    OptionKind::Object,
                    Some(Value::Object(Map::new())),
                    "options for the subgraph ({defaults: {...}, label: {...}})",
                ),
        }
    }
}

impl Job for GraphRunJob {
    fn name(&self) -> &'static str {
        "graph.run"
    }

    fn schema(&self) -> &crate::job::OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        Box::pin(async move {
            let graph = ctx.str_required("graphName")?.to_owned();
            let options = ctx
                .options
                .get("graphOptions")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            let services = ctx.services.clone();
            services.run_subgraph(&ctx, &graph, options).await
        })
    }

    fn occupies_slot(&self) -> bool {
        false
    }
}
