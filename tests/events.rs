//! `GET /api/2.0/events` against the real binary: every change of a workflow in order,
//! filters, and a client that reconnects with `Last-Event-ID` missing nothing.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Server, describe_event};

/// One parsed Server-Sent Event: its id and its JSON data.
#[derive(Debug, Clone)]
struct Sse {
    id: String,
    data: Value,
}

/// Opens `GET /api/2.0/events?{query}`, resuming after `last` when given.
async fn open(server: &Server, query: &str, last: Option<&str>) -> reqwest::Response {
    let mut req = server
        .http()
        .get(server.url(&format!("/api/2.0/events?{query}")));
    if let Some(id) = last {
        req = req.header("Last-Event-ID", id);
    }
    req.send().await.unwrap()
}

/// Reads an event stream until `done` says so (or a minute passes).
async fn read_until(mut r: reqwest::Response, done: impl Fn(&Sse) -> bool) -> Vec<Sse> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let chunk = tokio::time::timeout_at(deadline.into(), r.chunk())
            .await
            .expect("the stream went quiet")
            .unwrap()
            .expect("the stream ended");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut id = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str(v.trim()).unwrap());
                }
            }
            if let (Some(id), Some(data)) = (id, data) {
                let ev = Sse { id, data };
                let stop = done(&ev);
                out.push(ev);
                if stop {
                    return out;
                }
            }
        }
    }
}

fn describe(ev: &Sse) -> String {
    describe_event(&ev.data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_in_order_filter_and_resume() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    for g in [
        "{injectableName: Ev.G, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Wait, optionOverrides: {duration: 200ms}, waitOn: {a: succeeded}}]}",
        "{injectableName: Ev.Other, tasks: [{label: x, taskName: Task.Noop}]}",
    ] {
        let (code, body) = api.put_yaml("/api/2.0/workflows/graphs", g).await;
        assert_eq!(code, 201, "{body}");
    }
    let stream = open(&server, "graph=Ev.G", None).await;
    assert_eq!(stream.status(), 200);
    assert_eq!(
        stream.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let other = api.run("Ev.Other", None, json!({})).await;
    let id = api.run("Ev.G", None, json!({})).await;
    let is_end = |ev: &Sse| ev.data["kind"] == "workflow" && ev.data["status"] == "succeeded";
    let seen = read_until(stream, |ev| {
        ev.data["workflowId"] == id.as_str() && is_end(ev)
    })
    .await;
    assert!(
        seen.iter().all(|e| e.data["workflowId"] == id.as_str()),
        "{other} leaked in"
    );
    let order: Vec<String> = seen.iter().map(describe).collect();
    assert_eq!(
        order,
        [
            "wf:pending",
            "wf:running",
            "a:running",
            "a:succeeded",
            "b:running",
            "b:succeeded",
            "wf:succeeded"
        ],
        "{seen:?}"
    );

    // A client that lost the stream after the third event gets exactly the rest.
    let resumed = open(&server, &format!("workflow={id}"), Some(&seen[2].id)).await;
    let rest = read_until(resumed, is_end).await;
    let rest_ids: Vec<&str> = rest.iter().map(|e| e.id.as_str()).collect();
    let want: Vec<&str> = seen[3..].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(rest_ids, want);

    // An id from another run of the server replays everything still retained.
    let fresh = open(&server, &format!("workflow={id}"), Some("earlier-5")).await;
    let all = read_until(fresh, is_end).await;
    assert_eq!(all.len(), seen.len());

    // The events are committed with the changes they report: after a kill -9 and a
    // restart, the same client resumes where it was and gets the same events, and new
    // events are numbered after them.
    server.kill9();
    let server = Server::start(data.path(), "sled", &[]);
    let api = server.api();
    let resumed = open(&server, &format!("workflow={id}"), Some(&seen[2].id)).await;
    let rest = read_until(resumed, is_end).await;
    let got: Vec<(&str, &Value)> = rest.iter().map(|e| (e.id.as_str(), &e.data)).collect();
    let want: Vec<(&str, &Value)> = seen[3..].iter().map(|e| (e.id.as_str(), &e.data)).collect();
    assert_eq!(got, want);
    let live = open(&server, "", None).await;
    let next = api.run("Ev.Other", None, json!({})).await;
    let first = read_until(live, |_| true).await;
    assert_eq!(first[0].data["workflowId"], next.as_str());
    let number = |id: &str| id.rsplit_once('-').unwrap().1.parse::<u64>().unwrap();
    assert!(
        number(&first[0].id) > number(&seen.last().unwrap().id),
        "{} came after {}",
        first[0].id,
        seen.last().unwrap().id
    );
}
