//! The scheduler's core driven directly: no tokio, no engine, a virtual clock. Each step's
//! batch is committed to a memory store before its effects are looked at, as the runtime
//! does, and the final state is read back from that store, so these tests check what is
//! durable, not what the core holds in memory.

mod common;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use common::cases::{Case, cases};
use common::{Probe, jobs, library};
use metalgraph_engine::definitions::resolve;
use metalgraph_engine::model::{RunOptions, TaskState, WorkflowStatus};
use metalgraph_engine::ownership::partition_of;
use metalgraph_engine::scheduler::{Core, Effect, Msg, Outcome, StartJob, render_options};
use metalgraph_engine::template::Renderer;
use metalgraph_engine::workflow::{TaskRecord, WorkflowRecord, WorkflowView};
use metalgraph_engine::{ApiUrls, JobRegistry, keys};
use metalgraph_store::{Batch, MemStore, Store};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const T0: u64 = 1_800_000_000_000;

/// A simulated world around one core: jobs whose outcome follows from their name and
/// options, timers on a virtual clock, and a store every step is committed to.
struct Sim {
    core: Core,
    jobs: Arc<JobRegistry>,
    store: MemStore,
    now: u64,
    /// Messages due at a time, in order of (time, arrival).
    due: BinaryHeap<Reverse<(u64, u64)>>,
    queued: HashMap<u64, Msg>,
    seq: u64,
    /// Running jobs by (workflow, task index): their attempt.
    running: HashMap<(String, usize), u32>,
    /// Every job start, in order.
    starts: Vec<StartJob>,
    finished: Vec<String>,
    renderer: Renderer,
}

impl Sim {
    fn new(max_running: usize) -> Self {
        let jobs = Arc::new(jobs(&Arc::new(Probe::default())));
        Sim {
            core: Core::new(jobs.clone(), max_running),
            jobs,
            store: MemStore::new(),
            now: T0,
            due: BinaryHeap::new(),
            queued: HashMap::new(),
            seq: 0,
            running: HashMap::new(),
            starts: Vec::new(),
            finished: Vec::new(),
            renderer: Renderer::new(),
        }
    }

    /// Plans `graph` from `graphs` and loads it as a new workflow, as `Engine::run` does.
    fn create(&mut self, graphs: &[&str], graph: &str, options: Value) -> String {
        self.create_with(graphs, graph, options, |_| {})
    }

    /// [`Sim::create`] with the task records changed by `prepare` before they are
    /// committed, as `Engine::rerun` creates its taken-over tasks succeeded.
    fn create_with(
        &mut self,
        graphs: &[&str],
        graph: &str,
        options: Value,
        prepare: impl FnOnce(&mut [TaskRecord]),
    ) -> String {
        let lib = library(graphs);
        let run: RunOptions = serde_json::from_value(options).expect("run options");
        let plan = resolve(&lib.graphs[graph], &lib, &self.jobs, Some(&run))
            .unwrap_or_else(|p| panic!("{graph} does not plan: {p}"));
        self.seq += 1;
        let id = format!("wf-{}", self.seq);
        let rec = WorkflowRecord {
            id: id.clone(),
            deadline: plan.timeout_ms.map(|t| self.now.saturating_add(t)),
            plan,
            node: None,
            status: WorkflowStatus::Pending,
            options: run,
            created_at: self.now,
            finished_at: None,
            stop: None,
            parent: None,
            depth: 0,
            error: None,
            rerun_of: None,
            partition: None,
            task_key: None,
        };
        let mut tasks: Vec<TaskRecord> = (0..rec.plan.tasks.len())
            .map(|i| TaskRecord::new(format!("{id}.{i}"), format!("token-{i}")))
            .collect();
        prepare(&mut tasks);
        // The records are committed before the core sees them, as `Engine::run` does.
        let mut batch = Batch::new();
        batch.put(
            keys::WORKFLOWS,
            id.as_bytes(),
            serde_json::to_vec(&rec).unwrap(),
        );
        for (i, t) in tasks.iter().enumerate() {
            batch.put(
                keys::TASKS,
                keys::task_key(&id, i),
                serde_json::to_vec(t).unwrap(),
            );
        }
        self.store.commit(batch).unwrap();
        self.core.apply(
            Msg::Load {
                rec: Box::new(rec),
                tasks,
                recovering: false,
            },
            self.now,
        );
        id
    }

    fn at(&mut self, at: u64, msg: Msg) {
        self.seq += 1;
        self.due.push(Reverse((at, self.seq)));
        self.queued.insert(self.seq, msg);
    }

    /// Commits the core's step, then performs its effects. Returns the replies given.
    fn step(&mut self) -> Vec<(oneshot::Sender<Result<(), metalgraph_engine::Error>>, bool)> {
        let step = self.core.step(self.now);
        if !step.batch.is_empty() {
            self.store.commit(step.batch).expect("the step commits");
        }
        let mut replies = Vec::new();
        for eff in step.effects {
            match eff {
                Effect::Start(s) => self.start(*s),
                Effect::CancelJob { wf, idx } => {
                    if let Some(attempt) = self.running.remove(&(wf.clone(), idx)) {
                        let msg = Msg::JobDone {
                            wf,
                            idx,
                            attempt,
                            outcome: Outcome::Cancelled,
                        };
                        self.at(self.now, msg);
                    }
                }
                Effect::Timer { at_ms, msg, .. } => self.at(at_ms, msg),
                Effect::Finished { wf } => self.finished.push(wf),
                Effect::Event(..) => {}
                Effect::Reply(tx, r) => replies.push((tx, r.is_ok())),
            }
        }
        replies
    }

    /// Decides a job's outcome from its name and options, as the test jobs would.
    fn start(&mut self, s: StartJob) {
        let key = (s.wf.clone(), s.idx);
        self.running.insert(key, s.attempt);
        if let Some(d) = s.deadline_ms {
            let msg = Msg::JobDone {
                wf: s.wf.clone(),
                idx: s.idx,
                attempt: s.attempt,
                outcome: Outcome::Timeout,
            };
            self.at(d, msg);
        }
        let job = self.jobs.get(&s.job).expect("a known job").clone();
        let done = |outcome| Msg::JobDone {
            wf: s.wf.clone(),
            idx: s.idx,
            attempt: s.attempt,
            outcome,
        };
        let options = match render_options(
            job.as_ref(),
            &self.renderer,
            &ApiUrls::default(),
            &s,
            None,
            None,
        ) {
            Ok(o) => o,
            Err(e) => {
                self.at(self.now, done(Outcome::Failed(e)));
                self.starts.push(s);
                return;
            }
        };
        match s.job.as_str() {
            "noop" => self.at(self.now, done(Outcome::Succeeded(json!({})))),
            "echo" => self.at(self.now, done(Outcome::Succeeded(Value::Object(options)))),
            "fail" => self.at(self.now, done(Outcome::Failed("failed on purpose".into()))),
            "sleep" => {
                let ms = metalgraph_engine::job::value_to_duration(&options["duration"])
                    .expect("a duration")
                    .as_millis() as u64;
                self.at(self.now + ms, done(Outcome::Succeeded(json!({}))));
            }
            "hang" => {}
            "flaky" => {
                let n = options["failTimes"].as_u64().unwrap_or(1);
                let outcome = if u64::from(s.retry) < n {
                    Outcome::Failed(format!("flaky failure {}", s.retry + 1))
                } else {
                    Outcome::Succeeded(json!({"retry": s.retry}))
                };
                self.at(self.now, done(outcome));
            }
            other => panic!("the core test cannot simulate job {other}"),
        }
        self.starts.push(s);
    }

    /// Runs until workflow `id` has finished (or nothing is left to happen).
    fn run_until_finished(&mut self, id: &str) {
        for _ in 0..10_000 {
            self.step();
            if self.finished.iter().any(|f| f == id) {
                return;
            }
            let Some(Reverse((at, seq))) = self.due.pop() else {
                panic!("workflow {id} is stuck: nothing is due and it has not finished");
            };
            self.now = self.now.max(at);
            let msg = self.queued.remove(&seq).expect("a queued message");
            if let Msg::JobDone {
                wf, idx, attempt, ..
            } = &msg
                && self.running.get(&(wf.clone(), *idx)) == Some(attempt)
            {
                self.running.remove(&(wf.clone(), *idx));
            }
            self.core.apply(msg, self.now);
        }
        panic!("workflow {id} did not finish in 10,000 steps");
    }

    /// The workflow as committed.
    fn committed(&self, id: &str) -> WorkflowView {
        let raw = self.store.get(keys::WORKFLOWS, id.as_bytes()).unwrap();
        let rec: WorkflowRecord = serde_json::from_slice(&raw.expect("workflow stored")).unwrap();
        let tasks: Vec<TaskRecord> = self
            .store
            .scan_prefix(keys::TASKS, &keys::task_prefix(id))
            .unwrap()
            .into_iter()
            .map(|(_, v)| serde_json::from_slice(&v).unwrap())
            .collect();
        WorkflowView::build(&rec, &tasks)
    }

    fn task(&self, id: &str, idx: usize) -> TaskRecord {
        let raw = self
            .store
            .get(keys::TASKS, &keys::task_key(id, idx))
            .unwrap();
        serde_json::from_slice(&raw.expect("task stored")).unwrap()
    }
}

fn states(v: &WorkflowView) -> String {
    v.tasks
        .iter()
        .map(|t| format!("{}={}", t.label, t.state))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Cases that start subgraphs need an engine to create the child; `semantics.rs` runs them.
fn needs_engine(case: &Case) -> bool {
    case.graph.contains("Task.Graph.Run")
}

#[test]
fn every_rule_reaches_its_expected_end_in_the_core() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for case in cases().iter().filter(|c| !needs_engine(c)) {
        let mut sim = Sim::new(256);
        let id = sim.create(&[case.graph], "G", case.options.clone());
        sim.run_until_finished(&id);
        let end = sim.committed(&id);
        let got = (end.status, states(&end));
        if got != (case.status, case.states.to_owned()) {
            failures.push(format!(
                "{}: expected {} [{}], got {} [{}]",
                case.name, case.status, case.states, got.0, got.1
            ));
        }
        ran += 1;
    }
    assert!(ran >= 15, "only {ran} cases ran without an engine");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn effects_come_only_with_the_batch_that_records_them() {
    // A chain: every start is preceded, in the same step, by the write that marks the task
    // running; nothing starts that the store does not already show as running.
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}]}";
    let mut sim = Sim::new(256);
    let id = sim.create(&[g], "G", json!({}));
    let step = sim.core.step(sim.now);
    let starts: Vec<usize> = step
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start(s) => Some(s.idx),
            _ => None,
        })
        .collect();
    assert_eq!(starts, vec![0]);
    sim.store.commit(step.batch).unwrap();
    assert_eq!(sim.task(&id, 0).state, TaskState::Running);
    assert_eq!(sim.task(&id, 1).state, TaskState::Pending);
}

#[test]
fn the_job_limit_holds_in_the_core() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep}, {label: b, taskName: Task.Sleep}, {label: c, taskName: Task.Sleep}]}";
    let mut sim = Sim::new(2);
    let id = sim.create(&[g], "G", json!({}));
    let first = sim.core.step(sim.now);
    let started = first
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::Start(_)))
        .count();
    assert_eq!(started, 2, "only two slots");
    assert_eq!(sim.core.slots_in_use(), 2);
    sim.store.commit(first.batch).unwrap();
    for eff in first.effects {
        if let Effect::Start(s) = eff {
            sim.start(*s);
        }
    }
    sim.run_until_finished(&id);
    assert_eq!(sim.committed(&id).status, WorkflowStatus::Succeeded);
    assert_eq!(sim.core.slots_in_use(), 0);
}

#[test]
fn dropping_a_partition_writes_nothing_and_frees_its_job_slots() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep}, {label: b, taskName: Task.Sleep}]}";
    let mut sim = Sim::new(2);
    let first = sim.create(&[g], "G", json!({}));
    let step = sim.core.step(sim.now);
    assert_eq!(sim.core.slots_in_use(), 2);
    sim.store.commit(step.batch).unwrap();
    let second = sim.create(&[g], "G", json!({}));
    // Both slots are taken: the second workflow waits.
    let waiting = sim.core.step(sim.now);
    assert!(
        !waiting
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Start(_)))
    );
    sim.store.commit(waiting.batch).unwrap();
    let before = sim.store.scan_prefix(keys::TASKS, b"").unwrap();
    // Workflows without a node are partitioned by id; these two fall in different ones.
    let p = partition_of(&first);
    assert_ne!(p, partition_of(&second));
    let dropped = sim.core.drop_partitions(|q| q == p);
    assert_eq!(dropped, std::slice::from_ref(&first));
    assert!(!sim.core.has(&first) && sim.core.has(&second));
    // The dropped workflow's jobs no longer hold the slots: the second one starts.
    let after = sim.core.step(sim.now);
    let starts = after
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::Start(s) if s.wf == second))
        .count();
    assert_eq!((starts, sim.core.slots_in_use()), (2, 2));
    assert_eq!(
        after.partitions.iter().copied().collect::<Vec<_>>(),
        [partition_of(&second)]
    );
    // Nothing of the dropped workflow was written: the store holds it as it was.
    sim.store.commit(after.batch).unwrap();
    let first_tasks = |rows: &[(Vec<u8>, Vec<u8>)]| -> Vec<(Vec<u8>, Vec<u8>)> {
        rows.iter()
            .filter(|(k, _)| k.starts_with(first.as_bytes()))
            .cloned()
            .collect()
    };
    assert_eq!(
        first_tasks(&sim.store.scan_prefix(keys::TASKS, b"").unwrap()),
        first_tasks(&before)
    );
}

/// Runs the core until task `idx` of `id` starts (again) and returns that start.
fn until_running(sim: &mut Sim, id: &str, idx: usize) -> StartJob {
    let seen = sim.starts.len();
    for _ in 0..100 {
        sim.step();
        if let Some(s) = sim.starts[seen..]
            .iter()
            .find(|s| s.wf == id && s.idx == idx)
        {
            return s.clone();
        }
        let Some(Reverse((at, seq))) = sim.due.pop() else {
            break;
        };
        sim.now = sim.now.max(at);
        let msg = sim.queued.remove(&seq).unwrap();
        sim.core.apply(msg, sim.now);
    }
    panic!("task {idx} of {id} never started");
}

#[test]
fn a_notification_is_answered_after_the_commit_that_ends_the_task() {
    let g = "{injectableName: G, tasks: [{label: wait, taskName: Task.Hang}, {label: after, taskName: Task.Noop, waitOn: {wait: succeeded}}]}";
    let mut sim = Sim::new(256);
    let id = sim.create(&[g], "G", json!({}));
    let s = until_running(&mut sim, &id, 0);
    // A wrong token is refused without a write.
    let (tx, mut rx) = oneshot::channel();
    sim.core.apply(
        Msg::Notify {
            wf: id.clone(),
            task_id: s.task_id.clone(),
            token: "wrong".into(),
            body: json!({}),
            reply: tx,
        },
        sim.now,
    );
    let step = sim.core.step(sim.now);
    assert!(step.batch.is_empty(), "a refused callback writes nothing");
    assert!(
        rx.try_recv().is_err(),
        "no answer before the step is performed"
    );
    // The right token: the step's batch records the task's success with the body, and the
    // answer is an effect of that step, given only after its commit.
    let (tx, mut rx) = oneshot::channel();
    sim.core.apply(
        Msg::Notify {
            wf: id.clone(),
            task_id: s.task_id.clone(),
            token: s.token.clone(),
            body: json!({"installed": true}),
            reply: tx,
        },
        sim.now,
    );
    let step = sim.core.step(sim.now);
    let mut reply = None;
    let mut cancelled = false;
    let mut others = Vec::new();
    for eff in step.effects {
        match eff {
            Effect::Reply(tx, r) => reply = Some((tx, r)),
            Effect::CancelJob { idx: 0, .. } => cancelled = true,
            other => others.push(other),
        }
    }
    assert!(cancelled, "the waiting job is told to stop");
    assert!(rx.try_recv().is_err(), "not answered before the commit");
    sim.store.commit(step.batch).unwrap();
    for eff in others {
        if let Effect::Start(s) = eff {
            sim.start(*s);
        }
    }
    let t = sim.task(&id, 0);
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(t.output.as_deref(), Some(&json!({"installed": true})));
    let (tx, r) = reply.expect("an answer");
    assert!(r.is_ok());
    tx.send(r).unwrap();
    assert!(rx.try_recv().unwrap().is_ok());
    // The waiting job's own end, arriving later, is stale and changes nothing.
    sim.core.apply(
        Msg::JobDone {
            wf: id.clone(),
            idx: 0,
            attempt: s.attempt,
            outcome: Outcome::Cancelled,
        },
        sim.now,
    );
    sim.run_until_finished(&id);
    assert_eq!(
        states(&sim.committed(&id)),
        "wait=succeeded after=succeeded"
    );
}

#[test]
fn checkpoints_belong_to_one_attempt_and_a_retry_starts_without_one() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Hang, retries: {max: 1, backoff: 1s}}]}";
    let mut sim = Sim::new(256);
    let id = sim.create(&[g], "G", json!({}));
    let s = until_running(&mut sim, &id, 0);
    let checkpoint = |sim: &mut Sim, attempt: u32| {
        let (tx, mut rx) = oneshot::channel();
        sim.core.apply(
            Msg::Checkpoint {
                wf: id.clone(),
                task_id: s.task_id.clone(),
                attempt,
                value: json!({"issued": "reset"}),
                reply: tx,
            },
            sim.now,
        );
        for (tx, ok) in sim.step() {
            let _ = tx.send(if ok {
                Ok(())
            } else {
                Err(metalgraph_engine::Error::Conflict("stale".into()))
            });
        }
        rx.try_recv().expect("answered").is_ok()
    };
    assert!(
        !checkpoint(&mut sim, s.attempt + 1),
        "another attempt's checkpoint is refused"
    );
    assert!(checkpoint(&mut sim, s.attempt));
    assert_eq!(
        sim.task(&id, 0).checkpoint.as_deref(),
        Some(&json!({"issued": "reset"}))
    );
    // The attempt fails: the retry starts afresh, without the checkpoint.
    sim.core.apply(
        Msg::JobDone {
            wf: id.clone(),
            idx: 0,
            attempt: s.attempt,
            outcome: Outcome::Failed("the BMC went away".into()),
        },
        sim.now,
    );
    sim.running.clear();
    sim.step();
    assert_eq!(sim.task(&id, 0).checkpoint, None);
    let retry = until_running(&mut sim, &id, 0);
    assert_eq!(retry.attempt, s.attempt + 1);
    assert_eq!(retry.checkpoint, None);
}

#[test]
fn a_recovered_attempt_gets_its_checkpoint_and_keeps_its_deadline() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Hang, timeout: 10s}]}";
    let mut sim = Sim::new(256);
    let id = sim.create(&[g], "G", json!({}));
    let s = until_running(&mut sim, &id, 0);
    let (tx, _rx) = oneshot::channel();
    sim.core.apply(
        Msg::Checkpoint {
            wf: id.clone(),
            task_id: s.task_id.clone(),
            attempt: s.attempt,
            value: json!({"endsAt": 42}),
            reply: tx,
        },
        sim.now,
    );
    sim.step();
    // "Crash": a new core loads what the store holds, 4 s later.
    let raw = sim
        .store
        .get(keys::WORKFLOWS, id.as_bytes())
        .unwrap()
        .unwrap();
    let rec: WorkflowRecord = serde_json::from_slice(&raw).unwrap();
    let tasks = vec![sim.task(&id, 0)];
    let mut again = Sim::new(256);
    again.now = sim.now + 4_000;
    again.store = std::mem::replace(&mut sim.store, MemStore::new());
    again.core.apply(
        Msg::Load {
            rec: Box::new(rec),
            tasks,
            recovering: true,
        },
        again.now,
    );
    let restarted = until_running(&mut again, &id, 0);
    assert_eq!(restarted.attempt, s.attempt + 1);
    assert_eq!(restarted.checkpoint, Some(json!({"endsAt": 42})));
    assert_eq!(
        restarted.deadline_ms, s.deadline_ms,
        "the deadline carries over"
    );
    again.run_until_finished(&id);
    let end = again.committed(&id);
    assert_eq!(states(&end), "a=timeout");
    assert_eq!(again.now, s.deadline_ms.unwrap());
}

#[test]
fn deadlines_never_overflow() {
    // The largest timeout the validator allows, started at the end of time, saturates.
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Hang, timeout: 30d}]}";
    let mut sim = Sim::new(256);
    sim.now = u64::MAX - 5;
    let id = sim.create(&[g], "G", json!({}));
    let s = until_running(&mut sim, &id, 0);
    assert_eq!(s.deadline_ms, Some(u64::MAX));
}

#[test]
fn workflows_take_turns_for_job_slots() {
    // A workflow of fifty ready tasks is loaded first; one of a single task comes after.
    // With two slots, each gets one: the big one cannot hold every slot.
    let big: String = format!(
        "{{injectableName: Big, tasks: [{}]}}",
        (0..50)
            .map(|i| format!("{{label: t{i}, taskName: Task.Sleep}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let small = "{injectableName: Small, tasks: [{label: only, taskName: Task.Sleep}]}";
    let mut sim = Sim::new(2);
    let a = sim.create(&[&big], "Big", json!({}));
    let b = sim.create(&[small], "Small", json!({}));
    let step = sim.core.step(sim.now);
    let started: Vec<&str> = step
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Start(s) => Some(s.wf.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![a.as_str(), b.as_str()]);
}

#[test]
fn tasks_created_succeeded_count_as_done_and_their_outputs_reach_templates() {
    // How a rerun starts: the first two tasks succeeded in the workflow it reruns.
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Echo}
  - {label: b, taskName: Task.Echo, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Echo, optionOverrides: {level: "{{ context.a.v }}/{{ context.b.v }}"}, waitOn: {b: succeeded}}
  - {label: d, taskName: Task.Noop, waitOn: {a: finished}}
"#;
    let mut sim = Sim::new(256);
    let id = sim.create_with(&[g], "G", json!({}), |tasks| {
        for (i, v) in [(0, "x"), (1, "y")] {
            tasks[i].state = TaskState::Succeeded;
            tasks[i].attempts = 1;
            tasks[i].output = Some(Box::new(json!({"v": v})));
        }
    });
    sim.run_until_finished(&id);
    let started: Vec<&str> = sim.starts.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(started, ["c", "d"]);
    let c = &sim.starts[0];
    let context = c.context.as_ref().expect("c's options hold a template");
    assert_eq!(
        Value::Object(context.clone()),
        json!({"a": {"v": "x"}, "b": {"v": "y"}})
    );
    let end = sim.committed(&id);
    assert_eq!(end.status, WorkflowStatus::Succeeded);
    assert_eq!(end.context["c"]["level"], "x/y");
    assert_eq!(
        (sim.task(&id, 0).attempts, sim.task(&id, 2).attempts),
        (1, 1),
        "the succeeded tasks were not started again"
    );
}
