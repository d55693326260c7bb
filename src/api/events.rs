//! `GET /api/2.0/events`: every committed workflow and task change as Server-Sent Events,
//! in commit order, with filters `?workflow=&node=&graph=`. Each event's `id:` is
//! `{log}-{number}`: events are numbered in the store's event log and committed with the
//! change they report, so the numbers hold across restarts. A client that reconnects with
//! `Last-Event-ID` gets every retained event after it (all retained ones when the id is from
//! another log), then the live ones. The events are the engine's, the same the gRPC `Watch`
//! sends and webhooks deliver.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use metalgraph_engine::{Event, EventFilter, Numbered};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;

use super::AppState;
use super::extract::Query;

/// Every committed workflow and task change as Server-Sent Events, in commit order.
///
/// Each event has an `id:` (`{log}-{number}`), an `event:` (`workflow` or `task`) and
/// `data:`, one JSON `Event`. A client that reconnects with `Last-Event-ID` gets every
/// retained event after it, then the live ones. The stream does not end.
#[utoipa::path(
    get,
    path = "/events",
    tag = "events",
    params(
        EventFilter,
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event"),
    ),
    responses((
        status = 200,
        description = "An endless `text/event-stream`; each event's data is an `Event`",
        body = String,
        content_type = "text/event-stream"
    ))
)]
pub async fn events(
    State(s): State<AppState>,
    Query(filter): Query<EventFilter>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let log = s.engine.event_log_id().await;
    // An id of this log resumes after it; any other id starts with what is retained; no id
    // starts with what comes next.
    let after = match headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        Some(id) => match id.split_once('-') {
            Some((l, n)) if l == log => Some(n.parse::<u64>().unwrap_or(0)),
            _ => Some(0),
        },
        None => Some(s.engine.last_event().await),
    };
    // Subscribed before the response is sent: nothing committed after this is missed.
    let (replay, live) = s.engine.events_since(after, usize::MAX).await;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(forward(s, filter, log, after, replay, live, tx));
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Sends the replay, then the live events, until the client goes away.
async fn forward(
    s: AppState,
    filter: EventFilter,
    log: String,
    after: Option<u64>,
    replay: Vec<Numbered>,
    mut live: broadcast::Receiver<Numbered>,
    tx: mpsc::Sender<Result<SseEvent, Infallible>>,
) {
    let mut sent = after.unwrap_or(0);
    for (n, ev) in replay {
        if !send(&filter, &log, n, &ev, &tx).await {
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
                    let (replay, rx) = s.engine.events_since(Some(sent), usize::MAX).await;
                    live = rx;
                    for (n, ev) in replay {
                        if !send(&filter, &log, n, &ev, &tx).await {
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
        if !send(&filter, &log, n, &ev, &tx).await {
            return;
        }
        sent = n;
    }
}

/// Sends one event when it passes the filter; false once the client has gone.
async fn send(
    filter: &EventFilter,
    log: &str,
    n: u64,
    ev: &Event,
    tx: &mpsc::Sender<Result<SseEvent, Infallible>>,
) -> bool {
    if !filter.matches(ev) {
        return true;
    }
    let data = serde_json::to_string(ev).unwrap_or_default();
    let sse = SseEvent::default()
        .id(format!("{log}-{n}"))
        .event(ev.kind())
        .data(data);
    tx.send(Ok(sse)).await.is_ok()
}
