//! Batches in the engine: at most `maxConcurrent` workflows at once, busy and missing
//! nodes skipped with a reason, no new start after `stopAfterFailures`, cancel, and the
//! requests refused up front.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Harness, node, start};
use metalgraph_engine::batches::{BatchRecord, BatchState, EntryStatus, NewBatch};
use metalgraph_engine::{Error, WorkflowStatus};
use metalgraph_store::MemStore;
use serde_json::json;

const GRAPHS: &str = r#"
injectableName: Graph.Nap
tasks:
  - {label: nap, taskName: Task.Sleep, optionOverrides: {duration: 150ms}}
---
injectableName: Graph.Fail
tasks:
  - {label: fail, taskName: Task.Fail}
---
injectableName: Graph.Hang
tasks:
  - {label: hang, taskName: Task.Hang}
"#;

fn harness() -> Harness {
    let graphs: Vec<&str> = GRAPHS.split("---").collect();
    start(Arc::new(MemStore::new()), &graphs, |_| {})
}

fn batch(graph: &str, nodes: &[&str], max: usize) -> NewBatch {
    NewBatch {
        name: graph.to_owned(),
        options: Default::default(),
        nodes: Some(nodes.iter().map(|n| (*n).to_owned()).collect()),
        tags: None,
        max_concurrent: max,
        stop_after_failures: None,
    }
}

async fn finished(h: &Harness, id: &str) -> BatchRecord {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rec = h
            .engine
            .batches()
            .get(id)
            .await
            .unwrap()
            .expect("the batch");
        if rec.state == BatchState::Finished {
            return rec;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rec:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn statuses(rec: &BatchRecord) -> Vec<EntryStatus> {
    rec.entries.iter().map(|e| e.status).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_max_concurrent_run_and_every_node_gets_its_workflow() {
    let h = harness();
    let ids: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    for id in &ids {
        node(&h, id).await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rec = h
        .engine
        .create_batch(batch("Graph.Nap", &refs, 2))
        .await
        .unwrap();
    let done = finished(&h, &rec.id).await;
    assert_eq!(statuses(&done), vec![EntryStatus::Succeeded; 6]);
    assert_eq!(h.probe.peak.load(Ordering::SeqCst), 2);
    for e in &done.entries {
        let wf = h
            .engine
            .get(e.workflow.as_deref().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(wf.node.as_deref(), Some(e.node.as_str()));
        assert_eq!(wf.status, WorkflowStatus::Succeeded);
    }
    assert_eq!(done.counts()["succeeded"], 6);

    // Listed newest first, a page at a time.
    let second = h
        .engine
        .create_batch(batch("Graph.Nap", &refs[..1], 1))
        .await
        .unwrap();
    finished(&h, &second.id).await;
    let page = h.engine.batches().page(Some(1), None).await.unwrap();
    assert_eq!(page.items[0].id, second.id);
    let rest = h.engine.batches().page(Some(1), page.next).await.unwrap();
    assert_eq!(rest.items[0].id, rec.id);
    assert!(rest.next.is_none(), "{:?}", rest.next);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_missing_nodes_are_skipped_with_a_reason() {
    let h = harness();
    node(&h, "busy").await;
    node(&h, "free").await;
    let holding = h.run("Graph.Hang", json!({}), Some("busy")).await;
    let rec = h
        .engine
        .create_batch(batch("Graph.Nap", &["busy", "ghost", "free"], 3))
        .await
        .unwrap();
    let done = finished(&h, &rec.id).await;
    assert_eq!(
        statuses(&done),
        vec![
            EntryStatus::Skipped,
            EntryStatus::Skipped,
            EntryStatus::Succeeded
        ]
    );
    let reason = |i: usize| done.entries[i].reason.clone().unwrap_or_default();
    assert!(
        reason(0).contains("busy") && reason(0).contains(&holding.instance_id),
        "{}",
        reason(0)
    );
    assert!(reason(1).contains("ghost does not exist"), "{}", reason(1));
    assert!(done.entries[0].workflow.is_none() && done.entries[1].workflow.is_none());
    h.engine.cancel(&holding.instance_id).await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_new_start_after_too_many_failures() {
    let h = harness();
    let ids: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    for id in &ids {
        node(&h, id).await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut new = batch("Graph.Fail", &refs, 1);
    new.stop_after_failures = Some(3);
    let rec = h.engine.create_batch(new).await.unwrap();
    let done = finished(&h, &rec.id).await;
    use EntryStatus::{Failed, NotStarted};
    assert_eq!(
        statuses(&done),
        vec![Failed, Failed, Failed, NotStarted, NotStarted, NotStarted]
    );
    assert_eq!(done.stopped.as_deref(), Some("stopped after 3 failures"));
    assert_eq!(
        done.entries[0].reason.as_deref(),
        Some("task 'fail' failed: failed on purpose")
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_starting_and_cancels_what_runs() {
    let h = harness();
    let ids: Vec<String> = (0..4).map(|i| format!("n{i}")).collect();
    for id in &ids {
        node(&h, id).await;
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let rec = h
        .engine
        .create_batch(batch("Graph.Hang", &refs, 2))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.probe.running.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cancelling = h.engine.batches().cancel(&rec.id).await.unwrap();
    assert_eq!(cancelling.state, BatchState::Cancelling);
    let done = finished(&h, &rec.id).await;
    use EntryStatus::{Cancelled, NotStarted};
    assert_eq!(
        statuses(&done),
        vec![Cancelled, Cancelled, NotStarted, NotStarted]
    );
    assert_eq!(h.probe.cleaned_up.load(Ordering::SeqCst), 2);
    let again = h.engine.batches().cancel(&rec.id).await;
    assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
    h.stop().await;
}

#[tokio::test]
async fn wrong_batches_are_refused_before_anything_starts() {
    let h = harness();
    node(&h, "n0").await;
    let refuse = |new: NewBatch| {
        let engine = h.engine.clone();
        async move { engine.create_batch(new).await.expect_err("refused") }
    };
    let e = refuse(batch("Graph.Nap", &["n0"], 0)).await;
    assert!(e.to_string().contains("maxConcurrent"), "{e}");
    let e = refuse(batch("Graph.Nap", &[], 1)).await;
    assert!(e.to_string().contains("names no node"), "{e}");
    let e = refuse(batch("Graph.Nap", &["n0", "n0"], 1)).await;
    assert!(e.to_string().contains("n0 twice"), "{e}");
    let e = refuse(batch("Graph.Nope", &["n0"], 1)).await;
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
    let mut both = batch("Graph.Nap", &["n0"], 1);
    both.tags = Some(vec!["rack1".into()]);
    let e = refuse(both).await;
    assert!(e.to_string().contains("either 'nodes'"), "{e}");
    let mut none = batch("Graph.Nap", &["n0"], 1);
    none.stop_after_failures = Some(0);
    let e = refuse(none).await;
    assert!(e.to_string().contains("stopAfterFailures"), "{e}");
    let listed = h.engine.batches().page(Some(10), None).await.unwrap();
    assert!(listed.items.is_empty() && listed.next.is_none());
    h.stop().await;
}
