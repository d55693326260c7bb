//! Workflow history: lists served page by page from the index, each workflow exactly once
//! while others are created, every filter, deletion, and a store from before the index.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use metalgraph_engine::clock::TokioClock;
use metalgraph_engine::nodes::NodeFilter;
use metalgraph_engine::retention::Retention;
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

#[tokio::test(start_paused = true)]
async fn retention_removes_what_the_policy_says_and_never_live_work() {
    const DAY: Duration = Duration::from_secs(86_400);
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let graphs = [
        GRAPHS[0],
        "{injectableName: Forever, tasks: [{label: a, taskName: Task.Hang}]}",
        "{injectableName: P, tasks: [{label: sub, taskName: Task.Graph.Run, optionOverrides: {graphName: G}}]}",
    ];
    let h = start(store.clone(), &graphs, |o| {
        o.clock = TokioClock::new(1_800_000_000_000);
        o.retention = Some(Retention {
            max_age: Some(30 * DAY),
            keep_per_node: Some(2),
            interval: Duration::from_secs(365 * 86_400),
        });
    });
    node(&h, "n1").await;
    node(&h, "n2").await;
    let finished = async |graph: &str, node: Option<&str>| {
        let id = h.run(graph, json!({}), node).await.instance_id;
        assert_eq!(h.wait(&id).await.status, WorkflowStatus::Succeeded);
        tokio::time::advance(Duration::from_secs(1)).await;
        id
    };
    // Day 0: an old node-less workflow, a parent with its subgraph, one on n1, and a
    // workflow on n2 that never finishes.
    let old = finished("G", None).await;
    let parent = finished("P", None).await;
    let child = h
        .engine
        .list(&ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.parent.as_ref().map(|p| p.workflow_id.as_str()) == Some(parent.as_str()))
        .map(|w| w.instance_id)
        .expect("the subgraph");
    let old_n1 = finished("G", Some("n1")).await;
    let live = h.run("Forever", json!({}), Some("n2")).await.instance_id;
    tokio::time::advance(20 * DAY).await;
    // Day 20: four more on n1: with the one from day 0, the oldest three are beyond the
    // newest two.
    let mut n1 = Vec::new();
    for _ in 0..4 {
        n1.push(finished("G", Some("n1")).await);
    }
    let young = finished("G", None).await;

    let sweep = h.engine.sweep_history().await.unwrap();
    // Nothing is 30 days old yet; n1 keeps its newest two.
    assert_eq!(sweep.removed, 3, "{sweep:?}");
    let left: HashSet<String> = ids_of(&h, ListFilter::default())
        .await
        .into_iter()
        .collect();
    let want: HashSet<String> = [&young, &n1[3], &n1[2], &live, &child, &parent, &old]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(left, want);
    assert!(!left.contains(&old_n1));

    // Day 31: the day-0 workflows are past the age; the parent goes with its subgraph; the
    // live one stays however old.
    tokio::time::advance(11 * DAY).await;
    let sweep = h.engine.sweep_history().await.unwrap();
    assert_eq!(sweep.removed, 3, "{sweep:?}");
    let left = ids_of(&h, ListFilter::default()).await;
    assert_eq!(left, [young, n1[3].clone(), n1[2].clone(), live.clone()]);
    assert!(
        store
            .scan(keys::CHILDREN, Scan::prefix(b"", 10))
            .unwrap()
            .is_empty(),
        "the parent's link to its subgraph went with it"
    );
    // A second sweep finds nothing more.
    assert_eq!(h.engine.sweep_history().await.unwrap().removed, 0);
    assert!(
        !h.engine
            .get(&live)
            .await
            .unwrap()
            .unwrap()
            .status
            .is_terminal()
    );
    h.stop().await;
}

/// The ids of every node matching `filter`, page by page (pages of 7).
async fn node_ids(h: &Harness, filter: NodeFilter) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = h
            .engine
            .nodes()
            .list_page(&NodeFilter {
                limit: Some(7),
                cursor: cursor.clone(),
                ..filter.clone()
            })
            .await
            .unwrap();
        ids.extend(page.items.into_iter().map(|n| n.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return ids,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn nodes_page_by_id_and_filter_by_tag_type_and_endpoint_from_the_index() {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let h = harness(store.clone());
    for i in 0..30 {
        let tags: Vec<&str> = if i % 3 == 0 {
            vec!["rack-a", "gpu"]
        } else {
            vec!["rack-b"]
        };
        let node = json!({
            "id": format!("n{i:02}"), "name": format!("n{i:02}"), "tags": tags,
            "type": if i % 5 == 0 { "switch" } else { "compute" },
            "obms": [{"service": "sim-obm-service", "config": {"host": format!("bmc-{}", i % 4)}}],
        });
        h.engine
            .nodes()
            .create(serde_json::from_value(node).unwrap())
            .await
            .unwrap();
    }
    let every = |pred: &dyn Fn(usize) -> bool| -> Vec<String> {
        (0..30)
            .filter(|i| pred(*i))
            .map(|i| format!("n{i:02}"))
            .collect()
    };
    assert_eq!(node_ids(&h, NodeFilter::default()).await, every(&|_| true));
    let tag = |t: &str| NodeFilter {
        tag: Some(t.into()),
        ..Default::default()
    };
    assert_eq!(node_ids(&h, tag("gpu")).await, every(&|i| i % 3 == 0));
    let switches = NodeFilter {
        node_type: Some("switch".into()),
        ..Default::default()
    };
    assert_eq!(node_ids(&h, switches.clone()).await, every(&|i| i % 5 == 0));
    let behind = NodeFilter {
        endpoint: Some("bmc-1".into()),
        ..Default::default()
    };
    assert_eq!(node_ids(&h, behind).await, every(&|i| i % 4 == 1));
    let both = NodeFilter {
        tag: Some("gpu".into()),
        node_type: Some("switch".into()),
        ..Default::default()
    };
    assert_eq!(node_ids(&h, both).await, every(&|i| i % 15 == 0));
    let skipped = h
        .engine
        .nodes()
        .list_page(&NodeFilter {
            skip: 4,
            limit: Some(3),
            ..tag("gpu")
        })
        .await
        .unwrap();
    let skipped: Vec<String> = skipped.items.into_iter().map(|n| n.id).collect();
    assert_eq!(skipped, ["n12", "n15", "n18"]);

    // A retag moves the node in the index; a deletion takes it out.
    h.engine
        .nodes()
        .update("n03", |n| {
            n.tags = vec!["rack-b".into()];
            Ok(())
        })
        .await
        .unwrap();
    h.engine.nodes().delete("n06").await.unwrap();
    let gpu = every(&|i| i % 3 == 0 && i != 3 && i != 6);
    assert_eq!(node_ids(&h, tag("gpu")).await, gpu);
    assert!(
        node_ids(&h, tag("rack-b"))
            .await
            .contains(&"n03".to_owned())
    );
    match h
        .engine
        .nodes()
        .list_page(&NodeFilter {
            limit: Some(1001),
            ..Default::default()
        })
        .await
    {
        Err(Error::BadRequest(m)) => assert_eq!(m, "a page holds 1 to 1000 nodes, not 1001"),
        other => panic!("{other:?}"),
    }
    h.stop().await;

    // A store from before the node index: rebuilt on start.
    let mut batch = Batch::new();
    for (k, _) in store
        .scan(keys::NODE_INDEX, Scan::prefix(b"", 10_000))
        .unwrap()
    {
        batch.delete(keys::NODE_INDEX, k);
    }
    batch.delete(keys::META, b"node_index".to_vec());
    store.commit(batch).unwrap();
    let h = harness(store);
    h.engine.list(&ListFilter::default()).await.unwrap(); // waits for recovery
    assert_eq!(node_ids(&h, tag("gpu")).await, gpu);
    assert_eq!(node_ids(&h, switches).await, every(&|i| i % 5 == 0));
    h.stop().await;
}

/// The keys of a keyspace.
fn keys_in(store: &dyn Store, keyspace: &str) -> Vec<String> {
    store
        .scan_prefix(keyspace, b"")
        .unwrap()
        .into_iter()
        .map(|(k, _)| String::from_utf8(k).unwrap())
        .collect()
}

/// The id of the plan record workflow `id`'s record refers to.
fn plan_id_of(store: &dyn Store, id: &str) -> String {
    let raw = store.get(keys::WORKFLOWS, id.as_bytes()).unwrap().unwrap();
    let rec: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(rec["plan"].get("tasks").is_none(), "{rec}");
    rec["plan"]["id"].as_str().expect("a plan id").to_owned()
}

#[tokio::test(start_paused = true)]
async fn equal_plans_share_a_record_which_goes_with_the_last_workflow_referring_to_it() {
    const DAY: Duration = Duration::from_secs(86_400);
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let h = start(store.clone(), &GRAPHS, |o| {
        o.clock = TokioClock::new(1_800_000_000_000);
        o.retention = Some(Retention {
            max_age: Some(30 * DAY),
            keep_per_node: None,
            interval: Duration::from_secs(365 * 86_400),
        });
    });
    let finished = async |options: serde_json::Value| {
        let id = h.run("G", options, None).await.instance_id;
        assert_eq!(h.wait(&id).await.status, WorkflowStatus::Succeeded);
        id
    };
    let same: Vec<String> = vec![finished(json!({})).await, finished(json!({})).await];
    let other = finished(json!({"a": {"note": "x"}})).await;
    let shared = plan_id_of(store.as_ref(), &same[0]);
    assert_eq!(plan_id_of(store.as_ref(), &same[1]), shared);
    let own = plan_id_of(store.as_ref(), &other);
    assert_ne!(own, shared, "other options, another plan");
    assert_eq!(keys_in(store.as_ref(), keys::PLANS).len(), 2);
    // Read back whole, each with its own options.
    let view = h.engine.get(&same[1]).await.unwrap().unwrap();
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].label, "a");

    // Referred to: nothing goes.
    let sweep = h.engine.sweep_history().await.unwrap();
    assert_eq!((sweep.removed, sweep.plans), (0, 0), "{sweep:?}");
    // A day later one more shares the plan (the other options' plan was stored after it);
    // a month on, the first three are past the age and go, and so does the plan only they
    // referred to.
    tokio::time::advance(DAY).await;
    let young = finished(json!({})).await;
    assert_eq!(plan_id_of(store.as_ref(), &young), shared);
    tokio::time::advance(30 * DAY).await;
    let sweep = h.engine.sweep_history().await.unwrap();
    assert_eq!((sweep.removed, sweep.plans), (3, 1), "{sweep:?}");
    assert_eq!(
        keys_in(store.as_ref(), keys::PLANS),
        std::slice::from_ref(&shared)
    );
    assert!(h.engine.get(&other).await.unwrap().is_none());
    assert_eq!(
        keys_in(store.as_ref(), keys::PLAN_REFS),
        [format!("{shared}/{young}")]
    );
    tokio::time::advance(DAY).await;
    let sweep = h.engine.sweep_history().await.unwrap();
    assert_eq!((sweep.removed, sweep.plans), (1, 1), "{sweep:?}");
    for keyspace in [keys::PLANS, keys::PLAN_STATE, keys::PLAN_REFS] {
        assert!(keys_in(store.as_ref(), keyspace).is_empty(), "{keyspace}");
    }

    // The engine still holds the removed plan as the graph's last: a new workflow that
    // shares it is refused by the store and committed with a record of its own.
    let again = finished(json!({})).await;
    let fresh = plan_id_of(store.as_ref(), &again);
    assert_ne!(fresh, shared);
    assert_eq!(keys_in(store.as_ref(), keys::PLANS), [fresh]);
    // Deleted through the API, the workflow takes its plan with it, sweep or none.
    h.engine.delete(&again).await.unwrap();
    for keyspace in [keys::PLANS, keys::PLAN_STATE, keys::PLAN_REFS] {
        assert!(keys_in(store.as_ref(), keyspace).is_empty(), "{keyspace}");
    }
    h.stop().await;
}
