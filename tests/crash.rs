//! Kill -9 end to end: the real binary runs a mix of workflows (sleeps, retries, timeouts,
//! parallel branches, fail-fast) on many nodes and is SIGKILLed at random moments, at least
//! twenty times, restarting on the same data directory each time. Every workflow that was
//! acknowledged must end in its expected state, none may be lost, and a task state once seen
//! finished must never change again. Run for the sled and the file store.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Api, Rng, Server, states};

/// `(graph, yaml, expected workflow status, expected task states)`.
const GRAPHS: &[(&str, &str, &str, &str)] = &[
    (
        "Crash.Chain",
        r#"
injectableName: Crash.Chain
tasks:
  - {label: a, taskName: Task.Wait, optionOverrides: {duration: 300ms}}
  - {label: b, taskName: Task.Wait, optionOverrides: {duration: 200ms}, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Noop, waitOn: {b: succeeded}}
"#,
        "succeeded",
        "a=succeeded b=succeeded c=succeeded",
    ),
    (
        "Crash.Parallel",
        r#"
injectableName: Crash.Parallel
tasks:
  - {label: start, taskName: Task.Noop}
  - {label: x, taskName: Task.Wait, optionOverrides: {duration: 400ms}, waitOn: {start: succeeded}}
  - {label: y, taskName: Task.Wait, optionOverrides: {duration: 150ms}, waitOn: {start: succeeded}}
  - {label: z, taskName: Task.Noop, waitOn: {start: succeeded}}
  - {label: join, taskName: Task.Noop, waitOn: {x: succeeded, y: succeeded, z: succeeded}}
"#,
        "succeeded",
        "start=succeeded x=succeeded y=succeeded z=succeeded join=succeeded",
    ),
    (
        "Crash.Retry",
        r#"
injectableName: Crash.Retry
tasks:
  - {label: flaky, taskName: Task.Fail, retries: {max: 2, backoff: 150ms}}
  - {label: recover, taskName: Task.Noop, waitOn: {flaky: failed}}
"#,
        "succeeded",
        "flaky=failed recover=succeeded",
    ),
    (
        "Crash.Timeout",
        r#"
injectableName: Crash.Timeout
tasks:
  - {label: slow, taskName: Task.Wait, optionOverrides: {duration: 1h}, timeout: 400ms}
  - {label: on-timeout, taskName: Task.Noop, waitOn: {slow: timeout}}
"#,
        "succeeded",
        "slow=timeout on-timeout=succeeded",
    ),
    (
        "Crash.FailFast",
        r#"
injectableName: Crash.FailFast
tasks:
  - {label: boom, taskName: Task.Fail}
  - {label: long, taskName: Task.Wait, optionOverrides: {duration: 1h}}
  - {label: after, taskName: Task.Noop, waitOn: {boom: succeeded}}
"#,
        "failed",
        "boom=failed long=cancelled after=skipped",
    ),
];

const NODES: usize = 12;
const KILLS: usize = 22;
const TARGET_WORKFLOWS: usize = 70;

async fn setup(api: &Api) {
    for (_, yaml, _, _) in GRAPHS {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", yaml).await;
        assert!(code == 200 || code == 201, "PUT graph: {code} {body}");
    }
    for i in 0..NODES {
        let (code, body) = api
            .send(
                "POST",
                "/api/2.0/nodes",
                Some(
                    json!({"id": format!("crash-{i:02}"), "name": format!("crash-{i:02}"),
                            "identifiers": [format!("02:00:00:00:10:{i:02x}")]}),
                ),
            )
            .await;
        assert_eq!(code, 201, "POST node: {body}");
    }
}

/// Starts workflows on idle nodes until the target count is reached; returns the ids the
/// server acknowledged with 201, with their graph.
async fn launch(api: &Api, launched: &mut Vec<(String, &'static str)>, rng: &mut Rng) {
    for i in 0..NODES {
        if launched.len() >= TARGET_WORKFLOWS {
            return;
        }
        let node = format!("crash-{i:02}");
        let graph = GRAPHS[rng.range(0, GRAPHS.len() as u64) as usize].0;
        let Ok(r) = api
            .http
            .post(format!("{}/api/2.0/nodes/{node}/workflows", api.base))
            .json(&json!({"name": graph}))
            .send()
            .await
        else {
            return; // Killed mid-request: an unacknowledged run may or may not exist.
        };
        let code = r.status().as_u16();
        let Ok(body) = r.json::<Value>().await else {
            return;
        };
        match code {
            201 => launched.push((body["instanceId"].as_str().unwrap().to_owned(), graph)),
            409 => {} // The node is busy with an earlier workflow.
            other => panic!("run {graph} on {node}: {other} {body}"),
        }
    }
}

/// Records every task state seen; a finished task must never be seen in another state.
fn observe(api_views: &[Value], seen: &mut HashMap<(String, String), String>) {
    for v in api_views {
        let id = v["instanceId"].as_str().unwrap_or_default().to_owned();
        let wf_key = (id.clone(), "(workflow)".to_owned());
        let wf_status = v["status"].as_str().unwrap_or_default().to_owned();
        check_monotonic(
            seen,
            wf_key,
            wf_status,
            &["succeeded", "failed", "cancelled"],
        );
        for t in v["tasks"].as_array().into_iter().flatten() {
            let key = (
                id.clone(),
                t["label"].as_str().unwrap_or_default().to_owned(),
            );
            let state = t["state"].as_str().unwrap_or_default().to_owned();
            check_monotonic(
                seen,
                key,
                state,
                &["succeeded", "failed", "timeout", "cancelled", "skipped"],
            );
        }
    }
}

fn check_monotonic(
    seen: &mut HashMap<(String, String), String>,
    key: (String, String),
    now: String,
    terminal: &[&str],
) {
    if let Some(before) = seen.get(&key)
        && terminal.contains(&before.as_str())
        && *before != now
    {
        panic!(
            "{} of workflow {} was reported {before} and later {now}",
            key.1, key.0
        );
    }
    seen.insert(key, now);
}

async fn crash_loop(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::from_env_or_time();
    let mut launched: Vec<(String, &'static str)> = Vec::new();
    let mut seen = HashMap::new();

    let server = Server::start(dir.path(), store, &[]);
    let api = server.api();
    setup(&api).await;
    let mut server = Some(server);

    for kill in 0..KILLS {
        let s = server
            .take()
            .unwrap_or_else(|| Server::start(dir.path(), store, &[]));
        let api = s.api();
        launch(&api, &mut launched, &mut rng).await;
        if let Ok(r) = api
            .http
            .get(format!("{}/api/2.0/workflows", api.base))
            .send()
            .await
            && let Ok(Value::Array(views)) = r.json::<Value>().await
        {
            observe(&views, &mut seen);
        }
        // Let the engine work for a random moment, launching more as nodes free up.
        let until = tokio::time::Instant::now() + Duration::from_millis(rng.range(20, 900));
        while tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(rng.range(5, 120))).await;
            launch(&api, &mut launched, &mut rng).await;
        }
        eprintln!("kill {kill}: {} workflows launched", launched.len());
        s.kill9();
    }

    // A final start that runs everything to its end.
    let s = Server::start(dir.path(), store, &[]);
    let api = s.api();
    while launched.len() < TARGET_WORKFLOWS {
        launch(&api, &mut launched, &mut rng).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let expected: HashMap<&str, (&str, &str)> = GRAPHS
        .iter()
        .map(|(g, _, st, ts)| (*g, (*st, *ts)))
        .collect();
    let mut wrong = Vec::new();
    for (id, graph) in &launched {
        let v = api.wait(id, Duration::from_secs(120)).await;
        let (status, task_states) = expected[graph];
        if v["status"] != status || states(&v) != task_states {
            wrong.push(format!(
                "{graph} {id}: {} [{}], expected {status} [{task_states}]",
                v["status"],
                states(&v)
            ));
        }
    }
    let (_, all) = api.get("/api/2.0/workflows").await;
    observe(all.as_array().unwrap(), &mut seen);
    assert!(
        wrong.is_empty(),
        "{} wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    // No node is left locked: every node takes a new workflow.
    for i in 0..NODES {
        let (code, body) = api
            .send(
                "POST",
                &format!("/api/2.0/nodes/crash-{i:02}/workflows"),
                Some(json!({"name": "Crash.Chain"})),
            )
            .await;
        assert_eq!(code, 201, "node crash-{i:02} still locked: {body}");
    }
    assert_eq!(s.terminate().code(), Some(0), "orderly exit after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_sled() {
    crash_loop("sled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_file() {
    crash_loop("file").await;
}
