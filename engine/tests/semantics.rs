//! The scheduling rules of DESIGN.md section 2, one graph per rule: each case gives a graph
//! and the expected final state of every task and of the workflow.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::cases::{SUBGRAPHS, cases};
use common::*;
use metalgraph_engine::nodes::Node;
use metalgraph_engine::{Error, RunRequest, WorkflowStatus};
use metalgraph_store::MemStore;
use serde_json::json;

#[tokio::test(start_paused = true)]
async fn every_rule_reaches_its_expected_end() {
    let mut failures = Vec::new();
    for case in cases() {
        let mut graphs = vec![case.graph];
        graphs.extend_from_slice(SUBGRAPHS);
        let h = start(Arc::new(MemStore::new()), &graphs, |_| {});
        let v = h.run("G", case.options.clone(), None).await;
        let end = h.wait(&v.instance_id).await;
        let got = (end.status, states(&end));
        if got != (case.status, case.states.to_owned()) {
            failures.push(format!(
                "{}: expected {} [{}], got {} [{}] (error: {:?}, tasks: {:?})",
                case.name,
                case.status,
                case.states,
                got.0,
                got.1,
                end.error,
                end.tasks
                    .iter()
                    .map(|t| (&t.label, &t.error))
                    .collect::<Vec<_>>()
            ));
        }
        h.stop().await;
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[tokio::test(start_paused = true)]
async fn retries_count_attempts_and_back_off() {
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Flaky, optionOverrides: {failTimes: 2}, retries: {max: 3, backoff: 10s}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let t0 = tokio::time::Instant::now();
    let v = h.run("G", json!({}), None).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded);
    assert_eq!(end.tasks[0].attempts, 3);
    // Backoff doubles: 10 s, then 20 s.
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    assert_eq!(end.context["a"]["retry"], json!(2));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn options_follow_the_precedence_chain() {
    // Each layer sets its own key and overrides every lower one's `level`.
    let g = r#"
injectableName: G
options:
  defaults: {level: graph-defaults, graphDefault: 1}
  b: {level: graph-label}
tasks:
  - {label: a, taskName: Task.Echo}
  - {label: b, taskName: Task.Echo, optionOverrides: {level: override, fromOverride: 1}}
  - {label: c, taskName: Task.Echo, optionOverrides: {level: override}}
  - {label: d, taskDefinition: {implementsTask: echo}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let v = h
        .run(
            "G",
            json!({"defaults": {"runDefault": 1}, "c": {"level": "run-label"}}),
            None,
        )
        .await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    let level = |l: &str| end.context[l]["level"].as_str().unwrap().to_owned();
    assert_eq!(level("a"), "graph-defaults");
    assert_eq!(level("b"), "graph-label");
    assert_eq!(level("c"), "run-label");
    assert_eq!(level("d"), "graph-defaults");
    assert_eq!(end.context["b"]["fromOverride"], json!(1));
    assert_eq!(end.context["a"]["runDefault"], json!(1));
    h.stop().await;

    // Without graph-level values, the job default and the task definition show through.
    let g2 = r#"
injectableName: G2
tasks:
  - {label: taskdef, taskName: Task.Echo}
  - {label: job, taskDefinition: {implementsTask: echo}}
  - {label: run-defaults, taskName: Task.Echo, optionOverrides: {level: override}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g2], |_| {});
    let v = h.run("G2", json!({"run-defaults": {}}), None).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.context["taskdef"]["level"], json!("taskdef"));
    assert_eq!(end.context["job"]["level"], json!("job"));
    assert_eq!(end.context["run-defaults"]["level"], json!("override"));
    let v = h
        .run("G2", json!({"defaults": {"level": "run-defaults"}}), None)
        .await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.context["run-defaults"]["level"], json!("run-defaults"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn templates_see_node_task_and_api_but_no_secret() {
    let g = r#"
injectableName: G
tasks:
  - label: a
    taskName: Task.Echo
    optionOverrides:
      node: "{{ node.name }} {{ node.macs[0] }} {{ node.obmHost }}"
      task: "{{ task.label }} {{ task.workflowId }}"
      api: "{{ api.base }}"
      hidden: "{{ node.obm is defined }}-{{ node.password is defined }}"
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |o| {
        o.api.base = "http://mg:8080/api/2.0".into();
    });
    let node: Node = serde_json::from_value(json!({
        "id": "n1", "name": "rack1-u1", "identifiers": ["52:54:00:AA:BB:01"],
        "obms": [{"service": "redfish-obm-service", "config": {"host": "10.0.0.5", "user": "root", "password": "hunter2"}}]
    }))
    .unwrap();
    h.engine.nodes().create(node).await.unwrap();
    let v = h.run("G", json!({}), Some("n1")).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    let out = &end.context["a"];
    assert_eq!(out["node"], json!("rack1-u1 52:54:00:aa:bb:01 10.0.0.5"));
    assert_eq!(out["task"], json!(format!("a {}", v.instance_id)));
    assert_eq!(out["api"], json!("http://mg:8080/api/2.0"));
    assert_eq!(out["hidden"], json!("False-False"));
    assert!(!serde_json::to_string(&end).unwrap().contains("hunter2"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn views_redact_secret_options_but_jobs_get_them() {
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Echo}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let options = json!({
        "defaults": {"password": "hunter2", "user": "root", "apiToken": "tok-1"},
        "a": {"nested": {"bmcPassword": "pw-2", "list": [{"clientSecret": "sec-3"}]}, "tokens": 3}
    });
    let v = h.run("G", options, None).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    let shown = serde_json::to_string(&end).unwrap();
    for secret in ["hunter2", "tok-1", "pw-2", "sec-3"] {
        assert!(!shown.contains(secret), "{secret} shown in {shown}");
    }
    assert_eq!(end.options["defaults"]["password"], json!("<redacted>"));
    assert_eq!(end.options["defaults"]["user"], json!("root"));
    assert_eq!(
        end.options["a"]["tokens"],
        json!(3),
        "only key suffixes count"
    );
    assert_eq!(
        end.options["a"]["nested"]["list"][0]["clientSecret"],
        json!("<redacted>")
    );
    assert_eq!(end.context["a"]["password"], json!("<redacted>"));
    assert_eq!(end.context["a"]["user"], json!("root"));
    // The record keeps the values, and the job got them.
    let (rec, tasks) = h.engine.load(&v.instance_id).await.unwrap().unwrap();
    assert_eq!(rec.options["defaults"]["password"], json!("hunter2"));
    assert_eq!(
        tasks[0].output.as_ref().unwrap()["password"],
        json!("hunter2")
    );
    assert_eq!(
        tasks[0].output.as_ref().unwrap()["nested"]["bmcPassword"],
        json!("pw-2")
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancel_reaches_running_jobs_and_subgraphs() {
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Hang}
  - {label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Hang}}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
"#;
    let sub = "{injectableName: Sub.Hang, tasks: [{label: h, taskName: Task.Hang}]}";
    let h = start(Arc::new(MemStore::new()), &[g, sub], |_| {});
    let v = h.run("G", json!({}), None).await;
    // Let both jobs and the subgraph's job start.
    while h.probe.running.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let child = h
        .engine
        .list(&Default::default())
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.name == "Sub.Hang")
        .expect("subgraph started");
    h.engine.cancel(&v.instance_id).await.unwrap();
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Cancelled);
    assert_eq!(states(&end), "a=cancelled sub=cancelled b=skipped");
    let child_end = h.wait(&child.instance_id).await;
    assert_eq!(child_end.status, WorkflowStatus::Cancelled);
    assert_eq!(
        h.probe.cleaned_up.load(Ordering::SeqCst),
        2,
        "both hanging jobs cleaned up"
    );
    // Cancelling again is a conflict: it already finished.
    assert!(matches!(
        h.engine.cancel(&v.instance_id).await,
        Err(Error::Conflict(_))
    ));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn one_active_workflow_per_node() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: 5s}}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    h.engine
        .nodes()
        .create(serde_json::from_value(json!({"id": "n1", "name": "n1"})).unwrap())
        .await
        .unwrap();
    let first = h.run("G", json!({}), Some("n1")).await;
    let second = h
        .engine
        .run(RunRequest {
            graph: "G".into(),
            node: Some("n1".into()),
            options: Default::default(),
        })
        .await;
    match second {
        Err(Error::NodeBusy { workflow, .. }) => assert_eq!(workflow, first.instance_id),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let unknown = h
        .engine
        .run(RunRequest {
            graph: "G".into(),
            node: Some("nope".into()),
            options: Default::default(),
        })
        .await;
    assert!(matches!(unknown, Err(Error::NotFound { kind: "node", .. })));
    h.wait(&first.instance_id).await;
    // Free again once the first finished.
    let third = h.run("G", json!({}), Some("n1")).await;
    assert_eq!(
        h.wait(&third.instance_id).await.status,
        WorkflowStatus::Succeeded
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_node_lock_is_atomic_under_concurrent_runs() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    h.engine
        .nodes()
        .create(serde_json::from_value(json!({"id": "n1", "name": "n1"})).unwrap())
        .await
        .unwrap();
    let runs = (0..16).map(|_| {
        let e = h.engine.clone();
        tokio::spawn(async move {
            e.run(RunRequest {
                graph: "G".into(),
                node: Some("n1".into()),
                options: Default::default(),
            })
            .await
        })
    });
    let results = futures_join(runs).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "exactly one run wins the node");
    h.stop().await;
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn missing_required_options_are_refused_at_run() {
    let g = r#"
injectableName: G
options: {defaults: {imageUrl: null}}
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {image: "{{ options.imageUrl }}"}}
  - {label: s, taskName: Task.Sleep, optionOverrides: {duration: null}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let run = |opts: serde_json::Value| {
        let e = h.engine.clone();
        async move {
            e.run(RunRequest {
                graph: "G".into(),
                node: None,
                options: serde_json::from_value(opts).unwrap(),
            })
            .await
        }
    };
    match run(json!({})).await {
        Err(Error::BadOptions(m)) => assert!(m.to_string().contains("imageUrl"), "{m}"),
        other => panic!("{other:?}"),
    }
    match run(json!({"defaults": {"imageUrl": "http://x/y.iso"}})).await {
        Err(Error::BadOptions(m)) => {
            let m = m.to_string();
            assert!(m.contains("task 's'") && m.contains("duration"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    // A layer that names no task label is ignored, as RackHD ignores it.
    let v = run(json!({"defaults": {"imageUrl": "http://x/y.iso"}, "s": {"duration": "1s"}, "nope": {"x": 1}}))
        .await
        .unwrap();
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded);
    assert_eq!(end.context["a"]["image"], json!("http://x/y.iso"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_global_job_limit_holds() {
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Sleep}
  - {label: b, taskName: Task.Sleep}
  - {label: c, taskName: Task.Sleep}
  - {label: d, taskName: Task.Sleep}
  - {label: e, taskName: Task.Sleep}
  - {label: f, taskName: Task.Sleep}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |o| o.max_running_jobs = 2);
    let a = h.run("G", json!({}), None).await;
    let b = h.run("G", json!({}), None).await;
    assert_eq!(
        h.wait(&a.instance_id).await.status,
        WorkflowStatus::Succeeded
    );
    assert_eq!(
        h.wait(&b.instance_id).await.status,
        WorkflowStatus::Succeeded
    );
    assert_eq!(h.probe.peak.load(Ordering::SeqCst), 2);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn events_report_every_transition_once() {
    let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let mut rx = h.engine.subscribe();
    let v = h.run("G", json!({}), None).await;
    let mut seen = Vec::new();
    let mut received = Vec::new();
    loop {
        let (n, ev) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("events keep coming")
            .unwrap();
        received.push((n, ev.clone()));
        assert_eq!(ev.workflow_id(), v.instance_id);
        let done = matches!(&*ev, metalgraph_engine::Event::Workflow { status, .. } if status.is_terminal());
        seen.push(match &*ev {
            metalgraph_engine::Event::Workflow { status, .. } => format!("wf:{status}"),
            metalgraph_engine::Event::Task { label, state, .. } => format!("{label}:{state}"),
        });
        if done {
            break;
        }
    }
    assert_eq!(
        seen.join(" "),
        "wf:pending wf:running a:running a:succeeded b:running b:succeeded wf:succeeded"
    );
    // The retained log and every subscriber hold one allocation of each event, not a copy.
    let (retained, _) = h.engine.events_since(None, usize::MAX).await;
    assert_eq!(retained.len(), received.len());
    for ((n, ev), (m, kept)) in received.iter().zip(&retained) {
        assert_eq!(n, m);
        assert!(Arc::ptr_eq(ev, kept), "event {n} was copied");
    }
    h.stop().await;
}

/// A store whose commits take a while, so that a caller can give up in the middle of one.
struct SlowStore(MemStore);

impl metalgraph_store::Store for SlowStore {
    fn get(&self, ks: &str, key: &[u8]) -> metalgraph_store::Result<Option<Vec<u8>>> {
        self.0.get(ks, key)
    }
    fn scan_prefix(
        &self,
        ks: &str,
        prefix: &[u8],
    ) -> metalgraph_store::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.0.scan_prefix(ks, prefix)
    }
    fn scan(
        &self,
        ks: &str,
        scan: metalgraph_store::Scan<'_>,
    ) -> metalgraph_store::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.0.scan(ks, scan)
    }
    fn commit(&self, batch: metalgraph_store::Batch) -> metalgraph_store::Result<()> {
        std::thread::sleep(Duration::from_millis(30));
        self.0.commit(batch)
    }
    fn backend(&self) -> &'static str {
        "slow"
    }
}

/// A caller that stops waiting (an HTTP client that disconnects) while its workflow is
/// being created must never leave a committed workflow unscheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_giving_up_mid_create_never_strands_a_workflow() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Noop}]}";
    let h = start(Arc::new(SlowStore(MemStore::new())), &[g], |_| {});
    for i in 0..10u64 {
        let e = h.engine.clone();
        let run = tokio::spawn(async move {
            e.run(RunRequest {
                graph: "G".into(),
                node: None,
                options: Default::default(),
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(5 + i * 3)).await;
        run.abort();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = h.engine.list(&Default::default()).await.unwrap();
    assert!(!all.is_empty(), "some creations committed before the abort");
    for w in all {
        let end = wait_for(&h.engine, &w.instance_id, Duration::from_secs(10)).await;
        assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    }
    h.stop().await;
}

/// A job that, when it starts, reads its workflow back from the store and fails unless its
/// task is recorded running with this very attempt.
struct SelfCheck(Arc<std::sync::OnceLock<metalgraph_engine::Engine>>);

impl metalgraph_engine::Job for SelfCheck {
    fn name(&self) -> &'static str {
        "self-check"
    }
    fn schema(&self) -> &metalgraph_engine::OptionSchema {
        static SCHEMA: std::sync::OnceLock<metalgraph_engine::OptionSchema> =
            std::sync::OnceLock::new();
        SCHEMA.get_or_init(metalgraph_engine::OptionSchema::new)
    }
    fn run(
        &self,
        ctx: metalgraph_engine::job::JobContext,
    ) -> metalgraph_engine::job::BoxFuture<'static, metalgraph_engine::JobResult> {
        let engine = self.0.get().expect("the engine is set").clone();
        Box::pin(async move {
            let stored = engine
                .get(&ctx.workflow_id)
                .await
                .map_err(|e| metalgraph_engine::JobError::new(e.to_string()))?
                .ok_or_else(|| metalgraph_engine::JobError::new("workflow not stored"))?;
            let task = stored
                .tasks
                .iter()
                .find(|t| t.label == ctx.label)
                .expect("the task is in its workflow");
            if task.state != metalgraph_engine::TaskState::Running || task.attempts != ctx.attempt {
                return Err(metalgraph_engine::JobError::new(format!(
                    "started while the store holds {} after {} attempts",
                    task.state, task.attempts
                )));
            }
            Ok(json!({}))
        })
    }
}

/// The scheduler commits one step while it applies the messages of the next: however the
/// two overlap, a job starts only once the commit that records its task running is done.
/// Commits here take 30 ms, so jobs end, and their successors are decided, while the step
/// that started their siblings is still being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_starts_only_once_its_start_is_committed() {
    let tasks = "- {injectableName: Task.SelfCheck, implementsTask: self-check}";
    let g = "{injectableName: G, tasks: [
        {label: a, taskName: Task.SelfCheck},
        {label: b, taskName: Task.SelfCheck, waitOn: {a: succeeded}},
        {label: c, taskName: Task.SelfCheck, waitOn: {a: succeeded}},
        {label: d, taskName: Task.SelfCheck, waitOn: {b: succeeded, c: succeeded}}]}";
    let engine = Arc::new(std::sync::OnceLock::new());
    let h = start(Arc::new(SlowStore(MemStore::new())), &[tasks, g], |o| {
        o.jobs.register(SelfCheck(engine.clone()));
    });
    assert!(
        engine.set(h.engine.clone()).is_ok(),
        "the engine is set once"
    );
    let runs: Vec<_> = (0..8)
        .map(|_| {
            let e = h.engine.clone();
            tokio::spawn(async move {
                e.run(RunRequest {
                    graph: "G".into(),
                    node: None,
                    options: Default::default(),
                })
                .await
            })
        })
        .collect();
    for run in runs {
        let id = run.await.unwrap().unwrap().instance_id;
        let end = wait_for(&h.engine, &id, Duration::from_secs(20)).await;
        assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    }
    h.stop().await;
}

/// Runs of one graph share their planned tasks in the scheduler while those are equal
/// (`share_plan`, tested in the core); each workflow's jobs see only their own run's
/// options, whether the run before or after it changed a task.
#[tokio::test]
async fn runs_of_a_graph_see_their_own_options() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Echo}, \
             {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let plain = h.run("G", json!({}), None).await;
    let own = h.run("G", json!({"a": {"level": "mine"}}), None).await;
    let again = h.run("G", json!({}), None).await;
    for (v, level) in [(plain, "taskdef"), (own, "mine"), (again, "taskdef")] {
        let end = h.wait(&v.instance_id).await;
        assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
        assert_eq!(end.context["a"]["level"], level, "{end:#?}");
    }
    h.stop().await;
}
