//! The event log: every change the scheduler commits is reported by an [`Event`], numbered
//! and written in the same batch as the change, so the numbers survive restarts and an event
//! exists exactly when its change does. The latest [`EVENT_RETENTION`] events are kept (in
//! the store and in memory); older ones are deleted in the batch that adds their successor.
//!
//! Streams that resume (`GET /api/2.0/events` with `Last-Event-ID`) and webhook deliveries
//! read from here; the log's id tells one store's numbering from another's.

use std::collections::VecDeque;
use std::sync::Arc;

use metalgraph_store::{Batch, Store};

use crate::error::Error;
use crate::keys;
use crate::workflow::Event;

/// How many of the latest events are retained.
pub const EVENT_RETENTION: u64 = 65_536;

/// An event with its number in the log. One allocation of each event is shared by the
/// retained log, the broadcast channel and every subscriber.
pub type Numbered = (u64, Arc<Event>);

/// The key under which the log's id is kept in the `meta` keyspace.
const LOG_ID_KEY: &[u8] = b"event_log";

/// The retained events, numbered, with the log's id.
#[derive(Default)]
pub(crate) struct EventLog {
    pub(crate) id: String,
    pub(crate) last: u64,
    pub(crate) recent: VecDeque<Numbered>,
}

impl EventLog {
    /// Reads the log from the store (blocking). A store without one gets a new id, written
    /// into `batch`.
    pub(crate) fn load(store: &dyn Store, batch: &mut Batch) -> Result<EventLog, Error> {
        let id = match store.get(keys::META, LOG_ID_KEY)? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => {
                let id = crate::new_token()[..12].to_owned();
                batch.put(keys::META, LOG_ID_KEY, id.clone().into_bytes());
                id
            }
        };
        let mut recent = VecDeque::new();
        for (k, v) in store.scan_prefix(keys::EVENTS, b"")? {
            recent.push_back(decode(&k, &v)?);
        }
        // Keys are big-endian, so every backend returns them in order; sorting anyway
        // keeps the log's order independent of that.
        recent.make_contiguous().sort_by_key(|(n, _)| *n);
        let last = recent.back().map_or(0, |(n, _)| *n);
        Ok(EventLog { id, last, recent })
    }

    /// Retains a committed event.
    pub(crate) fn push(&mut self, n: u64, ev: Arc<Event>) {
        self.last = n;
        self.recent.push_back((n, ev));
        while self
            .recent
            .front()
            .is_some_and(|(first, _)| *first + EVENT_RETENTION <= n)
        {
            self.recent.pop_front();
        }
    }

    /// The first `limit` retained events numbered above `after` (from the first retained
    /// one when `None`).
    pub(crate) fn since(&self, after: Option<u64>, limit: usize) -> Vec<Numbered> {
        self.recent
            .range(self.start(after)..)
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many retained events numbered above `after` match `filter`.
    pub(crate) fn count(&self, after: u64, filter: &EventFilter) -> u64 {
        self.recent
            .range(self.start(Some(after))..)
            .filter(|(_, ev)| filter.matches(ev))
            .count() as u64
    }

    fn start(&self, after: Option<u64>) -> usize {
        match after {
            None => 0,
            Some(a) => self.recent.partition_point(|(n, _)| *n <= a),
        }
    }
}

/// Writes event `n` into `batch`, with the deletion of the event that falls out of
/// retention.
pub(crate) fn record(batch: &mut Batch, n: u64, ev: &Event) {
    record_raw(
        batch,
        n,
        serde_json::to_vec(ev).expect("an event serializes"),
    );
}

/// [`record`] of an event already serialised.
pub(crate) fn record_raw(batch: &mut Batch, n: u64, value: Vec<u8>) {
    batch.put(keys::EVENTS, n.to_be_bytes().to_vec(), value);
    if n > EVENT_RETENTION {
        batch.delete(keys::EVENTS, (n - EVENT_RETENTION).to_be_bytes().to_vec());
    }
}

/// Which events a stream or a webhook wants: every given field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema, utoipa::IntoParams))]
#[cfg_attr(feature = "openapi", into_params(parameter_in = Query))]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Only events of this workflow (its instanceId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Only events of workflows on this node (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only events of workflows of this graph (its injectableName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
}

impl EventFilter {
    pub fn matches(&self, ev: &Event) -> bool {
        let (workflow, graph, node) = match ev {
            Event::Workflow {
                workflow_id,
                graph,
                node,
                ..
            }
            | Event::Task {
                workflow_id,
                graph,
                node,
                ..
            } => (workflow_id, graph, node),
        };
        self.workflow.as_ref().is_none_or(|w| w == workflow)
            && self.graph.as_ref().is_none_or(|g| g == graph)
            && self.node.as_ref().is_none_or(|n| node.as_ref() == Some(n))
    }
}

/// An event's number, from its key in the log.
pub(crate) fn number(k: &[u8]) -> Result<u64, Error> {
    k.try_into()
        .map(u64::from_be_bytes)
        .map_err(|_| Error::Store(format!("event key {k:?} is not a number")))
}

/// An event as stored in the log, with its number.
pub(crate) fn decode(k: &[u8], v: &[u8]) -> Result<Numbered, Error> {
    let n = number(k)?;
    let ev: Event = serde_json::from_slice(v)
        .map_err(|e| Error::Store(format!("event {n} is unreadable: {e}")))?;
    Ok((n, Arc::new(ev)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkflowStatus;

    fn ev(i: u64) -> Event {
        Event::Workflow {
            workflow_id: format!("w{i}"),
            graph: "g".into(),
            node: None,
            status: WorkflowStatus::Running,
            error: None,
        }
    }

    #[test]
    fn since_returns_what_follows_and_retention_drops_the_oldest() {
        let mut log = EventLog::default();
        for n in 1..=EVENT_RETENTION + 3 {
            log.push(n, Arc::new(ev(n)));
        }
        assert_eq!(log.recent.len() as u64, EVENT_RETENTION);
        assert_eq!(log.recent.front().unwrap().0, 4);
        let after: Vec<u64> = log
            .since(Some(EVENT_RETENTION + 1), usize::MAX)
            .iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(after, [EVENT_RETENTION + 2, EVENT_RETENTION + 3]);
        assert_eq!(log.since(Some(1), usize::MAX).len() as u64, EVENT_RETENTION);
        assert_eq!(
            log.since(None, 2).iter().map(|x| x.0).collect::<Vec<_>>(),
            [4, 5]
        );
        assert!(log.since(Some(EVENT_RETENTION + 3), usize::MAX).is_empty());
        let only = EventFilter {
            workflow: Some("w7".into()),
            ..EventFilter::default()
        };
        assert_eq!(log.count(5, &only), 1);
        assert_eq!(log.count(7, &only), 0);
    }
}
