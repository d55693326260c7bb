//! Requests for the owner of a partition, through the store (docs/scale-out.md): when
//! replicas share the store, the replica that accepts a run or a cancel is often not the
//! one that drives the workflow. It commits the request under the workflow's partition in
//! the `inbox` keyspace (a run in the same commit that creates the workflow), and the
//! owner's scheduler reads its partitions' requests (and a node's callback, which any
//! replica accepts), applies them, and deletes each in the
//! fenced commit of the step that applied it. A request is durable once accepted, and a
//! partition's new owner finds what its old one left.

use metalgraph_store::{Batch, Scan, Store};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::keys;

/// The most requests read at once.
const PAGE: usize = 4096;

/// A request for a partition's owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) enum Request {
    /// Drive this newly created workflow.
    Load(String),
    /// Cancel this workflow.
    Cancel(String),
    /// A node called back for this running task (its token checked against the store).
    Notify {
        wf: String,
        task_id: String,
        token: String,
        body: serde_json::Value,
    },
}

/// Adds `request` for partition `p` to `batch`. Keys sort by partition, then by time.
pub(crate) fn put(batch: &mut Batch, p: u32, now_ms: u64, request: &Request) {
    let key = format!("{p:03}/{now_ms:016x}-{}", crate::new_token());
    let value = serde_json::to_vec(request).expect("a request serialises");
    batch.put(keys::INBOX, key.into_bytes(), value);
}

/// The pending requests of the partitions `owned` accepts (blocking), oldest first within
/// a partition: each with its key (to delete once applied) and partition. A malformed one is
/// an error naming it.
pub(crate) fn read(
    store: &dyn Store,
    owned: impl Fn(u32) -> bool,
) -> Result<Vec<(Vec<u8>, u32, Request)>, Error> {
    decode_owned(store.scan(keys::INBOX, Scan::prefix(b"", PAGE))?, owned)
}

/// The workflows of the partitions `owned` accepts whose creation's [`Request::Load`] is
/// still in the inbox (blocking): no owner has committed a step of theirs yet, so loading
/// them is [`read`]'s to do, which announces them with their `pending` event. A partition's
/// new owner leaves them to it when it loads the partition's unfinished workflows.
pub(crate) fn unapplied_loads(
    store: &dyn Store,
    owned: impl Fn(u32) -> bool,
) -> Result<std::collections::HashSet<String>, Error> {
    Ok(decode_owned(store.scan_prefix(keys::INBOX, b"")?, owned)?
        .into_iter()
        .filter_map(|(_, _, request)| match request {
            Request::Load(id) => Some(id),
            _ => None,
        })
        .collect())
}

fn decode_owned(
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    owned: impl Fn(u32) -> bool,
) -> Result<Vec<(Vec<u8>, u32, Request)>, Error> {
    let mut out = Vec::new();
    for (k, v) in entries {
        let p = std::str::from_utf8(&k)
            .ok()
            .and_then(|k| k.get(..3))
            .and_then(|p| p.parse::<u32>().ok())
            .ok_or_else(|| Error::Store(format!("inbox key {k:?} is malformed")))?;
        if !owned(p) {
            continue;
        }
        let request: Request = serde_json::from_slice(&v).map_err(|e| {
            Error::Store(format!(
                "inbox request {} is unreadable: {e}",
                String::from_utf8_lossy(&k)
            ))
        })?;
        out.push((k, p, request));
    }
    Ok(out)
}
