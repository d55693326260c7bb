//! Workflow history: lists served page by page from the index, each workflow exactly once
//! while others are created, every filter, deletion, and a store from before the index.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use metalgraph_engine::clock::TokioClock;
use metalgraph_engine::{Error, ListFilter, WorkflowStatus, keys};
use metalgraph_store::{Batch, MemStore, Scan, Store};
use serde_json::json;

const GRAPHS: [&str; 4] = [
    "{injectableName: G, tasks: [{label: a, taskName: Task.Noop}]}",
    "{injectableName: H, tasks: [{label: a, taskName: Task.Noop}]}",
    "{injectableName: F, tasks: [{label: a, taskName: Task.Fail}]}",
    "{injectableName: S, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: 1h}}]}",
];

fn harness(store: Arc<dyn Store>) -> Harness {
    start(store, &GRAPHS, |o| {
        o.clock = TokioClock::new(1_800_000_000_000)
    })
}

/// The ids of the first page of a list.
async fn ids_of(h: &Harness, f: ListFilter) -> Vec<String> {
    h.engine
        .list(&f)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.instance_id)
        .collect()
}

/// What orders a list: creation time, then id.
fn key(v: &metalgraph_engine::WorkflowView) -> (u64, String) {
    let created = metalgraph_engine::clock::parse_rfc3339(&v.created_at).unwrap();
    (created, v.instance_id.clone())
}

/// Every id of a list, page by page through the cursor, `between` run after each page.
async fn page_through(
    h: &Harness,
    filter: ListFilter,
    mut between: impl AsyncFnMut(),
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = h
            .engine
            .list_page(&ListFilter {
                cursor: cursor.clone(),
                ..filter.clone()
            })
            .await
            .unwrap();
        ids.extend(page.items.iter().map(|v| v.instance_id.clone()));
        between().await;
        match page.next {
            Some(next) => cursor = Some(next),
            None => return ids,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn paging_while_workflows_are_created_returns_each_one_once_newest_first() {
    let h = harness(Arc::new(MemStore::new()));
    let mut before = Vec::new();
    for i in 0..230 {
        let graph = if i % 3 == 0 { "H" } else { "G" };
        before.push(key(&h.run(graph, json!({}), None).await));
        // Several workflows share each millisecond, so ties are ordered too.
        if i % 4 == 0 {
            tokio::time::advance(Duration::from_millis(1)).await;
        }
    }
    let mut created_meanwhile = Vec::new();
    let listed = page_through(
        &h,
        ListFilter {
            limit: Some(40),
            ..Default::default()
        },
        async || created_meanwhile.push(key(&h.run("G", json!({}), None).await)),
    )
    .await;
    let unique: HashSet<&String> = listed.iter().collect();
    assert_eq!(unique.len(), listed.len(), "an id came twice");
    // Newest first (ties in a millisecond by id, descending); those created while paging
    // are newer than the first page, so none of them shows.
    before.sort();
    let want: Vec<String> = before.iter().rev().map(|(_, id)| id.clone()).collect();
    assert!(
        listed == want,
        "the list is not every workflow once, newest first"
    );
    assert!(created_meanwhile.iter().all(|(_, id)| !unique.contains(id)));

    // $skip and $top, RackHD's way, give the same order.
    let page = h
        .engine
        .list(&ListFilter {
            skip: 50,
            limit: Some(7),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids: Vec<String> = page.into_iter().map(|v| v.instance_id).collect();
    created_meanwhile.extend(before);
    created_meanwhile.sort();
    let newest_first: Vec<String> = created_meanwhile
        .into_iter()
        .rev()
        .map(|(_, id)| id)
        .collect();
    assert_eq!(ids, newest_first[50..57]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn every_filter_is_served_and_bad_paging_is_refused() {
    let h = harness(Arc::new(MemStore::new()));
    node(&h, "n1").await;
    node(&h, "n2").await;
    let mut made = Vec::new();
    for (graph, node) in [
        ("G", Some("n1")),
        ("H", Some("n1")),
        ("G", Some("n2")),
        ("F", None),
        ("G", None),
    ] {
        let id = h.run(graph, json!({}), node).await.instance_id;
        h.wait(&id).await;
        made.push(id);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let running = h.run("S", json!({}), Some("n2")).await.instance_id;
    let all = h.engine.list(&Default::default()).await.unwrap();
    let t0 = metalgraph_engine::clock::parse_rfc3339(&all.last().unwrap().created_at).unwrap();

    let ids = async |f: ListFilter| ids_of(&h, f).await;
    let m = |i: usize| made[i].clone();
    let by_node = ids(ListFilter {
        node: Some("n1".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(by_node, [m(1), m(0)]);
    let by_graph = ids(ListFilter {
        graph: Some("G".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(by_graph, [m(4), m(2), m(0)]);
    let both = ids(ListFilter {
        graph: Some("G".into()),
        node: Some("n2".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(both, [m(2)]);
    let failed = ids(ListFilter {
        status: Some(WorkflowStatus::Failed),
        ..Default::default()
    })
    .await;
    assert_eq!(failed, [m(3)]);
    let active = ids(ListFilter {
        active: Some(true),
        ..Default::default()
    })
    .await;
    assert_eq!(active, [running]);
    let finished = ids(ListFilter {
        active: Some(false),
        ..Default::default()
    })
    .await;
    assert_eq!(finished, [m(4), m(3), m(2), m(1), m(0)]);
    let window = ids(ListFilter {
        created_after: Some(t0 + 500),
        created_before: Some(t0 + 2500),
        ..Default::default()
    })
    .await;
    assert_eq!(window, [m(2), m(1)]);

    for (f, message) in [
        (
            ListFilter {
                limit: Some(0),
                ..Default::default()
            },
            "a page holds 1 to 1000 workflows, not 0",
        ),
        (
            ListFilter {
                limit: Some(1001),
                ..Default::default()
            },
            "a page holds 1 to 1000 workflows, not 1001",
        ),
        (
            ListFilter {
                cursor: Some("nonsense".into()),
                ..Default::default()
            },
            "cursor \"nonsense\" is not one this server gave",
        ),
    ] {
        match h.engine.list(&f).await {
            Err(Error::BadRequest(got)) => assert_eq!(got, message),
            other => panic!("{f:?}: {other:?}"),
        }
    }
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deleted_workflows_leave_the_index_and_an_older_store_is_indexed_on_start() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let h = harness(store.clone());
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = h.run("G", json!({}), None).await.instance_id;
        h.wait(&id).await;
        ids.push(id);
        tokio::time::advance(Duration::from_millis(5)).await;
    }
    h.engine.delete(&ids[2]).await.unwrap();
    let listed = ids_of(&h, ListFilter::default()).await;
    let want: Vec<String> = ids
        .iter()
        .rev()
        .filter(|id| **id != ids[2])
        .cloned()
        .collect();
    assert_eq!(listed, want);
    h.stop().await;

    // A store written before the index existed: no index keys, no marker.
    let mut batch = Batch::new();
    for (k, _) in store
        .scan(keys::WORKFLOW_INDEX, Scan::prefix(b"", 1000))
        .unwrap()
    {
        batch.delete(keys::WORKFLOW_INDEX, k);
    }
    batch.delete(keys::META, b"workflow_index".to_vec());
    store.commit(batch).unwrap();
    let h = harness(store.clone());
    let listed = ids_of(&h, ListFilter::default()).await;
    assert!(
        listed == want,
        "not every workflow is listed again, newest first: {listed:?}"
    );
    h.stop().await;
}
