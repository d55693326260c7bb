//! The scheduler's runtime: one tokio task that feeds messages to the [`Core`], commits each
//! step's batch, and only then performs its effects — starting jobs, cancelling them, arming
//! timers, publishing events, answering callers.
//!
//! Messages that arrive together are applied together and committed in one batch (group
//! commit), so one `fsync` covers many transitions. Jobs run on their own tokio tasks; a job
//! that panics ends its task `failed`, naming the job, like any other failure.

pub mod core;
pub(crate) mod inbox;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use metalgraph_store::{Batch, Store};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
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
use crate::ownership::{Ownership, Tick};
use crate::template::{Dialect, Renderer};
use crate::workflow::Event;
use crate::workflow::load_records;
use crate::workflow::{TaskRecord, WorkflowRecord};

/// The most messages applied before one group commit.
const MAX_GROUP: usize = 512;

/// How often a replica reads its partitions' inbox when nobody wakes it.
const INBOX_EVERY: Duration = Duration::from_millis(100);

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
    /// Which workflows this scheduler drives (see `ownership.rs`).
    ownership: Ownership,
    /// A replica's: the lease rounds that changed something.
    ticks: Option<mpsc::UnboundedReceiver<Tick>>,
    /// A replica's: what wakes the inbox reader.
    inbox: Option<Arc<tokio::sync::Notify>>,
    /// A fenced commit failed: the partitions still held are to be loaded again.
    reload: bool,
    /// The step being committed, if any. Messages that arrive meanwhile are applied to the
    /// core and committed as the next step once this one is durable, so the core's work
    /// overlaps the store's write and sync.
    in_flight: Option<InFlight>,
}

/// A step whose batch is being committed, and what to do once it is.
struct InFlight {
    commit: tokio::task::JoinHandle<Result<(), metalgraph_store::Error>>,
    effects: Vec<Effect>,
    /// The batch staged events (a replica's), for the sequencer to number.
    staged: bool,
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
            ownership: Ownership::Sole,
            ticks: None,
            inbox: None,
            reload: false,
            in_flight: None,
        }
    }

    /// Makes this scheduler a replica's: it drives the partitions it holds, as `ticks`
    /// report them, reads their inbox when `inbox` is notified (and every
    /// [`INBOX_EVERY`]), fences its commits and stages its events.
    pub(crate) fn lease(
        &mut self,
        ownership: Ownership,
        ticks: mpsc::UnboundedReceiver<Tick>,
        inbox: Arc<tokio::sync::Notify>,
    ) {
        self.ownership = ownership;
        self.ticks = Some(ticks);
        self.inbox = Some(inbox);
        self.core.stage_events();
    }

    fn leased(&self) -> bool {
        self.ticks.is_some()
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
        let mut inbox_every = tokio::time::interval(INBOX_EVERY);
        inbox_every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if std::mem::take(&mut self.reload) {
                self.load_partitions(None).await?;
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return self.settle().await,
                Some(tick) = next_tick(&mut self.ticks) => self.on_tick(tick).await?,
                () = inbox_due(&self.inbox, &mut inbox_every) => self.read_inbox().await?,
                committed = committed(&mut self.in_flight), if self.in_flight.is_some() => {
                    let done = self.in_flight.take().expect("a commit is in flight");
                    self.finish(done, committed)?;
                    self.begin(Batch::new(), BTreeSet::new());
                }
                msg = self.rx.recv() => {
                    let Some(msg) = msg else { return self.settle().await };
                    self.apply(msg);
                    let mut n = 1;
                    while n < MAX_GROUP {
                        match self.rx.try_recv() {
                            Ok(m) => { self.apply(m); n += 1; }
                            Err(_) => break,
                        }
                    }
                    if self.in_flight.is_none() {
                        self.begin(Batch::new(), BTreeSet::new());
                    }
                    // Finished jobs stay in the set until reaped; under steady load the
                    // `join_next` branch below rarely wins, so reap them here.
                    while self.joins.try_join_next().is_some() {}
                }
                Some(_) = self.joins.join_next(), if !self.joins.is_empty() => {}
            }
        }
    }

    /// Loads every workflow the `active` index names in the partitions this scheduler
    /// drives (all of them, unless it is a replica's, which loads its partitions as it
    /// takes them) and commits what recovery changes.
    async fn recover(&mut self) -> Result<(), Error> {
        let store = self.store.clone();
        let mut extra = Batch::new();
        let node_store = self.engine.nodes().clone();
        let own = self.ownership.clone();
        let ((log, pages), loaded, missing, extra) = blocking(move || {
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
            let (loaded, missing) = load_active(store.as_ref(), |p| own.owns(p))?;
            Ok::<_, Error>((log, loaded, missing, extra))
        })
        .await?;
        self.engine.restore_events(log);
        if !self.leased() {
            self.core.continue_events(pages);
        }
        let now = self.clock.now_ms();
        let mut extra = extra;
        for id in missing {
            warn!(workflow_id = %id, "active index names a missing workflow; dropping it");
            extra.delete(keys::ACTIVE, id.as_bytes());
        }
        let n = loaded.len();
        self.resume(loaded, now);
        self.flush(extra, BTreeSet::new()).await?;
        self.engine.mark_recovered();
        info!(workflows = n, "engine recovered");
        Ok(())
    }

    /// Loads unfinished workflows found in the store (the core skips those it has), then
    /// cancels the subgraphs whose parent no longer waits for them.
    fn resume(&mut self, loaded: Vec<(WorkflowRecord, Vec<TaskRecord>)>, now: u64) {
        for (rec, tasks) in loaded {
            let msg = Msg::Load {
                rec: Box::new(rec),
                tasks,
                recovering: true,
            };
            self.core.apply(msg, now);
        }
        self.core.cancel_orphans(now);
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

    /// Commits the core's step (with `extra` writes, of workflows in `partitions`) after the
    /// step in flight, if any, then performs its effects. A failed commit answers waiting
    /// callers with the error and stops the scheduler; a replica's commit refused by a
    /// fence (another replica took a partition over) drops its workflows instead and loads
    /// the partitions it still holds again.
    async fn flush(&mut self, extra: Batch, partitions: BTreeSet<u32>) -> Result<(), Error> {
        self.settle().await?;
        self.begin(extra, partitions);
        self.settle().await
    }

    /// Waits for the step in flight, if any, and performs its effects.
    async fn settle(&mut self) -> Result<(), Error> {
        match self.in_flight.take() {
            Some(mut done) => {
                let committed = committed_of(&mut done.commit).await;
                self.finish(done, committed)
            }
            None => Ok(()),
        }
    }

    /// Takes the core's step (with `extra` writes, of workflows in `partitions`) and starts
    /// committing it; a step that writes nothing has its effects performed at once. Called
    /// only when no step is in flight, so steps are committed in order.
    fn begin(&mut self, extra: Batch, partitions: BTreeSet<u32>) {
        debug_assert!(self.in_flight.is_none());
        let Step {
            mut batch,
            effects,
            partitions: mut fence,
            ..
        } = self.core.step(self.clock.now_ms());
        batch.extend(extra);
        fence.extend(partitions);
        let mut held = true;
        for &p in &fence {
            held &= self.ownership.fence(p, &mut batch);
        }
        if !held {
            self.fenced_out(effects, None);
            return;
        }
        if batch.is_empty() {
            self.perform_all(effects);
            return;
        }
        let staged = self.leased()
            && batch.ops.iter().any(|op| {
                matches!(op, metalgraph_store::Op::Put { keyspace, .. } if keyspace == keys::EVENT_STAGE)
            });
        let store = self.store.clone();
        self.in_flight = Some(InFlight {
            commit: tokio::task::spawn_blocking(move || store.commit(batch)),
            effects,
            staged,
        });
    }

    /// Acts on the end of a step's commit: performs its effects once it is durable.
    fn finish(
        &mut self,
        done: InFlight,
        committed: Result<(), metalgraph_store::Error>,
    ) -> Result<(), Error> {
        match committed {
            Ok(()) => {}
            Err(metalgraph_store::Error::Conflict { keyspace, key, .. })
                if Ownership::fenced_partition(&keyspace, &key).is_some() =>
            {
                self.fenced_out(done.effects, Ownership::fenced_partition(&keyspace, &key));
                return Ok(());
            }
            Err(e) => {
                let e = Error::from(e);
                for eff in done.effects {
                    if let Effect::Reply(tx, _) = eff {
                        let _ = tx.send(Err(Error::Store(e.to_string())));
                    }
                }
                return Err(e);
            }
        }
        if done.staged {
            self.engine.staged();
        }
        self.perform_all(done.effects);
        Ok(())
    }

    fn perform_all(&mut self, effects: Vec<Effect>) {
        for eff in effects {
            self.perform(eff);
        }
        let m = metrics::metrics();
        m.workflows_active.set(self.core.active() as i64);
        m.job_slots_in_use.set(self.core.slots_in_use() as i64);
    }

    /// A commit was refused by a fence (partition `lost`, when known), or would have
    /// written a partition no longer held: nothing of the step happened. Callers are told to
    /// try again, every workflow is dropped (their state in memory is the step's, which the
    /// store does not hold), and the partitions still held are loaded again.
    fn fenced_out(&mut self, effects: Vec<Effect>, lost: Option<u32>) {
        if let (Some(p), Ownership::Leased(leases)) = (lost, &self.ownership) {
            leases.lost(p);
        }
        warn!(
            partition = ?lost,
            "another replica has taken over a partition this one drove; reloading the partitions still held"
        );
        // What the core decided since (messages applied while the step was committed) was
        // decided on that state too: it goes the same way.
        let pending = self.core.discard_step();
        for eff in effects.into_iter().chain(pending) {
            if let Effect::Reply(tx, _) = eff {
                let _ = tx.send(Err(Error::Unavailable(
                    "the workflow's partition changed owner; try again".into(),
                )));
            }
        }
        self.drop_partitions(|_| true);
        self.reload = true;
    }

    /// Drops the workflows of the partitions `gone` says, without writing anything, and
    /// stops their jobs and timers.
    fn drop_partitions(&mut self, gone: impl Fn(u32) -> bool) {
        for id in self.core.drop_partitions(gone) {
            if let Some(w) = self.tokens.remove(&id) {
                w.token.cancel();
            }
        }
        let m = metrics::metrics();
        m.workflows_active.set(self.core.active() as i64);
        m.job_slots_in_use.set(self.core.slots_in_use() as i64);
    }

    /// Acts on a lease round: drops the partitions lost or to be released (then releases
    /// those), and loads the partitions taken.
    async fn on_tick(&mut self, tick: Tick) -> Result<(), Error> {
        let gone: BTreeSet<u32> = tick.lost.iter().chain(&tick.release).copied().collect();
        if !gone.is_empty() {
            self.drop_partitions(|p| gone.contains(&p));
        }
        if !tick.lost.is_empty() {
            warn!(partitions = ?tick.lost, "lost the leases of partitions; their workflows are dropped here");
        }
        if let (false, Ownership::Leased(leases)) = (tick.release.is_empty(), &self.ownership) {
            info!(partitions = ?tick.release, "releasing partitions to the other replicas");
            let (leases, release) = (leases.clone(), tick.release.clone());
            if let Err(e) = blocking(move || leases.release(&release)).await {
                warn!(error = %e, "releasing partitions failed; their leases run out instead");
            }
        }
        if !tick.acquired.is_empty() {
            info!(partitions = ?tick.acquired, "took partitions over");
            let taken: BTreeSet<u32> = tick.acquired.into_iter().collect();
            self.load_partitions(Some(taken)).await?;
        }
        Ok(())
    }

    /// Loads the unfinished workflows of the partitions held (of `only` among them, when
    /// given) that are not loaded yet, and continues their staged events.
    async fn load_partitions(&mut self, only: Option<BTreeSet<u32>>) -> Result<(), Error> {
        let Ownership::Leased(leases) = &self.ownership else {
            return Ok(());
        };
        let (store, own) = (self.store.clone(), self.ownership.clone());
        let parts: Vec<u32> = leases
            .partitions()
            .into_iter()
            .filter(|p| *p < crate::ownership::PARTITIONS)
            .filter(|p| only.as_ref().is_none_or(|o| o.contains(p)))
            .collect();
        let (loaded, stage) = blocking(move || {
            let want = |p: u32| own.owns(p) && parts.contains(&p);
            let (loaded, _) = load_active(store.as_ref(), want)?;
            let stage = parts
                .iter()
                .map(|&p| Ok((p, crate::sequencer::last_staged(store.as_ref(), p)?)))
                .collect::<Result<Vec<_>, Error>>()?;
            Ok::<_, Error>((loaded, stage))
        })
        .await?;
        for (p, last) in stage {
            self.core.continue_stage(p, last);
        }
        let n = loaded.len();
        self.resume(loaded, self.clock.now_ms());
        info!(
            workflows = n,
            "loaded the unfinished workflows of the partitions taken"
        );
        self.flush(Batch::new(), BTreeSet::new()).await?;
        // Their workflows still in the inbox are loaded from there.
        self.read_inbox().await
    }

    /// Applies the requests in the inbox of the partitions held: loads new workflows,
    /// cancels workflows. Each request is deleted in the commit of the step that applied it.
    async fn read_inbox(&mut self) -> Result<(), Error> {
        let (store, own) = (self.store.clone(), self.ownership.clone());
        let requests = match blocking(move || inbox::read(store.as_ref(), |p| own.owns(p))).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reading the inbox failed; trying again");
                return Ok(());
            }
        };
        if requests.is_empty() {
            return Ok(());
        }
        let mut done = Batch::new();
        let mut partitions = BTreeSet::new();
        let mut loads = Vec::new();
        let mut later = Vec::new();
        for (key, p, request) in requests {
            done.delete(keys::INBOX, key);
            partitions.insert(p);
            match request {
                inbox::Request::Load(id) if !self.core.has(&id) => loads.push(id),
                inbox::Request::Load(_) => {}
                other => later.push(other),
            }
        }
        let store = self.store.clone();
        let loaded: Vec<(WorkflowRecord, Vec<TaskRecord>)> = blocking(move || {
            let mut out = Vec::new();
            for id in loads {
                if let Some(records) = load_records(store.as_ref(), &id)? {
                    out.push(records);
                }
            }
            Ok::<_, Error>(out)
        })
        .await?;
        let now = self.clock.now_ms();
        for (rec, tasks) in loaded {
            // Loaded and finished since (by an owner that stopped before deleting this).
            if rec.status.is_terminal() {
                continue;
            }
            let msg = Msg::Load {
                rec: Box::new(rec),
                tasks,
                recovering: false,
            };
            self.core.apply(msg, now);
        }
        for request in later {
            // Whoever asked was answered when the request was committed; what the core
            // answers now (a task that no longer waits) only goes to the log.
            let (reply, answer) = tokio::sync::oneshot::channel();
            let msg = match request {
                inbox::Request::Cancel(id) => Msg::Cancel { id, reply },
                inbox::Request::Notify {
                    wf,
                    task_id,
                    token,
                    body,
                } => Msg::Notify {
                    wf,
                    task_id,
                    token,
                    body,
                    reply,
                },
                inbox::Request::Load(_) => continue,
            };
            self.core.apply(msg, now);
            tokio::spawn(async move {
                if let Ok(Err(e)) = answer.await {
                    debug!(error = %e, "a request from the inbox was not applied");
                }
            });
        }
        self.flush(done, partitions).await
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
                // A replica's events are staged: they are published once numbered.
                if !self.leased() {
                    self.engine.publish(n, Arc::new(ev));
                }
            }
            Effect::Reply(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }

    fn start_job(&mut self, s: StartJob) {
        if !self.ownership.owns(s.partition) {
            // The lease ran out on this replica's clock since the step was committed: the
            // task stays running in the store, for the partition's next owner to start.
            warn!(workflow_id = %s.wf, label = %s.label, "not starting a job: this replica's lease of its partition ran out");
            return;
        }
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
            // A panic inside the job is caught here and becomes the task's failure instead
            // of stranding the workflow.
            let (outcome, panicked) = match catch_unwind(run.run()).await {
                Ok(outcome) => (outcome, false),
                Err(p) => {
                    let why = panic_message(p);
                    error!(workflow_id = %wf, job = name, panic = %why, "job panicked");
                    (Outcome::Failed(format!("job {name} panicked: {why}")), true)
                }
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

/// The end of the commit in flight (called only when there is one).
async fn committed(in_flight: &mut Option<InFlight>) -> Result<(), metalgraph_store::Error> {
    match in_flight {
        Some(done) => committed_of(&mut done.commit).await,
        None => std::future::pending().await,
    }
}

async fn committed_of(
    commit: &mut tokio::task::JoinHandle<Result<(), metalgraph_store::Error>>,
) -> Result<(), metalgraph_store::Error> {
    commit.await.unwrap_or_else(|e| {
        Err(metalgraph_store::Error::Io(format!(
            "the commit did not complete: {e}"
        )))
    })
}

/// The next lease round of a replica's scheduler; never, for one process's.
async fn next_tick(ticks: &mut Option<mpsc::UnboundedReceiver<Tick>>) -> Option<Tick> {
    match ticks {
        Some(ticks) => ticks.recv().await,
        None => std::future::pending().await,
    }
}

/// When a replica's scheduler reads its inbox: when woken, or every [`INBOX_EVERY`];
/// never, for one process's.
async fn inbox_due(wake: &Option<Arc<tokio::sync::Notify>>, every: &mut tokio::time::Interval) {
    match wake {
        Some(wake) => {
            tokio::select! {
                () = wake.notified() => {}
                _ = every.tick() => {}
            }
        }
        None => std::future::pending().await,
    }
}

/// The records of the unfinished workflows the `active` index names in the partitions
/// `want` accepts (blocking), and the ids it names that have no record. Workflows whose
/// creation is still in the inbox are left to the inbox's reading (`inbox::unapplied_loads`):
/// loaded from here, as a partition's new owner would, they would never get their
/// `pending` event.
#[allow(clippy::type_complexity)]
fn load_active(
    store: &dyn Store,
    want: impl Fn(u32) -> bool,
) -> Result<(Vec<(WorkflowRecord, Vec<TaskRecord>)>, Vec<String>), Error> {
    let mut loaded = Vec::new();
    let mut missing = Vec::new();
    let active = store.scan_prefix(keys::ACTIVE, b"")?;
    // The inbox is read after the index: a workflow created in between is not in the
    // index read, and one in it whose creation is still in the inbox is left there.
    let fresh = inbox::unapplied_loads(store, &want)?;
    for (k, v) in active {
        let id = String::from_utf8_lossy(&k).into_owned();
        if fresh.contains(&id) {
            continue;
        }
        // Entries written before partitions hold nothing: their record says.
        let p = std::str::from_utf8(&v)
            .ok()
            .and_then(|v| v.parse::<u32>().ok());
        if p.is_some_and(|p| !want(p)) {
            continue;
        }
        match load_records(store, &id)? {
            Some(records) if p.is_some() || want(records.0.partition()) => loaded.push(records),
            Some(_) => {}
            None => missing.push(id),
        }
    }
    Ok((loaded, missing))
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
        // Only templates show the capability (`task.cap`): without any, none is computed.
        let cap = node
            .as_ref()
            .filter(|_| s.context.is_some())
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

/// Runs `fut` to its end; a panic while it is polled ends it with the panic's payload.
async fn catch_unwind<T>(
    fut: impl std::future::Future<Output = T>,
) -> Result<T, Box<dyn std::any::Any + Send>> {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(p) => std::task::Poll::Ready(Err(p)),
        }
    })
    .await
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
