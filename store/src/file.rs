//! The file backend: an append-only, checksummed journal of commits plus a snapshot, in
//! plain text that `cat`, `less` and `grep` can read.
//!
//! # Layout
//!
//! The store directory holds:
//! - `journal.log`: one record per commit (a batch, or the batches committed together),
//!   in commit order, then up to a MiB of empty lines: space written ahead of the records,
//!   so that a commit's `fdatasync` need not record a new file length (`wal.rs`, which
//!   writes and reads the journal);
//! - `snapshot`: the whole state as of the last compaction, in records of the same form;
//! - `snapshot.tmp`: a snapshot being written; present only if a compaction was cut short,
//!   and deleted on open.
//!
//! A record is a header line followed by a payload of exactly `len` bytes:
//!
//! ```text
//! batch 72 96ac38a6
//! put "nodes" "node-17" "{%22state%22:%22ready%22}"
//! del "locks" "node-17"
//! ```
//!
//! The header reads `batch <len> <crc>`, where `len` is the payload length in decimal and
//! `crc` the CRC-32 (IEEE) of the payload in eight hex digits. Each payload line is one op,
//! in batch order. Keyspaces, keys and values are quoted; inside the quotes, the printable
//! ASCII characters other than `"` and `%` stand for themselves and every other byte
//! (space and newline included) is written `%XX`. Preconditions are not journaled: they were checked before the record was
//! written, and replay only needs the outcome.
//!
//! # Memory
//!
//! Every key is kept in memory with where its value is: a value of up to [`INLINE_MAX`]
//! bytes in memory too, a longer one as the offset and length of its text in the snapshot
//! or the journal, read back (`pread`, then unescaped) when asked for. So the memory a
//! store needs grows with its number of keys, not with the size of its values: about 100
//! bytes per key plus the key itself, whatever the values weigh (a workflow record of a
//! few KiB costs its key and 32 bytes). Opening streams the files a record at a time, and
//! compaction copies values from file to file, so neither holds the data in memory.
//!
//! # Durability
//!
//! A commit, holding the writer lock, checks its preconditions against the in-memory state,
//! writes its record after the journal's last one, calls `fdatasync`, and only then applies
//! the ops in memory. So when `commit` returns `Ok` the record is on disk, and no reader
//! has seen a batch that is not. Commits that arrive while one is being written are
//! written together (`group.rs`): each batch's preconditions are checked against the state
//! the earlier batches of the group leave, and the ops of those that pass form one record,
//! so one `fdatasync` covers them all and they survive a crash together or not at all
//! (none of them was acknowledged before the sync). Since records are written in turn and each
//! waits for its `fdatasync`, only the last record of the journal can be incomplete after a
//! crash.
//!
//! On open, the snapshot is loaded and the journal replayed over it, up to the empty lines
//! written ahead. The first record that is incomplete or fails its checksum ends the
//! replay. If no valid record follows it, it is a torn tail: the commit that wrote it never
//! returned `Ok`, so it is discarded, and the file is truncated to the last good record so
//! that later records start clean. If a valid
//! record does follow, committed data lies beyond the damage; open fails with
//! [`Error::Io`] naming the file and offset rather than silently dropping it. (A last record
//! damaged after its commit returned cannot be told apart from a torn one, and is dropped.)
//!
//! If a journal write or `fdatasync` fails, the store refuses every later commit until it is
//! reopened: after a failed `fsync` the kernel may have dropped the dirty pages, so nothing
//! more can be safely appended behind them.
//!
//! # Compaction
//!
//! [`FileStore::compact`] (also run automatically once the journal outgrows a threshold)
//! writes the state to `snapshot.tmp` (each value copied from where it is), fsyncs it, renames it over `snapshot`,
//! fsyncs the directory, and only then empties the journal and fsyncs it. A crash at any
//! point reopens to the same state:
//! - before the rename, the old snapshot and the full journal are intact (the leftover
//!   `snapshot.tmp` is ignored and deleted);
//! - after the rename but before the journal is emptied, the new snapshot already contains
//!   the effect of every journal record, and the journal is replayed over it once more. That
//!   replay changes nothing: every op is a put or delete of an absolute value, so the value
//!   of each key after replaying a journal depends only on the last op in it for that key,
//!   not on the state it started from; keys the journal does not touch keep their snapshot
//!   value. Replaying a journal over a state that already includes it is the identity.
//!   This needs the snapshot to include *everything* in the journal, which holds because
//!   the writer lock is held throughout, so the snapshot is the state after the last record.
//! - after the journal is emptied, the snapshot alone is the state.
//!
//! Once the new snapshot is in place, and before the journal is emptied, every value's
//! place is moved to the new snapshot; readers keep the old snapshot's file open until then,
//! so a read never meets a file that no longer holds its value.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError, RwLock};

use crate::group::Group;
use crate::mem::{Keyspaces, check_group};
use crate::wal::{FILL, Wal};
use crate::{Batch, Bytes, Error, Op, Result, Scan, Store, check_keyspace};

const JOURNAL: &str = "journal.log";
const SNAPSHOT: &str = "snapshot";
const SNAPSHOT_TMP: &str = "snapshot.tmp";
const LOCK: &str = "LOCK";

/// The journal size past which a commit triggers compaction, unless configured otherwise.
const DEFAULT_COMPACT_THRESHOLD: u64 = 64 * 1024 * 1024;

/// How many puts go into one snapshot record, so that a large state does not become one
/// huge record that must be buffered whole to check its checksum.
const SNAPSHOT_RECORD_OPS: usize = 1024;

/// A header is `batch <len> <crc>\n`; anything longer without a newline is not a header.
const MAX_HEADER: usize = 64;

/// Values of up to this many bytes are kept in memory; longer ones are read from the file
/// that holds them.
pub const INLINE_MAX: usize = 64;

/// Where a value is.
#[derive(Debug, Clone)]
enum Slot {
    /// In memory.
    Inline(Bytes),
    /// As the escaped text of its token (without the quotes), `len` bytes at `at`.
    Disk { file: Which, at: u64, len: u64 },
}

/// The file a value's text is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Snapshot,
    Journal,
}

/// What readers need: the index, and the files its values are in.
struct State {
    index: Keyspaces<Slot>,
    /// The snapshot the index's `Snapshot` places are in (absent before the first one).
    snapshot: Option<File>,
    /// The journal, for reading.
    journal: File,
}

impl State {
    /// The value `slot` stands for.
    fn value(&self, slot: &Slot) -> Result<Bytes> {
        match slot {
            Slot::Inline(v) => Ok(v.clone()),
            Slot::Disk { file, at, len } => {
                let text = self.text(*file, *at, *len)?;
                unescape(&text)
                    .map_err(|why| Error::Io(format!("{:?} at offset {at}: {why}", file)))
            }
        }
    }

    /// The escaped text of a value on disk.
    fn text(&self, which: Which, at: u64, len: u64) -> Result<Vec<u8>> {
        let file = match which {
            Which::Snapshot => self.snapshot.as_ref().ok_or_else(|| {
                Error::Io("a value is placed in a snapshot that is not open".to_owned())
            })?,
            Which::Journal => &self.journal,
        };
        let mut text = vec![0; len as usize];
        file.read_exact_at(&mut text, at).map_err(|e| {
            Error::Io(format!(
                "reading a value of {len} bytes at offset {at} of the {which:?}: {e}"
            ))
        })?;
        Ok(text)
    }

    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.index
            .get(keyspace, key)
            .map(|slot| self.value(slot))
            .transpose()
    }

    fn values(&self, entries: Vec<(Bytes, Slot)>) -> Result<Vec<(Bytes, Bytes)>> {
        entries
            .into_iter()
            .map(|(k, slot)| Ok((k, self.value(&slot)?)))
            .collect()
    }
}

/// One op as the index takes it: a put's value is given when it may be short enough to
/// keep in memory, and its escaped text's place in the payload always.
enum Entry {
    Put {
        keyspace: String,
        key: Bytes,
        value: Option<Bytes>,
        text: Range<usize>,
    },
    Delete {
        keyspace: String,
        key: Bytes,
    },
}

/// A value whose escaped text is longer than this decodes to more than [`INLINE_MAX`]
/// bytes (an escape is three bytes for one), so replay need not decode it.
const DECODE_MAX: usize = 3 * INLINE_MAX;

/// Applies one entry to the index: a put's value is kept in memory when short, else
/// placed at its text in the payload at `payload_at` in `file`.
fn apply(index: &mut Keyspaces<Slot>, entry: Entry, file: Which, payload_at: u64) {
    match entry {
        Entry::Put {
            keyspace,
            key,
            value,
            text,
        } => {
            let slot = match value {
                Some(value) if value.len() <= INLINE_MAX => Slot::Inline(value),
                _ => Slot::Disk {
                    file,
                    at: payload_at + text.start as u64,
                    len: (text.end - text.start) as u64,
                },
            };
            index.insert(keyspace, key, slot);
        }
        Entry::Delete { keyspace, key } => index.remove(&keyspace, &key),
    }
}

/// A `replay` callback that places each entry of a record in `index`, its values in `file`.
fn into_index(
    index: &mut Keyspaces<Slot>,
    file: Which,
) -> impl FnMut(&[u8], u64) -> Result<(), String> + '_ {
    move |payload, payload_at| {
        for entry in decode_entries(payload)? {
            apply(index, entry, file, payload_at);
        }
        Ok(())
    }
}

/// What a [`FileStore`] keeps in memory ([`FileStore::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub keys: usize,
    /// The bytes of the keys and of the values kept in memory.
    pub bytes: u64,
}

/// A [`Store`] in a directory holding a journal and a snapshot (see the module docs).
pub struct FileStore {
    dir: PathBuf,
    /// The state (keys, and where each value is), as of the last commit that reached the
    /// disk.
    state: RwLock<State>,
    /// Serialises commits and compactions; owns the journal file.
    writer: Mutex<Writer>,
    /// Commits that arrive together share one append and one `fdatasync`.
    group: Group,
    /// Journal size, in bytes, past which a commit compacts.
    compact_threshold: u64,
    /// An exclusive advisory lock on `LOCK`, held while the store is open, so that two
    /// processes never append to one journal.
    _lock: File,
}

struct Writer {
    /// The journal, written by commits and emptied by compaction.
    journal: Wal,
    /// The snapshot's length (0 without one): the journal compacts once it is longer than
    /// this and the threshold.
    snapshot_len: u64,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.dir)
            .field("compact_threshold", &self.compact_threshold)
            .finish_non_exhaustive()
    }
}

/// How long opening waits for the directory's lock before it says another process holds it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl FileStore {
    /// Opens the store in `dir`, creating the directory and an empty journal if missing,
    /// loading the snapshot, replaying the journal and cutting off a torn tail.
    ///
    /// One process at a time: the directory's lock file is held while the store is open. A
    /// lock still held a moment after its owner closed it (a child forked meanwhile shares
    /// it until it execs) is waited for, up to [`LOCK_WAIT`]; one held longer is another
    /// process's, and opening fails.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.exists() {
            fs::create_dir_all(dir).map_err(|e| io_error(dir, "creating", &e))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }

        let lock_path = dir.join(LOCK);
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_error(&lock_path, "opening", &e))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Io(format!(
                        "{}: the store is in use by another process",
                        dir.display()
                    )));
                }
                Err(fs::TryLockError::Error(e)) => return Err(io_error(&lock_path, "locking", &e)),
            }
        }

        let tmp = dir.join(SNAPSHOT_TMP);
        if tmp.exists() {
            tracing::warn!(path = %tmp.display(), "removing a snapshot left by an interrupted compaction");
            fs::remove_file(&tmp).map_err(|e| io_error(&tmp, "removing", &e))?;
        }

        let mut index = Keyspaces::default();
        let snapshot = dir.join(SNAPSHOT);
        let (snapshot_file, snapshot_len) = match File::open(&snapshot) {
            Ok(file) => {
                let (end, damage) =
                    replay(&file, &snapshot, into_index(&mut index, Which::Snapshot))?;
                // The snapshot is complete whenever it exists (it is only ever renamed into
                // place whole), so any damage in it is corruption, never a torn tail.
                if damage.is_some() {
                    return Err(Error::Io(format!(
                        "{}: corrupt record at offset {end}{}",
                        snapshot.display(),
                        damage.map(|d| format!(": {d}")).unwrap_or_default()
                    )));
                }
                (Some(file), end)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, 0),
            Err(e) => return Err(io_error(&snapshot, "reading", &e)),
        };

        let path = dir.join(JOURNAL);
        let journal = Wal::open(&path, into_index(&mut index, Which::Journal))?;
        let reader = journal.reader()?;

        Ok(FileStore {
            _lock: lock,
            dir: dir.to_owned(),
            state: RwLock::new(State {
                index,
                snapshot: snapshot_file,
                journal: reader,
            }),
            writer: Mutex::new(Writer {
                journal,
                snapshot_len,
            }),
            group: Group::default(),
            compact_threshold: DEFAULT_COMPACT_THRESHOLD,
        })
    }

    /// Sets the journal size, in bytes, past which a commit compacts the store (64 MiB
    /// unless set). The journal also grows to the snapshot's size before it compacts, so
    /// that each compaction, which rewrites the whole state, follows at least as many bytes
    /// of commits: the cost of compacting stays proportional to what is written, and the
    /// files on disk within twice the state plus the threshold.
    pub fn with_compact_threshold(mut self, bytes: u64) -> Self {
        self.compact_threshold = bytes;
        self
    }

    /// What the store holds in memory: its number of keys, and the bytes of those keys and
    /// of the values short enough to be kept with them (at most [`INLINE_MAX`] each). The
    /// maps around them add some 80 bytes per key. Walks every key.
    pub fn memory(&self) -> Memory {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut memory = Memory { keys: 0, bytes: 0 };
        for (_, key, slot) in state.index.iter() {
            memory.keys += 1;
            memory.bytes += key.len() as u64;
            if let Slot::Inline(v) = slot {
                memory.bytes += v.len() as u64;
            }
        }
        memory
    }

    /// Writes the whole state into a new snapshot and empties the journal.
    pub fn compact(&self) -> Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.compact_locked(&mut writer)
    }

    fn compact_locked(&self, writer: &mut Writer) -> Result<()> {
        if let Some(reason) = writer.journal.poisoned() {
            return Err(Error::Io(reason.to_owned()));
        }
        let tmp = self.dir.join(SNAPSHOT_TMP);
        let places = match self.write_snapshot(&tmp) {
            Ok(places) => places,
            Err(e) => {
                // The old snapshot and the journal are untouched, so the store stays usable.
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let snapshot = self.dir.join(SNAPSHOT);
        fs::rename(&tmp, &snapshot)
            .map_err(|e| io_error(&snapshot, "renaming the new snapshot to", &e))?;
        sync_dir(&self.dir)?;
        // Until here readers used the old snapshot's file, which stays open; if the new one
        // cannot be opened they still do, and the journal is kept, so nothing is lost.
        let file = File::open(&snapshot).map_err(|e| io_error(&snapshot, "opening", &e))?;
        writer.snapshot_len = file
            .metadata()
            .map_err(|e| io_error(&snapshot, "reading", &e))?
            .len();
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            // The writer lock is held, so the index has not changed since the snapshot was
            // written from it, and its entries come in the same order.
            for (slot, new) in state.index.values_mut().zip(places) {
                *slot = new;
            }
            state.snapshot = Some(file);
        }

        let compacted_bytes = writer.journal.len();
        // A journal that may or may not be empty reopens correctly over the new snapshot.
        writer.journal.clear()?;
        tracing::debug!(dir = %self.dir.display(), compacted_bytes, "compacted the store");
        Ok(())
    }

    /// Writes the current state to `path` and fsyncs it, copying each value's text from
    /// where it is. Returns every entry's place in the new snapshot, in index order.
    fn write_snapshot(&self, path: &Path) -> Result<Vec<Slot>> {
        let file = File::create(path).map_err(|e| io_error(path, "creating", &e))?;
        let mut out = BufWriter::new(file);
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let mut places = Vec::with_capacity(state.index.len());
        let mut written: u64 = 0;
        let mut payload = Vec::new();
        // Entries of the record being built: (index in `places`, the value's text in it).
        let mut pending: Vec<(usize, Range<usize>)> = Vec::new();
        let mut flush = |payload: &mut Vec<u8>,
                         pending: &mut Vec<(usize, Range<usize>)>,
                         places: &mut Vec<Slot>|
         -> Result<()> {
            let record = frame(payload);
            let payload_at = written + (record.len() - payload.len()) as u64;
            for (i, text) in pending.drain(..) {
                if let Slot::Disk { file, at, len } = &mut places[i] {
                    *file = Which::Snapshot;
                    *at = payload_at + text.start as u64;
                    *len = (text.end - text.start) as u64;
                }
            }
            out.write_all(&record)
                .map_err(|e| io_error(path, "writing", &e))?;
            written += record.len() as u64;
            payload.clear();
            Ok(())
        };
        for (keyspace, key, slot) in state.index.iter() {
            payload.extend_from_slice(b"put ");
            quote(&mut payload, keyspace.as_bytes());
            payload.push(b' ');
            quote(&mut payload, key);
            payload.push(b' ');
            match slot {
                Slot::Inline(value) => {
                    quote(&mut payload, value);
                    places.push(slot.clone());
                }
                Slot::Disk { file, at, len } => {
                    payload.push(b'"');
                    let start = payload.len();
                    payload.extend_from_slice(&state.text(*file, *at, *len)?);
                    pending.push((places.len(), start..payload.len()));
                    payload.push(b'"');
                    places.push(slot.clone());
                }
            }
            payload.push(b'\n');
            if places.len() % SNAPSHOT_RECORD_OPS == 0 {
                flush(&mut payload, &mut pending, &mut places)?;
            }
        }
        drop(state);
        if !payload.is_empty() {
            flush(&mut payload, &mut pending, &mut places)?;
        }
        let file = out
            .into_inner()
            .map_err(|e| io_error(path, "writing", e.error()))?;
        file.sync_all().map_err(|e| io_error(path, "syncing", &e))?;
        Ok(places)
    }

    /// Commits a group of batches (see `group.rs`): each checked, in order, against the
    /// state the earlier ones of the group leave; the ops of those that pass appended as one
    /// record with one write and one `fdatasync`; then all applied in memory. One record,
    /// so that a crash during the write leaves a torn tail and nothing behind it.
    fn write_group(&self, batches: Vec<Batch>) -> Vec<Result<()>> {
        // The state changes only under the writer lock, so the preconditions checked here
        // still hold when the ops are applied below.
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(reason) = writer.journal.poisoned() {
            return batches
                .iter()
                .map(|_| Err(Error::Io(reason.to_owned())))
                .collect();
        }
        let mut payload = Vec::new();
        let mut results = {
            let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
            check_group(&batches, |keyspace, key| state.get(keyspace, key))
        };
        // For each batch written, each op's value text in the payload (empty for a delete).
        let written: Vec<Option<Vec<Range<usize>>>> = results
            .iter()
            .zip(&batches)
            .map(|(result, batch)| {
                (result.is_ok() && !batch.ops.is_empty()).then(|| encode(batch, &mut payload))
            })
            .collect();
        if payload.is_empty() {
            return results;
        }
        let payload_at = match writer.journal.append(&payload) {
            Ok(at) => at,
            Err(e) => {
                for (result, w) in results.iter_mut().zip(&written) {
                    if w.is_some() {
                        *result = Err(e.clone());
                    }
                }
                return results;
            }
        };

        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        for (batch, w) in batches.into_iter().zip(written) {
            let Some(texts) = w else {
                continue;
            };
            for (op, text) in batch.ops.into_iter().zip(texts) {
                let entry = match op {
                    Op::Put {
                        keyspace,
                        key,
                        value,
                    } => Entry::Put {
                        keyspace,
                        key,
                        value: Some(value),
                        text,
                    },
                    Op::Delete { keyspace, key } => Entry::Delete { keyspace, key },
                };
                apply(&mut state.index, entry, Which::Journal, payload_at);
            }
        }
        drop(state);

        if writer.journal.len() > self.compact_threshold.max(writer.snapshot_len) {
            // The batches are durable already, so a failed compaction must not turn these
            // commits into errors; the next commit over the threshold tries again.
            if let Err(e) = self.compact_locked(&mut writer) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "compaction failed");
            }
        }
        results
    }
}

impl Store for FileStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        check_keyspace(keyspace)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.get(keyspace, key)
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.values(state.index.scan_prefix(keyspace, prefix))
    }

    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>> {
        check_keyspace(keyspace)?;
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.values(state.index.scan(keyspace, scan))
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        self.group
            .commit(batch, |batches| self.write_group(batches))
    }

    fn backend(&self) -> &'static str {
        "file"
    }
}

/// Appends a batch's ops to a journal payload; returns each op's value text in it (empty
/// for a delete).
pub(crate) fn encode(batch: &Batch, payload: &mut Vec<u8>) -> Vec<Range<usize>> {
    let mut texts = Vec::with_capacity(batch.ops.len());
    for op in &batch.ops {
        match op {
            Op::Put {
                keyspace,
                key,
                value,
            } => texts.push(encode_put(payload, keyspace, key, value)),
            Op::Delete { keyspace, key } => {
                payload.extend_from_slice(b"del ");
                quote(payload, keyspace.as_bytes());
                payload.push(b' ');
                quote(payload, key);
                payload.push(b'\n');
                texts.push(0..0);
            }
        }
    }
    texts
}

pub(crate) fn io_error(path: &Path, doing: &str, e: &dyn std::fmt::Display) -> Error {
    Error::Io(format!("{doing} {}: {e}", path.display()))
}

/// Fsyncs a directory, so that files created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(dir, "syncing directory", &e))
}

/// Replays the records of `file` (at `path`) a record at a time: `each` gets a record's
/// payload and the payload's offset in the file.
///
/// Returns the offset just past the last good record and, if it stopped short of the end
/// before anything but the journal's fill (`wal.rs`), what was wrong with the record
/// there. Fails if a good record follows a bad one, or if a record with a good checksum
/// does not parse (`each` fails: no torn write can do that).
pub(crate) fn replay(
    file: &File,
    path: &Path,
    mut each: impl FnMut(&[u8], u64) -> Result<(), String>,
) -> Result<(u64, Option<String>)> {
    let total = file
        .metadata()
        .map_err(|e| io_error(path, "reading", &e))?
        .len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut pos = 0u64;
    let (mut header, mut payload) = (Vec::new(), Vec::new());
    while pos < total {
        match next_record(&mut reader, total - pos, &mut header, &mut payload) {
            Ok(header_len) => {
                let payload_at = pos + header_len as u64;
                each(&payload, payload_at).map_err(|why| {
                    Error::Io(format!("{}: record at offset {pos}: {why}", path.display()))
                })?;
                pos = payload_at + payload.len() as u64;
            }
            Err(damage) => {
                // Whether committed data lies past the damage: the rest of the file, read
                // only in this case.
                let mut rest = vec![0; (total - pos) as usize];
                file.read_exact_at(&mut rest, pos)
                    .map_err(|e| io_error(path, "reading", &e))?;
                if rest.iter().all(|&b| b == FILL) {
                    return Ok((pos, None));
                }
                if let Some(good) = next_good_record(&rest, 0) {
                    return Err(Error::Io(format!(
                        "{}: corrupt record at offset {pos} ({damage}) followed by a valid \
                         record at offset {}; refusing to drop committed data",
                        path.display(),
                        pos + good as u64
                    )));
                }
                return Ok((pos, Some(damage)));
            }
        }
    }
    Ok((pos, None))
}

/// Reads the next record of `reader`, at most `remaining` bytes long, into `header` and
/// `payload`; returns the header's length, or what is wrong with the record.
fn next_record(
    reader: &mut impl BufRead,
    remaining: u64,
    header: &mut Vec<u8>,
    payload: &mut Vec<u8>,
) -> Result<usize, String> {
    header.clear();
    reader
        .by_ref()
        .take(MAX_HEADER as u64)
        .read_until(b'\n', header)
        .map_err(|e| e.to_string())?;
    let Some(line) = header.strip_suffix(b"\n") else {
        return Err("no complete header line".to_owned());
    };
    let (len, crc) = parse_header(line)?;
    if len as u64 > remaining - header.len() as u64 {
        return Err(format!("payload of {len} bytes is incomplete"));
    }
    payload.clear();
    payload.resize(len, 0);
    reader
        .read_exact(payload)
        .map_err(|_| format!("payload of {len} bytes is incomplete"))?;
    if crc32(payload) != crc {
        return Err("checksum mismatch".to_owned());
    }
    Ok(header.len())
}

/// The payload length and checksum a header line (without its newline) gives.
fn parse_header(line: &[u8]) -> Result<(usize, u32), String> {
    let header = std::str::from_utf8(line).map_err(|_| "header is not text".to_owned())?;
    let fields: Vec<&str> = header.split(' ').collect();
    match fields.as_slice() {
        ["batch", len, crc] if crc.len() == 8 => Ok((
            len.parse::<usize>()
                .map_err(|_| format!("bad length in header {header:?}"))?,
            u32::from_str_radix(crc, 16)
                .map_err(|_| format!("bad checksum in header {header:?}"))?,
        )),
        _ => Err(format!("malformed header {header:?}")),
    }
}

/// Reads the record at `pos`: its payload and the offset just past it, or what is wrong.
fn read_record(data: &[u8], pos: usize) -> Result<(&[u8], usize), String> {
    let rest = &data[pos..];
    let Some(newline) = rest.iter().take(MAX_HEADER).position(|&b| b == b'\n') else {
        return Err("no complete header line".to_owned());
    };
    let (len, crc) = parse_header(&rest[..newline])?;
    let start = newline + 1;
    let payload = rest
        .get(start..start.saturating_add(len))
        .ok_or_else(|| format!("payload of {len} bytes is incomplete"))?;
    if crc32(payload) != crc {
        return Err("checksum mismatch".to_owned());
    }
    Ok((payload, pos + start + len))
}

/// The offset of the first valid record after `pos`, if any.
///
/// Every record starts at the beginning of a line and no payload line starts with
/// `batch `, so only line starts need to be tried.
fn next_good_record(data: &[u8], pos: usize) -> Option<usize> {
    (pos + 1..data.len())
        .filter(|&i| data[i - 1] == b'\n' && data[i..].starts_with(b"batch "))
        .find(|&i| read_record(data, i).is_ok())
}

/// Wraps a payload in a record: its header line, then the payload.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut record = header(payload);
    record.extend_from_slice(payload);
    record
}

/// The header line of a record of `payload`.
pub(crate) fn header(payload: &[u8]) -> Vec<u8> {
    format!("batch {} {:08x}\n", payload.len(), crc32(payload)).into_bytes()
}

/// Writes a put line; returns where the value's escaped text is in `out` (between its
/// quotes).
fn encode_put(out: &mut Vec<u8>, keyspace: &str, key: &[u8], value: &[u8]) -> Range<usize> {
    out.extend_from_slice(b"put ");
    quote(out, keyspace.as_bytes());
    out.push(b' ');
    quote(out, key);
    out.push(b' ');
    let start = out.len() + 1;
    quote(out, value);
    let text = start..out.len() - 1;
    out.push(b'\n');
    text
}

/// Writes `bytes` as a quoted token: printable ASCII as is, except `"`, `%` and space,
/// and everything else as `%XX`. The token never contains a space or a newline.
fn quote(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let plain = |b: u8| b.is_ascii_graphic() && b != b'"' && b != b'%';
    out.reserve(bytes.len() + 2);
    out.push(b'"');
    let mut rest = bytes;
    // Runs of bytes that stand for themselves are copied whole.
    while let Some(i) = rest.iter().position(|&b| !plain(b)) {
        out.extend_from_slice(&rest[..i]);
        let b = rest[i];
        out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
    out.push(b'"');
}

fn unquote(token: &str) -> Result<Bytes, String> {
    let inner = token
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .ok_or_else(|| format!("token {token:?} is not quoted"))?;
    unescape(inner.as_bytes()).map_err(|why| format!("{why} in token {token:?}"))
}

/// The bytes a token's escaped text (between its quotes) stands for.
fn unescape(bytes: &[u8]) -> Result<Bytes, String> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad escape at byte {i}"))?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn decode_keyspace(token: &str) -> Result<String, String> {
    let name = String::from_utf8(unquote(token)?)
        .map_err(|_| format!("keyspace {token:?} is not UTF-8"))?;
    check_keyspace(&name).map_err(|e| e.to_string())?;
    Ok(name)
}

/// The ops of a payload, each value unescaped.
pub(crate) fn decode_payload(payload: &[u8]) -> Result<Vec<Op>, String> {
    decode_entries(payload)?
        .into_iter()
        .map(|entry| match entry {
            Entry::Put {
                keyspace,
                key,
                value,
                text,
            } => Ok(Op::Put {
                keyspace,
                key,
                value: match value {
                    Some(v) => v,
                    None => unescape(&payload[text])?,
                },
            }),
            Entry::Delete { keyspace, key } => Ok(Op::Delete { keyspace, key }),
        })
        .collect()
}

/// The ops of a payload, each put with where its value's escaped text is in the payload
/// (between its quotes) and, unless that text is too long for the value to be kept in
/// memory ([`DECODE_MAX`]), the value.
fn decode_entries(payload: &[u8]) -> Result<Vec<Entry>, String> {
    let text = std::str::from_utf8(payload).map_err(|_| "payload is not text".to_owned())?;
    let body = text
        .strip_suffix('\n')
        .ok_or_else(|| "payload does not end with a newline".to_owned())?;
    let mut line_at = 0;
    body.split('\n')
        .map(|line| {
            let at = line_at;
            line_at += line.len() + 1;
            match line.split(' ').collect::<Vec<_>>().as_slice() {
                ["put", keyspace, key, value] => {
                    let inner = value
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .ok_or_else(|| format!("token {value:?} is not quoted"))?;
                    // The text's place in the payload, from where the slices start.
                    let start = at + (inner.as_ptr() as usize - line.as_ptr() as usize);
                    Ok(Entry::Put {
                        keyspace: decode_keyspace(keyspace)?,
                        key: unquote(key)?,
                        value: if inner.len() > DECODE_MAX {
                            None
                        } else {
                            Some(unquote(value)?)
                        },
                        text: start..start + inner.len(),
                    })
                }
                ["del", keyspace, key] => Ok(Entry::Delete {
                    keyspace: decode_keyspace(keyspace)?,
                    key: unquote(key)?,
                }),
                _ => Err(format!("malformed op line {line:?}")),
            }
        })
        .collect()
}

/// CRC-32 (IEEE 802.3, reflected, as in zlib and gzip).
fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn quoting_round_trips_every_byte() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        quote(&mut out, &all);
        let token = String::from_utf8(out).unwrap();
        assert!(!token.contains(' ') && !token.contains('\n'));
        assert_eq!(unquote(&token).unwrap(), all);
        assert_eq!(unquote("\"\"").unwrap(), b"");
    }

    #[test]
    fn the_module_docs_show_a_real_record() {
        let mut payload = Vec::new();
        encode_put(&mut payload, "nodes", b"node-17", br#"{"state":"ready"}"#);
        payload.extend_from_slice(b"del \"locks\" \"node-17\"\n");
        let record = String::from_utf8(frame(&payload)).unwrap();
        let docs = include_str!("file.rs");
        let shown: String = record.lines().map(|line| format!("//! {line}\n")).collect();
        assert!(
            docs.contains(&shown),
            "update the module docs to:\n{record}"
        );
    }

    #[test]
    fn a_record_reads_back() {
        let mut payload = Vec::new();
        encode_put(&mut payload, "nodes", b"node 1", b"{\"a\":1}");
        let record = frame(&payload);
        let (read, end) = read_record(&record, 0).unwrap();
        assert_eq!(end, record.len());
        let ops = decode_payload(read).unwrap();
        assert_eq!(
            ops,
            vec![Op::Put {
                keyspace: "nodes".into(),
                key: b"node 1".to_vec(),
                value: b"{\"a\":1}".to_vec()
            }]
        );
        assert!(String::from_utf8(record).unwrap().contains("\"node%201\""));
    }
}
