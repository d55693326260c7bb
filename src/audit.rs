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
        let last = store
            .scan(KEYSPACE, Scan::prefix(b"", 1).reverse())?
            .into_iter()
            .next()
            .map(|(k, _)| number(&k))
            .unwrap_or(0);
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

async fn writer(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Request>, mut last: u64) {
    let mut pending = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut pending, BATCH).await > 0 {
        let time = now_rfc3339();
        let mut batch = Batch::new();
        let first = last + 1;
        for (record, _) in &pending {
            last += 1;
            let entry = Entry {
                id: last,
                time: time.clone(),
                token: record.caller.as_ref().map(|c| c.name.clone()),
                role: record.caller.as_ref().map(|c| c.role.as_str().to_owned()),
                protocol: record.protocol.to_owned(),
                method: record.method.clone(),
                target: record.target.clone(),
                status: record.status.clone(),
                peer: record.peer.clone(),
            };
            batch.put(
                KEYSPACE,
                last.to_be_bytes().to_vec(),
                serde_json::to_vec(&entry).expect("an audit entry serialises"),
            );
        }
        // What this batch pushes out of the window.
        for n in first.saturating_sub(RETAINED)..last.saturating_sub(RETAINED) + 1 {
            if n > 0 {
                batch.delete(KEYSPACE, n.to_be_bytes().to_vec());
            }
        }
        let committed = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.commit(batch)).await
        };
        let outcome = match committed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("the audit log cannot be written: {e}")),
            Err(e) => Err(format!("the audit log cannot be written: {e}")),
        };
        if let Err(e) = &outcome {
            error!(error = %e, entries = pending.len(), "audit entries were not recorded");
            last = first - 1;
        }
        for (_, done) in pending.drain(..) {
            let _ = done.send(outcome.clone());
        }
    }
}
