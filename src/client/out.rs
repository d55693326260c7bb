//! The one way the client writes to stdout, so that a reader that goes away early
//! (`metalgraph graphs list | head -1`) ends the command quietly instead of with a panic.
//!
//! Rust starts every program with SIGPIPE ignored, so writing to a closed pipe is an
//! `EPIPE` error rather than a signal, and `println!` panics on that error ("failed
//! printing to stdout: Broken pipe"). Rather than restore the default SIGPIPE (which needs
//! `unsafe`, would kill the process with a signal instead of exit 0, and must never reach
//! `serve`), the client prints only through `print`, which turns `EPIPE` into
//! `StdoutClosed`; `main` ends a client command that returns it with success and no
//! message. `serve` never prints through here and keeps SIGPIPE ignored, as a server must:
//! a peer closing a socket is an error on that one connection, never the process's end.

use std::io::{ErrorKind, Write as _};

/// Stdout was closed by its reader: not a failure of the command, which stops quietly.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
pub struct StdoutClosed;

/// Writes `text` to stdout and flushes it, so a line shows as soon as it is printed (`run
/// --wait` piped into `tee`) and a closed pipe is noticed at once.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// `print` with a line break after `text`.
pub fn line(text: &str) -> anyhow::Result<()> {
    print(&format!("{text}\n"))
}
