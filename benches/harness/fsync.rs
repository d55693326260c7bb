//! The disk's own durability floor: how long writing 4 KiB to a file and `fdatasync`ing it
//! takes, in the directory the store uses. No transition that waits for the disk can be
//! made durable faster than this.
//!
//! Two ways, sample by sample in turn so that both see the same disk: appending (the file
//! grows, so the sync also commits the file's new length to the file system's journal)
//! and writing over space the file already has (the sync writes the data alone). The
//! embedded stores' journals write ahead of their records (`store/src/wal.rs`), so a commit
//! pays the second, with an append once in a few hundred commits.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::quantile;

/// The measured floor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FsyncFloor {
    pub samples: usize,
    /// 4 KiB appended, then `fdatasync`.
    pub append: Syncs,
    /// 4 KiB written over space written before, then `fdatasync`.
    pub overwrite: Syncs,
}

/// One way's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Syncs {
    #[serde(with = "crate::util::secs")]
    pub median: Duration,
    #[serde(with = "crate::util::secs")]
    pub p99: Duration,
    #[serde(with = "crate::util::secs")]
    pub mean: Duration,
}

impl Syncs {
    fn of(mut times: Vec<Duration>) -> Syncs {
        let total: Duration = times.iter().sum();
        times.sort();
        Syncs {
            median: quantile(&times, 0.5),
            p99: quantile(&times, 0.99),
            mean: total / u32::try_from(times.len().max(1)).unwrap_or(u32::MAX),
        }
    }
}

/// Takes `samples` of each way, in turn, in two files in `dir`. A few unrecorded rounds
/// first let the files exist and the disk settle.
pub fn measure(dir: &Path, samples: usize) -> std::io::Result<FsyncFloor> {
    std::fs::create_dir_all(dir)?;
    let open = |name: &str| {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        Ok::<_, std::io::Error>((file, path))
    };
    let (mut appended, append_path) = open("fsync-append.bin")?;
    let (overwritten, overwrite_path) = open("fsync-overwrite.bin")?;
    let block = vec![0x5au8; 4096];
    let rounds = 10 + samples;
    overwritten.write_all_at(&vec![0u8; block.len() * rounds], 0)?;
    overwritten.sync_all()?;
    let (mut append, mut overwrite) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let start = Instant::now();
        appended.write_all(&block)?;
        appended.sync_data()?;
        let appending = start.elapsed();
        let start = Instant::now();
        overwritten.write_all_at(&block, (round * block.len()) as u64)?;
        overwritten.sync_data()?;
        let overwriting = start.elapsed();
        if round >= 10 {
            append.push(appending);
            overwrite.push(overwriting);
        }
    }
    drop((appended, overwritten));
    std::fs::remove_file(&append_path)?;
    std::fs::remove_file(&overwrite_path)?;
    Ok(FsyncFloor {
        samples,
        append: Syncs::of(append),
        overwrite: Syncs::of(overwrite),
    })
}
