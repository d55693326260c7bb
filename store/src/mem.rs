//! The in-memory store, and the keyspace map that the file backend keeps in memory too.
//!
//! [`MemStore`] is the reference semantics of [`Store`] written as plainly as possible: a
//! map of keyspaces behind one lock. It is not durable. The engine's unit tests use it, and
//! the conformance suite holds every other backend to the same answers.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use crate::{Batch, Bytes, Op, Result, Scan, Store, check_keyspace};

/// Every keyspace and its entries, in key order.
///
/// An empty keyspace is removed from the map so that two states with the same entries
/// compare equal however they were reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Keyspaces {
    map: BTreeMap<String, BTreeMap<Bytes, Bytes>>,
}

impl Keyspaces {
    pub(crate) fn get(&self, keyspace: &str, key: &[u8]) -> Option<Bytes> {
        self.map.get(keyspace)?.get(key).cloned()
    }

    pub(crate) fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Vec<(Bytes, Bytes)> {
        let Some(entries) = self.map.get(keyspace) else {
            return Vec::new();
        };
        entries
            .range::<[u8], _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub(crate) fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Vec<(Bytes, Bytes)> {
        let (Some(entries), Some(range)) = (self.map.get(keyspace), scan.bounds()) else {
            return Vec::new();
        };
        let range = entries.range::<Vec<u8>, _>(range);
        let pick = |(k, v): (&Bytes, &Bytes)| (k.clone(), v.clone());
        if scan.reverse {
            range.rev().take(scan.limit).map(pick).collect()
        } else {
            range.take(scan.limit).map(pick).collect()
        }
    }

    /// Checks every precondition of `batch` against this state, in order.
    pub(crate) fn check(&self, batch: &Batch) -> Result<()> {
        for (index, precondition) in batch.preconditions.iter().enumerate() {
            let (keyspace, key) = precondition.target();
            let current = self.map.get(keyspace).and_then(|entries| entries.get(key));
            if !precondition.holds(current.map(Vec::as_slice)) {
                return Err(precondition.conflict(index));
            }
        }
        Ok(())
    }

    /// Applies one op. Ops of a batch are applied in order, so a later op on a key wins.
    pub(crate) fn apply(&mut self, op: Op) {
        match op {
            Op::Put {
                keyspace,
                key,
                value,
            } => {
                self.map.entry(keyspace).or_default().insert(key, value);
            }
            Op::Delete { keyspace, key } => {
                if let Some(entries) = self.map.get_mut(&keyspace) {
                    entries.remove(&key);
                    if entries.is_empty() {
                        self.map.remove(&keyspace);
                    }
                }
            }
        }
    }

    /// Every entry as `(keyspace, key, value)`, keyspaces and keys in ascending order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Bytes, &Bytes)> {
        self.map
            .iter()
            .flat_map(|(ks, entries)| entries.iter().map(move |(k, v)| (ks.as_str(), k, v)))
    }
}

/// Rejects a batch naming an invalid keyspace before anything else is looked at, so that a
/// malformed batch is reported as such rather than as a conflict.
pub(crate) fn validate(batch: &Batch) -> Result<()> {
    for precondition in &batch.preconditions {
        check_keyspace(precondition.target().0)?;
    }
    for op in &batch.ops {
        match op {
            Op::Put { keyspace, .. } | Op::Delete { keyspace, .. } => check_keyspace(keyspace)?,
        }
    }
    Ok(())
}

/// An in-memory [`Store`]: the same semantics as the durable backends, minus durability.
///
/// All state lives behind one `RwLock`; a commit holds the write half while it checks and
/// applies, which makes it atomic with respect to readers and other commits.
#[derive(Debug, Default)]
pub struct MemStore {
    state: RwLock<Keyspaces>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        check_keyspace(keyspace)?;
        // A panic in another thread cannot leave the map half-updated (ops are applied
        // only after every check passed, and applying does not panic), so a poisoned lock
        // still guards a consistent state.
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Ok(state.get(keyspace, key))
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Ok(state.scan_prefix(keyspace, prefix))
    }

    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        Ok(state.scan(keyspace, scan))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        validate(&batch)?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        state.check(&batch)?;
        for op in batch.ops {
            state.apply(op);
        }
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "mem"
    }
}
