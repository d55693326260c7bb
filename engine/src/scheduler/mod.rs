//! The scheduler's runtime: one tokio task that feeds messages to the [`Core`], commits each
//! step's batch, and only then performs its effects — starting jobs, cancelling them, arming
//! timers, publishing events, answering callers.
//!
//! Messages that arrive together are applied together and committed in one batch (group
//! commit), so one `fsync` covers many transitions. Jobs run on their own tokio tasks; a job
//! that panics ends its task `failed`, naming the job, like any other failure.

pub mod core;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use metalgraph_store::{Batch, Store};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, error, info, warn};

pub use self::core::{Core, Effect, Msg, Outcome, Reply, StartJob, Step};
use crate::clock::{Clock, until};
use crate::engine::{ApiUrls, Engine, Services};
use crate::error::{Error, blocking};
use crate::events::EventLog;
use crate::job::{BoxFuture, Job, JobContext, JobRegistry, JobResult, Options};
use crate::keys;
use crate::metrics;
use crate::model::WorkflowStatus;
use crate::nodes::Node;
use crate::notify::NodeCap;
use crate::template::{Dialect, Renderer};
use crate::workflow::Event;
use crate::workflow::load_records;

/// The most messages applied before one group commit.
const MAX_GROUP: usize = 512;

/// The tokens of one unfinished workflow: its own (timers hang off it) and its running jobs'.
#[derive(Default)]
struct WfTokens {
    token: CancellationToken,
    /// By task index: the attempt that runs and its token.
    jobs: HashMap<usize, (u32, CancellationToken)>,
}

pub(crate) struct Runtime {
    pub(crate) engine: Engine,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) jobs: Arc<JobRegistry>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) renderer: Arc<Renderer>,
    pub(crate) api: ApiUrls,
    pub(crate) grace: Duration,
    pub(crate) core: Core,
    pub(crate) rx: mpsc::UnboundedReceiver<Msg>,
    pub(crate) shutdown: CancellationToken,
    joins: JoinSet<()>,
    tokens: HashMap<String, WfTokens>,
}

impl Runtime {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: Engine,
        store: Arc<dyn Store>,
        jobs: Arc<JobRegistry>,
        clock: Arc<dyn Clock>,
        api: ApiUrls,
        max_running: usize,
        grace: Duration,
        rx: mpsc::UnboundedReceiver<Msg>,
        shutdown: CancellationToken,
    ) -> Self {
        metrics::metrics().job_slots.set(max_running.max(1) as i64);
        Self {
            core: Core::new(jobs.clone(), max_running),
            engine,
            store,
            jobs,
            clock,
            renderer: Arc::new(Renderer::new()),
            api,
            grace,
            rx,
            shutdown,
            joins: JoinSet::new(),
            tokens: HashMap::new(),
        }
    }

    /// Recovers every unfinished workflow, then schedules until shutdown or a store failure.
    /// Returns the failure that stopped it, if any.
    pub(crate) async fn run(mut self) -> Result<(), Error> {
        let res = self.serve().await;
        // Drop running jobs; their tasks stay `running` in the store and restart next time.
        self.joins.abort_all();
        while self.joins.join_next().await.is_some() {}
        match &res {
            Ok(()) => info!("scheduler stopped"),
            Err(e) => error!(error = %e, "the scheduler stopped after a store failure"),
        }
        res
    }

    async fn serve(&mut self) -> Result<(), Error> {
        self.recover().await?;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return Ok(()) };
                    self.apply(msg);
                    let mut n = 1;
                    while n < MAX_GROUP {
                        match self.rx.try_recv() {
                            Ok(m) => { self.apply(m); n += 1; }
                            Err(_) => break,
                        }
                    }
                    self.flush(Batch::new()).await?;
                    // Finished jobs stay in the set until reaped; under steady load the
                    // `join_next` branch below rarely wins, so reap them here.
                    while self.joins.try_join_next().is_some() {}
                }
                Some(_) = self.joins.join_next(), if !self.joins.is_empty() => {}
            }
        }
    }

    /// Loads every workflow the `active` index names and commits what recovery changes.
    async fn recover(&mut self) -> Result<(), Error> {
        let store = self.store.clone();
        let mut extra = Batch::new();
        let node_store = self.engine.nodes().clone();
        let (log, loaded, missing, extra) = blocking(move || {
            let log = EventLog::load(store.as_ref(), &mut extra)?;
            let indexed = crate::history::build_index(store.as_ref())?;
            let (nodes, sealed) = node_store.migrate_blocking()?;
            if indexed + nodes + sealed > 0 {
                info!(
                    workflows = indexed,
                    nodes,
                    sealed,
                    "brought the records of an earlier version up to date (indexes, sealed passwords)"
                );
            }
            let mut loaded = Vec::new();
            let mut missing = Vec::new();
            for (k, _) in store.scan_prefix(keys::ACTIVE, b"")? {
                let id = String::from_utf8_lossy(&k).into_owned();
                match load_records(store.as_ref(), &id)? {
                    Some(records) => loaded.push(records),
                    None => missing.push(id),
                }
            }
            Ok::<_, Error>((log, loaded, missing, extra))
        })
        .await?;
        let last = self.engine.restore_events(log);
        self.core.continue_events_after(last);
        let now = self.clock.now_ms();
        let mut extra = extra;
        for id in missing {
            warn!(workflow_id = %id, "active index names a missing workflow; dropping it");
            extra.delete(keys::ACTIVE, id.as_bytes());
        }
        let n = loaded.len();
        for (rec, tasks) in loaded {
            let msg = Msg::Load {
                rec: Box::new(rec),
                tasks,
                recovering: true,
            };
            self.core.apply(msg, now);
        }
        self.core.cancel_orphans(now);
        self.flush(extra).await?;
        self.engine.mark_recovered();
        info!(workflows = n, "engine recovered");
        Ok(())
    }

    fn apply(&mut self, msg: Msg) {
        if let Msg::JobDone {
            wf, idx, attempt, ..
        } = &msg
            && let Some(w) = self.tokens.get_mut(wf)
            && w.jobs.get(idx).is_some_and(|(a, _)| a == attempt)
        {
            w.jobs.remove(idx);
        }
        self.core.apply(msg, self.clock.now_ms());
    }

    /// Commits the core's step (with `extra` writes), then performs its effects. A failed
    /// commit answers waiting callers with the error and stops the scheduler.
    async fn flush(&mut self, extra: Batch) -> Result<(), Error> {
        let Step { mut batch, effects } = self.core.step(self.clock.now_ms());
        batch.extend(extra);
        if !batch.is_empty() {
            let store = self.store.clone();
            if let Err(e) = blocking(move || store.commit(batch).map_err(Error::from)).await {
                for eff in effects {
                    if let Effect::Reply(tx, _) = eff {
                        let _ = tx.send(Err(Error::Store(e.to_string())));
                    }
                }
                return Err(e);
            }
        }
        for eff in effects {
            self.perform(eff);
        }
        let m = metrics::metrics();
        m.workflows_active.set(self.core.active() as i64);
        m.job_slots_in_use.set(self.core.slots_in_use() as i64);
        Ok(())
    }

    fn wf_tokens(&mut self, wf: &str) -> &mut WfTokens {
        let shutdown = &self.shutdown;
        self.tokens
            .entry(wf.to_owned())
            .or_insert_with(|| WfTokens {
                token: shutdown.child_token(),
                jobs: HashMap::new(),
            })
    }

    fn perform(&mut self, eff: Effect) {
        match eff {
            Effect::Start(s) => self.start_job(*s),
            Effect::CancelJob { wf, idx } => {
                if let Some((_, token)) = self.tokens.get(&wf).and_then(|w| w.jobs.get(&idx)) {
                    token.cancel();
                }
            }
            Effect::Timer { wf, at_ms, msg } => {
                // The clock reads whole milliseconds (rounded down), so one is added: a
                // timer may fire a millisecond late, never early.
                let at =
                    Instant::now() + until(self.clock.now_ms(), at_ms) + Duration::from_millis(1);
                let token = self.wf_tokens(&wf).token.clone();
                let tx = self.engine.sender();
                // A timer ends with its workflow, so finished workflows leave none behind.
                self.joins.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => { let _ = tx.send(msg); }
                        _ = token.cancelled() => {}
                    }
                });
            }
            Effect::Finished { wf } => {
                if let Some(w) = self.tokens.remove(&wf) {
                    w.token.cancel();
                }
            }
            Effect::Event(n, ev) => {
                count_event(&ev);
                self.engine.publish(n, ev);
            }
            Effect::Reply(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }

    fn start_job(&mut self, s: StartJob) {
        if s.retry > 0 && !s.restart {
            metrics::metrics()
                .task_retries
                .get_or_create(&metrics::JobLabels { job: s.job.clone() })
                .inc();
        }
        let Some(job) = self.jobs.get(&s.job).cloned() else {
            let outcome = Outcome::Failed(format!("job {} is not available", s.job));
            self.send_done(&s, outcome);
            return;
        };
        let tokens = self.wf_tokens(&s.wf);
        let token = tokens.token.child_token();
        tokens.jobs.insert(s.idx, (s.attempt, token.clone()));
        let deadline = s
            .deadline_ms
            .map(|d| Instant::now() + until(self.clock.now_ms(), d));
        let tx = self.engine.sender();
        let run = JobRun {
            job,
            start: s,
            engine: self.engine.clone(),
            renderer: self.renderer.clone(),
            api: self.api.clone(),
            token,
            deadline,
            grace: self.grace,
        };
        self.joins.spawn(async move {
            let (wf, idx, attempt, name) = (
                run.start.wf.clone(),
                run.start.idx,
                run.start.attempt,
                run.job.name(),
            );
            debug!(workflow_id = %wf, label = %run.start.label, attempt, "job started");
            let started = Instant::now();
            // The job runs on a task of its own, so that a panic inside it is caught here and
            // becomes the task's failure instead of stranding the workflow.
            let handle = AbortOnDropHandle::new(tokio::spawn(run.run()));
            let (outcome, panicked) = match handle.await {
                Ok(outcome) => (outcome, false),
                Err(e) if e.is_panic() => {
                    let why = panic_message(e.into_panic());
                    error!(workflow_id = %wf, job = name, panic = %why, "job panicked");
                    (Outcome::Failed(format!("job {name} panicked: {why}")), true)
                }
                Err(_) => (Outcome::Cancelled, false),
            };
            count_attempt(name, &outcome, panicked, started.elapsed());
            let _ = tx.send(Msg::JobDone {
                wf,
                idx,
                attempt,
                outcome,
            });
        });
    }

    fn send_done(&self, s: &StartJob, outcome: Outcome) {
        let _ = self.engine.sender().send(Msg::JobDone {
            wf: s.wf.clone(),
            idx: s.idx,
            attempt: s.attempt,
            outcome,
        });
    }
}

/// Counts an event in the workflow metrics.
fn count_event(ev: &Event) {
    let m = metrics::metrics();
    m.events.inc();
    if let Event::Workflow { graph, status, .. } = ev {
        if *status == WorkflowStatus::Pending {
            m.workflow_started(graph);
        } else if status.is_terminal() {
            m.workflow_finished(graph, *status);
        }
    }
}

/// Counts a finished job attempt in the task metrics.
fn count_attempt(job: &str, outcome: &Outcome, panicked: bool, took: Duration) {
    use metrics::{AttemptOutcome as A, FailureReason as F};
    let m = metrics::metrics();
    let (kind, reason) = match outcome {
        Outcome::Succeeded(_) => (A::succeeded, None),
        Outcome::Failed(_) if panicked => (A::failed, Some(F::panic)),
        Outcome::Failed(_) => (A::failed, Some(F::error)),
        Outcome::Timeout => (A::timeout, Some(F::timeout)),
        Outcome::Cancelled => (A::cancelled, None),
    };
    m.task_duration
        .get_or_create(&metrics::AttemptLabels {
            job: job.to_owned(),
            outcome: kind,
        })
        .observe(took.as_secs_f64());
    if let Some(reason) = reason {
        m.task_failures
            .get_or_create(&metrics::FailureLabels {
                job: job.to_owned(),
                reason,
            })
            .inc();
    }
}

/// One job run: read the node, render the options, run the job under its deadline.
struct JobRun {
    job: Arc<dyn Job>,
    start: StartJob,
    engine: Engine,
    renderer: Arc<Renderer>,
    api: ApiUrls,
    token: CancellationToken,
    deadline: Option<Instant>,
    grace: Duration,
}

impl JobRun {
    async fn run(self) -> Outcome {
        let s = self.start;
        // The node is read when each attempt starts, so that a retry sees a corrected OBM,
        // and its OBM's endpoint then, so that a rotated password is used.
        let node = match &s.node {
            None => None,
            Some(id) => match self.engine.nodes().current(id).await {
                Ok(Some(n)) => match self.engine.nodes().resolve(n).await {
                    Ok(n) => Some(n),
                    Err(e) => return Outcome::Failed(e.to_string()),
                },
                Ok(None) => return Outcome::Failed(format!("node {id} no longer exists")),
                Err(e) => return Outcome::Failed(format!("node {id} could not be read: {e}")),
            },
        };
        let cap = node
            .as_ref()
            .map(|n| self.engine.caps().cap(&n.id, &s.wf, &s.task_id, &s.token));
        let rendered = render(&self.job, &self.renderer, &self.api, &s, &node, cap).await;
        // Cancelled while the node was read or the options rendered: the job never starts,
        // and the task ends cancelled whatever the render gave.
        if self.token.is_cancelled() {
            return Outcome::Cancelled;
        }
        let options = match rendered {
            Ok(options) => options,
            Err(e) => return Outcome::Failed(e),
        };
        let ctx = JobContext {
            options,
            node,
            workflow_id: s.wf.clone(),
            task_id: s.task_id.clone(),
            label: s.label.clone(),
            attempt: s.attempt,
            retry: s.retry,
            token: s.token.clone(),
            checkpoint: s.checkpoint.clone(),
            cancel: self.token.clone(),
            services: Arc::new(Services::new(self.engine.clone())),
        };
        supervise(self.job.run(ctx), self.token, self.deadline, self.grace).await
    }
}

/// Renders a task's options on the blocking pool when they hold templates (rendering is
/// CPU work a hostile template can make long), then checks them.
async fn render(
    job: &Arc<dyn Job>,
    renderer: &Arc<Renderer>,
    api: &ApiUrls,
    s: &StartJob,
    node: &Option<Node>,
    cap: Option<NodeCap>,
) -> Result<Options, String> {
    if s.context.is_none() {
        return render_options(job.as_ref(), renderer, api, s, node.as_ref(), cap.as_ref());
    }
    let (job, renderer, api, s, node) = (
        job.clone(),
        renderer.clone(),
        api.clone(),
        s.clone(),
        node.clone(),
    );
    tokio::task::spawn_blocking(move || {
        render_options(
            job.as_ref(),
            &renderer,
            &api,
            &s,
            node.as_ref(),
            cap.as_ref(),
        )
    })
    .await
    .map_err(|e| format!("rendering the options did not complete: {e}"))?
}

/// A task's options as its job receives them: templates rendered (over `options`,
/// `context`, `node`, `task` (`id`, `label`, `workflowId`, `token`, `nodeId`, `cap`) and
/// `api`) when the task holds any, string values coerced to
/// their declared kinds, and the result checked against the job's schema. An error names
/// the option at fault. `cap` is the node's capability for the task (`task.cap`; absent
/// for a task without a node), which node-facing URLs carry so that the node is shown its
/// callback token (see `crate::notify`).
pub fn render_options(
    job: &dyn Job,
    renderer: &Renderer,
    api: &ApiUrls,
    s: &StartJob,
    node: Option<&Node>,
    cap: Option<&NodeCap>,
) -> Result<Options, String> {
    let mut opts = match &s.context {
        None => s.options.clone(),
        Some(context) => {
            let mut task = json!({
                "id": s.task_id,
                "label": s.label,
                "workflowId": s.wf,
                "token": s.token,
                // RackHD's name for the node the task runs on.
                "nodeId": node.map(|n| n.id.as_str()),
            });
            if let Some(cap) = cap {
                task["cap"] = json!(cap.as_str());
            }
            let vars = option_vars(
                s.dialect,
                api,
                Value::Object(context.clone()),
                json!(node.map(Node::template_view)),
                task,
            );
            renderer.render_task_options(s.dialect, &s.options, &s.data, &vars)?
        }
    };
    job.schema().coerce(&mut opts);
    job.schema()
        .check(&opts, true)
        .map(|()| opts)
        .map_err(|(f, m)| format!("option '{f}' {m}"))
}

/// The variables of a task's option templates besides `options`: `context` (the outputs of
/// finished tasks by label), `node`, `task` (with `workflowId` and `nodeId`) and `api`
/// (`base`, `nodeBase`). In RackHD's dialect `api` holds RackHD's names instead
/// ([`ApiUrls::rackhd_vars`]), `file.server` is the files directory, and `context.target`
/// and `context.graphId` are the node and the workflow, as in RackHD.
pub fn option_vars(
    dialect: Dialect,
    api: &ApiUrls,
    context: Value,
    node: Value,
    task: Value,
) -> Value {
    let mut vars = json!({
        "context": context,
        "node": node,
        "api": {"base": api.base, "nodeBase": api.node_base},
    });
    if dialect == Dialect::Rackhd {
        let (rackhd_api, file) = api.rackhd_vars();
        vars["api"] = rackhd_api;
        vars["file"] = file;
        if let Value::Object(c) = &mut vars["context"] {
            c.entry("target").or_insert_with(|| task["nodeId"].clone());
            c.entry("graphId")
                .or_insert_with(|| task["workflowId"].clone());
        }
    }
    vars["task"] = task;
    vars
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => (*s).to_owned(),
            Err(_) => "(no message)".to_owned(),
        },
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
