//! The promises at their edges: a panicking job, a subgraph deleted or lost under its
//! parent, absurd durations at run time, store work kept off the async runtime, timers
//! and reads that must not pile up per workflow, and an engine whose store fails.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use metalgraph_engine::clock::TokioClock;
use metalgraph_engine::{Error, RunRequest, WorkflowStatus, keys};
use metalgraph_store::{Batch, MemStore, Store};
use serde_json::json;

/// Waits until a workflow of `graph` exists and meets `when`, and returns its id.
async fn workflow_of(
    h: &Harness,
    graph: &str,
    when: impl Fn(&metalgraph_engine::WorkflowView) -> bool,
) -> String {
    loop {
        let all = h.engine.list(&Default::default()).await.unwrap();
        if let Some(w) = all.iter().find(|w| w.name == graph && when(w)) {
            return w.instance_id.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_job_fails_its_task_and_frees_its_slot_and_node() {
    let handled = "{injectableName: G, tasks: [{label: boom, taskName: Task.Panic}, {label: after, taskName: Task.Noop, waitOn: {boom: failed}}]}";
    let unhandled = "{injectableName: G2, tasks: [{label: boom, taskName: Task.Panic}]}";
    let ok = "{injectableName: Ok, tasks: [{label: a, taskName: Task.Noop}]}";
    // One job slot: a panic that kept its slot would leave nothing for the next workflow.
    let h = start(Arc::new(MemStore::new()), &[handled, unhandled, ok], |o| {
        o.max_running_jobs = 1
    });
    node(&h, "n1").await;
    let v = h.run("G", json!({}), Some("n1")).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded);
    assert_eq!(states(&end), "boom=failed after=succeeded");
    let err = end.tasks[0].error.as_deref().unwrap_or_default();
    assert!(err.contains("job panic panicked: boom: boom"), "{err}");

    let v = h.run("G2", json!({}), Some("n1")).await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Failed);
    assert!(
        end.error
            .as_deref()
            .unwrap_or_default()
            .contains("panicked"),
        "{end:?}"
    );
    // The node's lock and the only slot are free again.
    let v = h.run("Ok", json!({}), Some("n1")).await;
    assert_eq!(
        h.wait(&v.instance_id).await.status,
        WorkflowStatus::Succeeded
    );
    h.stop().await;
}

const PARENT: &str = r#"
injectableName: Parent
tasks:
  - {label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Ok}}
  - {label: hold, taskName: Task.Hang, waitOn: {sub: succeeded}}
"#;
const SUB_OK: &str = "{injectableName: Sub.Ok, tasks: [{label: x, taskName: Task.Noop}]}";

#[tokio::test(start_paused = true)]
async fn a_subgraph_cannot_be_deleted_while_its_parent_runs() {
    let h = start(Arc::new(MemStore::new()), &[PARENT, SUB_OK], |_| {});
    let parent = h.run("Parent", json!({}), None).await;
    h.engine.subscribe();
    // Wait until the child has finished and the parent holds.
    let child = workflow_of(&h, "Sub.Ok", |w| w.status.is_terminal()).await;
    match h.engine.delete(&child).await {
        Err(Error::Conflict(msg)) => assert!(
            msg.contains(&parent.instance_id) && msg.contains("still running"),
            "{msg}"
        ),
        other => panic!("expected a conflict naming the parent, got {other:?}"),
    }
    assert!(
        h.engine.get(&child).await.unwrap().is_some(),
        "nothing deleted"
    );
    h.engine.cancel(&parent.instance_id).await.unwrap();
    h.wait(&parent.instance_id).await;
    h.engine
        .delete(&child)
        .await
        .expect("deletable once the parent finished");
    assert!(h.engine.get(&child).await.unwrap().is_none());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_parent_whose_subgraph_is_gone_fails_instead_of_waiting_forever() {
    let hang_sub = "{injectableName: Sub.Hang, tasks: [{label: x, taskName: Task.Hang}]}";
    let parent = "{injectableName: P, tasks: [{label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Hang}}]}";
    let store = Arc::new(MemStore::new());
    let clock = TokioClock::new(1_800_000_000_000);
    let h = start(store.clone(), &[parent, hang_sub], |o| {
        o.clock = clock.clone()
    });
    let p = h.run("P", json!({}), None).await;
    let child = workflow_of(&h, "Sub.Hang", |_| true).await;
    h.stop().await;
    // While the engine is down, the child's records are lost (the API refuses to delete a
    // child whose parent runs, but a store can lose data or be edited by hand).
    let mut lost = Batch::new();
    lost.delete(keys::WORKFLOWS, child.as_bytes());
    lost.delete(keys::ACTIVE, child.as_bytes());
    lost.delete(keys::TASKS, keys::task_key(&child, 0));
    store.commit(lost).unwrap();

    let h = start(store, &[parent, hang_sub], |o| o.clock = clock);
    let end = tokio::time::timeout(Duration::from_secs(60), h.wait(&p.instance_id))
        .await
        .expect("the parent does not wait forever");
    assert_eq!(end.status, WorkflowStatus::Failed);
    let err = end.tasks[0].error.as_deref().unwrap_or_default();
    assert!(
        err.contains(&child) && err.contains("no longer exists"),
        "{err}"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn absurd_durations_are_refused_when_a_graph_is_run() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    for (options, field) in [
        (json!({"a": {"duration": "31d"}}), "options.duration"),
        (
            json!({"defaults": {"duration": 18_446_744_073_709_551_615u64}}),
            "options.duration",
        ),
        (
            json!({"a": {"_taskTimeout": 2_592_000_001u64}}),
            "options._taskTimeout",
        ),
    ] {
        let res = h
            .engine
            .run(RunRequest {
                graph: "G".into(),
                node: None,
                options: serde_json::from_value(options.clone()).unwrap(),
            })
            .await;
        match res {
            Err(Error::BadOptions(p)) => {
                let msg = p.to_string();
                assert!(
                    msg.contains(field) && msg.contains("30 days"),
                    "{options}: {msg}"
                );
            }
            other => panic!("{options}: expected a 400, got {other:?}"),
        }
    }
    assert!(h.engine.list(&Default::default()).await.unwrap().is_empty());
    h.stop().await;
}

/// Every store call the engine makes — through its API, its scheduler, recovery and the
/// jobs' services — runs off the async runtime's threads. On a current-thread runtime the
/// runtime is this test's thread, so not one call may come from it.
#[test]
fn no_store_call_runs_on_the_async_runtime() {
    let spy = SpyStore::new(Arc::new(MemStore::new()));
    let runtime_thread = std::thread::current().id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let g = r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Sleep, optionOverrides: {duration: 20ms}}
  - {label: b, taskName: Task.Echo, optionOverrides: {got: "{{ context.a.sleptMs }}"}, waitOn: {a: succeeded}}
  - {label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Ok}, waitOn: {b: succeeded}}
"#;
        let hang = "{injectableName: H, tasks: [{label: h, taskName: Task.Hang}]}";
        let h = start(spy.clone(), &[g, hang, SUB_OK], |_| {});
        node(&h, "n1").await;
        let nodes = h.engine.nodes();
        nodes.get("n1").await.unwrap();
        nodes.list().await.unwrap();
        nodes
            .update("n1", |n| {
                n.tags.push("x".into());
                Ok(())
            })
            .await
            .unwrap();
        nodes.put_catalog("n1", "test", &json!({})).await.unwrap();
        nodes.catalogs("n1").await.unwrap();
        let defs = h.engine.definitions();
        defs.graphs_page(Default::default()).await.unwrap();
        defs.get_task("Task.Noop").await.unwrap();
        let v = h.run("G", json!({}), Some("n1")).await;
        assert_eq!(h.wait(&v.instance_id).await.status, WorkflowStatus::Succeeded);
        let hung = h.run("H", json!({}), Some("n1")).await;
        h.engine.current_tasks("n1").await.unwrap();
        assert!(h.engine.notify(Some("n1"), "nope", json!({})).await.is_err());
        h.engine.cancel(&hung.instance_id).await.unwrap();
        h.wait(&hung.instance_id).await;
        h.engine.list(&Default::default()).await.unwrap();
        h.engine.delete(&v.instance_id).await.unwrap();
        h.stop().await;
        // A restart recovers from the same store.
        let h = start(spy.clone(), &[g, hang, SUB_OK], |_| {});
        h.engine.list(&Default::default()).await.unwrap();
        h.stop().await;
    });
    let threads = spy.threads.lock().unwrap();
    assert!(!threads.is_empty());
    assert!(
        !threads.contains(&runtime_thread),
        "a store call ran on the async runtime's thread"
    );
}

#[tokio::test(start_paused = true)]
async fn timers_end_with_their_workflow() {
    let g = "{injectableName: G, timeout: 30d, tasks: [{label: a, taskName: Task.Noop}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    for _ in 0..100 {
        let v = h.run("G", json!({}), None).await;
        assert_eq!(
            h.wait(&v.instance_id).await.status,
            WorkflowStatus::Succeeded
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = metrics.num_alive_tasks();
    assert!(
        after <= before + 5,
        "{} tasks outlive 100 finished workflows with a 30-day deadline",
        after - before
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_waiting_subgraph_task_does_not_reread_its_child_on_other_events() {
    let hang_sub = "{injectableName: Sub.Hang, tasks: [{label: x, taskName: Task.Hang}]}";
    let parent = "{injectableName: P, tasks: [{label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Hang}}]}";
    let busy = "{injectableName: Busy, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}]}";
    let spy = SpyStore::new(Arc::new(MemStore::new()));
    let h = start(spy.clone(), &[parent, hang_sub, busy], |_| {});
    let p = h.run("P", json!({}), None).await;
    let child = workflow_of(&h, "Sub.Hang", |_| true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    spy.reads.lock().unwrap().clear();
    // Fifty other workflows publish some three hundred events.
    for _ in 0..50 {
        let v = h.run("Busy", json!({}), None).await;
        h.wait(&v.instance_id).await;
    }
    assert_eq!(
        spy.reads_of(keys::WORKFLOWS, &child),
        0,
        "the waiting task re-read its child for other workflows' events"
    );
    h.engine.cancel(&p.instance_id).await.unwrap();
    h.wait(&p.instance_id).await;
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_store_failure_stops_the_engine_and_health_says_why() {
    let g = "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: 5s}}]}";
    let spy = SpyStore::new(Arc::new(MemStore::new()));
    let h = start(spy.clone(), &[g], |_| {});
    assert!(h.engine.health().is_ok());
    let v = h.run("G", json!({}), None).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The disk fills while the sleep runs: the scheduler's next commit fails.
    spy.fail_commits.store(true, Ordering::SeqCst);
    let res = tokio::time::timeout(Duration::from_secs(60), h.engine.stopped()).await;
    assert!(res.is_ok(), "the scheduler stops");
    let why = h.engine.health().expect_err("unhealthy");
    assert!(
        why.contains("store failure") && why.contains("no space left on device"),
        "{why}"
    );
    match h
        .engine
        .run(RunRequest {
            graph: "G".into(),
            node: None,
            options: Default::default(),
        })
        .await
    {
        Err(Error::Unavailable(m)) => assert!(m.contains("no space left"), "{m}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    let Harness { handle, .. } = h;
    let stopped = handle.await.unwrap();
    assert!(matches!(stopped, Err(Error::Store(_))), "{stopped:?}");
    // The workflow is still recorded as it last committed: running, to be resumed.
    let _ = v;
}

#[tokio::test(start_paused = true)]
async fn graph_run_cycles_are_refused_and_nesting_is_bounded() {
    let h = start(Arc::new(MemStore::new()), &[], |_| {});
    let defs = h.engine.definitions();
    let put = |yaml: &str| {
        metalgraph_engine::definitions::parse(yaml, "t")
            .unwrap()
            .remove(0)
    };
    let graph = |d: metalgraph_engine::model::Definition| match d {
        metalgraph_engine::model::Definition::Graph(g) => g,
        _ => panic!("not a graph"),
    };
    // A graph that runs itself, directly or through another, is refused when stored.
    let me = graph(put(
        "{injectableName: Me, tasks: [{label: again, taskName: Task.Graph.Run, optionOverrides: {graphName: Me}}]}",
    ));
    match defs.put_graph(me).await {
        Err(Error::Invalid(p)) => assert!(
            p.to_string().contains("graph Me, task 'again', field 'options.graphName': graph.run forms a cycle: Me -> Me"),
            "{p}"
        ),
        other => panic!("{other:?}"),
    }
    let b = graph(put(
        "{injectableName: B, tasks: [{label: to-a, taskName: Task.Graph.Run, optionOverrides: {graphName: A}}]}",
    ));
    defs.put_graph(b)
        .await
        .expect("A does not exist yet: no cycle");
    let a = graph(put(
        "{injectableName: A, tasks: [{label: to-b, taskName: Task.Graph.Run, optionOverrides: {graphName: B}}]}",
    ));
    match defs.put_graph(a).await {
        Err(Error::Invalid(p)) => assert!(p.to_string().contains("A -> B -> A"), "{p}"),
        other => panic!("{other:?}"),
    }
    // A name given by a template escapes validation; nesting stops at the depth limit and
    // the whole tree fails.
    let r = graph(put(
        "{injectableName: R, options: {defaults: {next: R}}, tasks: [{label: again, taskName: Task.Graph.Run, optionOverrides: {graphName: '{{ options.next }}'}}]}",
    ));
    defs.put_graph(r).await.unwrap();
    let top = h.run("R", json!({}), None).await;
    let end = h.wait(&top.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Failed);
    let all = h.engine.list(&Default::default()).await.unwrap();
    assert_eq!(
        all.len(),
        1 + metalgraph_engine::definitions::MAX_SUBGRAPH_DEPTH as usize
    );
    assert!(all.iter().all(|w| w.status == WorkflowStatus::Failed));
    let deepest = all
        .iter()
        .find(|w| {
            w.tasks[0]
                .error
                .as_deref()
                .unwrap_or_default()
                .contains("nest")
        })
        .expect("the deepest names the limit");
    assert!(
        deepest.tasks[0]
            .error
            .as_deref()
            .unwrap()
            .contains("at most 8"),
        "{deepest:?}"
    );
    // More tasks than a graph may have.
    let many = format!(
        "{{injectableName: Many, tasks: [{}]}}",
        (0..1001)
            .map(|i| format!("{{label: t{i}, taskName: Task.Noop}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match defs.put_graph(graph(put(&many))).await {
        Err(Error::Invalid(p)) => assert!(
            p.to_string().contains("graph has 1001 tasks; at most 1000"),
            "{p}"
        ),
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_parent_stops_its_whole_tree() {
    let t1 = "{injectableName: T1, tasks: [{label: down, taskName: Task.Graph.Run, optionOverrides: {graphName: T2}}]}";
    let t2 = "{injectableName: T2, tasks: [{label: down, taskName: Task.Graph.Run, optionOverrides: {graphName: T3}}, {label: h, taskName: Task.Hang}]}";
    let t3 = "{injectableName: T3, tasks: [{label: h, taskName: Task.Hang}]}";
    let h = start(Arc::new(MemStore::new()), &[t1, t2, t3], |_| {});
    let top = h.run("T1", json!({}), None).await;
    while h.probe.running.load(Ordering::SeqCst) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = h.engine.cancel(&top.instance_id).await.unwrap();
    assert_eq!(end.status, WorkflowStatus::Cancelled);
    let all = h.engine.list(&Default::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    for w in &all {
        assert_eq!(w.status, WorkflowStatus::Cancelled, "{}: {w:?}", w.name);
    }
    assert_eq!(h.probe.running.load(Ordering::SeqCst), 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn what_came_from_outside_is_never_evaluated_again() {
    // A node's callback carries template syntax; the parent passes it on to a subgraph.
    let parent = r#"
injectableName: P
tasks:
  - {label: wait, taskName: Task.WaitNode}
  - label: sub
    taskName: Task.Graph.Run
    optionOverrides: {graphName: Sub.Echo, graphOptions: {defaults: {got: "{{ context.wait.x }}"}}}
    waitOn: {wait: succeeded}
"#;
    let child = "{injectableName: Sub.Echo, tasks: [{label: e, taskName: Task.Echo}]}";
    let h = start(Arc::new(MemStore::new()), &[parent, child], |_| {});
    node(&h, "n1").await;
    let p = h.run("P", json!({}), Some("n1")).await;
    let token = loop {
        if let Some((_, t)) = h.engine.waiting_token("n1") {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let hostile = "{{ 7*7 }}{{ task.token }}";
    h.engine
        .notify(Some("n1"), &token, json!({"x": hostile}))
        .await
        .unwrap();
    let end = h.wait(&p.instance_id).await;
    assert_eq!(end.status, WorkflowStatus::Succeeded, "{end:?}");
    let got = &end.context["sub"]["context"]["e"]["got"];
    assert_eq!(got, hostile, "the callback's text was evaluated again");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn options_a_job_declares_secret_are_redacted_whatever_their_name() {
    let g = "{injectableName: G, tasks: [{label: in, taskName: Task.Login}, {label: other, taskName: Task.Noop}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let v = h
        .run(
            "G",
            json!({"in": {"pin": "4711"}, "other": {"pin": "shown"}}),
            None,
        )
        .await;
    let end = h.wait(&v.instance_id).await;
    assert_eq!(end.options["in"]["pin"], "<redacted>");
    // Another task's job does not declare it: the value is not a secret there.
    assert_eq!(end.options["other"]["pin"], "shown");
    assert!(!serde_json::to_string(&end).unwrap().contains("4711"));
    h.stop().await;
}

/// A cancel that arrives while a task's options are still rendering ends that task
/// cancelled, not succeeded, and the scheduler answers the cancel without waiting for the
/// render (which runs on the blocking pool, bounded by its fuel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_render_cancels_the_task() {
    // Each option is a template of its own, each within its fuel: together they take a
    // while to render.
    let heavy = "{% for i in range(300) %}{% for j in range(900) %}{% endfor %}{% endfor %}";
    let g = format!(
        "{{injectableName: G, tasks: [{{label: slow, taskName: Task.Echo, optionOverrides: {{{}}}}}]}}",
        (0..6)
            .map(|i| format!("o{i}: \"{heavy}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let g = g.as_str();
    let h = start(Arc::new(MemStore::new()), &[g], |_| {});
    let v = h.run("G", json!({}), None).await;
    // The task is running: its options are being rendered.
    while h.engine.get(&v.instance_id).await.unwrap().unwrap().tasks[0].state
        != metalgraph_engine::TaskState::Running
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let end = h.engine.cancel(&v.instance_id).await.unwrap();
    assert_eq!(end.status, WorkflowStatus::Cancelled);
    assert_eq!(states(&end), "slow=cancelled");
    assert!(
        h.probe.succeeded.lock().unwrap().is_empty(),
        "the job ran after the cancel"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_task_count_limit_is_configurable() {
    let g = "{injectableName: Four, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Noop}, {label: c, taskName: Task.Noop}, {label: d, taskName: Task.Noop}]}";
    let h = start(Arc::new(MemStore::new()), &[g], |o| {
        o.max_tasks_per_graph = 3
    });
    match h
        .engine
        .run(RunRequest {
            graph: "Four".into(),
            node: None,
            options: Default::default(),
        })
        .await
    {
        Err(Error::Invalid(p)) => {
            assert!(
                p.to_string().contains(
                    "graph Four, field 'tasks': graph has 4 tasks; at most 3 are allowed"
                ),
                "{p}"
            )
        }
        other => panic!("{other:?}"),
    }
    h.stop().await;
}

/// A store written before sealing holds OBM passwords as given; an engine with a key seals
/// them on start, and still reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_obm_passwords_are_sealed_on_start_and_still_read() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let h = start(store.clone(), &[], |_| {});
    let node = serde_json::from_value(json!({
        "id": "n1", "name": "n1",
        "obms": [{"service": "ipmi-obm-service",
                  "config": {"host": "10.0.0.9", "user": "admin", "password": "Old-pl41n-pw"}}],
    }))
    .unwrap();
    h.engine.nodes().create(node).await.unwrap();
    h.stop().await;
    let raw = |store: &Arc<dyn Store>| {
        String::from_utf8(store.get(keys::NODES, b"n1").unwrap().unwrap()).unwrap()
    };
    assert!(
        raw(&store).contains("Old-pl41n-pw"),
        "written as given without a key"
    );

    let sealer = Arc::new(metalgraph_engine::seal::Sealer::new(&[9u8; 32]).unwrap());
    let h = start(store.clone(), &[], |o| o.sealer = Some(sealer.clone()));
    h.engine.list(&Default::default()).await.unwrap(); // recovery has run
    let stored = raw(&store);
    assert!(
        !stored.contains("Old-pl41n-pw") && stored.contains("sealed:v1:"),
        "{stored}"
    );
    let node = h.engine.nodes().get("n1").await.unwrap().unwrap();
    let password = node.obms[0].config.password.as_ref().unwrap();
    assert_eq!(password.expose(), "Old-pl41n-pw");
    h.stop().await;
}
