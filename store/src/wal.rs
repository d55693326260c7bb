//! A write-ahead journal for a store whose own way to make a commit durable costs more
//! than one write and one `fdatasync` (sled: see `sled_store.rs`).
//!
//! Records have the file store's format (`file.rs`): a header line with the payload's
//! length and CRC-32, then the payload, the ops of one group of batches. A commit appends
//! one record and waits for its `fdatasync`, so only the last record can be incomplete
//! after a crash. Opening reads every complete record back, in order; an incomplete or
//! damaged last record (a commit that never returned) is cut off, and a damaged record
//! followed by a good one fails the open rather than drop committed data.
//!
//! The store the journal stands in front of applies the records it reads back on open,
//! then makes its own state durable and empties the journal ([`Wal::clear`]); it does the
//! same whenever the journal outgrows a threshold. Every op is a put or a delete of an
//! absolute value, so applying a record to a state that already holds it changes nothing:
//! a crash between making the state durable and emptying the journal is harmless.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::file::{decode_payload, header, open_journal};
use crate::{Error, Op, Result};

/// An open journal, appended to at its end.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    len: u64,
    /// Why commits are refused: a write or sync failed (after which the kernel may have
    /// dropped what it had not written, so nothing can safely be appended behind it), or
    /// the store could not apply what the journal holds.
    poisoned: Option<String>,
}

impl Wal {
    /// Opens (creating) the journal at `path`: the journal and the ops of each of its
    /// complete records, in order (`file::open_journal`, as the file store opens its own).
    pub(crate) fn open(path: &Path) -> Result<(Wal, Vec<Vec<Op>>)> {
        let mut records = Vec::new();
        let (file, len) = open_journal(path, |payload, _| {
            records.push(decode_payload(payload)?);
            Ok(())
        })?;
        let wal = Wal {
            file,
            path: path.to_owned(),
            len,
            poisoned: None,
        };
        Ok((wal, records))
    }

    /// The journal's length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Appends a record of `payload` (ops encoded as the file store encodes them) and waits
    /// for it to reach the disk.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<()> {
        if let Some(reason) = &self.poisoned {
            return Err(Error::Io(reason.clone()));
        }
        let header = header(payload);
        let written = self
            .file
            .write_all(&header)
            .and_then(|()| self.file.write_all(payload))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Best effort: take a partial record back off the end. Whether the failed
            // commit is found on reopen is unknown (the record may have reached the disk);
            // its caller was told it failed. Refused from here on either way.
            let _ = self.file.set_len(self.len);
            let err = Error::Io(format!("appending to journal {}: {e}", self.path.display()));
            self.poisoned = Some(format!("refusing commits until reopened: {err}"));
            return Err(err);
        }
        self.len += (header.len() + payload.len()) as u64;
        Ok(())
    }

    /// Empties the journal, once the state it holds is durable elsewhere.
    pub(crate) fn clear(&mut self) -> Result<()> {
        let io =
            |e: std::io::Error| Error::Io(format!("emptying journal {}: {e}", self.path.display()));
        self.file.set_len(0).map_err(io)?;
        self.len = 0;
        self.file.sync_data().map_err(io)
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
