//! metalgraph's storage: a small, storage-shaped trait and its backends.
//!
//! The engine keeps everything it knows in a [`Store`]: named keyspaces mapping byte keys
//! to byte values, read with point lookups and prefix scans, and written only through
//! atomic, durable, multi-key [`Batch`] commits guarded by compare-and-swap
//! [`Precondition`]s. Records (workflows, tasks, nodes, definitions) are serialised above
//! this layer; the store never interprets values.
//!
//! Backends:
//! - [`SledStore`]: the embedded default, on the `sled` crate.
//! - [`FileStore`]: a directory holding an append-only, checksummed journal of commits,
//!   readable with ordinary tools.
//! - [`PgStore`]: PostgreSQL, which several replicas share (docs/scale-out.md).
//! - [`MemStore`]: an in-memory map with the same semantics and no durability, for unit
//!   tests of the layers above and as the reference model of the others.
//!
//! Every backend passes the same conformance suite (`tests/conformance.rs`).

mod file;
mod group;
mod mem;
mod postgres;
mod sled_store;
mod wal;

use std::fmt;
use std::ops::Bound;

pub use file::{FileStore, Memory};
pub use mem::MemStore;
pub use postgres::{PgOptions, PgStore};
pub use sled_store::SledStore;

/// A key or a value: plain bytes.
pub type Bytes = Vec<u8>;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A precondition of a [`Batch`] did not hold; nothing in the batch was applied.
    /// Carries the index of the first failing precondition in `Batch::preconditions`.
    #[error("precondition {index} failed on {keyspace}/{key}")]
    Conflict {
        index: usize,
        keyspace: String,
        key: String,
    },
    /// The backend could not read or write its data (I/O error, corruption that cannot be
    /// repaired by discarding a torn tail, ...). The message names the path or record.
    #[error("store I/O error: {0}")]
    Io(String),
    /// The keyspace name is not acceptable (empty, or contains `/` or a control character).
    #[error("invalid keyspace name {0:?}")]
    InvalidKeyspace(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One write inside a [`Batch`].
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    /// Set `keyspace/key` to `value`, creating or replacing it.
    Put {
        keyspace: String,
        key: Bytes,
        value: Bytes,
    },
    /// Remove `keyspace/key`; removing an absent key is not an error.
    Delete { keyspace: String, key: Bytes },
}

impl Op {
    /// The key the op writes and the value it leaves there (`None` for a delete).
    pub fn effect(&self) -> (&str, &[u8], Option<&[u8]>) {
        match self {
            Op::Put {
                keyspace,
                key,
                value,
            } => (keyspace, key, Some(value)),
            Op::Delete { keyspace, key } => (keyspace, key, None),
        }
    }
}

/// A condition that must hold, against the state before the batch, for a batch to apply.
#[derive(Clone, PartialEq, Eq)]
pub enum Precondition {
    /// `keyspace/key` must not exist.
    Absent { keyspace: String, key: Bytes },
    /// `keyspace/key` must exist and hold exactly `value`.
    Equals {
        keyspace: String,
        key: Bytes,
        value: Bytes,
    },
}

impl Precondition {
    fn target(&self) -> (&str, &[u8]) {
        match self {
            Precondition::Absent { keyspace, key } | Precondition::Equals { keyspace, key, .. } => {
                (keyspace, key)
            }
        }
    }

    /// Whether the condition holds given the key's current value.
    pub fn holds(&self, current: Option<&[u8]>) -> bool {
        match self {
            Precondition::Absent { .. } => current.is_none(),
            Precondition::Equals { value, .. } => current == Some(value.as_slice()),
        }
    }

    /// The [`Error::Conflict`] reported when this condition, at `index`, fails.
    pub fn conflict(&self, index: usize) -> Error {
        let (keyspace, key) = self.target();
        Error::Conflict {
            index,
            keyspace: keyspace.to_owned(),
            key: String::from_utf8_lossy(key).into_owned(),
        }
    }
}

/// An atomic unit of change: every precondition is checked, then every op is applied in
/// order (a later op on the same key wins), all or nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub preconditions: Vec<Precondition>,
    pub ops: Vec<Op>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.preconditions.is_empty() && self.ops.is_empty()
    }

    pub fn put(
        &mut self,
        keyspace: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        self.ops.push(Op::Put {
            keyspace: keyspace.to_owned(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn delete(&mut self, keyspace: &str, key: impl Into<Bytes>) -> &mut Self {
        self.ops.push(Op::Delete {
            keyspace: keyspace.to_owned(),
            key: key.into(),
        });
        self
    }

    pub fn require_absent(&mut self, keyspace: &str, key: impl Into<Bytes>) -> &mut Self {
        self.preconditions.push(Precondition::Absent {
            keyspace: keyspace.to_owned(),
            key: key.into(),
        });
        self
    }

    pub fn require_equals(
        &mut self,
        keyspace: &str,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> &mut Self {
        self.preconditions.push(Precondition::Equals {
            keyspace: keyspace.to_owned(),
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Appends another batch's preconditions and ops after this one's.
    pub fn extend(&mut self, other: Batch) {
        self.preconditions.extend(other.preconditions);
        self.ops.extend(other.ops);
    }
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Put {
                keyspace,
                key,
                value,
            } => write!(
                f,
                "Put({keyspace}/{}, {} bytes)",
                String::from_utf8_lossy(key),
                value.len()
            ),
            Op::Delete { keyspace, key } => {
                write!(f, "Delete({keyspace}/{})", String::from_utf8_lossy(key))
            }
        }
    }
}

impl fmt::Debug for Precondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (keyspace, key) = self.target();
        let key = String::from_utf8_lossy(key);
        match self {
            Precondition::Absent { .. } => write!(f, "Absent({keyspace}/{key})"),
            Precondition::Equals { value, .. } => {
                write!(f, "Equals({keyspace}/{key}, {} bytes)", value.len())
            }
        }
    }
}

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("preconditions", &self.preconditions)
            .field("ops", &self.ops)
            .finish()
    }
}

/// Checks a keyspace name: non-empty, at most 64 bytes, no `/`, no control characters.
pub fn check_keyspace(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.contains('/')
        && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidKeyspace(name.to_owned()))
    }
}

/// The storage contract every backend meets.
///
/// - **Reads** ([`get`](Store::get), [`scan_prefix`](Store::scan_prefix)) see every batch
///   whose `commit` has returned, and never a part of a batch.
/// - **Writes** happen only through [`commit`](Store::commit): all preconditions are checked
///   against the current state and, if all hold, every op is applied, atomically with respect
///   to concurrent commits and reads. When `commit` returns `Ok`, the batch is durable: it
///   survives a process crash (SIGKILL) and an OS crash, within what `fsync` guarantees.
///   When it returns `Err`, nothing of the batch was applied.
/// - A keyspace exists implicitly once a key is put into it; reading an unknown keyspace
///   yields nothing.
/// - Implementations are safe to share between threads; every method may block on I/O, so
///   async callers run them where blocking is acceptable.
pub trait Store: Send + Sync + 'static {
    /// The value at `keyspace/key`, if any.
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>>;

    /// Every entry of `keyspace` whose key starts with `prefix`, in ascending key order.
    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>>;

    /// One page of the entries of `keyspace` whose keys start with `scan.prefix`: at most
    /// `scan.limit` of them, in ascending key order (descending when `scan.reverse`),
    /// beginning after `scan.after` (before it, when reverse) when given. A page costs
    /// O(page), whatever the keyspace holds: lists and sweeps over history page through
    /// index keyspaces with it.
    fn scan(&self, keyspace: &str, scan: Scan<'_>) -> Result<Vec<(Bytes, Bytes)>>;

    /// Applies `batch` atomically and durably, or not at all (see the trait docs).
    /// A failed precondition yields [`Error::Conflict`] naming the first one that failed.
    fn commit(&self, batch: Batch) -> Result<()>;

    /// Flushes anything buffered and releases resources; called on orderly shutdown.
    /// Commits are already durable, so this is never needed for correctness.
    fn close(&self) -> Result<()> {
        Ok(())
    }

    /// A short name of the backend for logs and health output (`"sled"`, `"file"`).
    fn backend(&self) -> &'static str;

    /// The store's clock, in milliseconds since the Unix epoch. Replicas that share a
    /// database measure their leases on its clock, so that their own clocks need not
    /// agree; an embedded store answers with the system clock. Wrappers forward it.
    fn now_ms(&self) -> Result<u64> {
        Ok(system_now_ms())
    }
}

/// The system clock in milliseconds since the Unix epoch.
pub fn system_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A range of keys: its lower and upper bounds.
pub type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// What [`Store::scan`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan<'a> {
    /// Only keys that start with this.
    pub prefix: &'a [u8],
    /// Only keys after this one (before it when `reverse`); it need not exist.
    pub after: Option<&'a [u8]>,
    /// The most entries returned.
    pub limit: usize,
    /// Descending key order.
    pub reverse: bool,
}

impl<'a> Scan<'a> {
    /// The first `limit` keys with `prefix`, ascending.
    pub fn prefix(prefix: &'a [u8], limit: usize) -> Self {
        Scan {
            prefix,
            after: None,
            limit,
            reverse: false,
        }
    }

    pub fn after(self, after: Option<&'a [u8]>) -> Self {
        Scan { after, ..self }
    }

    pub fn reverse(self) -> Self {
        Scan {
            reverse: true,
            ..self
        }
    }

    /// The key range the scan covers, as bounds for ordered maps; `None` when it is
    /// empty. With a prefix the upper bound is the prefix's successor (none when the prefix
    /// is all `0xff`). The bounds are always well-formed (start below end).
    pub fn bounds(&self) -> Option<KeyRange> {
        let end = prefix_successor(self.prefix);
        let below_end = |k: &[u8]| end.as_deref().is_none_or(|e| k < e);
        let lo = Bound::Included(self.prefix.to_vec());
        let hi = match &end {
            Some(e) => Bound::Excluded(e.clone()),
            None => Bound::Unbounded,
        };
        match self.after {
            None => Some((lo, hi)),
            Some(after) if !self.reverse => {
                if after < self.prefix {
                    Some((lo, hi))
                } else if below_end(after) {
                    // Keys in (after, end): empty but well-formed when after + 1 == end.
                    Some((Bound::Excluded(after.to_vec()), hi))
                } else {
                    None
                }
            }
            Some(after) => {
                if after <= self.prefix {
                    None
                } else if below_end(after) {
                    Some((lo, Bound::Excluded(after.to_vec())))
                } else {
                    Some((lo, hi))
                }
            }
        }
    }
}

/// The smallest key greater than every key starting with `prefix`, if one exists.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Which backend to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sled,
    File,
    Postgres,
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "sled" => Ok(Backend::Sled),
            "file" => Ok(Backend::File),
            "postgres" => Ok(Backend::Postgres),
            other => Err(format!(
                "unknown store backend {other:?} (expected sled, file or postgres)"
            )),
        }
    }
}

/// Opens the chosen backend in `dir` (created if missing). PostgreSQL needs
/// [`OpenOptions::database`]: see [`open_with`].
pub fn open(backend: Backend, dir: &std::path::Path) -> Result<std::sync::Arc<dyn Store>> {
    open_with(backend, dir, &OpenOptions::default())
}

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// sled's page cache, in bytes (the file store has none: it keeps its keys in memory
    /// and reads values from its files, through the kernel's page cache).
    pub sled_cache_bytes: u64,
    /// The database of the PostgreSQL backend.
    pub database: Option<PgOptions>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            sled_cache_bytes: sled_store::DEFAULT_CACHE_BYTES,
            database: None,
        }
    }
}

/// [`open`] with options.
pub fn open_with(
    backend: Backend,
    dir: &std::path::Path,
    options: &OpenOptions,
) -> Result<std::sync::Arc<dyn Store>> {
    Ok(match backend {
        Backend::Sled => {
            std::sync::Arc::new(SledStore::open_with_cache(dir, options.sled_cache_bytes)?)
        }
        Backend::File => std::sync::Arc::new(FileStore::open(dir)?),
        Backend::Postgres => match &options.database {
            Some(db) => std::sync::Arc::new(PgStore::open(db)?),
            None => {
                return Err(Error::Io(
                    "the postgres store needs a database URL (METALGRAPH_DATABASE_URL, \
                     --database-url, or database_url in the config file)"
                        .into(),
                ));
            }
        },
    })
}
