//! Rerunning a failed or cancelled workflow from where it stopped (`Engine::rerun`): which
//! tasks run again, what the rerun's context and options hold, and which reruns are refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use metalgraph_engine::{Error, Event, WorkflowStatus, WorkflowView};
use metalgraph_store::MemStore;
use serde_json::{Value, json};

/// Five tasks in a chain; the third fails until a rerun tells it not to (`failTimes: 0`),
/// and the fourth renders the first two outputs into its options.
const FIVE: &str = r#"
injectableName: Five
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {level: first}}
  - {label: b, taskName: Task.Echo, optionOverrides: {level: second}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Flaky, waitOn: {b: succeeded}}
  - label: d
    taskName: Task.Echo
    optionOverrides: {level: "{{ context.a.level }} then {{ context.b.level }}"}
    waitOn: {c: succeeded}
  - {label: e, taskName: Task.Noop, waitOn: {d: succeeded}}
"#;

fn options(v: Value) -> metalgraph_engine::model::RunOptions {
    serde_json::from_value(v).expect("run options")
}

/// The labels whose jobs returned success in workflow `id`, in the order they did.
fn ran(h: &Harness, id: &str) -> Vec<String> {
    h.probe
        .succeeded
        .lock()
        .unwrap()
        .iter()
        .filter(|(wf, _)| wf == id)
        .map(|(_, label)| label.clone())
        .collect()
}

fn task<'a>(v: &'a WorkflowView, label: &str) -> &'a metalgraph_engine::workflow::TaskView {
    v.tasks.iter().find(|t| t.label == label).expect("the task")
}

#[tokio::test(start_paused = true)]
async fn a_rerun_runs_the_failed_task_onwards_with_the_earlier_outputs() {
    let h = start(Arc::new(MemStore::new()), &[FIVE], |_| {});
    let old = h
        .run(
            "Five",
            json!({"defaults": {"count": 5}, "c": {"failTimes": 1}}),
            None,
        )
        .await;
    let old = h.wait(&old.instance_id).await;
    assert_eq!(old.status, WorkflowStatus::Failed);
    assert_eq!(
        states(&old),
        "a=succeeded b=succeeded c=failed d=skipped e=skipped"
    );

    let mut events = h.engine.subscribe();
    let rerun = h
        .engine
        .rerun(&old.instance_id, options(json!({"c": {"failTimes": 0}})))
        .await
        .expect("a failed workflow reruns");
    assert_ne!(rerun.instance_id, old.instance_id);
    assert_eq!(rerun.rerun_of.as_deref(), Some(old.instance_id.as_str()));
    assert_eq!((rerun.name.as_str(), &rerun.node), ("Five", &None));
    // Created with the first two already succeeded, their outputs in the context.
    assert_eq!(
        states(&rerun),
        "a=succeeded b=succeeded c=pending d=pending e=pending"
    );
    assert_eq!(rerun.context["a"], old.context["a"]);
    assert_eq!(rerun.context["b"], old.context["b"]);
    // The override is merged into the old run's options.
    assert_eq!(
        serde_json::to_value(&rerun.options).unwrap(),
        json!({"defaults": {"count": 5}, "c": {"failTimes": 0}})
    );

    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    assert_eq!(ran(&h, &rerun.instance_id), ["c", "d", "e"]);
    assert_eq!(end.context["a"]["level"], "first");
    assert_eq!(end.context["b"]["level"], "second");
    // A later task rendered the taken-over outputs into its options.
    assert_eq!(end.context["d"]["level"], "first then second");
    assert_eq!(end.context["d"]["count"], 5);
    for label in ["a", "b"] {
        let (was, now) = (task(&old, label), task(&end, label));
        assert_eq!(
            (now.attempts, &now.started_at, &now.finished_at),
            (was.attempts, &was.started_at, &was.finished_at),
            "{label} was taken over, not run"
        );
        assert_ne!(now.id, was.id, "{label} is a task of the new workflow");
    }
    for label in ["c", "d", "e"] {
        let t = task(&end, label);
        assert_eq!(t.attempts, 1, "{label}");
        assert!(
            t.started_at.as_deref() >= Some(end.created_at.as_str()),
            "{label} ran in the rerun: {t:?}"
        );
    }
    // The old workflow is left as it was.
    assert_eq!(
        h.engine.get(&old.instance_id).await.unwrap(),
        Some(old.clone())
    );

    // The rerun's events: created, started, and only the tasks that ran. Events are
    // published after the commit the wait above saw, so they are read up to the rerun's end.
    let mut seen = Vec::new();
    loop {
        let (_, ev) = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap_or_else(|_| panic!("the rerun's events stopped at {seen:?}"))
            .expect("the rerun's events");
        match &*ev {
            Event::Workflow {
                workflow_id,
                status,
                ..
            } if *workflow_id == rerun.instance_id => {
                seen.push(format!("wf:{status}"));
                if status.is_terminal() {
                    break;
                }
            }
            Event::Task {
                workflow_id,
                label,
                state,
                ..
            } if *workflow_id == rerun.instance_id => seen.push(format!("{label}:{state}")),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "wf:pending",
            "wf:running",
            "c:running",
            "c:succeeded",
            "d:running",
            "d:succeeded",
            "e:running",
            "e:succeeded",
            "wf:succeeded"
        ]
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rerun_plans_the_graph_as_it_is_stored_now() {
    let h = start(Arc::new(MemStore::new()), &[FIVE], |_| {});
    let put = |yaml: &str| {
        let graph = serde_json::from_value(metalgraph_engine::text::parse_yaml(yaml).unwrap());
        let defs = h.engine.definitions().clone();
        async move { defs.put_graph(graph.unwrap()).await.unwrap() }
    };
    let old = h.run("Five", json!({}), None).await;
    let old = h.wait(&old.instance_id).await;
    assert_eq!(old.status, WorkflowStatus::Failed);
    // The graph is fixed since: `c` no longer fails, `b`'s options changed (its task did
    // not), `e` is gone and `f` is new.
    let fixed = r#"
injectableName: Five
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {level: first}}
  - {label: b, taskName: Task.Echo, optionOverrides: {level: changed}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Flaky, optionOverrides: {failTimes: 0}, waitOn: {b: succeeded}}
  - label: d
    taskName: Task.Echo
    optionOverrides: {level: "{{ context.a.level }} then {{ context.b.level }}"}
    waitOn: {c: succeeded}
  - {label: f, taskName: Task.Noop, waitOn: {a: succeeded}}
"#;
    put(fixed).await;
    let rerun = h
        .engine
        .rerun(&old.instance_id, Default::default())
        .await
        .unwrap();
    assert_eq!(
        states(&rerun),
        "a=succeeded b=succeeded c=pending d=pending f=pending"
    );
    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    let mut labels = ran(&h, &rerun.instance_id);
    labels.sort();
    assert_eq!(labels, ["c", "d", "f"]);
    // `b` kept the output it had: a task is taken over by label, task name and wait, not
    // by its options.
    assert_eq!(end.context["d"]["level"], "first then second");

    // The tasks that failed are gone from the graph: nothing is left to run.
    put("{injectableName: Two, tasks: [{label: a, taskName: Task.Echo}, {label: b, taskName: Task.Fail}]}").await;
    let two = h.run("Two", json!({}), None).await;
    assert_eq!(
        h.wait(&two.instance_id).await.status,
        WorkflowStatus::Failed
    );
    put("{injectableName: Two, tasks: [{label: a, taskName: Task.Echo}]}").await;
    let rerun = h
        .engine
        .rerun(&two.instance_id, Default::default())
        .await
        .unwrap();
    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(
        (end.status, states(&end)),
        (WorkflowStatus::Succeeded, "a=succeeded".into())
    );
    assert!(ran(&h, &rerun.instance_id).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_task_that_ran_after_the_failure_runs_again_after_the_rerun_task() {
    // `cleanup` ran after `work` failed and succeeded; in the rerun it waits for `work`
    // again. `report` handled the failure; this time it is skipped.
    let g = r#"
injectableName: Cleanup
tasks:
  - {label: setup, taskName: Task.Echo}
  - {label: work, taskName: Task.Flaky, waitOn: {setup: succeeded}}
  - {label: cleanup, taskName: Task.Noop, waitOn: {work: finished}}
  - {label: report, taskName: Task.Noop, waitOn: {work: failed}}
  - {label: fail-anyway, taskName: Task.Fail, waitOn: {cleanup: succeeded, report: succeeded}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let old = h.run("Cleanup", json!({}), None).await;
    let old = h.wait(&old.instance_id).await;
    assert_eq!(old.status, WorkflowStatus::Failed);
    assert_eq!(
        states(&old),
        "setup=succeeded work=failed cleanup=succeeded report=succeeded fail-anyway=failed"
    );
    let rerun = h
        .engine
        .rerun(&old.instance_id, options(json!({"work": {"failTimes": 0}})))
        .await
        .unwrap();
    assert_eq!(
        states(&rerun),
        "setup=succeeded work=pending cleanup=pending report=pending fail-anyway=pending"
    );
    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    assert_eq!(
        states(&end),
        "setup=succeeded work=succeeded cleanup=succeeded report=skipped fail-anyway=skipped"
    );
    assert_eq!(ran(&h, &rerun.instance_id), ["work", "cleanup"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_workflow_reruns_what_was_cancelled_and_skipped() {
    let g = r#"
injectableName: Slow
tasks:
  - {label: a, taskName: Task.Echo}
  - {label: b, taskName: Task.Sleep, optionOverrides: {duration: 1h}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Echo, waitOn: {b: succeeded}}
"#;
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let old = h.run("Slow", json!({}), None).await;
    while h.probe.running.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let old = h.engine.cancel(&old.instance_id).await.unwrap();
    assert_eq!(old.status, WorkflowStatus::Cancelled);
    assert_eq!(states(&old), "a=succeeded b=cancelled c=skipped");
    let rerun = h
        .engine
        .rerun(
            &old.instance_id,
            options(json!({"b": {"duration": "10ms"}})),
        )
        .await
        .unwrap();
    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    assert_eq!(ran(&h, &rerun.instance_id), ["b", "c"]);
    assert_eq!(end.context["b"]["sleptMs"], 10);
    assert_eq!(end.context["a"], old.context["a"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_subgraph_starts_again_as_a_new_child_and_a_succeeded_one_is_kept() {
    let g = r#"
injectableName: Parent
tasks:
  - {label: ok, taskName: Task.Graph.Run, optionOverrides: {graphName: Child.Ok}}
  - {label: maybe, taskName: Task.Graph.Run, optionOverrides: {graphName: Child.Maybe}, waitOn: {ok: succeeded}}
"#;
    let ok = "{injectableName: Child.Ok, tasks: [{label: x, taskName: Task.Echo}]}";
    let maybe = "{injectableName: Child.Maybe, tasks: [{label: f, taskName: Task.Flaky}]}";
    let h = start(Arc::new(MemStore::new()), &[g, ok, maybe], |_| {});
    let old = h.run("Parent", json!({}), None).await;
    let old = h.wait(&old.instance_id).await;
    assert_eq!(states(&old), "ok=succeeded maybe=failed");
    let children = |graph: &'static str| {
        let engine = h.engine.clone();
        async move {
            let mut ids: Vec<String> = engine
                .list(&metalgraph_engine::ListFilter {
                    graph: Some(graph.into()),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|w| w.instance_id)
                .collect();
            ids.sort();
            ids
        }
    };
    let failed_child = children("Child.Maybe").await;
    assert_eq!(failed_child.len(), 1);

    // A subgraph is not rerun on its own: its parent's rerun starts it again.
    match h.engine.rerun(&failed_child[0], Default::default()).await {
        Err(Error::Conflict(m)) => {
            assert!(
                m.contains(&format!("subgraph of workflow {}", old.instance_id)),
                "{m}"
            )
        }
        other => panic!("expected a conflict, got {other:?}"),
    }

    let rerun = h
        .engine
        .rerun(
            &old.instance_id,
            options(json!({"maybe": {"graphOptions": {"failTimes": 0}}})),
        )
        .await
        .unwrap();
    let end = h.wait(&rerun.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:#?}");
    // The succeeded subgraph is kept (no second Child.Ok), the failed one ran again as a new
    // child, and the old child is left failed.
    assert_eq!(end.context["ok"], old.context["ok"]);
    assert_eq!(children("Child.Ok").await.len(), 1);
    let now = children("Child.Maybe").await;
    assert_eq!(now.len(), 2);
    let new_child = end.context["maybe"]["workflowId"].as_str().unwrap();
    assert!(new_child != failed_child[0] && now.iter().any(|c| c == new_child));
    let old_child = h.engine.get(&failed_child[0]).await.unwrap().unwrap();
    assert_eq!(old_child.status, WorkflowStatus::Failed);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn only_a_failed_or_cancelled_workflow_reruns_and_it_takes_the_node_lock() {
    let wait = "{injectableName: Wait, tasks: [{label: w, taskName: Task.Sleep, optionOverrides: {duration: 1h}}]}";
    let quick = "{injectableName: Quick, tasks: [{label: q, taskName: Task.Noop}]}";
    // A rerun of Slow still runs when the test looks at the node's lock (a rerun of Five
    // could already have ended and released it).
    let slow = "{injectableName: Slow, tasks: [{label: c, taskName: Task.Flaky}, {label: s, taskName: Task.Sleep, optionOverrides: {duration: 10m}, waitOn: {c: succeeded}}]}";
    let h = start(Arc::new(MemStore::new()), &[wait, quick, slow], |_| {});
    node(&h, "n1").await;

    let unknown = h.engine.rerun("no-such-id", Default::default()).await;
    assert!(
        matches!(&unknown, Err(Error::NotFound { kind: "workflow", id }) if id == "no-such-id"),
        "{unknown:?}"
    );

    let done = h.run("Quick", json!({}), None).await;
    h.wait(&done.instance_id).await;
    match h.engine.rerun(&done.instance_id, Default::default()).await {
        Err(Error::Conflict(m)) => assert!(
            m.contains("succeeded: only a failed or cancelled workflow can be rerun"),
            "{m}"
        ),
        other => panic!("expected a conflict, got {other:?}"),
    }

    // A failed workflow on n1, then another workflow holding n1.
    let failed = h.run("Slow", json!({}), Some("n1")).await;
    assert_eq!(
        h.wait(&failed.instance_id).await.status,
        WorkflowStatus::Failed
    );
    let busy = h.run("Wait", json!({}), Some("n1")).await;
    match h.engine.rerun(&busy.instance_id, Default::default()).await {
        Err(Error::Conflict(m)) => assert!(m.contains("is still "), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match h
        .engine
        .rerun(&failed.instance_id, options(json!({"c": {"failTimes": 0}})))
        .await
    {
        Err(Error::NodeBusy { node, workflow }) => {
            assert_eq!((node.as_str(), workflow), ("n1", busy.instance_id.clone()))
        }
        other => panic!("expected the node to be busy, got {other:?}"),
    }
    // Options the graph's tasks refuse are refused as in a run.
    h.engine.cancel(&busy.instance_id).await.unwrap();
    let bad = h
        .engine
        .rerun(
            &failed.instance_id,
            options(json!({"c": {"failTimes": "many"}})),
        )
        .await;
    assert!(matches!(bad, Err(Error::BadOptions(_))), "{bad:?}");

    // Once n1 is free, the rerun runs on it and holds it.
    let rerun = h
        .engine
        .rerun(&failed.instance_id, options(json!({"c": {"failTimes": 0}})))
        .await
        .unwrap();
    assert_eq!(rerun.node.as_deref(), Some("n1"));
    assert_eq!(
        h.engine.nodes().active_workflow("n1").await.unwrap(),
        Some(rerun.instance_id.clone())
    );
    assert_eq!(
        h.wait(&rerun.instance_id).await.status,
        WorkflowStatus::Succeeded
    );
    // A workflow may be rerun again; each rerun names the one it reruns.
    let again = h
        .engine
        .rerun(&failed.instance_id, Default::default())
        .await
        .unwrap();
    assert_eq!(again.rerun_of.as_deref(), Some(failed.instance_id.as_str()));
    assert_eq!(
        h.wait(&again.instance_id).await.status,
        WorkflowStatus::Failed,
        "without the override the flaky task fails again"
    );
    h.stop().await;
}
