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
//! A commit is made durable by a journal of our own, `metalgraph.wal` in the database
//! directory (`wal.rs`), not by sled: making sled's log durable takes `Db::flush`, which
//! writes the log and waits for it with `sync_file_range` (that neither flushes the disk's
//! write cache nor records the file's new length, so it survives a process crash, not a
//! power loss), and then an `fdatasync` of the log — two trips to the device where the
//! journal needs one.
//!
//! So a commit, holding the store's `gate` exclusively: checks each batch's preconditions
//! against sled and the batches before it in its group (`group.rs`: commits that arrive
//! while one is being written are written together); appends the ops of those that pass
//! to the journal as one record and calls `fdatasync`; then applies them to sled's trees,
//! plain inserts and removes. Only then does it release the gate, so no reader sees a batch
//! before it is durable, or half of one. A crash before the record is complete loses a
//! group none of whose commits returned; a crash after it loses at most sled's copy of
//! them, which the journal still holds.
//!
//! Opening applies every record of the journal to sled again (each op sets or removes an
//! absolute value, so applying one that sled already holds changes nothing), then
//! checkpoints. A checkpoint, also run when the journal passes 32 MiB and on `close`, makes
//! sled's state durable (`Db::flush`, `fdatasync` of sled's log, and a sync of any blob
//! file sled wrote for a large value, with their directory: sled writes those with no sync
//! at all) and only then empties the journal.
//!
//! If a journal write or `fdatasync` fails, the store refuses every later commit until it
//! is reopened. If applying a journalled group to sled fails, or a commit panics, sled may
//! hold part of a group, so reads are refused too.
//!
//! Between checkpoints sled still writes its log by itself when an I/O buffer fills,
//! waiting with `sync_file_range`, counts what it wrote as stable, and may then reuse a log
//! segment whose live pages it rewrote elsewhere. That rewrite must be durable before the
//! reuse is, or a power loss could take sled's older data back (data the journal, which
//! holds only what was committed since the checkpoint, cannot restore). Two things see to
//! it, as a per-commit `fdatasync` of sled's log did before the journal:
//! - the data: what `sync_file_range` waited for is in the device's cache, and the next
//!   commit's journal `fdatasync` ends with a flush of that cache, which covers every write
//!   the device completed (the journal lives beside sled's log, on the same device);
//! - the length: when sled grew its log past its end (`sync_file_range` does not make the
//!   new length durable), the next commit syncs sled's log too (`Syncer::keep_length`, a
//!   length compared per commit; sled grows it a segment at a time, so rarely).
//!
//! This is weaker than a flush of sled per commit in one way: sled writes its buffers on
//! its own threads, so a write it makes after a commit's journal sync is made durable only
//! by the next commit's. A power loss on a disk with a volatile write cache that reorders
//! writes, striking after sled has rewritten pages and reused the space they came from
//! with no commit in between, could take those pages back to an older state. Making that
//! impossible means waiting for sled's flush in every commit, a second trip to the device
//! (what the journal replaced).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::file::{decode_payload, encode};
use crate::group::Group;
use crate::mem::check_group;
use crate::wal::Wal;
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
    /// Trees already opened, by keyspace name. Only writes add to it, under `gate`.
    trees: RwLock<HashMap<String, sled::Tree>>,
    /// Makes commits atomic with respect to reads: commits take it exclusively.
    gate: RwLock<()>,
    /// What makes sled's flushed state durable at a checkpoint (see the module docs).
    sync: Syncer,
    /// Commits that arrive together share one journal record and sync.
    group: Group,
    /// The journal that makes a commit durable before sled's own flush (module docs).
    wal: Mutex<Wal>,
    /// How long the journal may grow before sled is flushed and the journal emptied.
    checkpoint_bytes: u64,
    /// Set when sled may hold part of a journalled group (applying it failed, or a commit
    /// panicked): reads fail too, naming why, until the store is reopened and the journal
    /// applied whole.
    failed: std::sync::OnceLock<String>,
}

/// The journal's file in the database directory, beside sled's own files.
const WAL: &str = "metalgraph.wal";

/// How long the journal grows before a checkpoint: big enough that the cost of sled's
/// flush is shared by many commits, small enough to be read back quickly on open.
const CHECKPOINT_BYTES: u64 = 32 * 1024 * 1024;

/// Syncs what `Db::flush` leaves unsynced: sled's log file and its blob files.
struct Syncer {
    /// sled's log, `<dir>/db`, opened a second time for `fdatasync`.
    log: std::fs::File,
    /// sled's directory of values too large for the log, `<dir>/blobs`.
    blobs: PathBuf,
    /// The blob files already synced. Only checkpoints touch it, under the gate.
    synced: std::sync::Mutex<std::collections::HashSet<std::ffi::OsString>>,
    /// The log's length when it was last synced.
    synced_len: std::sync::atomic::AtomicU64,
}

impl Syncer {
    fn open(dir: &Path) -> std::io::Result<Syncer> {
        let log = std::fs::File::open(dir.join("db"))?;
        // The log's own directory entry, made when the database was created.
        std::fs::File::open(dir)?.sync_all()?;
        log.sync_data()?;
        Ok(Syncer {
            synced_len: log.metadata()?.len().into(),
            log,
            blobs: dir.join("blobs"),
            synced: Default::default(),
        })
    }

    /// Syncs sled's log when its length changed since it was last synced (see the module
    /// docs): sled grows the file by itself when it writes a full buffer past its end, and
    /// `sync_file_range` does not make the new length durable.
    fn keep_length(&self) -> std::io::Result<()> {
        let len = self.log.metadata()?.len();
        if len != self.synced_len.load(std::sync::atomic::Ordering::Relaxed) {
            self.sync_log(len)?;
        }
        Ok(())
    }

    /// Syncs sled's log, `len` bytes long.
    fn sync_log(&self, len: u64) -> std::io::Result<()> {
        self.log.sync_data()?;
        self.synced_len
            .store(len, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Makes everything `Db::flush` wrote durable.
    fn sync(&self) -> std::io::Result<()> {
        self.sync_log(self.log.metadata()?.len())?;
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
                if !sync_if_present(&self.blobs.join(&name))? {
                    // sled removed it since the listing: nothing refers to it any more.
                    continue;
                }
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

/// Syncs the file at `path`; `false` when there is none, as when sled removed a blob
/// between the directory's listing and its opening.
fn sync_if_present(path: &Path) -> std::io::Result<bool> {
    match std::fs::File::open(path) {
        Ok(file) => file.sync_all().map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
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
        // No background flusher: checkpoints flush (see the module docs).
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
        let mut journalled = Vec::new();
        let wal = Wal::open(&dir.join(WAL), |payload, _| {
            journalled.push(decode_payload(payload)?);
            Ok(())
        })?;
        let store = SledStore {
            db,
            path: dir.to_owned(),
            trees: RwLock::new(HashMap::new()),
            gate: RwLock::new(()),
            sync,
            group: Group::default(),
            wal: Mutex::new(wal),
            checkpoint_bytes: CHECKPOINT_BYTES,
            failed: std::sync::OnceLock::new(),
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
        // Commits the journal holds may be missing from sled (a crash before its flush):
        // applied again (each op sets an absolute value, so this is harmless for those sled
        // has), then made durable in sled.
        if !journalled.is_empty() {
            for ops in &journalled {
                store.apply(ops.iter())?;
            }
            let mut wal = store.wal.lock().unwrap_or_else(PoisonError::into_inner);
            store.checkpoint(&mut wal)?;
        }
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

    /// Makes sled's state durable and empties the journal, which it then holds. Under the
    /// gate (or before the store is shared).
    fn checkpoint(&self, wal: &mut Wal) -> Result<()> {
        self.flush().map_err(|e| {
            Error::Io(format!(
                "flushing sled database {}: {e}",
                self.path.display()
            ))
        })?;
        wal.clear()
    }

    fn io_error(&self, keyspace: &str, doing: &str, e: &dyn std::fmt::Display) -> Error {
        Error::Io(format!(
            "{doing} keyspace {keyspace:?} in sled database {}: {e}",
            self.path.display()
        ))
    }

    /// The journal, refusing commits if a commit panicked while holding it: sled may then
    /// hold part of a group, which only a reopen mends.
    fn journal(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(|poisoned| {
            let mut wal = poisoned.into_inner();
            let why = "a commit panicked while applying its group to sled";
            self.fail(why);
            wal.poison(format!("refusing commits until reopened: {why}"));
            wal
        })
    }

    /// Marks sled as possibly holding part of a group (see `failed`).
    fn fail(&self, why: &str) {
        let _ = self.failed.set(format!(
            "sled database {} may hold part of a commit ({why}); reopen the store",
            self.path.display()
        ));
    }

    /// Refuses reads once sled may hold part of a group (see `failed`).
    fn readable(&self) -> Result<()> {
        match self.failed.get() {
            Some(why) => Err(Error::Io(why.clone())),
            None => Ok(()),
        }
    }

    /// A key's value, without the gate (the caller holds it, either way).
    fn read(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let Some(tree) = self.tree(keyspace) else {
            return Ok(None);
        };
        let value = tree
            .get(key)
            .map_err(|e| self.io_error(keyspace, "reading", &e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Commits a group of batches (see `group.rs`): each checked against the state the
    /// earlier ones leave, the ops of those that pass appended to the journal as one record
    /// and synced, then applied to sled's trees. Readers wait at the gate until
    /// the group is applied, so none sees a batch that is not durable.
    fn write_group(&self, batches: Vec<Batch>) -> Vec<Result<()>> {
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut wal = self.journal();
        if let Some(reason) = wal.poisoned() {
            let e = Error::Io(reason.to_owned());
            return batches.iter().map(|_| Err(e.clone())).collect();
        }
        let mut results = check_group(&batches, |keyspace, key| self.read(keyspace, key));
        let mut payload = Vec::new();
        let written: Vec<bool> = results
            .iter()
            .zip(&batches)
            .map(|(result, batch)| {
                let write = result.is_ok() && !batch.ops.is_empty();
                if write {
                    encode(batch, &mut payload);
                }
                write
            })
            .collect();
        if payload.is_empty() {
            return results;
        }
        let mut fail = |e: Error| {
            for (result, written) in results.iter_mut().zip(&written) {
                if *written {
                    *result = Err(e.clone());
                }
            }
        };
        if let Err(e) = wal.append(&payload) {
            fail(e);
            return results;
        }
        let ops = batches
            .iter()
            .zip(&written)
            .filter(|(_, written)| **written)
            .flat_map(|(batch, _)| &batch.ops);
        let applied = self.apply(ops).and_then(|()| {
            self.sync.keep_length().map_err(|e| {
                Error::Io(format!(
                    "syncing the log of sled database {}: {e}",
                    self.path.display()
                ))
            })
        });
        if let Err(e) = applied {
            // Durable in the journal, so the next open applies it; until then sled does
            // not hold it, and nothing more may be built on top.
            let e = Error::Io(format!(
                "applying a journalled commit to sled database {} (it is durable and is \
                 applied when the store is reopened): {e}",
                self.path.display()
            ));
            self.fail(&e.to_string());
            wal.poison(format!("refusing commits until reopened: {e}"));
            fail(e);
            return results;
        }
        if wal.len() > self.checkpoint_bytes
            && let Err(e) = self.checkpoint(&mut wal)
        {
            // The group is durable in the journal already, so a failed checkpoint does not
            // fail it; the next commit over the threshold tries again.
            tracing::warn!(dir = %self.path.display(), error = %e, "sled checkpoint failed");
        }
        results
    }

    /// Applies what ops leave, to the trees they write (created if new). Not as a sled
    /// transaction: the journal holds them, so a crash part way through is mended by
    /// applying them again on open, and readers wait at the gate until all are applied.
    ///
    /// The ops are applied in key order, and of several on one key only the last: sled
    /// finds each key's leaf from its tree's root and copies the leaf to change it, so
    /// consecutive keys that share a leaf find it in the cache. A group of a fan-out
    /// (some 300 ops of ten commits, to random workflow ids) applied 20-25 % faster.
    fn apply<'a>(&self, ops: impl Iterator<Item = &'a Op>) -> Result<()> {
        let mut effects: Vec<_> = ops.map(Op::effect).collect();
        // Stable, so that the ops on one key stay in their order, the last one last.
        effects.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        let mut trees: HashMap<&str, sled::Tree> = HashMap::new();
        let mut effects = effects.into_iter().peekable();
        while let Some((keyspace, key, value)) = effects.next() {
            if effects
                .peek()
                .is_some_and(|next| (next.0, next.1) == (keyspace, key))
            {
                continue;
            }
            let tree = match trees.get(keyspace) {
                Some(tree) => tree,
                None => trees
                    .entry(keyspace)
                    .or_insert(self.tree_for_write(keyspace)?),
            };
            let applied = match value {
                Some(value) => tree.insert(key, value),
                None => tree.remove(key),
            };
            applied.map_err(|e| self.io_error(keyspace, "writing", &e))?;
        }
        Ok(())
    }
}

impl Store for SledStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        check_keyspace(keyspace)?;
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.readable()?;
        self.read(keyspace, key)
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let _gate = self.gate.read().unwrap_or_else(PoisonError::into_inner);
        self.readable()?;
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
        self.readable()?;
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
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        let mut wal = self.journal();
        if let Some(reason) = wal.poisoned() {
            // sled may lack what the journal holds: the journal stays for the next open.
            return Err(Error::Io(format!(
                "closing sled database {} without a checkpoint: {reason}",
                self.path.display()
            )));
        }
        self.checkpoint(&mut wal)
    }

    fn backend(&self) -> &'static str {
        "sled"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled keeps a value larger than a quarter of a log segment (512 KiB) in a file of
    /// its own, written without a sync; the checkpoint must sync it.
    #[test]
    fn a_checkpoint_syncs_the_blob_files_of_large_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let mut batch = Batch::new();
        batch.put("big", b"k".to_vec(), vec![7u8; 300 * 1024]);
        store.commit(batch).unwrap();
        store.close().unwrap();
        let on_disk: std::collections::HashSet<_> = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!on_disk.is_empty(), "sled wrote no blob file");
        assert_eq!(*store.sync.synced.lock().unwrap(), on_disk);
        // sled removes a blob file in the background once nothing refers to it, so one
        // listed may be gone when the checkpoint opens it: passed over, not an error (it
        // was: a checkpoint, and the store's close, failed with "No such file").
        let blob = dir
            .path()
            .join("blobs")
            .join(on_disk.iter().next().unwrap());
        assert!(sync_if_present(&blob).unwrap());
        std::fs::remove_file(&blob).unwrap();
        assert!(!sync_if_present(&blob).unwrap());
    }

    /// A group is applied in key order, and of several ops on one key the last wins, as
    /// in the order they were committed.
    #[test]
    fn a_group_applies_the_last_op_on_each_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        put(&store, "gone", "0");
        let mut first = Batch::new();
        first.put("ks", b"b".to_vec(), b"1".to_vec());
        first.put("ks", b"a".to_vec(), b"1".to_vec());
        first.delete("ks", b"gone".to_vec());
        let mut second = Batch::new();
        second.delete("ks", b"b".to_vec());
        second.put("ks", b"a".to_vec(), b"2".to_vec());
        second.put("ks", b"gone".to_vec(), b"back".to_vec());
        let results = store.write_group(vec![first, second]);
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(get(&store, "a").as_deref(), Some("2"));
        assert_eq!(get(&store, "b"), None);
        assert_eq!(get(&store, "gone").as_deref(), Some("back"));
        store.close().unwrap();
        // And so it stays after a reopen.
        drop(store);
        let reopened = SledStore::open(dir.path()).unwrap();
        assert_eq!(get(&reopened, "a").as_deref(), Some("2"));
        assert_eq!(get(&reopened, "b"), None);
    }

    /// What a crash leaves of a store that is still open: its files as they are now.
    fn files_now(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                files_now(&entry.path(), &to.join(entry.file_name()));
            } else {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    fn put(store: &SledStore, key: &str, value: &str) {
        let mut batch = Batch::new();
        batch.put("ks", key.as_bytes().to_vec(), value.as_bytes().to_vec());
        store.commit(batch).unwrap();
    }

    fn get(store: &SledStore, key: &str) -> Option<String> {
        let value = store.get("ks", key.as_bytes()).unwrap()?;
        Some(String::from_utf8(value).unwrap())
    }

    /// A commit is durable once it is in the journal, before sled makes it durable: a power
    /// loss that drops everything sled wrote after its last checkpoint (its files as they
    /// were then) but keeps the synced journal reopens with the commit, and the reopen
    /// makes sled hold it.
    #[test]
    fn a_commit_survives_losing_what_sled_wrote_after_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        put(&store, "x", "0");
        store.close().unwrap();
        let lost = tempfile::tempdir().unwrap();
        files_now(dir.path(), lost.path());
        put(&store, "a", "1");
        put(&store, "b", "2");
        assert!(store.wal.lock().unwrap().len() > 0);
        std::fs::copy(dir.path().join(WAL), lost.path().join(WAL)).unwrap();

        let reopened = SledStore::open(lost.path()).unwrap();
        assert_eq!(get(&reopened, "x").as_deref(), Some("0"));
        assert_eq!(get(&reopened, "a").as_deref(), Some("1"));
        assert_eq!(get(&reopened, "b").as_deref(), Some("2"));
        // Applied and flushed into sled, the journal is empty again.
        assert_eq!(reopened.wal.lock().unwrap().len(), 0);
        drop(reopened);
        std::fs::remove_file(lost.path().join(WAL)).unwrap();
        let reopened = SledStore::open(lost.path()).unwrap();
        assert_eq!(get(&reopened, "b").as_deref(), Some("2"));
    }

    /// A record torn by a crash mid-write (its commit never returned) is cut off; a damaged
    /// record with a good one after it fails the open, naming the journal.
    #[test]
    fn a_torn_journal_tail_is_dropped_and_damage_before_good_data_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        put(&store, "a", "1");
        let crashed = tempfile::tempdir().unwrap();
        files_now(dir.path(), crashed.path());
        let wal = crashed.path().join(WAL);
        let good = std::fs::read(&wal).unwrap();
        let mut torn = good.clone();
        torn.extend_from_slice(b"batch 400 0badf00d\nput \"ks\" \"c\" \"3");
        std::fs::write(&wal, &torn).unwrap();
        let reopened = SledStore::open(crashed.path()).unwrap();
        assert_eq!(get(&reopened, "a").as_deref(), Some("1"));
        assert_eq!(get(&reopened, "c"), None);
        drop(reopened);

        let damaged = tempfile::tempdir().unwrap();
        files_now(dir.path(), damaged.path());
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 0x20;
        bad.extend_from_slice(&good);
        std::fs::write(damaged.path().join(WAL), &bad).unwrap();
        let err = SledStore::open(damaged.path()).unwrap_err().to_string();
        assert!(
            err.contains(WAL) && err.contains("refusing to drop committed data"),
            "{err}"
        );
    }

    /// When sled has grown its log by itself (on its own threads, after the commits that
    /// filled its buffers), the next commit makes the new length durable.
    #[test]
    fn the_log_length_sled_grows_is_synced_by_the_next_commit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("db");
        let store = SledStore::open(dir.path()).unwrap();
        let before = std::fs::metadata(&log).unwrap().len();
        for round in 0..8u32 {
            let mut batch = Batch::new();
            for i in 0..500u32 {
                batch.put("ks", format!("{round}-{i}").into_bytes(), vec![b'v'; 1024]);
            }
            store.commit(batch).unwrap();
        }
        // Until sled's own writes have settled.
        let mut len = std::fs::metadata(&log).unwrap().len();
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = std::fs::metadata(&log).unwrap().len();
            if now == len {
                break;
            }
            len = now;
        }
        assert!(
            len > before,
            "sled did not grow its log ({before} -> {len})"
        );
        put(&store, "last", "1");
        let synced = store
            .sync
            .synced_len
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(synced, std::fs::metadata(&log).unwrap().len());
    }

    /// A commit that panicked while it held the journal may have left sled holding part of
    /// its group: later commits and reads are refused, naming why, until the store is
    /// reopened (which applies the journal whole).
    #[test]
    fn a_commit_that_panicked_stops_later_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        put(&store, "a", "1");
        std::thread::scope(|s| {
            let panicked = s.spawn(|| {
                let _journal = store.wal.lock().unwrap();
                panic!("a commit fails half way");
            });
            assert!(panicked.join().is_err());
        });
        let mut batch = Batch::new();
        batch.put("ks", b"b".to_vec(), b"2".to_vec());
        let err = store.commit(batch).unwrap_err().to_string();
        assert!(err.contains("a commit panicked"), "{err}");
        // Reads fail too: sled may hold part of the group that panicked.
        let err = store.get("ks", b"a").unwrap_err().to_string();
        assert!(err.contains("reopen the store"), "{err}");
        assert!(store.close().is_err());
        drop(store);
        let reopened = SledStore::open(dir.path()).unwrap();
        put(&reopened, "b", "2");
        assert_eq!(get(&reopened, "b").as_deref(), Some("2"));
    }

    /// Past its threshold the journal is emptied once sled holds its commits durably.
    #[test]
    fn the_journal_is_emptied_once_sled_holds_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = SledStore::open(dir.path()).unwrap();
        store.checkpoint_bytes = 10;
        put(&store, "a", "1");
        assert_eq!(store.wal.lock().unwrap().len(), 0, "a checkpoint ran");
        put(&store, "b", "2");
        let crashed = tempfile::tempdir().unwrap();
        files_now(dir.path(), crashed.path());
        std::fs::remove_file(crashed.path().join(WAL)).unwrap();
        let reopened = SledStore::open(crashed.path()).unwrap();
        assert_eq!(get(&reopened, "a").as_deref(), Some("1"));
        assert_eq!(get(&reopened, "b").as_deref(), Some("2"));
    }
}
