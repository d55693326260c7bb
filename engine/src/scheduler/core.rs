//! The scheduler's core: every rule of workflow execution as plain data and functions, with
//! no I/O, no clock and no async runtime ("sans-I/O").
//!
//! The runtime (`scheduler/mod.rs`) feeds it messages with the current time
//! ([`Core::apply`]), then asks for a [`Step`]: the store batch that records every
//! transition those messages caused, and the effects to perform once that batch is durable
//! (start a job, cancel one, arm a timer, publish an event, answer a caller). Because the
//! core never acts itself, "commit before acting" holds by construction, and the rules can
//! be tested by feeding messages and reading steps, without tokio or a store.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use metalgraph_store::Batch;
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::definitions::MAX_BACKOFF_MS;
use crate::error::Error;
use crate::job::{JobRegistry, Options};
use crate::keys;
use crate::model::{Readiness, TaskState, WorkflowStatus};
use crate::template::holds_template;
use crate::workflow::{
    Event, StopReason, TaskRecord, WorkflowRecord, context_of, write_task, write_workflow,
};

/// Where the answer to a caller's request goes once the step that decided it is committed.
pub type Reply = oneshot::Sender<Result<(), Error>>;

/// The outcome of one job run, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    Failed(String),
    Timeout,
    Cancelled,
}

/// What the core is told.
#[derive(Debug)]
pub enum Msg {
    /// A workflow to drive: just created, or found unfinished at start (`recovering`).
    Load {
        rec: Box<WorkflowRecord>,
        tasks: Vec<TaskRecord>,
        recovering: bool,
    },
    /// Stop a workflow on request.
    Cancel { id: String, reply: Reply },
    /// A job run ended.
    JobDone {
        wf: String,
        idx: usize,
        attempt: u32,
        outcome: Outcome,
    },
    /// A failed task's backoff has passed.
    RetryDue { wf: String, idx: usize },
    /// A workflow's deadline has passed.
    Deadline { wf: String },
    /// A node called back for the task with this id and token: the task succeeds with
    /// `body` as its output, and the caller is answered once that is committed.
    Notify {
        wf: String,
        task_id: String,
        token: String,
        body: Value,
        reply: Reply,
    },
    /// A running job records a checkpoint; the caller is answered once it is committed.
    Checkpoint {
        wf: String,
        task_id: String,
        attempt: u32,
        value: Value,
        reply: Reply,
    },
}

/// A job the runtime must start, with everything it needs to render the options and build
/// the job's context.
#[derive(Debug, Clone)]
pub struct StartJob {
    pub wf: String,
    /// The workflow's partition (see `ownership.rs`).
    pub partition: u32,
    pub idx: usize,
    pub job: String,
    pub graph: String,
    pub node: Option<String>,
    pub task_id: String,
    pub label: String,
    pub attempt: u32,
    pub retry: u32,
    /// The attempt was running when the engine stopped and starts again.
    pub restart: bool,
    pub token: String,
    /// The attempt's deadline (epoch ms).
    pub deadline_ms: Option<u64>,
    /// The merged options, not yet rendered.
    pub options: Options,
    /// Options that are data, not templates (never rendered).
    pub data: Vec<String>,
    /// The template dialect of the options.
    pub dialect: crate::template::Dialect,
    /// The outputs of finished tasks by label, given only when an option holds a template.
    pub context: Option<Map<String, Value>>,
    /// What an earlier run of this attempt recorded (after a restart).
    pub checkpoint: Option<Value>,
}

/// What the runtime does after the step's batch is committed.
#[derive(Debug)]
pub enum Effect {
    Start(Box<StartJob>),
    /// Signal a running job to stop (cancel, fail-fast, a notification that ended it).
    CancelJob {
        wf: String,
        idx: usize,
    },
    /// Deliver `msg` at `at_ms` (epoch ms) unless workflow `wf` has finished by then.
    Timer {
        wf: String,
        at_ms: u64,
        msg: Msg,
    },
    /// Workflow `wf` has finished: its timers and job tokens can go.
    Finished {
        wf: String,
    },
    /// An event and its number in the event log: [`Core::step`] numbers the step's events
    /// and writes them into its batch, so each is committed with the change it reports.
    Event(u64, Event),
    Reply(Reply, Result<(), Error>),
}

impl Effect {
    /// An event, numbered when its step is taken.
    fn event(ev: Event) -> Effect {
        Effect::Event(0, ev)
    }
}

/// The writes and effects of one group of messages.
#[derive(Debug, Default)]
pub struct Step {
    pub batch: Batch,
    pub effects: Vec<Effect>,
    /// The partitions of the workflows the batch writes: a replica fences its commit with
    /// them (see `ownership.rs`).
    pub partitions: std::collections::BTreeSet<u32>,
    /// The partition of each workflow the step changed, for its events.
    of: HashMap<String, u32>,
}

impl Step {
    /// Notes that the step changes workflow `rec`.
    fn note(&mut self, rec: &WorkflowRecord) {
        let p = rec.partition();
        self.partitions.insert(p);
        if !self.of.contains_key(&rec.id) {
            self.of.insert(rec.id.clone(), p);
        }
    }

    fn write_workflow(&mut self, rec: &WorkflowRecord) {
        self.note(rec);
        write_workflow(&mut self.batch, rec);
    }

    fn write_task(&mut self, rec: &WorkflowRecord, idx: usize, t: &TaskRecord) {
        self.note(rec);
        write_task(&mut self.batch, &rec.id, idx, t);
    }
}

/// How a step's events reach the event log.
#[derive(Debug)]
enum EventMode {
    /// Numbered here and written to the log in the step's batch, as one page (one process
    /// owns the store): the log's pages in the store.
    Numbered(crate::events::Pages),
    /// Written to the staging area, per partition in order, for the replica that holds the
    /// sequencer to number (see `crate::sequencer`): the next sequence number of each
    /// partition.
    Staged(HashMap<u32, u64>),
}

/// A workflow the core drives.
struct Wf {
    rec: WorkflowRecord,
    tasks: Vec<TaskRecord>,
    /// Tasks whose job runs now.
    running: HashSet<usize>,
    /// Tasks queued to start (so they are not queued twice).
    queued: Vec<bool>,
    /// The queued tasks, in order.
    ready: VecDeque<usize>,
    /// Whether the workflow is in the core's round-robin ring.
    in_ring: bool,
    /// Running tasks found at recovery, to be started again keeping their deadline.
    restart: Vec<bool>,
    /// Its plan's shape, shared with the workflows whose plan shares its tasks.
    shape: Arc<Shape>,
}

/// What the core derives from a plan's tasks to find its way around them quickly.
struct Shape {
    /// Task index by label, so that readiness checks do not search the plan.
    index: HashMap<String, usize>,
    /// The tasks that wait on each task, so that a task's end rechecks only them.
    dependents: Vec<Vec<usize>>,
}

impl Shape {
    fn of(tasks: &[crate::definitions::PlannedTask]) -> Shape {
        let index: HashMap<String, usize> = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.label.clone(), i))
            .collect();
        let mut dependents = vec![Vec::new(); tasks.len()];
        for (i, t) in tasks.iter().enumerate() {
            for label in t.wait_on.labels() {
                if let Some(&dep) = index.get(label)
                    && !dependents[dep].contains(&i)
                {
                    dependents[dep].push(i);
                }
            }
        }
        Shape { index, dependents }
    }
}

impl Wf {
    fn state_of(&self, label: &str) -> TaskState {
        self.shape
            .index
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
        match self.rec.stop {
            Some(StopReason::Cancel) => return WorkflowStatus::Cancelled,
            Some(StopReason::Deadline) => return WorkflowStatus::Failed,
            Some(StopReason::Failure) | None => {}
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

/// The scheduler's state: every unfinished workflow, the queue of ready tasks and the job
/// slots in use.
pub struct Core {
    jobs: Arc<JobRegistry>,
    max_running: usize,
    wfs: HashMap<String, Wf>,
    /// Ready tasks waiting for a job slot, in order.
    ///
    /// Each workflow keeps its own queue; workflows with queued tasks take turns, one task
    /// at a time, so a workflow of a thousand ready tasks cannot hold every slot while
    /// others wait.
    ring: VecDeque<String>,
    /// Queued tasks whose job takes no slot: while every slot is taken and there are none,
    /// nothing can start and the ring is not walked.
    queued_free: usize,
    running_slots: usize,
    events: EventMode,
    step: Step,
    /// The tasks of the last plan loaded of each graph and their shape, which the next
    /// workflow of the graph shares when its tasks are equal (see `share_plan`).
    shapes: HashMap<String, (Arc<Vec<crate::definitions::PlannedTask>>, Arc<Shape>)>,
}

impl Core {
    /// A core that runs at most `max_running` slot-occupying jobs at once.
    pub fn new(jobs: Arc<JobRegistry>, max_running: usize) -> Self {
        Self {
            jobs,
            max_running: max_running.max(1),
            wfs: HashMap::new(),
            ring: VecDeque::new(),
            queued_free: 0,
            running_slots: 0,
            events: EventMode::Numbered(Default::default()),
            step: Step::default(),
            shapes: HashMap::new(),
        }
    }

    /// How many workflows are unfinished.
    pub fn active(&self) -> usize {
        self.wfs.len()
    }

    /// Slot-occupying jobs running now.
    pub fn slots_in_use(&self) -> usize {
        self.running_slots
    }

    /// Applies one message at time `now` (epoch ms).
    pub fn apply(&mut self, msg: Msg, now: u64) {
        match msg {
            Msg::Load {
                rec,
                tasks,
                recovering,
            } => self.load(*rec, tasks, recovering, now),
            Msg::Cancel { id, reply } => {
                let res = if self.wfs.contains_key(&id) {
                    self.stop(&id, StopReason::Cancel, "cancelled by request".into(), now);
                    Ok(())
                } else {
                    Err(Error::Conflict(format!("workflow {id} already finished")))
                };
                self.step.effects.push(Effect::Reply(reply, res));
            }
            Msg::JobDone {
                wf,
                idx,
                attempt,
                outcome,
            } => self.job_done(&wf, idx, attempt, outcome, now),
            Msg::RetryDue { wf, idx } => {
                if let Some(w) = self.wfs.get_mut(&wf)
                    && w.tasks[idx].state == TaskState::Pending
                    && w.tasks[idx].retry_at.is_some()
                {
                    w.tasks[idx].retry_at = None;
                    self.advance(&wf, now);
                }
            }
            Msg::Deadline { wf } => {
                if self.wfs.contains_key(&wf) {
                    let why = "the workflow's deadline passed".into();
                    self.stop(&wf, StopReason::Deadline, why, now);
                }
            }
            Msg::Notify {
                wf,
                task_id,
                token,
                body,
                reply,
            } => {
                let res = match self.running_task(&wf, &task_id) {
                    Some((idx, attempt, t)) if t.token == token => {
                        self.step.effects.push(Effect::CancelJob {
                            wf: wf.clone(),
                            idx,
                        });
                        self.job_done(&wf, idx, attempt, Outcome::Succeeded(body), now);
                        Ok(())
                    }
                    Some(_) => Err(Error::Conflict(
                        "the notification token does not match the waiting task".into(),
                    )),
                    None => Err(Error::Conflict(format!(
                        "task {task_id} no longer waits for a notification"
                    ))),
                };
                self.step.effects.push(Effect::Reply(reply, res));
            }
            Msg::Checkpoint {
                wf,
                task_id,
                attempt,
                value,
                reply,
            } => {
                let res = match self.running_task(&wf, &task_id) {
                    Some((idx, current, _)) if current == attempt => {
                        let w = self.wfs.get_mut(&wf).expect("the task was just found");
                        w.tasks[idx].checkpoint = Some(Box::new(value));
                        self.step.write_task(&w.rec, idx, &w.tasks[idx]);
                        Ok(())
                    }
                    _ => Err(Error::Conflict(format!(
                        "task {task_id} attempt {attempt} no longer runs"
                    ))),
                };
                self.step.effects.push(Effect::Reply(reply, res));
            }
        }
    }

    /// Starts queued tasks while job slots are free and hands over what the messages since
    /// the last step decided: the batch to commit, then the effects to perform.
    pub fn step(&mut self, now: u64) -> Step {
        self.start_queued(now);
        let mut step = std::mem::take(&mut self.step);
        let mut page = Vec::new();
        for eff in &mut step.effects {
            let Effect::Event(n, ev) = eff else {
                continue;
            };
            match &mut self.events {
                EventMode::Numbered(pages) => {
                    *n = pages.last() + 1 + page.len() as u64;
                    page.push(serde_json::to_vec(ev).expect("an event serializes"));
                }
                EventMode::Staged(next) => {
                    let p = step
                        .of
                        .get(ev.workflow_id())
                        .copied()
                        .unwrap_or_else(|| crate::ownership::partition_of(ev.workflow_id()));
                    let seq = next.entry(p).or_insert(1);
                    crate::sequencer::stage(&mut step.batch, p, *seq, ev);
                    *seq += 1;
                    step.partitions.insert(p);
                }
            }
        }
        if let EventMode::Numbered(pages) = &mut self.events {
            pages.record(&mut step.batch, &page);
        }
        step
    }

    /// Drops what the messages since the last step decided, without numbering its events,
    /// and returns its effects (whose replies the runtime answers): the state it was decided
    /// on is being dropped too (see `Runtime::fenced_out`).
    pub fn discard_step(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.step).effects
    }

    /// Continues the event log after its `pages` in the store (those committed before this
    /// core started).
    pub(crate) fn continue_events(&mut self, pages: crate::events::Pages) {
        self.events = EventMode::Numbered(pages);
    }

    /// Stages events for a sequencer instead of numbering them (replicas share the store).
    pub fn stage_events(&mut self) {
        if !matches!(self.events, EventMode::Staged(_)) {
            self.events = EventMode::Staged(HashMap::new());
        }
    }

    /// Continues partition `p`'s staged events after sequence number `last` (the last one
    /// staged by its previous owner and not yet numbered, or 0).
    pub fn continue_stage(&mut self, p: u32, last: u64) {
        if let EventMode::Staged(next) = &mut self.events {
            next.insert(p, last + 1);
        }
    }

    /// Drops every workflow of the partitions `lost` says, without writing anything: their
    /// owner is elsewhere now (or will be), and the store holds them as last committed.
    /// Returns their ids, whose jobs and timers the runtime stops.
    pub fn drop_partitions(&mut self, lost: impl Fn(u32) -> bool) -> Vec<String> {
        let ids: Vec<String> = self
            .wfs
            .iter()
            .filter(|(_, w)| lost(w.rec.partition()))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            let w = self.wfs.remove(id).expect("the workflow was just listed");
            for &idx in &w.running {
                if takes_slot(&self.jobs, &w.rec.plan.tasks[idx].job) {
                    self.running_slots = self.running_slots.saturating_sub(1);
                }
            }
            for &idx in &w.ready {
                if !takes_slot(&self.jobs, &w.rec.plan.tasks[idx].job) {
                    self.queued_free = self.queued_free.saturating_sub(1);
                }
            }
        }
        self.ring.retain(|id| self.wfs.contains_key(id));
        if let EventMode::Staged(next) = &mut self.events {
            next.retain(|p, _| !lost(*p));
        }
        ids
    }

    /// Whether workflow `id` is loaded.
    pub fn has(&self, id: &str) -> bool {
        self.wfs.contains_key(id)
    }

    /// Cancels every loaded subgraph whose parent task no longer waits for it. Called once
    /// after recovery has loaded every unfinished workflow.
    pub fn cancel_orphans(&mut self, now: u64) {
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
            let why = "its parent workflow no longer waits for it".into();
            self.stop(&id, StopReason::Cancel, why, now);
        }
    }

    /// The index, attempt and record of a running task, by id.
    fn running_task(&self, wf: &str, task_id: &str) -> Option<(usize, u32, &TaskRecord)> {
        let w = self.wfs.get(wf)?;
        let idx = w.tasks.iter().position(|t| t.id == task_id)?;
        let t = &w.tasks[idx];
        (t.state == TaskState::Running && w.running.contains(&idx)).then_some((idx, t.attempts, t))
    }

    /// Makes `rec`'s plan share its tasks with the last plan of its graph loaded when they
    /// are equal, and gives their shape; else remembers them for the next plan. Every
    /// unfinished workflow is in memory, however it got there (created, recovered, taken
    /// over by a replica), so the runs of a graph hold one copy of its tasks, not one each.
    /// A change to a shared plan goes through `Arc::make_mut`.
    fn share_plan(&mut self, rec: &mut WorkflowRecord) -> Arc<Shape> {
        if let Some((tasks, shape)) = self.shapes.get(&rec.plan.graph)
            && (Arc::ptr_eq(tasks, &rec.plan.tasks) || **tasks == *rec.plan.tasks)
        {
            rec.plan.tasks = tasks.clone();
            return shape.clone();
        }
        let shape = Arc::new(Shape::of(&rec.plan.tasks));
        let entry = (rec.plan.tasks.clone(), shape.clone());
        self.shapes.insert(rec.plan.graph.clone(), entry);
        shape
    }

    fn load(
        &mut self,
        mut rec: WorkflowRecord,
        tasks: Vec<TaskRecord>,
        recovering: bool,
        now: u64,
    ) {
        let id = rec.id.clone();
        if self.wfs.contains_key(&id) {
            return; // Loaded already (a replica may find it both in its inbox and its index).
        }
        let n = tasks.len();
        let shape = self.share_plan(&mut rec);
        let mut w = Wf {
            shape,
            rec,
            tasks,
            running: HashSet::new(),
            queued: vec![false; n],
            ready: VecDeque::new(),
            in_ring: false,
            restart: vec![false; n],
        };
        if !recovering {
            // Creation commits the workflow outside the scheduler (it needs the node lock's
            // precondition answered on its own); its event is committed here, with the
            // first step. A crash between the two loses only this event.
            self.step.note(&w.rec);
            self.step.effects.push(Effect::event(Event::Workflow {
                workflow_id: id.clone(),
                graph: w.rec.plan.graph.clone(),
                node: w.rec.node.clone(),
                status: w.rec.status,
                error: None,
            }));
        }
        if let Some(at_ms) = w.rec.deadline {
            self.step.effects.push(Effect::Timer {
                wf: id.clone(),
                at_ms,
                msg: Msg::Deadline { wf: id.clone() },
            });
        }
        for i in 0..n {
            let t = &mut w.tasks[i];
            match t.state {
                TaskState::Running if recovering => {
                    if w.rec.stop.is_some() {
                        t.state = TaskState::Cancelled;
                        t.finished_at = Some(now);
                        self.step.write_task(&w.rec, i, t);
                        let ev = task_event(&w.rec, i, t);
                        self.step.effects.push(Effect::event(ev));
                    } else {
                        w.restart[i] = true;
                        w.queued[i] = true;
                        w.ready.push_front(i);
                        if !takes_slot(&self.jobs, &w.rec.plan.tasks[i].job) {
                            self.queued_free += 1;
                        }
                    }
                }
                TaskState::Pending => {
                    if let Some(at_ms) = t.retry_at {
                        self.step.effects.push(Effect::Timer {
                            wf: id.clone(),
                            at_ms,
                            msg: Msg::RetryDue {
                                wf: id.clone(),
                                idx: i,
                            },
                        });
                    }
                }
                _ => {}
            }
        }
        if recovering {
            debug!(workflow_id = %id, "workflow recovered");
        }
        self.wfs.insert(id.clone(), w);
        self.advance(&id, now);
    }

    /// Skips tasks that can no longer run, queues tasks that are ready, and finishes the
    /// workflow when every task is terminal. Looks at every task.
    fn advance(&mut self, id: &str, now: u64) {
        self.advance_from(id, now, None);
    }

    /// [`Core::advance`] after only task `from` changed (`None`: anything may have): only
    /// the tasks that wait on it are looked at, and those that wait on a task skipped on
    /// the way, so a step costs what it touches, not the size of the graph.
    fn advance_from(&mut self, id: &str, now: u64, from: Option<usize>) {
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        let mut look: Vec<usize> = match from {
            Some(i) if w.rec.stop.is_none() => w.shape.dependents[i].clone(),
            _ => (0..w.tasks.len()).collect(),
        };
        while !look.is_empty() {
            let mut skipped = Vec::new();
            for i in look {
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
                        self.step.write_task(&w.rec, i, t);
                        let ev = task_event(&w.rec, i, t);
                        self.step.effects.push(Effect::event(ev));
                        skipped.push(i);
                    }
                    Readiness::Ready if w.tasks[i].retry_at.is_none() => {
                        w.queued[i] = true;
                        w.ready.push_back(i);
                        if !takes_slot(&self.jobs, &w.rec.plan.tasks[i].job) {
                            self.queued_free += 1;
                        }
                    }
                    _ => {}
                }
            }
            look = skipped
                .iter()
                .flat_map(|&i| w.shape.dependents[i].iter().copied())
                .collect();
        }
        if w.tasks.iter().all(|t| t.state.is_terminal()) {
            self.finish_workflow(id, now);
        } else {
            self.enqueue(id);
        }
    }

    fn finish_workflow(&mut self, id: &str, now: u64) {
        let Some(mut w) = self.wfs.remove(id) else {
            return;
        };
        let status = w.outcome();
        w.rec.status = status;
        w.rec.finished_at = Some(now);
        if status == WorkflowStatus::Failed && w.rec.error.is_none() {
            w.rec.error = Some("a task failed".into());
        }
        if status == WorkflowStatus::Succeeded {
            w.rec.error = None;
        }
        self.step.write_workflow(&w.rec);
        let batch = &mut self.step.batch;
        batch.delete(keys::ACTIVE, id.as_bytes());
        if let (Some(node), None) = (&w.rec.node, &w.rec.parent) {
            batch.delete(keys::NODE_LOCKS, node.as_bytes());
        }
        self.step
            .effects
            .push(Effect::Finished { wf: id.to_owned() });
        self.step.effects.push(Effect::event(Event::Workflow {
            workflow_id: id.to_owned(),
            graph: w.rec.plan.graph.clone(),
            node: w.rec.node.clone(),
            status,
            error: w.rec.error.clone(),
        }));
        info!(workflow_id = %id, graph = %w.rec.plan.graph, %status, "workflow finished");
    }

    /// Stops a workflow early: records why, signals running jobs, skips pending tasks.
    fn stop(&mut self, id: &str, reason: StopReason, why: String, now: u64) {
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        if w.rec.stop.is_some() {
            return;
        }
        w.rec.stop = Some(reason);
        w.rec.error = Some(why);
        self.step.write_workflow(&w.rec);
        for &idx in &w.running {
            self.step.effects.push(Effect::CancelJob {
                wf: id.to_owned(),
                idx,
            });
        }
        self.advance(id, now);
    }

    /// Starts queued tasks while job slots are free, one task of each workflow in turn.
    /// Tasks whose job takes no slot start even when every slot is taken.
    fn start_queued(&mut self, now: u64) {
        let mut without_start = 0;
        while without_start < self.ring.len() {
            if self.running_slots >= self.max_running && self.queued_free == 0 {
                break;
            }
            let Some(id) = self.ring.pop_front() else {
                break;
            };
            let Some(w) = self.wfs.get_mut(&id) else {
                continue;
            };
            w.in_ring = false;
            let free = self.running_slots < self.max_running;
            let jobs = &self.jobs;
            let tasks = &w.rec.plan.tasks;
            let next = w
                .ready
                .iter()
                .position(|&i| free || !takes_slot(jobs, &tasks[i].job));
            let started = match next {
                Some(pos) => {
                    let idx = w.ready.remove(pos).expect("the position was just found");
                    let slot = takes_slot(jobs, &tasks[idx].job);
                    if !slot {
                        self.queued_free -= 1;
                    }
                    self.start_task(&id, idx, slot, now);
                    true
                }
                None => false,
            };
            without_start = if started { 0 } else { without_start + 1 };
            self.enqueue(&id);
        }
    }

    /// Puts a workflow with queued tasks into the round-robin ring, once.
    fn enqueue(&mut self, id: &str) {
        if let Some(w) = self.wfs.get_mut(id)
            && !w.ready.is_empty()
            && !w.in_ring
        {
            w.in_ring = true;
            self.ring.push_back(id.to_owned());
        }
    }

    fn start_task(&mut self, id: &str, idx: usize, slot: bool, now: u64) {
        let known = self.wfs.get(id).is_some_and(|w| {
            let job = &w.rec.plan.tasks[idx].job;
            self.jobs.get(job).is_some()
        });
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
                self.step.write_task(&w.rec, idx, t);
                let ev = task_event(&w.rec, idx, t);
                self.step.effects.push(Effect::event(ev));
            }
            self.advance(id, now);
            return;
        }
        if w.tasks[idx].state != TaskState::Pending && !restart {
            return;
        }
        let planned = &w.rec.plan.tasks[idx];
        let t = &mut w.tasks[idx];
        t.state = TaskState::Running;
        t.attempts += 1;
        t.error = None;
        if !restart || t.started_at.is_none() {
            t.started_at = Some(now);
        }
        if !restart || t.deadline.is_none() {
            t.deadline = planned.timeout_ms.map(|ms| now.saturating_add(ms));
        }
        self.step.write_task(&w.rec, idx, t);
        if w.rec.status == WorkflowStatus::Pending {
            w.rec.status = WorkflowStatus::Running;
            self.step.write_workflow(&w.rec);
            self.step.effects.push(Effect::event(Event::Workflow {
                workflow_id: id.to_owned(),
                graph: w.rec.plan.graph.clone(),
                node: w.rec.node.clone(),
                status: WorkflowStatus::Running,
                error: None,
            }));
        }
        let t = &w.tasks[idx];
        let ev = task_event(&w.rec, idx, t);
        self.step.effects.push(Effect::event(ev));
        w.running.insert(idx);
        if slot {
            self.running_slots += 1;
        }
        let attempt = t.attempts;
        if !known {
            // The attempt fails before any job runs; it is still one durable attempt.
            let why = format!("job {} is not available in this engine", planned.job);
            self.job_done(id, idx, attempt, Outcome::Failed(why), now);
            return;
        }
        // Building the context clones every finished task's output; only a task whose
        // options hold a template needs it.
        let context = planned
            .options
            .iter()
            .any(|(k, v)| !planned.data.contains(k) && holds_template(v))
            .then(|| context_of(&w.rec.plan, &w.tasks));
        self.step.effects.push(Effect::Start(Box::new(StartJob {
            wf: id.to_owned(),
            partition: w.rec.partition(),
            idx,
            job: planned.job.clone(),
            graph: w.rec.plan.graph.clone(),
            node: w.rec.node.clone(),
            task_id: t.id.clone(),
            label: planned.label.clone(),
            attempt,
            retry: t.failures,
            restart,
            token: t.token.clone(),
            deadline_ms: t.deadline,
            options: planned.options.clone(),
            data: planned.data.clone(),
            dialect: planned.dialect,
            context,
            checkpoint: t.checkpoint.as_deref().cloned(),
        })));
    }

    fn job_done(&mut self, id: &str, idx: usize, attempt: u32, outcome: Outcome, now: u64) {
        let Some(w) = self.wfs.get_mut(id) else {
            return;
        };
        if w.tasks[idx].state != TaskState::Running || w.tasks[idx].attempts != attempt {
            return; // A stale result from an attempt that no longer counts.
        }
        let planned = &w.rec.plan.tasks[idx];
        if w.running.remove(&idx) && takes_slot(&self.jobs, &planned.job) {
            self.running_slots = self.running_slots.saturating_sub(1);
        }
        let label = planned.label.clone();
        let (retries, backoff) = (planned.retries, planned.backoff_ms);
        let stopping = w.rec.stop.is_some();
        let t = &mut w.tasks[idx];
        let (state, error) = match outcome {
            Outcome::Succeeded(v) => {
                t.output = Some(Box::new(v));
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
            // Retry after a backoff that doubles with each failure; a retry starts afresh,
            // without the failed attempt's checkpoint.
            let delay = backoff_after(backoff, t.failures);
            t.failures += 1;
            t.state = TaskState::Pending;
            t.retry_at = Some(now.saturating_add(delay));
            t.deadline = None;
            t.checkpoint = None;
            self.step.write_task(&w.rec, idx, t);
            let ev = task_event(&w.rec, idx, t);
            self.step.effects.push(Effect::event(ev));
            self.step.effects.push(Effect::Timer {
                wf: id.to_owned(),
                at_ms: now.saturating_add(delay),
                msg: Msg::RetryDue {
                    wf: id.to_owned(),
                    idx,
                },
            });
            warn!(workflow_id = %id, label = %label, error = ?error, retry_in_ms = delay, "task failed; retrying");
            return;
        }
        if state.is_failure() {
            t.failures += 1;
        }
        t.state = state;
        t.finished_at = Some(now);
        self.step.write_task(&w.rec, idx, t);
        let ev = task_event(&w.rec, idx, t);
        self.step.effects.push(Effect::event(ev));
        if state.is_failure() {
            warn!(workflow_id = %id, label = %label, error = ?error, %state, "task failed");
            if !w.handled(idx, state) {
                let why = format!("task '{label}' {state}: {}", error.unwrap_or_default());
                self.stop(id, StopReason::Failure, why, now);
            }
        }
        self.advance_from(id, now, Some(idx));
    }
}

/// Whether a job takes one of the limited job slots (an unknown one does: it fails at once).
fn takes_slot(jobs: &JobRegistry, job: &str) -> bool {
    jobs.get(job).is_none_or(|j| j.occupies_slot())
}

/// The wait before retry number `failures + 1`: `backoff` doubled per earlier failure,
/// capped at [`MAX_BACKOFF_MS`].
pub fn backoff_after(backoff: u64, failures: u32) -> u64 {
    backoff
        .saturating_mul(1u64 << failures.min(20))
        .min(MAX_BACKOFF_MS)
}

fn fmt_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn task_event(rec: &WorkflowRecord, idx: usize, t: &TaskRecord) -> Event {
    let plan = &rec.plan;
    Event::Task {
        workflow_id: rec.id.clone(),
        graph: plan.graph.clone(),
        node: rec.node.clone(),
        label: plan.tasks[idx].label.clone(),
        index: idx,
        state: t.state,
        attempts: t.attempts,
        error: t.error.as_deref().map(crate::workflow::scrub),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A job that never ends, so that the workflows it runs in stay in memory.
    struct Hold(crate::job::OptionSchema);

    impl crate::job::Job for Hold {
        fn name(&self) -> &'static str {
            "hold"
        }
        fn schema(&self) -> &crate::job::OptionSchema {
            &self.0
        }
        fn run(
            &self,
            _: crate::job::JobContext,
        ) -> crate::job::BoxFuture<'static, crate::job::JobResult> {
            Box::pin(std::future::pending())
        }
    }

    /// Workflow `id` of graph G, its one task's options `{"level": level}`, as a fresh plan
    /// deserialised from its own JSON (so sharing nothing with any other).
    fn loading(id: &str, level: &str, recovering: bool) -> Msg {
        let rec: WorkflowRecord = serde_json::from_value(json!({
            "id": id, "status": "running", "createdAt": 1,
            "plan": {"graph": "G", "tasks": [{
                "label": "a", "taskName": "Task.Hold", "job": "hold",
                "options": {"level": level}, "waitOn": {},
            }]},
        }))
        .unwrap();
        let tasks = vec![TaskRecord::new(format!("{id}-a"), "t".into())];
        Msg::Load {
            rec: Box::new(rec),
            tasks,
            recovering,
        }
    }

    /// Workflows loaded into the core share one copy of their planned tasks while those are
    /// equal, whether they were just created or recovered from the store; a workflow whose
    /// tasks differ keeps its own.
    #[test]
    fn loaded_workflows_share_equal_planned_tasks() {
        let mut jobs = crate::job::JobRegistry::new();
        jobs.register(Hold(Default::default()));
        let mut core = Core::new(Arc::new(jobs), 8);
        core.apply(loading("one", "taskdef", false), 1);
        core.apply(loading("two", "taskdef", true), 1);
        core.apply(loading("own", "mine", false), 1);
        core.apply(loading("three", "taskdef", false), 1);
        let tasks = |core: &Core, id: &str| core.wfs[id].rec.plan.tasks.clone();
        assert!(Arc::ptr_eq(&tasks(&core, "one"), &tasks(&core, "two")));
        assert!(!Arc::ptr_eq(&tasks(&core, "one"), &tasks(&core, "own")));
        assert_eq!(tasks(&core, "own")[0].options["level"], "mine");
        assert_eq!(tasks(&core, "one")[0].options["level"], "taskdef");
        // The last plan loaded is the one shared next.
        assert!(!Arc::ptr_eq(&tasks(&core, "one"), &tasks(&core, "three")));
        core.apply(loading("four", "taskdef", true), 1);
        assert!(Arc::ptr_eq(&tasks(&core, "three"), &tasks(&core, "four")));
        assert!(Arc::ptr_eq(
            &core.wfs["four"].shape,
            &core.wfs["three"].shape
        ));
        // Every task of every workflow was started with its own options.
        let mut started: Vec<_> = core
            .step(1)
            .effects
            .into_iter()
            .filter_map(|e| match e {
                Effect::Start(s) => Some((s.wf.clone(), s.options["level"].clone())),
                _ => None,
            })
            .collect();
        started.sort_by(|a, b| a.0.cmp(&b.0));
        let expected = [
            ("four", "taskdef"),
            ("one", "taskdef"),
            ("own", "mine"),
            ("three", "taskdef"),
            ("two", "taskdef"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(w, l)| (w.to_string(), json!(l)))
            .collect();
        assert_eq!(started, expected);
    }
}
