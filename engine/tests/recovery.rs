//! Crash recovery at the library level: engines are dropped mid-flight at many points
//! (every store commit in turn fails as a crash would, including the commit that follows a
//! job finishing; and plain stops at many moments), a new engine opens the same store, and
//! every workflow must end exactly as it would have without the crash.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::*;
use metalgraph_engine::clock::{Clock, TokioClock};
use metalgraph_engine::{Event, TaskState, WorkflowStatus};
use metalgraph_store::{Batch, Bytes, MemStore, Store};
use serde_json::json;

/// A store whose commits start failing, as if the process died, after a budget runs out.
struct CrashStore {
    inner: Arc<MemStore>,
    budget: AtomicI64,
}

impl Store for CrashStore {
    fn get(&self, ks: &str, key: &[u8]) -> metalgraph_store::Result<Option<Bytes>> {
        self.inner.get(ks, key)
    }
    fn scan_prefix(&self, ks: &str, p: &[u8]) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan_prefix(ks, p)
    }
    fn scan(
        &self,
        ks: &str,
        scan: metalgraph_store::Scan<'_>,
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan(ks, scan)
    }
    fn commit(&self, batch: Batch) -> metalgraph_store::Result<()> {
        if self.budget.fetch_sub(1, Ordering::SeqCst) <= 0 {
            return Err(metalgraph_store::Error::Io("simulated crash".into()));
        }
        self.inner.commit(batch)
    }
    fn backend(&self) -> &'static str {
        "crash"
    }
}

const GRAPHS: &[&str] = &[
    r#"{injectableName: G.chain, tasks: [
        {label: a, taskName: Task.Noop},
        {label: b, taskName: Task.Sleep, waitOn: {a: succeeded}},
        {label: c, taskName: Task.Echo, optionOverrides: {got: "{{ context.b.sleptMs }}"}, waitOn: {b: succeeded}},
        {label: d, taskName: Task.Noop, waitOn: {c: succeeded}}]}"#,
    r#"{injectableName: G.fan, tasks: [
        {label: a, taskName: Task.Noop},
        {label: b, taskName: Task.Sleep, optionOverrides: {duration: 2s}, waitOn: {a: succeeded}},
        {label: c, taskName: Task.Sleep, optionOverrides: {duration: 3s}, waitOn: {a: succeeded}},
        {label: d, taskName: Task.Noop, waitOn: {a: succeeded}},
        {label: e, taskName: Task.Noop, waitOn: {b: succeeded, c: succeeded, d: succeeded}}]}"#,
    r#"{injectableName: G.retry, tasks: [
        {label: a, taskName: Task.Flaky, optionOverrides: {failTimes: 2}, retries: {max: 3, backoff: 1s}},
        {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}]}"#,
    r#"{injectableName: G.failfast, tasks: [
        {label: a, taskName: Task.Sleep, optionOverrides: {duration: 1s}},
        {label: boom, taskName: Task.Fail, waitOn: {a: succeeded}},
        {label: slow, taskName: Task.Sleep, optionOverrides: {duration: 1h}},
        {label: never, taskName: Task.Noop, waitOn: {boom: succeeded}}]}"#,
    r#"{injectableName: G.handled, tasks: [
        {label: a, taskName: Task.Fail},
        {label: cleanup, taskName: Task.Noop, waitOn: {a: failed}}]}"#,
    r#"{injectableName: G.sub, tasks: [
        {label: s, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Ok}},
        {label: after, taskName: Task.Noop, waitOn: {s: succeeded}}]}"#,
    r#"{injectableName: Sub.Ok, tasks: [
        {label: x, taskName: Task.Sleep, optionOverrides: {duration: 2s}},
        {label: y, taskName: Task.Noop, waitOn: {x: succeeded}}]}"#,
    r#"{injectableName: G.timeout, tasks: [
        {label: h, taskName: Task.Hang, timeout: 5s},
        {label: on-timeout, taskName: Task.Noop, waitOn: {h: timeout}}]}"#,
];

const RUNS: &[(&str, Option<&str>)] = &[
    ("G.chain", Some("n1")),
    ("G.fan", Some("n2")),
    ("G.retry", None),
    ("G.failfast", None),
    ("G.handled", None),
    ("G.sub", Some("n3")),
    ("G.timeout", None),
];

/// `graph -> (status, task states)` for every top-level workflow in the store.
async fn outcomes(
    engine: &metalgraph_engine::Engine,
) -> BTreeMap<String, (WorkflowStatus, String)> {
    engine
        .list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|w| w.parent.is_none())
        .map(|w| (w.name.clone(), (w.status, states(&w))))
        .collect()
}

fn count_successes(
    events: &mut tokio::sync::broadcast::Receiver<metalgraph_engine::Numbered>,
    seen: &mut HashMap<(String, String), usize>,
) {
    while let Ok((_, ev)) = events.try_recv() {
        if let Event::Task {
            workflow_id,
            label,
            state: TaskState::Succeeded,
            ..
        } = &*ev
        {
            *seen
                .entry((workflow_id.clone(), label.clone()))
                .or_default() += 1;
        }
    }
}

struct Scenario {
    store: Arc<MemStore>,
    clock: Arc<TokioClock>,
}

impl Scenario {
    fn new() -> Self {
        Self {
            store: Arc::new(MemStore::new()),
            clock: TokioClock::new(1_800_000_000_000),
        }
    }

    fn engine(&self, store: Arc<dyn Store>) -> Harness {
        let clock: Arc<dyn Clock> = self.clock.clone();
        start(store, GRAPHS, |o| o.clock = clock)
    }

    /// Creates the nodes (outside any crash budget).
    async fn nodes(&self, h: &Harness) {
        for n in ["n1", "n2", "n3"] {
            h.engine
                .nodes()
                .create(serde_json::from_value(json!({"id": n, "name": n})).unwrap())
                .await
                .unwrap();
        }
    }
}

async fn run_all(h: &Harness) -> Vec<String> {
    let mut ids = Vec::new();
    for (graph, node) in RUNS {
        let req = metalgraph_engine::RunRequest {
            graph: (*graph).to_owned(),
            node: node.map(str::to_owned),
            options: Default::default(),
        };
        if let Ok(v) = h.engine.run(req).await {
            ids.push(v.instance_id);
        }
    }
    ids
}

async fn wait_all(h: &Harness, ids: &[String]) {
    for id in ids {
        wait_for(&h.engine, id, Duration::from_secs(4 * 3600)).await;
    }
}

async fn reference() -> (BTreeMap<String, (WorkflowStatus, String)>, i64) {
    let s = Scenario::new();
    let crash = Arc::new(CrashStore {
        inner: s.store.clone(),
        budget: AtomicI64::new(i64::MAX),
    });
    let h = s.engine(crash.clone());
    s.nodes(&h).await;
    let ids = run_all(&h).await;
    wait_all(&h, &ids).await;
    let out = outcomes(&h.engine).await;
    h.stop().await;
    let commits = i64::MAX - crash.budget.load(Ordering::SeqCst);
    (out, commits)
}

#[tokio::test(start_paused = true)]
async fn every_commit_point_recovers_to_the_same_end() {
    let (expected, commits) = reference().await;
    assert_eq!(expected.len(), RUNS.len());
    assert_eq!(expected["G.failfast"].0, WorkflowStatus::Failed);
    assert_eq!(
        expected["G.failfast"].1,
        "a=succeeded boom=failed slow=cancelled never=skipped"
    );
    assert_eq!(expected["G.timeout"].1, "h=timeout on-timeout=succeeded");
    assert!(commits > 20, "the scenario makes {commits} commits");

    let mut crashed = 0;
    for budget in 0..commits {
        let s = Scenario::new();
        let mut successes = HashMap::new();
        let crash = Arc::new(CrashStore {
            inner: s.store.clone(),
            budget: AtomicI64::new(i64::MAX),
        });
        let h = s.engine(crash.clone());
        s.nodes(&h).await;
        crash.budget.store(budget, Ordering::SeqCst);
        let mut events = h.engine.subscribe();
        let ids = run_all(&h).await;
        // Run until the "crash" stops the scheduler (or everything ends first).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(4 * 3600);
        while h.engine.is_healthy() && tokio::time::Instant::now() < deadline {
            let mut all_done = true;
            for id in &ids {
                let v = h.engine.get(id).await.unwrap();
                all_done &= v.is_some_and(|v| v.status.is_terminal());
            }
            if all_done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        count_successes(&mut events, &mut successes);
        if crash.budget.load(Ordering::SeqCst) < 0 {
            crashed += 1; // At least one commit was refused: the engine "died" mid-flight.
        }
        h.stop().await;

        let h2 = s.engine(s.store.clone());
        let mut events = h2.engine.subscribe();
        let all: Vec<String> = h2
            .engine
            .list(&Default::default())
            .await
            .unwrap()
            .into_iter()
            .map(|w| w.instance_id)
            .collect();
        assert!(all.len() >= ids.len());
        wait_all(&h2, &all).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        count_successes(&mut events, &mut successes);
        let got = outcomes(&h2.engine).await;
        for (graph, end) in &got {
            assert_eq!(
                Some(end),
                expected.get(graph),
                "crash at commit {budget}: {graph}"
            );
        }
        if let Some(((wf, label), n)) = successes.iter().find(|(_, n)| **n > 1) {
            panic!("crash at commit {budget}: task {label} of {wf} reported succeeded {n} times");
        }
        // Nothing is left locked or active.
        for n in ["n1", "n2", "n3"] {
            assert_eq!(
                h2.engine.nodes().active_workflow(n).await.unwrap(),
                None,
                "crash at {budget}"
            );
        }
        assert!(
            h2.engine
                .list(&metalgraph_engine::ListFilter {
                    active: Some(true),
                    ..Default::default()
                })
                .await
                .unwrap()
                .is_empty()
        );
        h2.stop().await;
    }
    // Group commit makes the number of commits vary from run to run (messages that arrive
    // together share one), so the budgets near the end may outlast a run; most budgets must
    // still have cut the engine off mid-flight for the test to mean anything.
    assert!(
        crashed >= 15 && crashed * 2 >= commits,
        "of {commits} crash points, only {crashed} crashed"
    );
}

#[tokio::test(start_paused = true)]
async fn stops_at_many_moments_recover_to_the_same_end() {
    let (expected, _) = reference().await;
    for ms in [
        0u64, 1, 5, 20, 300, 999, 1_000, 1_001, 1_500, 2_000, 2_500, 3_000, 4_000, 4_999, 5_000,
        6_000,
    ] {
        let s = Scenario::new();
        let h = s.engine(s.store.clone());
        s.nodes(&h).await;
        let ids = run_all(&h).await;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        h.stop().await;
        // Time passes while the engine is down.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let h2 = s.engine(s.store.clone());
        wait_all(&h2, &ids).await;
        assert_eq!(
            outcomes(&h2.engine).await,
            expected,
            "stopped after {ms} ms"
        );
        h2.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn deadlines_and_attempts_carry_over_a_restart() {
    let s = Scenario::new();
    let g = "{injectableName: T, tasks: [{label: h, taskName: Task.Hang, timeout: 10s}]}";
    let clock: Arc<dyn Clock> = s.clock.clone();
    let h = start(s.store.clone(), &[g], |o| o.clock = clock.clone());
    let t0 = tokio::time::Instant::now();
    let v = h.run("T", json!({}), None).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let h2 = start(s.store.clone(), &[g], |o| o.clock = clock);
    let end = h2.wait(&v.instance_id).await;
    assert_eq!(end.tasks[0].state, TaskState::Timeout);
    assert_eq!(
        end.tasks[0].attempts, 2,
        "the restart raised the attempt count"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "the remaining time counted, not a fresh timeout: {took:?}"
    );
    h2.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_waiting_at_a_crash_keeps_its_schedule() {
    let s = Scenario::new();
    let g = "{injectableName: R, tasks: [{label: f, taskName: Task.Flaky, optionOverrides: {failTimes: 1}, retries: {max: 1, backoff: 30s}}]}";
    let clock: Arc<dyn Clock> = s.clock.clone();
    let h = start(s.store.clone(), &[g], |o| o.clock = clock.clone());
    let t0 = tokio::time::Instant::now();
    let v = h.run("R", json!({}), None).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    h.stop().await;
    let h2 = start(s.store.clone(), &[g], |o| o.clock = clock);
    let end = h2.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded);
    assert_eq!(end.tasks[0].attempts, 2);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took < Duration::from_secs(31),
        "{took:?}"
    );
    h2.stop().await;
}
