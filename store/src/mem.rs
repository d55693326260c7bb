//! The in-memory store, and the keyspace map that the file backend keeps in memory too.
//!
//! [`MemStore`] is the reference semantics of [`Store`] written as plainly as possible: a
//! map of keyspaces behind one lock. It is not durable. The engine's unit tests use it, and
//! the conformance suite holds every other backend to the same answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::{PoisonError, RwLock};

use crate::{Batch, Bytes, Op, Result, Scan, Store, check_keyspace};

/// Every keyspace and its entries, in key order: the values themselves (`V = Bytes`, the
/// in-memory store) or where to find them (the file backend's index).
///
/// An empty keyspace is removed from the map so that two states with the same entries
/// compare equal however they were reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Keyspaces<V = Bytes> {
    map: BTreeMap<String, BTreeMap<Bytes, V>>,
}

impl<V> Default for Keyspaces<V> {
    fn default() -> Self {
        Keyspaces {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Clone> Keyspaces<V> {
    pub(crate) fn get(&self, keyspace: &str, key: &[u8]) -> Option<&V> {
        self.map.get(keyspace)?.get(key)
    }

    pub(crate) fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Vec<(Bytes, V)> {
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

    pub(crate) fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Vec<(Bytes, V)> {
        let (Some(entries), Some(range)) = (self.map.get(keyspace), scan.bounds()) else {
            return Vec::new();
        };
        let range = entries.range::<Vec<u8>, _>(range);
        let pick = |(k, v): (&Bytes, &V)| (k.clone(), v.clone());
        if scan.reverse {
            range.rev().take(scan.limit).map(pick).collect()
        } else {
            range.take(scan.limit).map(pick).collect()
        }
    }

    pub(crate) fn insert(&mut self, keyspace: String, key: Bytes, value: V) {
        self.map.entry(keyspace).or_default().insert(key, value);
    }

    pub(crate) fn remove(&mut self, keyspace: &str, key: &[u8]) {
        if let Some(entries) = self.map.get_mut(keyspace) {
            entries.remove(key);
            if entries.is_empty() {
                self.map.remove(keyspace);
            }
        }
    }

    /// Every entry as `(keyspace, key, value)`, keyspaces and keys in ascending order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Bytes, &V)> {
        self.map
            .iter()
            .flat_map(|(ks, entries)| entries.iter().map(move |(k, v)| (ks.as_str(), k, v)))
    }

    /// Every entry's value, mutably, in the order of [`Keyspaces::iter`].
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.map.values_mut().flat_map(BTreeMap::values_mut)
    }

    /// How many entries there are.
    pub(crate) fn len(&self) -> usize {
        self.map.values().map(BTreeMap::len).sum()
    }
}

impl Keyspaces<Bytes> {
    /// Checks every precondition of `batch` against this state, in order.
    pub(crate) fn check(&self, batch: &Batch) -> Result<()> {
        check(batch, |keyspace, key| Ok(self.get(keyspace, key).cloned()))
    }

    /// Applies one op. Ops of a batch are applied in order, so a later op on a key wins.
    pub(crate) fn apply(&mut self, op: Op) {
        match op {
            Op::Put {
                keyspace,
                key,
                value,
            } => self.insert(keyspace, key, value),
            Op::Delete { keyspace, key } => self.remove(&keyspace, &key),
        }
    }
}

/// Checks every precondition of `batch`, in order, against the values `current` gives.
pub(crate) fn check(
    batch: &Batch,
    current: impl Fn(&str, &[u8]) -> Result<Option<Bytes>>,
) -> Result<()> {
    for (index, precondition) in batch.preconditions.iter().enumerate() {
        let (keyspace, key) = precondition.target();
        if !precondition.holds(current(keyspace, key)?.as_deref()) {
            return Err(precondition.conflict(index));
        }
    }
    Ok(())
}

/// Checks a group of batches committed together: each is validated and its preconditions
/// checked against the state the earlier accepted batches of the group leave, `current`
/// reading the state before the group. `Ok` for each batch accepted.
pub(crate) fn check_group(
    batches: &[Batch],
    current: impl Fn(&str, &[u8]) -> Result<Option<Bytes>>,
) -> Vec<Result<()>> {
    // What the group's earlier batches wrote: `None` for a delete.
    let mut group: HashMap<(&str, &[u8]), Option<&[u8]>> = HashMap::new();
    batches
        .iter()
        .map(|batch| {
            validate(batch).and_then(|()| {
                check(batch, |keyspace, key| match group.get(&(keyspace, key)) {
                    Some(v) => Ok(v.map(<[u8]>::to_vec)),
                    None => current(keyspace, key),
                })
            })?;
            for op in &batch.ops {
                let (keyspace, key, value) = op.effect();
                group.insert((keyspace, key), value);
            }
            Ok(())
        })
        .collect()
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
        Ok(state.get(keyspace, key).cloned())
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
