//! The embedded default backend, on the `sled` crate: one sled tree per keyspace.
//!
//! # Layout
//!
//! Keyspace `k` lives in the sled tree named `ks/k`. The prefix keeps our names apart from
//! sled's own default tree and from anything added later. Trees are opened when a commit
//! first writes to a keyspace and cached; a read of a keyspace that has no tree yet answers
//! "nothing" without creating one.
//!
//! # Atomicity and durability
//!
//! A commit runs as one sled transaction over every tree the batch touches. sled stages
//! the writes of all trees of a transaction and seals them into its log as a single batch,
//! so after a crash either all of them are recovered or none. Preconditions are read inside
//! the same transaction, and a failing one aborts it, so nothing is written.
//!
//! sled lets a plain read observe a transaction half-applied (an iterator takes sled's
//! concurrency lock per step, not per scan), so the store adds its own `gate`: commits hold
//! it exclusively, reads share it. The gate also serialises commits, which is what makes
//! the check of preconditions for keyspaces that have no tree yet race-free.
//!
//! `commit` returns only after `Db::flush` and an `fdatasync` of sled's log. `Db::flush`
//! writes the log and, on Linux, waits for it with `sync_file_range`, which neither flushes
//! the disk's write cache nor records the file's new length: on its own it survives a
//! process crash, not a power loss. So the store then calls `fdatasync` on the log file
//! (`<dir>/db`) itself, and syncs any blob file sled wrote for a large value (sled writes
//! those with no sync at all) together with their directory. sled's log is shared by all
//! trees, so one flush and one sync cover the whole batch. Both happen while the gate is
//! still held so that no reader sees a batch before it is durable.
//!
//! Commits that arrive while one is being flushed are committed together (`group.rs`):
//! each batch in its own transaction, checked against the state the earlier ones left,
//! then one flush and one sync for the group, still under the gate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use crate::group::Group;
use crate::mem::validate;
use crate::{Batch, Bytes, Error, Op, Result, Scan, Store, check_keyspace};

/// How long an open waits for sled's directory lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Tree names for keyspaces start with this, so they never collide with sled's own trees.
const TREE_PREFIX: &str = "ks/";

/// A [`Store`] on a sled database in one directory.
pub struct SledStore {
    db: sled::Db,
    /// The database directory, named in error messages.
    path: PathBuf,
    /// Trees already opened, by keyspace name. Only commits add to it, under `gate`.
    trees: RwLock<HashMap<String, sled::Tree>>,
    /// Makes commits atomic with respect to reads: commits take it exclusively.
    gate: RwLock<()>,
    /// What makes a flushed commit durable (see the module docs).
    sync: Syncer,
    /// Commits that arrive together share one flush.
    group: Group,
}

/// Syncs what `Db::flush` leaves unsynced: sled's log file and its blob files.
struct Syncer {
    /// sled's log, `<dir>/db`, opened a second time for `fdatasync`.
    log: std::fs::File,
    /// sled's directory of values too large for the log, `<dir>/blobs`.
    blobs: PathBuf,
    /// The blob files already synced. Only commits touch it, under the gate.
    synced: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
}

impl Syncer {
    fn open(dir: &Path) -> std::io::Result<Syncer> {
        let log = std::fs::File::open(dir.join("db"))?;
        // The log's own directory entry, made when the database was created.
        std::fs::File::open(dir)?.sync_all()?;
        Ok(Syncer {
            log,
            blobs: dir.join("blobs"),
            synced: Default::default(),
        })
    }

    /// Makes everything `Db::flush` wrote durable.
    fn sync(&self) -> std::io::Result<()> {
        self.log.sync_data()?;
        // The blob directory is empty unless a value was larger than a quarter of a log
        // segment, so listing it costs little.
        let entries = match std::fs::read_dir(&self.blobs) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        let mut present = std::collections::HashSet::new();
        let mut new = false;
        for entry in entries {
            let name = entry?.file_name();
            if !synced.contains(&name) {
                std::fs::File::open(self.blobs.join(&name))?.sync_all()?;
                new = true;
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&self.blobs)?.sync_all()?;
        }
        // Blobs sled removed are forgotten.
        *synced = present;
        Ok(())
    }
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// sled's own default page cache, 1 GiB.
pub const DEFAULT_CACHE_BYTES: u64 = 1024 * 1024 * 1024;

impl SledStore {
    /// Opens (creating if needed) the sled database in `dir`, with sled's default page cache.
    ///
    /// sled locks the directory, so a second open of the same directory fails until the
    /// first store is dropped.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`SledStore::open`] with a page cache of `cache_bytes` (sled's `cache_capacity`):
    /// what it keeps of the database in memory beyond what is being written.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::Io(format!("creating sled directory {}: {e}", dir.display())))?;
        // No background flusher: every commit flushes itself.
        let config = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(cache_bytes);
        // sled's own threads may hold the directory lock for a moment after the last handle
        // of an earlier store in this process was dropped; a reopen waits that out, briefly.
        // Another process holding the lock still fails, after that wait.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            match config.open() {
                // sled reports a taken lock as an `Other` I/O error with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => {
                    break other.map_err(|e| {
                        Error::Io(format!("opening sled database {}: {e}", dir.display()))
                    })?;
                }
            }
        };
        let sync = Syncer::open(dir).map_err(|e| {
            Error::Io(format!(
                "opening the log of sled database {}: {e}",
                dir.display()
            ))
        })?;
        let store = SledStore {
            db,
            path: dir.to_owned(),
            trees: RwLock::new(HashMap::new()),
            gate: RwLock::new(()),
            sync,
            group: Group::default(),
        };
        // Opening every existing keyspace tree now means a missing cache entry really
        // means "no such keyspace", so reads never have to create trees.
        let mut trees = HashMap::new();
        for name in store.db.tree_names() {
            let Some(keyspace) = name.strip_prefix(TREE_PREFIX.as_bytes()) else {
                continue;
            };
            let keyspace = String::from_utf8(keyspace.to_vec()).map_err(|_| {
                Error::Io(format!(
                    "sled database {} has a tree with a non-UTF-8 keyspace name",
                    dir.display()
                ))
            })?;
            let tree = store.open_tree(&keyspace)?;
            trees.insert(keyspace, tree);
        }
        *store.trees.write().unwrap_or_else(PoisonError::into_inner) = trees;
        Ok(store)
    }

    fn open_tree(&self, keyspace: &str) -> Result<sled::Tree> {
        self.db
            .open_tree(format!("{TREE_PREFIX}{keyspace}"))
            .map_err(|e| self.io_error(keyspace, "opening the tree of", &e))
    }

    /// The cached tree of `keyspace`, if the keyspace has ever been written.
    fn tree(&self, keyspace: &str) -> Option<sled::Tree> {
        let trees = self.trees.read().unwrap_or_else(PoisonError::into_inner);
        trees.get(keyspace).cloned()
    }

    /// The tree of `keyspace`, created if missing. Called by commits only, under the gate.
    fn tree_for_write(&self, keyspace: &str) -> Result<sled::Tree> {
        if let Some(tree) = self.tree(keyspace) {
            return Ok(tree);
        }
        let tree = self.open_tree(keyspace)?;
        let mut trees = self.trees.write().unwrap_or_else(PoisonError::into_inner);
        trees.insert(keyspace.to_owned(), tree.clone());
        Ok(tree)
    }

    /// Writes sled's log and makes it durable (see the module docs).
    fn flush(&self) -> std::result::Result<(), String> {
        self.db.flush().map_err(|e| e.to_string())?;
        self.sync
            .sync()
            .map_err(|e| format!("syncing its files: {e}"))
    }

    fn io_error(&self, keyspace: &str, doing: &str, e: &dyn std::fmt::Display) -> Error {
        Error::Io(format!(
            "{doing} keyspace {keyspace:?} in sled database {}: {e}",
            self.path.display()
        ))
    }

    /// Commits a group of batches (see `group.rs`): each in a transaction of its own,
    /// checked against the state the earlier ones left, then one flush for all. Readers
    /// wait at the gate until the group is durable, so none sees a batch that is not.
    fn write_group(&self, batches: Vec<Batch>) -> Vec<Result<()>> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut results: Vec<Result<()>> = batches
            .iter()
            .map(|batch| validate(batch).and_then(|()| self.apply(batch)))
            .collect();
        // Which batches wrote something, and so wait for the flush.
        let wrote: Vec<bool> = results
            .iter()
            .zip(&batches)
            .map(|(result, batch)| result.is_ok() && !batch.ops.is_empty())
            .collect();
        if !wrote.contains(&true) {
            return results;
        }
        // sled has no way to take a committed transaction back, so if the flush fails the
        // batches stay applied in memory and may or may not survive a crash. The error says
        // so; the caller should treat the store as failed.
        if let Err(e) = self.flush() {
            let e = Error::Io(format!(
                "flushing sled database {} after a commit (the batch is applied but may not \
                 be durable): {e}",
                self.path.display()
            ));
            for (result, wrote) in results.iter_mut().zip(wrote) {
                if wrote {
                    *result = Err(e.clone());
                }
            }
        }
        results
    }

    /// Checks a batch's preconditions and applies it in memory (not yet durable), under
    /// the gate.
    fn apply(&self, batch: &Batch) -> Result<()> {
        // The transaction spans the trees the ops write (created if new) and the trees of
        // preconditioned keyspaces that already exist. Each gets a slot in `trees`.
        let mut trees = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for op in &batch.ops {
            let (Op::Put { keyspace, .. } | Op::Delete { keyspace, .. }) = op;
            if !slot.contains_key(keyspace.as_str()) {
                slot.insert(keyspace, trees.len());
                trees.push(self.tree_for_write(keyspace)?);
            }
        }
        for precondition in &batch.preconditions {
            let keyspace = precondition.target().0;
            if slot.contains_key(keyspace) {
                continue;
            }
            if let Some(tree) = self.tree(keyspace) {
                slot.insert(keyspace, trees.len());
                trees.push(tree);
            }
        }
        if trees.is_empty() {
            // Nothing to write and no tree to read: every precondition names a keyspace
            // that holds no keys.
            return crate::mem::Keyspaces::default().check(batch);
        }
        self.transact(batch, &trees, &slot)
    }

    /// Runs the transaction of a batch whose trees are `trees`, indexed by `slot`.
    fn transact(
        &self,
        batch: &Batch,
        trees: &[sled::Tree],
        slot: &HashMap<&str, usize>,
    ) -> Result<()> {
        let result: Result<(), TransactionError<Error>> = trees.transaction(|view| {
            for (index, precondition) in batch.preconditions.iter().enumerate() {
                let (keyspace, key) = precondition.target();
                // A keyspace without a tree holds no keys; the gate stops a concurrent
                // commit from creating it in the meantime.
                let current = match slot.get(keyspace) {
                    Some(&i) => view[i].get(key)?,
                    None => None,
                };
                if !precondition.holds(current.as_deref()) {
                    return Err(ConflictableTransactionError::Abort(
                        precondition.conflict(index),
                    ));
                }
            }
            for op in &batch.ops {
                match op {
                    Op::Put {
                        keyspace,
                        key,
                        value,
                    } => {
                        view[slot[keyspace.as_str()]].insert(key.as_slice(), value.as_slice())?;
                    }
                    Op::Delete { keyspace, key } => {
                        view[slot[keyspace.as_str()]].remove(key.as_slice())?;
                    }
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(conflict)) => Err(conflict),
            Err(TransactionError::Storage(e)) => Err(Error::Io(format!(
                "committing a batch to sled database {}: {e}",
                self.path.display()
            ))),
        }
    }
}

impl Store for SledStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        check_keyspace(keyspace)?;
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let Some(tree) = self.tree(keyspace) else {
            return Ok(None);
        };
        let value = tree
            .get(key)
            .map_err(|e| self.io_error(keyspace, "reading", &e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let Some(tree) = self.tree(keyspace) else {
            return Ok(Vec::new());
        };
        tree.scan_prefix(prefix)
            .map(|entry| {
                entry
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| self.io_error(keyspace, "scanning", &e))
            })
            .collect()
    }

    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        let (Some(tree), Some(range)) = (self.tree(keyspace), scan.bounds()) else {
            return Ok(Vec::new());
        };
        let range = tree.range::<Vec<u8>, _>(range);
        let entries: Box<dyn Iterator<Item = _>> = if scan.reverse {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        entries
            .take(scan.limit)
            .map(|entry| {
                entry
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| self.io_error(keyspace, "scanning", &e))
            })
            .collect()
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        self.group
            .commit(batch, |batches| self.write_group(batches))
    }

    fn close(&self) -> Result<()> {
        self.flush().map_err(|e| {
            Error::Io(format!(
                "flushing sled database {}: {e}",
                self.path.display()
            ))
        })
    }

    fn backend(&self) -> &'static str {
        "sled"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled keeps a value larger than a quarter of a log segment (512 KiB) in a file of
    /// its own, written without a sync; the commit must sync it before returning.
    #[test]
    fn a_commit_syncs_the_blob_files_of_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut batch = Batch::new();
        batch.put("big", b"k".to_vec(), vec![7u8; 300 * 1024]);
        store.commit(batch).unwrap();
        let on_disk: std::collections::HashSet<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!on_disk.is_empty(), "sled wrote no blob file");
        assert_eq!(*store.sync.synced.lock().unwrap(), on_disk);
    }
}
