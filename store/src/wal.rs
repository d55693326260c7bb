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

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::file::{decode_payload, header, next_good_record, read_record};
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
    /// complete records, in order.
    pub(crate) fn open(path: &Path) -> Result<(Wal, Vec<Vec<Op>>)> {
        let io = |doing: &str, e: std::io::Error| {
            Error::Io(format!("{doing} journal {}: {e}", path.display()))
        };
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(|e| io("opening", e))?;
        if let Some(dir) = path.parent() {
            // The file's directory entry, whether made now or by an open that crashed
            // before it synced it.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("syncing the directory of", e))?;
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(|e| io("reading", e))?;
        let mut records = Vec::new();
        let mut pos = 0;
        while pos < data.len() {
            match read_record(&data, pos) {
                Ok((payload, next)) => {
                    let ops = decode_payload(payload).map_err(|why| {
                        Error::Io(format!(
                            "journal {}: record at offset {pos}: {why}",
                            path.display()
                        ))
                    })?;
                    records.push(ops);
                    pos = next;
                }
                Err(damage) => {
                    if let Some(good) = next_good_record(&data, pos) {
                        return Err(Error::Io(format!(
                            "journal {}: corrupt record at offset {pos} ({damage}) followed \
                             by a valid record at offset {good}; refusing to drop committed \
                             data",
                            path.display()
                        )));
                    }
                    // A torn tail: cut off, so that later records do not follow it.
                    tracing::warn!(
                        journal = %path.display(),
                        offset = pos,
                        damage = %damage,
                        "dropping the torn last record of the journal (its commit never returned)"
                    );
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_data())
                        .map_err(|e| io("truncating the torn tail of", e))?;
                    break;
                }
            }
        }
        let wal = Wal {
            file,
            path: path.to_owned(),
            len: pos as u64,
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
