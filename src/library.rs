//! The shipped graph library, embedded at build time from `graphs/` (see `build.rs`).

use anyhow::Context as _;
use metalgraph_engine::Library;

include!(concat!(env!("OUT_DIR"), "/library.rs"));

/// Parses the embedded library. A broken shipped definition is a bug in this build, so the
/// error names the file and is fatal at start.
pub fn library() -> anyhow::Result<Library> {
    Library::from_texts(LIBRARY_FILES.iter().copied())
        .map_err(|p| anyhow::anyhow!("{p}"))
        .context("the shipped graph library is invalid")
}
