//! The event log: every change the scheduler commits is reported by an [`Event`], numbered
//! and written in the same batch as the change, so the numbers survive restarts and an event
//! exists exactly when its change does. The latest [`EVENT_RETENTION`] events are kept in
//! memory, and at least those in the store.
//!
//! The store holds the log in pages, one per commit: a page's key is the number of its
//! first event (big-endian, so keys sort in the log's order), its value a JSON array of the
//! events numbered from there, in order. (A value that is a JSON object is one event, as
//! logs written before pages hold.) A commit of many changes, such as a scheduler's step
//! over thousands of workflows, adds one page rather than one record per event; a page is
//! deleted, in the batch that adds a later one, once all its events are older than the
//! retained ones ([`Pages`]).
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
    /// Reads the log from the store (blocking), with its pages. A store without one gets a
    /// new id, written into `batch`.
    pub(crate) fn load(store: &dyn Store, batch: &mut Batch) -> Result<(EventLog, Pages), Error> {
        let id = match store.get(keys::META, LOG_ID_KEY)? {
            Some(id) => String::from_utf8_lossy(&id).into_owned(),
            None => {
                let id = crate::new_token()[..12].to_owned();
                batch.put(keys::META, LOG_ID_KEY, id.clone().into_bytes());
                id
            }
        };
        let mut pages = Vec::new();
        for (k, v) in store.scan_prefix(keys::EVENTS, b"")? {
            pages.push(decode(&k, &v)?);
        }
        // Keys are big-endian, so every backend returns them in order; sorting anyway
        // keeps the log's order independent of that.
        pages.sort_by_key(|page| page.first().map(|(n, _)| *n));
        let mut log = EventLog {
            id,
            ..EventLog::default()
        };
        let mut stored = Pages::default();
        for page in pages {
            stored.0.extend(bounds(&page));
            for (n, ev) in page {
                log.push(n, ev);
            }
        }
        Ok((log, stored))
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

/// The pages of the log in the store, oldest first: each page's first and last event
/// numbers. Kept by the one writer of the log (the scheduler of a process that owns its
/// store, or the replica holding the sequencer), so that it knows which pages to delete.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Pages(VecDeque<(u64, u64)>);

impl Pages {
    /// Reads the pages' bounds from the store (blocking): each page ends where the next
    /// one starts, and the last one is read to find its end.
    pub(crate) fn load(store: &dyn Store) -> Result<Pages, Error> {
        let keys = store.scan_prefix(keys::EVENTS, b"")?;
        let mut firsts = keys
            .iter()
            .map(|(k, _)| number(k))
            .collect::<Result<Vec<_>, _>>()?;
        firsts.sort_unstable();
        let mut pages: VecDeque<(u64, u64)> = firsts.windows(2).map(|w| (w[0], w[1] - 1)).collect();
        if let Some((k, v)) = keys.iter().max_by(|(a, _), (b, _)| a.cmp(b)) {
            pages.extend(bounds(&decode(k, v)?));
        }
        Ok(Pages(pages))
    }

    /// The number of the last event stored (0 when there is none).
    pub(crate) fn last(&self) -> u64 {
        self.0.back().map_or(0, |(_, last)| *last)
    }

    /// Writes `events` (serialised), numbered on from [`Pages::last`], into `batch` as one
    /// page, with the deletion of every page whose events all fall out of retention once
    /// they are added. Returns the number of the last; nothing is written for none.
    pub(crate) fn record(&mut self, batch: &mut Batch, events: &[Vec<u8>]) -> u64 {
        if events.is_empty() {
            return self.last();
        }
        let first = self.last() + 1;
        let last = first + events.len() as u64 - 1;
        let mut value = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 1);
        value.push(b'[');
        for (i, ev) in events.iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.extend_from_slice(ev);
        }
        value.push(b']');
        batch.put(keys::EVENTS, first.to_be_bytes().to_vec(), value);
        self.0.push_back((first, last));
        while let Some(&(old, old_last)) = self.0.front()
            && old_last + EVENT_RETENTION <= last
        {
            batch.delete(keys::EVENTS, old.to_be_bytes().to_vec());
            self.0.pop_front();
        }
        last
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

/// The first and last numbers of a page's events (none for an empty page).
fn bounds(page: &[Numbered]) -> Option<(u64, u64)> {
    Some((page.first()?.0, page.last()?.0))
}

/// The events of a page of the log, numbered.
pub(crate) fn decode(k: &[u8], v: &[u8]) -> Result<Vec<Numbered>, Error> {
    let n = number(k)?;
    let unreadable =
        |e: serde_json::Error| Error::Store(format!("events page {n} is unreadable: {e}"));
    let events: Vec<Event> = if v.first() == Some(&b'[') {
        serde_json::from_slice(v).map_err(unreadable)?
    } else {
        vec![serde_json::from_slice(v).map_err(unreadable)?]
    };
    Ok((n..).zip(events.into_iter().map(Arc::new)).collect())
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

    fn stored(store: &dyn Store) -> Vec<(u64, usize)> {
        store
            .scan_prefix(keys::EVENTS, b"")
            .unwrap()
            .iter()
            .map(|(k, v)| (number(k).unwrap(), decode(k, v).unwrap().len()))
            .collect()
    }

    fn serialised(range: std::ops::RangeInclusive<u64>) -> Vec<Vec<u8>> {
        range.map(|i| serde_json::to_vec(&ev(i)).unwrap()).collect()
    }

    #[test]
    fn a_commit_writes_one_page_and_deletes_whole_pages_past_retention() {
        let store = metalgraph_store::MemStore::new();
        let mut pages = Pages::default();
        let commit = |pages: &mut Pages, events: Vec<Vec<u8>>| {
            let mut batch = Batch::new();
            let last = pages.record(&mut batch, &events);
            store.commit(batch).unwrap();
            last
        };
        // Nothing is written for no events.
        assert_eq!(commit(&mut pages, Vec::new()), 0);
        assert!(stored(&store).is_empty());
        assert_eq!(commit(&mut pages, serialised(1..=3)), 3);
        assert_eq!(commit(&mut pages, serialised(4..=4)), 4);
        assert_eq!(stored(&store), [(1, 3), (4, 1)]);
        // Events 1-3 stay while any of them is among the latest EVENT_RETENTION.
        let big = EVENT_RETENTION - 2;
        assert_eq!(commit(&mut pages, serialised(5..=4 + big)), 4 + big);
        assert_eq!(stored(&store), [(1, 3), (4, 1), (5, big as usize)]);
        assert_eq!(commit(&mut pages, serialised(5 + big..=5 + big)), 5 + big);
        assert_eq!(
            stored(&store),
            [(4, 1), (5, big as usize), (5 + big, 1)],
            "the first page is deleted once its last event falls out"
        );
        // Reading the pages back gives the bounds the writer keeps, and the log in memory
        // the latest EVENT_RETENTION events.
        assert_eq!(Pages::load(&store).unwrap(), pages);
        let (log, loaded) = EventLog::load(&store, &mut Batch::new()).unwrap();
        assert_eq!(loaded, pages);
        assert_eq!(log.last, 5 + big);
        assert_eq!(log.recent.len() as u64, EVENT_RETENTION);
        assert_eq!(log.recent.front().unwrap().0, 6 + big - EVENT_RETENTION);
        let (n, ev5) = &log.since(Some(4), 1)[0];
        assert_eq!((*n, ev5.workflow_id()), (5, "w5"));
    }

    #[test]
    fn a_log_of_single_events_reads_and_continues() {
        // As logs written before pages hold it: one event per key.
        let store = metalgraph_store::MemStore::new();
        let mut batch = Batch::new();
        for (i, value) in (1..=3).zip(serialised(1..=3)) {
            batch.put(keys::EVENTS, u64::to_be_bytes(i).to_vec(), value);
        }
        store.commit(batch).unwrap();
        let mut pages = Pages::load(&store).unwrap();
        assert_eq!(pages.last(), 3);
        let mut batch = Batch::new();
        assert_eq!(pages.record(&mut batch, &serialised(4..=5)), 5);
        store.commit(batch).unwrap();
        let (log, _) = EventLog::load(&store, &mut Batch::new()).unwrap();
        let numbered: Vec<(u64, String)> = log
            .since(None, usize::MAX)
            .iter()
            .map(|(n, ev)| (*n, ev.workflow_id().to_owned()))
            .collect();
        assert_eq!(
            numbered,
            (1..=5).map(|i| (i, format!("w{i}"))).collect::<Vec<_>>()
        );
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
