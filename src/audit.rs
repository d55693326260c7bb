//! The audit log: every call that changes something (HTTP methods other than GET and HEAD,
//! gRPC calls other than reads), allowed or refused, with who made it and how it ended.
//!
//! Entries are committed before the call is answered (a store that cannot take them is
//! logged as an error; the call's own outcome stands, since it has happened). One writer task gathers the entries
//! that arrive while it commits and writes them in one batch (a group commit), so a busy
//! API pays one store commit per batch rather than one per call. The log keeps the latest
//! [`RETAINED`] entries: each batch also deletes what falls out of that window. Keys are
//! the entry's number, big-endian, in the `audit` keyspace.

use std::sync::Arc;

use metalgraph_engine::Error;
use metalgraph_engine::clock::now_rfc3339;
use metalgraph_store::{Batch, Scan, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::error;

/// The keyspace of the audit log.
pub const KEYSPACE: &str = "audit";

/// How many entries the log keeps.
pub const RETAINED: u64 = 100_000;

/// The most entries one commit carries.
const BATCH: usize = 512;

/// One audited call.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// The entry's number, increasing.
    pub id: u64,
    /// When the call was answered (RFC 3339, UTC).
    pub time: String,
    /// The token's name; absent when the call carried no valid token.
    pub token: Option<String>,
    /// The token's role.
    pub role: Option<String>,
    /// `http` or `grpc`.
    pub protocol: String,
    /// The HTTP method, or the gRPC method's full name.
    pub method: String,
    /// The path called (never its query, which may hold a secret).
    pub target: String,
    /// The HTTP status, or the gRPC status code's name.
    pub status: String,
    /// The address the call came from.
    pub peer: Option<String>,
}

/// What a caller records; the log numbers and dates it.
#[derive(Debug, Clone)]
pub struct Record {
    /// Who made the call; `None` without a valid token.
    pub caller: Option<crate::auth::Caller>,
    pub protocol: &'static str,
    pub method: String,
    pub target: String,
    pub status: String,
    pub peer: Option<String>,
}

type Request = (Record, oneshot::Sender<Result<(), String>>);

/// The audit log of one server.
#[derive(Clone)]
pub struct Audit {
    tx: mpsc::Sender<Request>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Audit")
    }
}

impl Audit {
    /// Opens the log and starts its writer (it ends when every handle is dropped).
    pub fn start(store: Arc<dyn Store>) -> Result<Audit, Error> {
        let last = newest(store.as_ref())?;
        let (tx, rx) = mpsc::channel(4 * BATCH);
        tokio::spawn(writer(store.clone(), rx, last));
        Ok(Audit { tx, store })
    }

    /// Records a call and waits until the entry is committed; an entry that cannot be
    /// written is logged as an error (the call's own outcome stands).
    pub async fn record(&self, record: Record) {
        let (done, wait) = oneshot::channel();
        let outcome = match self.tx.send((record, done)).await {
            Err(_) => Err("the audit log is closed".to_owned()),
            Ok(()) => wait
                .await
                .unwrap_or_else(|_| Err("the audit log stopped".to_owned())),
        };
        if let Err(e) = outcome {
            error!(error = %e, "a call was not recorded in the audit log");
        }
    }

    /// A page of entries, newest first: `top` after skipping `skip`.
    pub async fn page(&self, skip: usize, top: usize) -> Result<Vec<Entry>, Error> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let rows = store.scan(KEYSPACE, Scan::prefix(b"", skip + top).reverse())?;
            rows.into_iter()
                .skip(skip)
                .map(|(k, v)| {
                    serde_json::from_slice(&v).map_err(|e| {
                        Error::Store(format!("audit entry {} is unreadable: {e}", number(&k)))
                    })
                })
                .collect()
        })
        .await?
    }
}

fn number(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

/// The number of the newest entry (0 when there is none), blocking.
fn newest(store: &dyn Store) -> Result<u64, metalgraph_store::Error> {
    Ok(store
        .scan(KEYSPACE, Scan::prefix(b"", 1).reverse())?
        .into_iter()
        .next()
        .map(|(k, _)| number(&k))
        .unwrap_or(0))
}

/// How often a batch of entries is numbered again after another writer (a replica of the
/// same database) took its numbers first.
const RENUMBER: usize = 8;

async fn writer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Request>, mut last: u64) {
    let mut pending = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut pending, BATCH).await > 0 {
        let time = now_rfc3339();
        let entries: Vec<Entry> = pending
            .iter()
            .map(|(record, _)| Entry {
                id: 0,
                time: time.clone(),
                token: record.caller.as_ref().map(|c| c.name.clone()),
                role: record.caller.as_ref().map(|c| c.role.as_str().to_owned()),
                protocol: record.protocol.to_owned(),
                method: record.method.clone(),
                target: record.target.clone(),
                status: record.status.clone(),
                peer: record.peer.clone(),
            })
            .collect();
        let committed = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || append(store.as_ref(), entries, last)).await
        };
        let outcome = match committed {
            Ok(Ok(newest)) => {
                last = newest;
                Ok(())
            }
            Ok(Err(e)) => Err(format!("the audit log cannot be written: {e}")),
            Err(e) => Err(format!("the audit log cannot be written: {e}")),
        };
        if let Err(e) = &outcome {
            error!(error = %e, entries = pending.len(), "audit entries were not recorded");
        }
        for (_, done) in pending.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }
}

/// Commits `entries` numbered after `last` (blocking), each number required unused: when
/// another writer took one first, they are numbered again after the newest entry. Returns
/// the number of the last one written.
fn append(
    store: &dyn Store,
    mut entries: Vec<Entry>,
    mut last: u64,
) -> Result<u64, metalgraph_store::Error> {
    let mut tries = 0;
    loop {
        let mut batch = Batch::new();
        let first = last + 1;
        for (i, entry) in entries.iter_mut().enumerate() {
            entry.id = first + i as u64;
            let key = entry.id.to_be_bytes().to_vec();
            batch.require_absent(KEYSPACE, key.clone());
            batch.put(
                KEYSPACE,
                key,
                serde_json::to_vec(&entry).expect("an audit entry serialises"),
            );
        }
        let end = first + entries.len() as u64 - 1;
        // What this batch pushes out of the window.
        for n in first.saturating_sub(RETAINED)..end.saturating_sub(RETAINED) + 1 {
            if n > 0 {
                batch.delete(KEYSPACE, n.to_be_bytes().to_vec());
            }
        }
        match store.commit(batch) {
            Ok(()) => return Ok(end),
            Err(metalgraph_store::Error::Conflict { .. }) if tries < RENUMBER => {
                tries += 1;
                last = newest(store)?;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(target: &str) -> Entry {
        Entry {
            id: 0,
            time: now_rfc3339(),
            token: None,
            role: None,
            protocol: "http".into(),
            method: "GET".into(),
            target: target.into(),
            status: "200".into(),
            peer: None,
        }
    }

    fn targets(store: &dyn Store) -> Vec<(u64, String)> {
        store
            .scan_prefix(KEYSPACE, b"")
            .unwrap()
            .into_iter()
            .map(|(k, v)| {
                let e: Entry = serde_json::from_slice(&v).unwrap();
                assert_eq!(e.id, number(&k));
                (e.id, e.target)
            })
            .collect()
    }

    /// Replicas of one database share the log: an entry never overwrites one another
    /// writer numbered first.
    #[test]
    fn entries_numbered_by_another_writer_meanwhile_are_kept() {
        let store = metalgraph_store::MemStore::new();
        assert_eq!(append(&store, vec![entry("/a")], 0).unwrap(), 1);
        // Another writer, which also thought the log ended at 1, adds two.
        assert_eq!(
            append(&store, vec![entry("/b"), entry("/c")], 1).unwrap(),
            3
        );
        // This writer still thinks the log ends at 1.
        assert_eq!(append(&store, vec![entry("/d")], 1).unwrap(), 4);
        assert_eq!(
            targets(&store),
            [(1, "/a"), (2, "/b"), (3, "/c"), (4, "/d")].map(|(n, t)| (n, t.to_owned()))
        );
    }
}
