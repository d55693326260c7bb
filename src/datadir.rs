//! Writing a file the server keeps in its data directory (the admin token, the local CA's
//! keys and certificates), whole and with its final mode from the start.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Readable by its owner only: keys and tokens.
pub const PRIVATE: u32 = 0o600;
/// Readable by anyone: certificates.
pub const PUBLIC: u32 = 0o644;

/// Writes `bytes` to `path` with `mode`, replacing it whole: a temporary file in the same
/// directory, created with `mode`, synced, then renamed over `path`.
pub fn write_whole(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
