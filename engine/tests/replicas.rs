//! Engine replicas sharing one store under partition leases (`ownership.rs`): runs and
//! cancels through any replica, every replica's events on every replica in order per
//! workflow, takeover of a stopped replica's workflows, and fencing of a replica that
//! stalled past its lease. The store is shared in memory here; the binary's tests run
//! replicas on PostgreSQL.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Harness, start, wait_for};
use metalgraph_engine::ownership::{LeaseTimings, Leases, Ownership};
use metalgraph_engine::{Event, WorkflowStatus};
use metalgraph_store::{Batch, MemStore, Scan, Store};
use serde_json::json;

const GRAPHS: &str = r#"
- injectableName: Graph.Nap
  tasks:
    - {label: first, taskName: Task.Noop}
    - {label: nap, taskName: Task.Sleep, waitOn: {first: succeeded}}
    - {label: last, taskName: Task.Noop, waitOn: {nap: succeeded}}
- injectableName: Graph.Call
  tasks:
    - {label: call, taskName: Task.WaitNode}
- injectableName: Graph.Parent
  tasks:
    - {label: before, taskName: Task.Noop}
    - {label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: Graph.Nap}, waitOn: {before: succeeded}}
    - {label: after, taskName: Task.Noop, waitOn: {sub: succeeded}}
"#;

fn timings() -> LeaseTimings {
    LeaseTimings {
        ttl: Duration::from_millis(900),
        renew: Duration::from_millis(200),
        scan: Duration::from_millis(100),
    }
}

fn replica(store: &Arc<dyn Store>, name: &str) -> Harness {
    let leases = Leases::new(store.clone(), name.to_owned(), timings());
    start(store.clone(), &[GRAPHS], move |o| {
        o.ownership = Ownership::Leased(leases);
    })
}

async fn nodes(h: &Harness, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("node-{i}");
        common::node(h, &id).await;
        ids.push(id);
    }
    ids
}

/// Waits until the replicas between them hold every partition, each its share.
async fn settled(leases: &[&Arc<Leases>]) {
    let all = metalgraph_engine::ownership::PARTITIONS as usize + 1;
    let share = all.div_ceil(leases.len());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while leases.iter().map(|l| l.partitions().len()).sum::<usize>() != all
        || leases.iter().any(|l| l.partitions().len() > share)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "partitions never settled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `Graph.Nap` on each node through `h`, napping `nap`; returns the workflow ids.
async fn naps(h: &Harness, nodes: &[String], nap: &str) -> Vec<String> {
    let mut wfs = Vec::new();
    for node in nodes {
        let v = h
            .run("Graph.Nap", json!({"nap": {"duration": nap}}), Some(node))
            .await;
        wfs.push(v.instance_id.clone());
    }
    wfs
}

/// Waits until `n` jobs run on `h`.
async fn running(h: &Harness, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while h.probe.running.load(Ordering::SeqCst) < n {
        assert!(tokio::time::Instant::now() < deadline, "naps never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn leases_of(h: &Harness) -> Arc<Leases> {
    match h.engine.ownership() {
        Ownership::Leased(l) => l.clone(),
        Ownership::Sole => panic!("a replica"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_through_any_replica_finish_and_every_replica_sees_every_event_in_order() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = replica(&store, "a");
    let b = replica(&store, "b");
    let ids = nodes(&a, 12).await;
    settled(&[&leases_of(&a), &leases_of(&b)]).await;
    let mut watch_a = a.engine.subscribe();
    let mut watch_b = b.engine.subscribe();

    let mut wfs = Vec::new();
    for (i, node) in ids.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        let v = via
            .run(
                "Graph.Nap",
                json!({"nap": {"duration": "300ms"}}),
                Some(node),
            )
            .await;
        wfs.push(v.instance_id.clone());
    }
    // The node lock holds across replicas: the other replica refuses a second run.
    let busy = b
        .engine
        .run(metalgraph_engine::RunRequest {
            graph: "Graph.Nap".into(),
            node: Some(ids[0].clone()),
            options: Default::default(),
        })
        .await
        .expect_err("the node is busy");
    assert!(
        matches!(busy, metalgraph_engine::Error::NodeBusy { .. }),
        "{busy}"
    );

    for id in &wfs {
        let v = wait_for(&b.engine, id, Duration::from_secs(20)).await;
        assert_eq!(v.status, WorkflowStatus::Succeeded, "{v:#?}");
    }
    // A subgraph, run through the other replica than its parent's, is driven with its
    // parent and the parent sees it end.
    let parents: Vec<String> = {
        let mut ids = Vec::new();
        for via in [&a, &b, &a, &b] {
            ids.push(via.run("Graph.Parent", json!({}), None).await.instance_id);
        }
        ids
    };
    for id in &parents {
        let v = wait_for(&a.engine, id, Duration::from_secs(20)).await;
        assert_eq!(v.status, WorkflowStatus::Succeeded, "{v:#?}");
    }
    // Both replicas drove some of them.
    let drove_a: usize = a.probe.succeeded.lock().unwrap().len();
    let drove_b: usize = b.probe.succeeded.lock().unwrap().len();
    // Three tasks of each nap, and of each parent two and its child's three.
    assert_eq!(drove_a + drove_b, 3 * wfs.len() + 5 * parents.len());
    assert!(
        drove_a > 0 && drove_b > 0,
        "a drove {drove_a} tasks, b {drove_b}"
    );

    // Each replica's stream holds every workflow's events, numbered without gaps, and
    // each workflow's in the order they happened.
    for watch in [&mut watch_a, &mut watch_b] {
        let mut seen: HashMap<String, Vec<String>> = HashMap::new();
        let mut last = None;
        let mut ended = 0;
        while ended < wfs.len() {
            let (n, ev) = tokio::time::timeout(Duration::from_secs(10), watch.recv())
                .await
                .expect("events keep coming")
                .expect("no lag");
            if let Some(last) = last {
                assert_eq!(n, last + 1, "event numbers have no gaps");
            }
            last = Some(n);
            let step = match &*ev {
                Event::Workflow { status, .. } => {
                    if status.is_terminal() {
                        ended += 1;
                    }
                    format!("workflow:{status}")
                }
                Event::Task { label, state, .. } => format!("{label}:{state}"),
            };
            seen.entry(ev.workflow_id().to_owned())
                .or_default()
                .push(step);
        }
        for id in &wfs {
            assert_eq!(
                seen[id],
                [
                    "workflow:pending",
                    "workflow:running",
                    "first:running",
                    "first:succeeded",
                    "nap:running",
                    "nap:succeeded",
                    "last:running",
                    "last:succeeded",
                    "workflow:succeeded"
                ],
                "events of {id}"
            );
        }
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_replica_reaches_the_owner() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = replica(&store, "a");
    let b = replica(&store, "b");
    let ids = nodes(&a, 8).await;
    settled(&[&leases_of(&a), &leases_of(&b)]).await;
    let wfs = naps(&a, &ids, "1h").await;
    // Cancelled through each replica in turn, so some requests reach the other one's
    // partitions.
    for (i, id) in wfs.iter().enumerate() {
        let via = if i % 2 == 0 { &a } else { &b };
        let v = tokio::time::timeout(Duration::from_secs(10), via.engine.cancel(id))
            .await
            .expect("the cancel completes")
            .unwrap();
        assert_eq!(v.status, WorkflowStatus::Cancelled, "{v:#?}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replicas_workflows_are_taken_over_and_finish() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = replica(&store, "a");
    let ids = nodes(&a, 10).await;
    settled(&[&leases_of(&a)]).await;
    let wfs = naps(&a, &ids, "1s").await;
    // Once every workflow is napping, `a` crashes.
    running(&a, wfs.len()).await;
    // Its scheduler is dropped where it stands, and then everything else it runs: nothing
    // is released, as after a crash.
    a.handle.abort();
    a.shutdown.cancel();
    let stopped = tokio::time::Instant::now();
    let b = replica(&store, "b");
    for id in &wfs {
        let v = wait_for(&b.engine, id, Duration::from_secs(20)).await;
        assert_eq!(v.status, WorkflowStatus::Succeeded, "{v:#?}");
        let nap = &v.tasks[1];
        assert_eq!(nap.attempts, 2, "the nap ran again on b: {v:#?}");
    }
    // Taken over once a's leases ran out (900 ms), not before.
    assert!(stopped.elapsed() >= timings().ttl);
    assert_eq!(b.probe.succeeded.lock().unwrap().len(), 2 * wfs.len());
    b.stop().await;
}

/// Every task record as `key state attempts`.
fn tasks(store: &dyn Store) -> Vec<String> {
    store
        .scan_prefix("tasks", b"")
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let t: serde_json::Value = serde_json::from_slice(&v).unwrap();
            format!(
                "{} {} {}",
                String::from_utf8_lossy(&k),
                t["state"],
                t["attempts"]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_to_a_replica_that_does_not_drive_the_task_completes_it() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let a = replica(&store, "a");
    let b = replica(&store, "b");
    let ids = nodes(&a, 6).await;
    settled(&[&leases_of(&a), &leases_of(&b)]).await;
    for node in &ids {
        let v = a.run("Graph.Call", json!({}), Some(node)).await;
        // The replica that drives it shows the waiting task; the other does not.
        let p = metalgraph_engine::ownership::partition_of(node);
        let (owner, other) = if a.engine.ownership().owns(p) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let (wf, token) = loop {
            if let Some(w) = owner.engine.waiting_token(node) {
                break w;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the task never waited"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(wf, v.instance_id);
        // The other replica does not drive it, but finds it where the owner published it.
        assert!(other.engine.waiting_token(node).is_none());
        let seen = other.engine.waiting_task(node).await.expect("published");
        assert_eq!((seen.workflow_id, seen.token), (wf.clone(), token.clone()));
        // A wrong token is refused by the other replica as by the owner.
        let wrong = other
            .engine
            .notify(Some(node), "0123456789abcdef0123456789abcdef", json!({}))
            .await
            .expect_err("a wrong token");
        assert!(
            matches!(wrong, metalgraph_engine::Error::NotFound { .. }),
            "{wrong}"
        );
        let label = other
            .engine
            .notify(Some(node), &token, json!({"installed": node}))
            .await
            .unwrap();
        assert_eq!(label, "call");
        let done = wait_for(&other.engine, &wf, Duration::from_secs(10)).await;
        assert_eq!(done.status, WorkflowStatus::Succeeded, "{done:#?}");
        let (_, tasks) = other.engine.load(&wf).await.unwrap().unwrap();
        assert_eq!(
            tasks[0].output.as_deref(),
            Some(&json!({"installed": node}))
        );
        // The wait is over: nothing is published for the node any more.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while store.get("waiting", node.as_bytes()).unwrap().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the wait stayed published"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(other.engine.waiting_task(node).await.is_none());
    }
    a.stop().await;
    b.stop().await;
}

/// A store whose commits can be held up, as a replica's would be when it stalls (a long
/// pause, a partition from the database).
struct Stalling {
    inner: Arc<dyn Store>,
    stalled: AtomicBool,
    /// Commits that failed after the stall ended.
    refused: std::sync::atomic::AtomicUsize,
}

impl Store for Stalling {
    fn get(&self, ks: &str, key: &[u8]) -> metalgraph_store::Result<Option<Vec<u8>>> {
        self.inner.get(ks, key)
    }
    fn scan_prefix(&self, ks: &str, p: &[u8]) -> metalgraph_store::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan_prefix(ks, p)
    }
    fn scan(&self, ks: &str, scan: Scan<'_>) -> metalgraph_store::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.inner.scan(ks, scan)
    }
    fn commit(&self, batch: Batch) -> metalgraph_store::Result<()> {
        while self.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let res = self.inner.commit(batch);
        if res.is_err() {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        res
    }
    fn backend(&self) -> &'static str {
        "stalling"
    }
}

/// A shared store, and replica `a` on it through a [`Stalling`] view.
fn stalling_replica() -> (Arc<dyn Store>, Arc<Stalling>, Harness) {
    let shared: Arc<dyn Store> = Arc::new(MemStore::new());
    let stalling = Arc::new(Stalling {
        inner: shared.clone(),
        stalled: AtomicBool::new(false),
        refused: Default::default(),
    });
    let a_store: Arc<dyn Store> = stalling.clone();
    let a = replica(&a_store, "a");
    (shared, stalling, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_stalled_past_its_lease_writes_nothing_after_the_takeover() {
    let (shared, stalling, a) = stalling_replica();
    let ids = nodes(&a, 6).await;
    settled(&[&leases_of(&a)]).await;
    let wfs = naps(&a, &ids, "400ms").await;
    running(&a, wfs.len()).await;
    // a stalls: its naps end, but nothing it commits gets through, not even its renewals.
    stalling.stalled.store(true, Ordering::SeqCst);
    let b = replica(&shared, "b");
    for id in &wfs {
        let v = wait_for(&b.engine, id, Duration::from_secs(20)).await;
        assert_eq!(v.status, WorkflowStatus::Succeeded, "{v:#?}");
    }
    let after_b = tasks(shared.as_ref());
    // a comes back: whatever it had queued is refused by the fences, and it takes
    // nothing back from b.
    stalling.stalled.store(false, Ordering::SeqCst);
    tokio::time::sleep(timings().ttl * 2).await;
    assert!(
        stalling.refused.load(Ordering::SeqCst) > 0,
        "a's held-up commits were refused"
    );
    assert_eq!(
        tasks(shared.as_ref()),
        after_b,
        "a wrote nothing to the workflows after b took them over"
    );
    for id in &wfs {
        let v = b.engine.get(id).await.unwrap().unwrap();
        assert_eq!(v.status, WorkflowStatus::Succeeded);
    }
    a.stop().await;
    b.stop().await;
}

/// A workflow created while its partition's owner cannot commit is loaded by the replica
/// that takes the partition over; it must still be announced (its `pending` event), before
/// anything else it does, as any other workflow is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_created_just_before_its_partition_moves_is_announced_by_the_new_owner() {
    let (shared, stalling, a) = stalling_replica();
    let ids = nodes(&a, 1).await;
    settled(&[&leases_of(&a)]).await;
    // a holds every partition and can no longer commit: the run's creation below (through
    // b, which holds none yet) stays in a's inbox until b takes a's partitions over.
    stalling.stalled.store(true, Ordering::SeqCst);
    // Commits held up forever would keep the runtime from stopping after a failed assert.
    struct Unstall(Arc<Stalling>);
    impl Drop for Unstall {
        fn drop(&mut self) {
            self.0.stalled.store(false, Ordering::SeqCst);
        }
    }
    let unstall = Unstall(stalling.clone());
    let b = replica(&shared, "b");
    let mut watch = b.engine.subscribe();
    let id = b
        .run(
            "Graph.Nap",
            json!({"nap": {"duration": "50ms"}}),
            Some(&ids[0]),
        )
        .await
        .instance_id;
    let v = wait_for(&b.engine, &id, Duration::from_secs(20)).await;
    assert_eq!(v.status, WorkflowStatus::Succeeded, "{v:#?}");
    let mut seen = Vec::new();
    while !seen.iter().any(|s| s == "workflow:succeeded") {
        let (_, ev) = tokio::time::timeout(Duration::from_secs(10), watch.recv())
            .await
            .expect("events keep coming")
            .expect("no lag");
        if ev.workflow_id() != id {
            continue;
        }
        seen.push(match &*ev {
            Event::Workflow { status, .. } => format!("workflow:{status}"),
            Event::Task { label, state, .. } => format!("{label}:{state}"),
        });
    }
    assert_eq!(
        seen[..2],
        ["workflow:pending", "workflow:running"],
        "{seen:?}"
    );
    drop(unstall);
    a.stop().await;
    b.stop().await;
}
