//! The disk's own durability floor: how long appending 4 KiB to a file and `fdatasync`ing
//! it takes, in the directory the store uses. No transition that waits for the disk can be
//! made durable faster than this.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::quantile;

/// The measured floor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FsyncFloor {
    pub samples: usize,
    #[serde(with = "crate::util::secs")]
    pub median: Duration,
    #[serde(with = "crate::util::secs")]
    pub p99: Duration,
    #[serde(with = "crate::util::secs")]
    pub mean: Duration,
}

/// Writes 4 KiB and calls `fdatasync`, `samples` times, appending to one file in `dir` as
/// the file store's journal does (so every sync also commits the new file size). A few
/// unrecorded rounds first let the file exist and the disk settle.
pub fn measure(dir: &Path, samples: usize) -> std::io::Result<FsyncFloor> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("fsync-floor.bin");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    for _ in 0..10 {
        file.write_all(&block)?;
        file.sync_data()?;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        times.push(start.elapsed());
    }
    drop(file);
    std::fs::remove_file(&path)?;
    let total: Duration = times.iter().sum();
    times.sort();
    Ok(FsyncFloor {
        samples,
        median: quantile(&times, 0.5),
        p99: quantile(&times, 0.99),
        mean: total / u32::try_from(samples.max(1)).unwrap_or(u32::MAX),
    })
}
