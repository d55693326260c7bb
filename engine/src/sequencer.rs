//! The event log when replicas share the store.
//!
//! One process numbers its events itself, in the batch of the change they report
//! (`events.rs`). Replicas cannot: each would number from the same last event. So a
//! replica's scheduler stages each event in the batch of its change, under its workflow's
//! partition and a sequence number of that partition (`event_stage`,
//! `{partition:03}/{seq:016x}`), and the replica that holds the sequencer partition
//! ([`SEQUENCER`]) moves staged events into the log, numbering them, in one fenced commit
//! per page. A partition's events keep their order (one owner at a time stages them, and a
//! new owner continues after the last staged one), so every workflow's events are in
//! order in the log. Every replica follows the log ([`follow`]) and publishes what it
//! finds to its subscribers, so streams and webhooks on any replica see every replica's
//! changes.

use std::sync::Arc;
use std::time::Duration;

use metalgraph_store::{Batch, Error as StoreError, Scan, Store};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::engine::Engine;
use crate::error::{Error, blocking};
use crate::events::Pages;
use crate::keys;
pub use crate::ownership::SEQUENCER;
use crate::ownership::{Ownership, PARTITIONS};
use crate::workflow::Event;

/// The most events numbered in one commit.
const PAGE: usize = 1024;

/// How often the sequencer looks for staged events when nobody wakes it.
const SEQUENCE_EVERY: Duration = Duration::from_millis(50);

/// How often a replica reads the log for events when nobody wakes it.
const FOLLOW_EVERY: Duration = Duration::from_millis(100);

fn stage_key(p: u32, seq: u64) -> Vec<u8> {
    format!("{p:03}/{seq:016x}").into_bytes()
}

/// Stages event `ev` of partition `p` as its `seq`th, in `batch`.
pub(crate) fn stage(batch: &mut Batch, p: u32, seq: u64, ev: &Event) {
    let value = serde_json::to_vec(ev).expect("an event serializes");
    batch.put(keys::EVENT_STAGE, stage_key(p, seq), value);
}

/// The sequence number of partition `p`'s last staged event not yet numbered (0 when none).
pub(crate) fn last_staged(store: &dyn Store, p: u32) -> Result<u64, Error> {
    let prefix = format!("{p:03}/");
    let last = store.scan(
        keys::EVENT_STAGE,
        Scan::prefix(prefix.as_bytes(), 1).reverse(),
    )?;
    Ok(match last.first() {
        Some((k, _)) => parse_seq(k)?,
        None => 0,
    })
}

fn parse_seq(k: &[u8]) -> Result<u64, Error> {
    std::str::from_utf8(k)
        .ok()
        .and_then(|k| k.get(4..))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .ok_or_else(|| Error::Store(format!("staged event key {k:?} is malformed")))
}

/// The sequencer's state while its replica holds [`SEQUENCER`].
#[derive(Default)]
struct Sequencer {
    /// The log's pages in the store, read when the partition was taken.
    pages: Option<Pages>,
    /// The partition whose staged events come first in the next page, so that a busy
    /// partition cannot hold the others back.
    next: u32,
}

impl Sequencer {
    /// Numbers one page of staged events (blocking). Returns how many it numbered.
    fn page(&mut self, store: &dyn Store, own: &Ownership) -> Result<usize, Error> {
        if !own.owns(SEQUENCER) {
            self.pages = None;
            return Ok(0);
        }
        let mut pages = match self.pages.take() {
            Some(pages) => pages,
            None => Pages::load(store)?,
        };
        // From partition `next` to the end, then from the start.
        let from = format!("{:03}", self.next);
        let mut staged = store.scan(
            keys::EVENT_STAGE,
            Scan::prefix(b"", PAGE).after(Some(from.as_bytes())),
        )?;
        if staged.len() < PAGE && self.next > 0 {
            let wrapped = store.scan(keys::EVENT_STAGE, Scan::prefix(b"", PAGE - staged.len()))?;
            staged.extend(
                wrapped
                    .into_iter()
                    .take_while(|(k, _)| k < &from.as_bytes().to_vec()),
            );
        }
        if staged.is_empty() {
            self.pages = Some(pages);
            return Ok(0);
        }
        let mut batch = Batch::new();
        if !own.fence(SEQUENCER, &mut batch) {
            return Ok(0);
        }
        for (k, _) in &staged {
            batch.delete(keys::EVENT_STAGE, k.clone());
        }
        let n = staged.len();
        let events: Vec<Vec<u8>> = staged.iter().map(|(_, v)| v.clone()).collect();
        pages.record(&mut batch, &events);
        match store.commit(batch) {
            Ok(()) => {
                self.pages = Some(pages);
                let after: u32 = std::str::from_utf8(&staged[n - 1].0[..3])
                    .ok()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                self.next = (after + 1) % PARTITIONS;
                Ok(n)
            }
            Err(e) => {
                // Read again next time: the page may or may not have been written.
                if let (StoreError::Conflict { .. }, Ownership::Leased(l)) = (&e, own) {
                    l.lost(SEQUENCER);
                    return Ok(0);
                }
                Err(e.into())
            }
        }
    }
}

/// Numbers staged events while this replica holds the sequencer, until `stopped`.
/// `wake` is notified when this replica has staged events; `numbered` is notified after
/// each page, so that this replica's [`follow`] reads it at once.
pub(crate) async fn sequence(
    store: Arc<dyn Store>,
    own: Ownership,
    wake: Arc<Notify>,
    numbered: Arc<Notify>,
    stopped: CancellationToken,
) {
    let mut state = Sequencer::default();
    loop {
        let (store2, own2) = (store.clone(), own.clone());
        let (res, back) = blocking(move || {
            let res = state.page(store2.as_ref(), &own2);
            Ok::<_, Error>((res, state))
        })
        .await
        .unwrap_or_else(|e| (Err(e), Sequencer::default()));
        state = back;
        let more = match res {
            Ok(n) => {
                if n > 0 {
                    numbered.notify_one();
                }
                n == PAGE
            }
            Err(e) => {
                warn!(error = %e, "numbering the staged events failed; trying again");
                false
            }
        };
        if !more && !pause(&stopped, &wake, SEQUENCE_EVERY).await {
            return;
        }
    }
}

/// Waits until woken or `every` has passed; false once `stopped`.
async fn pause(stopped: &CancellationToken, wake: &Notify, every: Duration) -> bool {
    tokio::select! {
        () = stopped.cancelled() => false,
        () = wake.notified() => true,
        () = tokio::time::sleep(every) => true,
    }
}

/// Reads the events numbered after the ones this replica has, and publishes them to its
/// subscribers, until `stopped`. `wake` is notified when this replica numbered some.
pub(crate) async fn follow(
    engine: Engine,
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
    stopped: CancellationToken,
) {
    let mut last = engine.last_event().await;
    loop {
        let store2 = store.clone();
        let read = blocking(move || {
            let after = last.to_be_bytes();
            // Pages are written whole and numbered on from the last, so the events after
            // `last` start a page.
            let rows = store2.scan(keys::EVENTS, Scan::prefix(b"", PAGE).after(Some(&after)))?;
            let pages = rows
                .iter()
                .map(|(k, v)| crate::events::decode(k, v))
                .collect::<Result<Vec<_>, Error>>()?;
            Ok::<_, Error>((rows.len() == PAGE, pages))
        })
        .await;
        let full = match read {
            Ok((full, pages)) => {
                for (n, ev) in pages.into_iter().flatten() {
                    last = n;
                    engine.publish(n, ev);
                }
                full
            }
            Err(e) => {
                warn!(error = %e, "reading the event log failed; trying again");
                false
            }
        };
        if !full && !pause(&stopped, &wake, FOLLOW_EVERY).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkflowStatus;
    use crate::ownership::{LeaseTimings, Leases};
    use metalgraph_store::MemStore;

    fn ev(id: &str) -> Event {
        Event::Workflow {
            workflow_id: id.into(),
            graph: "g".into(),
            node: None,
            status: WorkflowStatus::Running,
            error: None,
        }
    }

    fn ids(store: &dyn Store) -> Vec<(u64, String)> {
        store
            .scan_prefix(keys::EVENTS, b"")
            .unwrap()
            .into_iter()
            .flat_map(|(k, v)| crate::events::decode(&k, &v).unwrap())
            .map(|(n, ev)| (n, ev.workflow_id().to_owned()))
            .collect()
    }

    #[test]
    fn staged_events_are_numbered_after_the_log_in_partition_order() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let mut b = Batch::new();
        // An event as logs before pages hold it: one per key.
        b.put(
            keys::EVENTS,
            1u64.to_be_bytes().to_vec(),
            serde_json::to_vec(&ev("old")).unwrap(),
        );
        stage(&mut b, 5, 1, &ev("p5-a"));
        stage(&mut b, 5, 2, &ev("p5-b"));
        stage(&mut b, 2, 7, &ev("p2"));
        store.commit(b).unwrap();
        assert_eq!(last_staged(store.as_ref(), 5).unwrap(), 2);
        assert_eq!(last_staged(store.as_ref(), 9).unwrap(), 0);

        let leases = Leases::new(store.clone(), "a".into(), LeaseTimings::default());
        // Without the sequencer partition nothing is numbered.
        let own = Ownership::Leased(leases.clone());
        let mut seq = Sequencer::default();
        assert_eq!(seq.page(store.as_ref(), &own).unwrap(), 0);
        leases.tick().unwrap();
        assert_eq!(seq.page(store.as_ref(), &own).unwrap(), 3);
        assert_eq!(
            ids(store.as_ref()),
            [(1, "old"), (2, "p2"), (3, "p5-a"), (4, "p5-b")].map(|(n, s)| (n, s.to_owned()))
        );
        assert!(
            store
                .scan_prefix(keys::EVENT_STAGE, b"")
                .unwrap()
                .is_empty()
        );
        // The next page starts after the last partition numbered, and wraps round.
        let mut b = Batch::new();
        stage(&mut b, 1, 1, &ev("p1"));
        stage(&mut b, 7, 1, &ev("p7"));
        store.commit(b).unwrap();
        assert_eq!(seq.page(store.as_ref(), &own).unwrap(), 2);
        let got: Vec<String> = ids(store.as_ref())
            .into_iter()
            .skip(4)
            .map(|x| x.1)
            .collect();
        assert_eq!(got, ["p7", "p1"]);
    }
}
