//! `GET /api/2.0/events`: every committed workflow and task change as Server-Sent Events,
//! in commit order, with filters `?workflow=&node=&graph=`. Each event's `id:` is
//! `{run}-{number}`; a client that reconnects with `Last-Event-ID` gets every retained event
//! after it (all retained ones when the id is from an earlier run of the server), then the
//! live ones. The events are the engine's, the same the gRPC `Watch` sends.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use metalgraph_engine::Event;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::extract::Query;

/// `?workflow=&node=&graph=`: every given filter must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    workflow: Option<String>,
    node: Option<String>,
    graph: Option<String>,
}

/// The event stream.
pub async fn events(
    State(s): State<AppState>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let run = s.engine.run_id().to_owned();
    // An id from this run resumes after it; any other id, or none, starts with what is
    // retained when resuming, or with what comes next for a new client.
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|id| match id.split_once('-') {
            Some((r, n)) if r == run => n.parse::<u64>().ok().or(Some(0)),
            _ => Some(0),
        });
    let after = last.flatten();
    // Subscribed before the response is sent: nothing committed after this is missed.
    let (replay, live) = s.engine.events_since(after);
    let replay = if last.is_some() { replay } else { Vec::new() };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(forward(s, q, run, after, replay, live, tx));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Sends the replay, then the live events, until the client goes away.
async fn forward(
    s: AppState,
    q: EventsQuery,
    run: String,
    after: Option<u64>,
    replay: Vec<(u64, Event)>,
    mut live: broadcast::Receiver<(u64, Event)>,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let mut filter = Filter {
        q,
        owners: HashMap::new(),
    };
    let mut sent = after.unwrap_or(0);
    for (n, ev) in replay {
        if !send(&s, &mut filter, &run, n, &ev, &tx).await {
            return;
        }
        sent = n;
    }
    loop {
        let (n, ev) = tokio::select! {
            got = live.recv() => match got {
                Ok(x) => x,
                // Fell behind: catch up from what is retained, then go on.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let (replay, rx) = s.engine.events_since(Some(sent));
                    live = rx;
                    for (n, ev) in replay {
                        if !send(&s, &mut filter, &run, n, &ev, &tx).await {
                            return;
                        }
                        sent = n;
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            () = tx.closed() => return,
        };
        if n <= sent {
            continue;
        }
        if !send(&s, &mut filter, &run, n, &ev, &tx).await {
            return;
        }
        sent = n;
    }
}

/// Sends one event when it passes the filter; false once the client has gone.
async fn send(
    s: &AppState,
    filter: &mut Filter,
    run: &str,
    n: u64,
    ev: &Event,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> bool {
    if !filter.passes(s, ev).await {
        return true;
    }
    let kind = match ev {
        Event::Workflow { .. } => "workflow",
        Event::Task { .. } => "task",
    };
    let data = serde_json::to_string(ev).unwrap_or_default();
    let sse = SseEvent::default()
        .id(format!("{run}-{n}"))
        .event(kind)
        .data(data);
    tx.send(Ok(sse)).await.is_ok()
}

/// The query's filters, with each workflow's graph and node remembered (task events name
/// only their workflow).
struct Filter {
    q: EventsQuery,
    owners: HashMap<String, (String, Option<String>)>,
}

impl Filter {
    async fn passes(&mut self, s: &AppState, ev: &Event) -> bool {
        let id = ev.workflow_id();
        if self.q.workflow.as_deref().is_some_and(|w| w != id) {
            return false;
        }
        if self.q.node.is_none() && self.q.graph.is_none() {
            return true;
        }
        let (graph, node) = match ev {
            Event::Workflow { graph, node, .. } => {
                self.owners
                    .insert(id.to_owned(), (graph.clone(), node.clone()));
                (graph.clone(), node.clone())
            }
            Event::Task { .. } => match self.owners.get(id) {
                Some(o) => o.clone(),
                None => match s.engine.get(id).await {
                    Ok(Some(v)) => {
                        let o = (v.name.clone(), v.node.clone());
                        self.owners.insert(id.to_owned(), o.clone());
                        o
                    }
                    _ => return false,
                },
            },
        };
        self.q.graph.as_ref().is_none_or(|g| *g == graph)
            && self
                .q
                .node
                .as_ref()
                .is_none_or(|n| node.as_ref() == Some(n))
    }
}
