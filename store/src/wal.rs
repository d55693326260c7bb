//! The write-ahead journal of the embedded stores: the file store's `journal.log`, and
//! `metalgraph.wal` in front of sled (whose own way to make a commit durable costs more
//! than one write and one `fdatasync`: see `sled_store.rs`).
//!
//! Records have the file store's format (`file.rs`): a header line with the payload's
//! length and CRC-32, then the payload, the ops of one group of batches. A commit writes
//! one record and waits for its `fdatasync`, so only the last record can be incomplete
//! after a crash. Opening reads every complete record back, in order; an incomplete or
//! damaged last record (a commit that never returned) is cut off, and a damaged record
//! followed by a good one fails the open rather than drop committed data.
//!
//! # Space written ahead
//!
//! An `fdatasync` after a write that makes a file longer must also write the file's new
//! length to the filesystem's own journal: a second device round trip, which on the
//! disks measured made an append's sync about 1.7 times as long as a sync of a write over
//! space the file already had (`BENCHMARKS.md`). So the journal is written ahead of its
//! records with empty lines ([`FILL`]), [`FILL_AHEAD`] bytes at a time, in the commit that
//! first needs them (one write and sync in about every few hundred), and records are
//! written over them. Replay ends where the fill starts: a record header is never an
//! empty line, and a torn record over the fill fails its checksum. The file stays text;
//! it ends with up to [`FILL_AHEAD`] empty lines.
//!
//! The store the journal stands in front of applies the records it reads back on open,
//! and once it has made their effect durable elsewhere (sled's flush, the file store's
//! snapshot) empties the journal ([`Wal::clear`]). Every op is a put or a delete of an
//! absolute value, so applying a record to a state that already holds it changes nothing:
//! a crash between making the state durable and emptying the journal is harmless.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::file::{header, io_error, replay, sync_dir};
use crate::{Error, Result};

/// What the journal is filled with ahead of its records.
pub(crate) const FILL: u8 = b'\n';

/// How far ahead of its records the journal is filled, each time it runs out.
const FILL_AHEAD: u64 = 1024 * 1024;

/// The fill is written from this, a piece at a time, rather than from a buffer allocated
/// per write.
static FILL_PIECE: [u8; 64 * 1024] = [FILL; 64 * 1024];

/// An open journal, written at the end of its records.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Where the next record starts: the end of the last one.
    len: u64,
    /// The file's length: the records, then the fill.
    filled: u64,
    /// Why commits are refused: a write or sync failed (after which the kernel may have
    /// dropped what it had not written, so nothing can safely be written behind it), or
    /// the store could not apply what the journal holds.
    poisoned: Option<String>,
}

impl Wal {
    /// Opens (creating) the journal at `path`, syncs its directory entry (made now, or by
    /// an open that crashed before syncing it), and replays its records through `each`
    /// (the payload and its offset in the file; see `file::replay`). A damaged last
    /// record is a torn tail, whose commit never returned: it is cut off, with the fill
    /// after it, so that later records do not follow it.
    pub(crate) fn open(
        path: &Path,
        each: impl FnMut(&[u8], u64) -> Result<(), String>,
    ) -> Result<Wal> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(|e| io_error(path, "opening", &e))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        let (len, damage) = replay(&file, path, each)?;
        let mut filled = file
            .metadata()
            .map_err(|e| io_error(path, "reading", &e))?
            .len();
        if let Some(reason) = damage {
            tracing::warn!(
                path = %path.display(),
                offset = len,
                discarded = filled - len,
                reason,
                "discarding the torn tail of the journal"
            );
            file.set_len(len)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error(path, "truncating the torn tail of", &e))?;
            filled = len;
        }
        Ok(Wal {
            file,
            path: path.to_owned(),
            len,
            filled,
            poisoned: None,
        })
    }

    /// The length of the journal's records in bytes (the fill after them not counted).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Another handle on the journal's file, for reading records back by offset.
    pub(crate) fn reader(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| io_error(&self.path, "opening", &e))
    }

    /// Writes a record of `payload` (ops encoded as the file store encodes them) after the
    /// last one, and waits for it to reach the disk. Returns the payload's offset.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<u64> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Io(reason.clone()));
        }
        let header = header(payload);
        let at = self.len + header.len() as u64;
        let end = at + payload.len() as u64;
        let fill_to = (end > self.filled).then_some(end + FILL_AHEAD);
        let written = self
            .file
            .write_all_at(&header, self.len)
            .and_then(|()| self.file.write_all_at(payload, at))
            .and_then(|()| match fill_to {
                Some(to) => fill(&self.file, end, to),
                None => Ok(()),
            })
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: take a partial record back off. Whether the failed commit is
            // found on reopen is unknown (the record may have reached the disk); its
            // caller was told it failed. Refused from here on either way.
            let _ = self.file.set_len(self.len);
            self.filled = self.len;
            let err = io_error(&self.path, "writing to journal", &e);
            self.poisoned = Some(format!("refusing commits until reopened: {err}"));
            return Err(err);
        }
        self.len = end;
        if let Some(to) = fill_to {
            self.filled = to;
        }
        Ok(at)
    }

    /// Empties the journal, once the state it holds is durable elsewhere. A failure
    /// refuses later commits: the journal may or may not be empty, and either reopens
    /// correctly, but writing after a failed sync is not safe.
    pub(crate) fn clear(&mut self) -> Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Io(reason.clone()));
        }
        if let Err(e) = self.file.set_len(0).and_then(|()| self.file.sync_all()) {
            let err = io_error(&self.path, "emptying journal", &e);
            self.poisoned = Some(format!("refusing commits until reopened: {err}"));
            return Err(err);
        }
        self.len = 0;
        self.filled = 0;
        Ok(())
    }

    /// Refuses every later append, with `reason`.
    pub(crate) fn poison(&mut self, reason: String) {
        self.poisoned.get_or_insert(reason);
    }

    /// Why appends are refused, if they are.
    pub(crate) fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }
}

/// Writes the fill over `from..to` of `file`.
fn fill(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let piece = (to - at).min(FILL_PIECE.len() as u64) as usize;
        file.write_all_at(&FILL_PIECE[..piece], at)?;
        at += piece as u64;
    }
    Ok(())
}
