//! A read-only TFTP server (RFC 1350, with the option extension of RFC 2347, blksize 2348,
//! timeout and tsize 2349, and windowsize 7440), jailed to one root directory. Requests
//! arrive on a tokio UDP socket; each transfer then runs on a blocking thread.
//!
//! We do not use the `tftpd` crate: it has no way to cancel one transfer but a global flag
//! polled once a second, no bound on concurrent transfers, unwraps socket calls, and puts
//! the server-side path into error packets (`file {path} does not exist`). Each of those
//! breaks a requirement here.
//!
//! Rules kept by this module:
//! - Only RRQ is served; WRQ gets "server is read-only".
//! - A file name is resolved lexically first (no `..`, no absolute name; `\` counts as `/`
//!   because some PXE ROMs send DOS paths), then canonicalised and checked to be inside
//!   the canonical root, so a symlink can point within the root but never out of it.
//! - Every refusal is answered "file not found", whatever the reason, so a client learns
//!   nothing about the server's file system; the reason is logged on the server only.
//! - Error packets carry fixed texts and never a server path.
//! - `netascii` is served as `octet`: boot files are binary and no PXE client asks for
//!   netascii; translating line ends would corrupt them.
//! - A client may abort after the option acknowledgement (UEFI firmware probes the size
//!   with `tsize` and then sends error 8); that ends the transfer quietly and frees its slot.
//!
//! What a block costs. A lock-step transfer (windowsize 1, which PXE ROMs and curl use)
//! waits for an ACK after every block, so its speed is the cost of that round trip, paid
//! 700 times per megabyte at blksize 1468. So a transfer runs on a thread of the blocking
//! pool with its own blocking socket, as tftpd-hpa runs a process per transfer: `send`,
//! then `recv`, which the ACK's arrival wakes directly. On the async runtime every ACK also
//! went through the reactor (a `recv` that fails, `epoll_wait`, a wake-up, possibly of
//! another worker) and shared its queues with the engine and the APIs: 0.65× tftpd-hpa's
//! speed for 64 MiB files against 1.0× now (BENCHMARKS.md, "Boot files"). The thread
//! looks at shutdown and at the transfer's deadline at least every [`WAIT_SLICE`] while it
//! waits, and threads are bounded by `max_transfers`. A transfer opens its file once (name
//! checks, open and size in one trip to the blocking pool) and reads it [`READ_AHEAD`]
//! bytes at a time into a buffer it keeps, never a block at a time (through `tokio::fs`
//! that was a seek and a read per block, each a trip to the blocking pool), and reuses
//! one packet buffer.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::FileExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const OP_RRQ: u16 = 1;
const OP_WRQ: u16 = 2;
const OP_DATA: u16 = 3;
const OP_ACK: u16 = 4;
const OP_ERROR: u16 = 5;
const OP_OACK: u16 = 6;

/// Error codes of RFC 1350 and RFC 2347.
pub mod code {
    /// Not defined, see message.
    pub const UNDEFINED: u16 = 0;
    /// File not found.
    pub const NOT_FOUND: u16 = 1;
    /// Access violation.
    pub const ACCESS: u16 = 2;
    /// Illegal TFTP operation.
    pub const ILLEGAL: u16 = 4;
    /// Option negotiation refused; clients send it to abort after an OACK.
    pub const OPTION_REFUSED: u16 = 8;
}

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;

/// How much of a file one read brings into a transfer's buffer (more if one window is
/// larger): 128 KiB is 89 blocks of 1468 bytes per trip to the blocking pool, and 256
/// transfers hold at most 32 MiB.
pub const READ_AHEAD: usize = 128 * 1024;

/// Settings of the TFTP server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where requests arrive (69 in production).
    pub listen: SocketAddr,
    /// The directory served; nothing outside it is ever read.
    pub root: PathBuf,
    /// Transfers at once; requests beyond it are dropped and the client retries.
    pub max_transfers: usize,
    /// Retransmission timeout, unless the client negotiates one (RFC 2349).
    pub timeout: Duration,
    /// Retransmissions of one packet before the transfer is abandoned.
    pub retries: u32,
    /// Largest block size granted; 1468 fills an Ethernet frame without fragmenting.
    pub max_blksize: u16,
    /// Largest window granted (RFC 7440).
    pub max_windowsize: u16,
    /// Upper bound on one transfer's duration, whatever the client does.
    pub transfer_deadline: Duration,
}

impl Options {
    /// Defaults for serving `root` on `listen`.
    pub fn new(listen: SocketAddr, root: impl Into<PathBuf>) -> Self {
        Options {
            listen,
            root: root.into(),
            // A rack of 200 booting at once, without drops (BENCHMARKS.md, "Rack
            // power-on"); a transfer holds at most READ_AHEAD bytes and a thread.
            max_transfers: 256,
            timeout: Duration::from_secs(1),
            retries: 5,
            max_blksize: 1468,
            max_windowsize: 16,
            transfer_deadline: Duration::from_secs(600),
        }
    }
}

/// Why the TFTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be bound.
    #[error("TFTP cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The root directory is missing or unreadable.
    #[error("TFTP root {root} is not a readable directory: {source}")]
    Root {
        /// The configured root.
        root: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Binary.
    Octet,
    /// Text; served as octet (see the module docs).
    Netascii,
}

/// A parsed request packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// A read request.
    Read {
        /// The file name as sent.
        filename: String,
        /// The mode.
        mode: Mode,
        /// Options (RFC 2347), names lower-cased, in the order sent.
        options: Vec<(String, String)>,
    },
    /// A write request (always refused).
    Write {
        /// The file name as sent.
        filename: String,
    },
}

/// Why a datagram on the request port is not a usable request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not an RRQ or WRQ (a stray ACK, DATA or ERROR, or garbage).
    #[error("opcode {0} is not a request")]
    NotARequest(u16),
    /// Shorter than an opcode.
    #[error("packet too short")]
    TooShort,
    /// The file name or mode is missing its terminating NUL.
    #[error("{0} is not NUL-terminated")]
    Unterminated(&'static str),
    /// A string is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// The file name is empty.
    #[error("empty file name")]
    EmptyName,
    /// A mode other than octet or netascii (e.g. the obsolete "mail").
    #[error("unsupported mode {0:?}")]
    Mode(String),
}

/// Parses a packet received on the request port. Never panics.
pub fn parse_request(bytes: &[u8]) -> Result<Request, ParseError> {
    let [hi, lo, rest @ ..] = bytes else {
        return Err(ParseError::TooShort);
    };
    let op = u16::from_be_bytes([*hi, *lo]);
    if op != OP_RRQ && op != OP_WRQ {
        return Err(ParseError::NotARequest(op));
    }
    // NUL-terminated strings; bytes after the last NUL are an unterminated string, which
    // is ignored where it would be an option (as other servers do).
    let mut strings: Vec<&[u8]> = Vec::new();
    let mut tail = rest;
    while let Some(i) = tail.iter().position(|b| *b == 0) {
        strings.push(&tail[..i]);
        tail = &tail[i + 1..];
    }
    let text = |bytes: &[u8], what: &'static str| {
        String::from_utf8(bytes.to_vec()).map_err(|_| ParseError::NotUtf8(what))
    };
    let filename = text(
        strings
            .first()
            .ok_or(ParseError::Unterminated("file name"))?,
        "file name",
    )?;
    let mode = text(
        strings.get(1).ok_or(ParseError::Unterminated("mode"))?,
        "mode",
    )?;
    if filename.is_empty() {
        return Err(ParseError::EmptyName);
    }
    if op == OP_WRQ {
        return Ok(Request::Write { filename });
    }
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::Netascii,
        _ => return Err(ParseError::Mode(mode)),
    };
    // Options are name/value pairs; an unpaired trailing name is ignored.
    let mut options = Vec::new();
    for pair in strings[2..].chunks_exact(2) {
        let name = text(pair[0], "option name")?;
        let value = text(pair[1], "option value")?;
        if !name.is_empty() {
            options.push((name.to_ascii_lowercase(), value));
        }
    }
    Ok(Request::Read {
        filename,
        mode,
        options,
    })
}

/// What the server agreed to for one transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Bytes per DATA packet.
    pub blksize: u16,
    /// DATA packets sent before waiting for an ACK.
    pub windowsize: u16,
    /// Retransmission timeout.
    pub timeout: Duration,
    /// Options to acknowledge in an OACK, in the order the client sent them; empty means
    /// no OACK (plain RFC 1350 transfer).
    pub oack: Vec<(String, String)>,
}

/// Negotiates `requested` options for a file of `size` bytes (RFC 2347/2348/2349/7440).
/// Unknown or invalid options are left out of the OACK, which tells the client they were
/// not accepted; too large values are lowered to the server's maximum.
pub fn negotiate(requested: &[(String, String)], size: u64, options: &Options) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: options.timeout,
        oack: Vec::new(),
    };
    let mut seen = std::collections::HashSet::new();
    for (name, value) in requested {
        if !seen.insert(name.as_str()) {
            continue;
        }
        let v: Option<u64> = value.trim().parse().ok();
        match (name.as_str(), v) {
            ("blksize", Some(b)) if b >= 8 => {
                let b = b.min(u64::from(options.max_blksize.min(MAX_BLKSIZE))) as u16;
                n.blksize = b;
                n.oack.push((name.clone(), b.to_string()));
            }
            ("windowsize", Some(w)) if w >= 1 => {
                let w = w.min(u64::from(options.max_windowsize.max(1))) as u16;
                n.windowsize = w;
                n.oack.push((name.clone(), w.to_string()));
            }
            ("timeout", Some(t)) if (1..=255).contains(&t) => {
                n.timeout = Duration::from_secs(t);
                n.oack.push((name.clone(), t.to_string()));
            }
            ("tsize", Some(_)) => n.oack.push((name.clone(), size.to_string())),
            _ => {}
        }
    }
    n
}

/// Why a file name is refused; logged on the server, never sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The name is absolute.
    #[error("absolute file name")]
    Absolute,
    /// The name contains `..`.
    #[error("file name climbs out with '..'")]
    Traversal,
    /// The name resolves (through a symlink) outside the root.
    #[error("file name resolves outside the root")]
    Escapes,
    /// Nothing there.
    #[error("no such file")]
    NotFound,
    /// A directory or other non-file.
    #[error("not a regular file")]
    NotAFile,
}

/// The path of `name` relative to the root, judged by its text alone.
pub fn lexical_path(name: &str) -> Result<PathBuf, Refusal> {
    let name = name.replace('\\', "/");
    if name.starts_with('/') {
        return Err(Refusal::Absolute);
    }
    let mut out = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(Refusal::Traversal),
            p => out.push(p),
        }
    }
    // `push` of a component such as "C:" is harmless on Unix, but make sure nothing the
    // platform treats as a prefix or root slipped through.
    if out.as_os_str().is_empty() || !out.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(Refusal::NotFound);
    }
    Ok(out)
}

/// Resolves `name` inside `root` (which must be canonical), following symlinks only as far
/// as they stay inside it.
pub async fn resolve(root: &Path, name: &str) -> Result<PathBuf, Refusal> {
    let (root, name) = (root.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || resolve_blocking(&root, &name))
        .await
        .unwrap_or(Err(Refusal::NotFound))
}

/// [`resolve`] on the calling thread.
fn resolve_blocking(root: &Path, name: &str) -> Result<PathBuf, Refusal> {
    let rel = lexical_path(name)?;
    let path = std::fs::canonicalize(root.join(rel)).map_err(|_| Refusal::NotFound)?;
    if !path.starts_with(root) {
        return Err(Refusal::Escapes);
    }
    let meta = std::fs::metadata(&path).map_err(|_| Refusal::NotFound)?;
    if !meta.is_file() {
        return Err(Refusal::NotAFile);
    }
    Ok(path)
}

/// Resolves `name` inside `root` and opens it, in one trip to the blocking pool; returns
/// the file and its size. The size is the opened file's, so a file replaced between the
/// check and the open is still a regular file of the size announced.
async fn open_in_root(root: &Path, name: &str) -> Result<(std::fs::File, u64), Refusal> {
    let (root, name) = (root.to_owned(), name.to_owned());
    tokio::task::spawn_blocking(move || {
        let path = resolve_blocking(&root, &name)?;
        let file = std::fs::File::open(&path).map_err(|_| Refusal::NotFound)?;
        let meta = file.metadata().map_err(|_| Refusal::NotFound)?;
        if !meta.is_file() {
            return Err(Refusal::NotAFile);
        }
        Ok((file, meta.len()))
    })
    .await
    .unwrap_or(Err(Refusal::NotFound))
}

/// A transfer's file, read [`READ_AHEAD`] bytes (or one window) at a time into a buffer the
/// transfer keeps.
struct Blocks {
    file: std::fs::File,
    size: u64,
    /// Bytes of the file from `start` on.
    buf: Vec<u8>,
    start: u64,
}

impl Blocks {
    fn new(file: std::fs::File, size: u64) -> Self {
        Blocks {
            file,
            size,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// The bytes `offset..offset + len` of the file, fewer at its end; reads from `offset`
    /// on unless the buffer holds them. `ahead` is how much to read then, at least `len`.
    fn get(&mut self, offset: u64, len: usize, ahead: usize) -> std::io::Result<&[u8]> {
        let end = offset.saturating_add(len as u64).min(self.size).max(offset);
        if offset < self.start || end > self.start + self.buf.len() as u64 {
            let want = ahead.max(len) as u64;
            let want = want.min(self.size.saturating_sub(offset)) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, offset)?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        let to = (end - self.start) as usize;
        Ok(&self.buf[from..to])
    }
}

fn error_packet(code: u16, msg: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(5 + msg.len());
    p.extend_from_slice(&OP_ERROR.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

fn oack_packet(opts: &[(String, String)]) -> Vec<u8> {
    let mut p = OP_OACK.to_be_bytes().to_vec();
    for (k, v) in opts {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// A bound TFTP server; `run` serves until cancelled.
pub struct Server {
    socket: UdpSocket,
    root: PathBuf,
    options: Arc<Options>,
}

impl Server {
    /// Checks the root and binds the request socket.
    pub async fn bind(options: Options) -> Result<Self, Error> {
        let root = tokio::fs::canonicalize(&options.root)
            .await
            .map_err(|source| Error::Root {
                root: options.root.clone(),
                source,
            })?;
        let _entries = tokio::fs::read_dir(&root)
            .await
            .map_err(|source| Error::Root {
                root: options.root.clone(),
                source,
            })?;
        let socket = UdpSocket::bind(options.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: options.listen,
                source,
            })?;
        // A rack's requests arrive nearly together, like its DISCOVERs, and the default
        // buffer could drop part of the burst before this loop reads it (ACKs go to each
        // transfer's own socket, not this one).
        crate::udp::enlarge_recv_buffer(&socket, "tftp");
        Ok(Server {
            socket,
            root,
            options: Arc::new(options),
        })
    }

    /// The bound request address (useful with port 0 in tests).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Serves until `cancel` fires; transfers in progress are cancelled with it.
    pub async fn run(self, cancel: CancellationToken) {
        let limit = Arc::new(Semaphore::new(self.options.max_transfers.max(1)));
        let root = Arc::new(self.root);
        let mut transfers = JoinSet::new();
        let mut buf = vec![0u8; 2048];
        let local_ip = self
            .socket
            .local_addr()
            .map(|a| a.ip())
            .unwrap_or(self.options.listen.ip());
        loop {
            let (len, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                Some(_) = transfers.join_next(), if !transfers.is_empty() => continue,
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(e) => {
                        debug!(error = %e, "TFTP receive error");
                        continue;
                    }
                },
            };
            let reply = |code: u16, msg: &'static str| {
                let packet = error_packet(code, msg);
                let socket = &self.socket;
                async move {
                    let _ = socket.send_to(&packet, peer).await;
                }
            };
            let (filename, options) = match parse_request(&buf[..len]) {
                Ok(Request::Read {
                    filename, options, ..
                }) => (filename, options),
                Ok(Request::Write { filename }) => {
                    info!(%peer, filename, "TFTP write refused: read-only server");
                    reply(code::ACCESS, "server is read-only").await;
                    continue;
                }
                Err(ParseError::NotARequest(op)) => {
                    // Answering stray ACKs or ERRORs could start a packet loop.
                    debug!(%peer, op, "ignored TFTP packet on the request port");
                    continue;
                }
                Err(e @ ParseError::Mode(_)) => {
                    info!(%peer, error = %e, "TFTP request refused");
                    reply(code::ILLEGAL, "unsupported mode, use octet").await;
                    continue;
                }
                Err(e) => {
                    info!(%peer, error = %e, "malformed TFTP request");
                    reply(code::ILLEGAL, "malformed request").await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                warn!(%peer, filename, "TFTP request dropped: too many transfers; the client will retry");
                crate::metrics::tftp_dropped();
                continue;
            };
            let transfer = Transfer {
                peer,
                local_ip,
                filename,
                requested: options,
                root: root.clone(),
                options: self.options.clone(),
            };
            let cancel = cancel.child_token();
            transfers.spawn(transfer.run(cancel, permit));
        }
        transfers.shutdown().await;
    }
}

/// How a transfer ended early.
#[derive(Debug, thiserror::Error)]
enum TransferError {
    #[error("client sent error {code}: {message}")]
    ClientError { code: u16, message: String },
    #[error("no answer from the client after {0} retransmissions")]
    TimedOut(u32),
    #[error("transfer deadline of {0:?} passed")]
    Deadline(Duration),
    #[error("cancelled")]
    Cancelled,
    #[error("cannot read the file: {0}")]
    File(std::io::Error),
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
}

struct Transfer {
    peer: SocketAddr,
    local_ip: IpAddr,
    filename: String,
    requested: Vec<(String, String)>,
    root: Arc<PathBuf>,
    options: Arc<Options>,
}

/// A packet from the client during a transfer.
enum Incoming {
    Ack(u16),
    Error(u16, String),
    Other,
}

fn parse_incoming(p: &[u8]) -> Incoming {
    let [o1, o2, a, b, msg @ ..] = p else {
        return Incoming::Other;
    };
    let arg = u16::from_be_bytes([*a, *b]);
    match u16::from_be_bytes([*o1, *o2]) {
        OP_ACK => Incoming::Ack(arg),
        OP_ERROR => {
            let end = msg.iter().position(|b| *b == 0).unwrap_or(msg.len());
            Incoming::Error(arg, String::from_utf8_lossy(&msg[..end]).into_owned())
        }
        _ => Incoming::Other,
    }
}

/// What ends a transfer early from the server's side: shutdown, or its deadline.
struct Stop {
    cancel: CancellationToken,
    at: std::time::Instant,
    limit: Duration,
}

impl Stop {
    fn check(&self) -> Result<(), TransferError> {
        if self.cancel.is_cancelled() {
            return Err(TransferError::Cancelled);
        }
        if std::time::Instant::now() >= self.at {
            return Err(TransferError::Deadline(self.limit));
        }
        Ok(())
    }
}

impl Transfer {
    /// Serves the request; `slot` is its place among `max_transfers`, freed the moment the
    /// last ACK is in (or the transfer fails).
    async fn run(self, cancel: CancellationToken, slot: tokio::sync::OwnedSemaphorePermit) {
        let started = Instant::now();
        let Transfer {
            peer,
            local_ip,
            filename,
            requested,
            root,
            options,
        } = self;
        let socket = match std::net::UdpSocket::bind(SocketAddr::new(local_ip, 0))
            .and_then(|s| s.connect(peer).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, filename, error = %e, "cannot open a TFTP transfer socket");
                return;
            }
        };
        let (file, size) = match open_in_root(&root, &filename).await {
            Ok(f) => f,
            Err(refusal) => {
                info!(%peer, filename, reason = %refusal, "TFTP read refused");
                crate::metrics::tftp_transfer("refused", 0);
                let _ = socket.send(&error_packet(code::NOT_FOUND, "file not found"));
                return;
            }
        };
        let stop = Stop {
            cancel,
            at: std::time::Instant::now() + options.transfer_deadline,
            limit: options.transfer_deadline,
        };
        let result = tokio::task::spawn_blocking(move || {
            let blocks = Blocks::new(file, size);
            let result = send(&socket, blocks, &requested, &options, &stop);
            drop(slot);
            if matches!(
                result,
                Err(TransferError::Deadline(_) | TransferError::Cancelled)
            ) {
                let _ = socket.send(&error_packet(code::UNDEFINED, "transfer aborted"));
            }
            result
        })
        .await
        .unwrap_or_else(|e| Err(TransferError::Io(std::io::Error::other(e))));
        match result {
            Ok((bytes, n)) => {
                info!(
                    %peer, filename, bytes, blksize = n.blksize, windowsize = n.windowsize,
                    elapsed_ms = started.elapsed().as_millis() as u64, "TFTP transfer complete"
                );
                crate::metrics::tftp_transfer("completed", bytes);
            }
            Err(TransferError::ClientError { code, message }) if code == code::OPTION_REFUSED => {
                // UEFI's size probe: OACK, then error 8, then the real request.
                debug!(%peer, filename, code, message, "TFTP client ended the transfer after the option acknowledgement");
                crate::metrics::tftp_transfer("probe", 0);
            }
            Err(e) => {
                warn!(%peer, filename, error = %e, "TFTP transfer failed");
                crate::metrics::tftp_transfer("failed", 0);
            }
        }
    }
}

/// How long a transfer waiting for an ACK sleeps in `recv` at most before it looks at its
/// `Stop` (and at its retransmission time) again: how late shutdown or a retransmission
/// can be.
pub const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Waits for an ACK of a block in `lo..=hi` (wire numbers wrap at 65536), returning its
/// index, or `None` at `until`.
fn wait_ack(
    socket: &std::net::UdpSocket,
    lo: u64,
    hi: u64,
    until: std::time::Instant,
    stop: &Stop,
) -> Result<Option<u64>, TransferError> {
    let mut buf = [0u8; 1024];
    loop {
        stop.check()?;
        if std::time::Instant::now() >= until {
            return Ok(None);
        }
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            // The slice passed (or a signal came): look at the clock and the stop again.
            // ConnectionRefused is an ICMP "port unreachable": the client is gone, or not
            // yet listening.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                        | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match parse_incoming(&buf[..len]) {
            Incoming::Ack(n) => {
                let offset = u64::from(n.wrapping_sub((lo & 0xffff) as u16));
                let idx = lo + offset;
                if idx <= hi {
                    return Ok(Some(idx));
                }
            }
            Incoming::Error(code, message) => {
                return Err(TransferError::ClientError { code, message });
            }
            Incoming::Other => {}
        }
    }
}

/// Sends the file: the option acknowledgement if options were negotiated, then every
/// window of blocks until the last is acknowledged. Runs on a blocking thread.
fn send(
    socket: &std::net::UdpSocket,
    mut blocks: Blocks,
    requested: &[(String, String)],
    options: &Options,
    stop: &Stop,
) -> Result<(u64, Negotiated), TransferError> {
    let size = blocks.size;
    let n = negotiate(requested, size, options);
    let retries = options.retries;
    socket.set_read_timeout(Some(WAIT_SLICE.min(n.timeout)))?;
    let wait = |lo: u64, hi: u64| {
        let until = std::time::Instant::now() + n.timeout;
        wait_ack(socket, lo, hi, until, stop)
    };
    if !n.oack.is_empty() {
        let oack = oack_packet(&n.oack);
        let mut tries = 0;
        loop {
            socket.send(&oack)?;
            if wait(0, 0)?.is_some() {
                break;
            }
            tries += 1;
            if tries > retries {
                return Err(TransferError::TimedOut(retries));
            }
        }
    }
    let blk = usize::from(n.blksize);
    let window = usize::from(n.windowsize);
    // The last block is shorter than blksize, possibly empty.
    let last = size / blk as u64 + 1;
    let mut base = 1u64;
    let mut tries = 0;
    let mut packet = Vec::with_capacity(4 + blk);
    while base <= last {
        let end = (base + window as u64 - 1).min(last);
        for idx in base..=end {
            // Reading at least a window ahead means a window needs at most two reads, and
            // one resent after a timeout usually none.
            let data = blocks
                .get((idx - 1) * blk as u64, blk, READ_AHEAD.max(window * blk))
                .map_err(TransferError::File)?;
            packet.clear();
            packet.extend_from_slice(&OP_DATA.to_be_bytes());
            packet.extend_from_slice(&((idx & 0xffff) as u16).to_be_bytes());
            packet.extend_from_slice(data);
            socket.send(&packet)?;
        }
        // An ACK of base-1 means "nothing new arrived"; waiting for the timeout before
        // resending avoids the Sorcerer's Apprentice duplicate cascade.
        match wait(base, end)? {
            Some(acked) => {
                base = acked + 1;
                tries = 0;
            }
            None => {
                tries += 1;
                if tries > retries {
                    return Err(TransferError::TimedOut(retries));
                }
            }
        }
    }
    Ok((size, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rrq(name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        let mut p = OP_RRQ.to_be_bytes().to_vec();
        for s in [name, mode] {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
        for (k, v) in opts {
            p.extend_from_slice(k.as_bytes());
            p.push(0);
            p.extend_from_slice(v.as_bytes());
            p.push(0);
        }
        p
    }

    #[test]
    fn parse_request_table() {
        let read = |f: &str, m: Mode, o: &[(&str, &str)]| {
            Ok(Request::Read {
                filename: f.into(),
                mode: m,
                options: o
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
        };
        let cases: Vec<(Vec<u8>, Result<Request, ParseError>)> = vec![
            (rrq("a.efi", "octet", &[]), read("a.efi", Mode::Octet, &[])),
            (rrq("a", "OCTET", &[]), read("a", Mode::Octet, &[])),
            (rrq("a", "netascii", &[]), read("a", Mode::Netascii, &[])),
            (
                rrq("a", "octet", &[("BLKSIZE", "1468"), ("tsize", "0")]),
                read("a", Mode::Octet, &[("blksize", "1468"), ("tsize", "0")]),
            ),
            (rrq("a", "mail", &[]), Err(ParseError::Mode("mail".into()))),
            (rrq("", "octet", &[]), Err(ParseError::EmptyName)),
            (
                vec![0, 1, b'a', 0, b'o'],
                Err(ParseError::Unterminated("mode")),
            ),
            (vec![0, 1, b'a'], Err(ParseError::Unterminated("file name"))),
            (vec![0], Err(ParseError::TooShort)),
            (vec![0, 4, 0, 1], Err(ParseError::NotARequest(4))),
            (
                vec![0, 1, 0xff, 0, b'o', b'c', b't', b'e', b't', 0],
                Err(ParseError::NotUtf8("file name")),
            ),
            (
                {
                    let mut p = OP_WRQ.to_be_bytes().to_vec();
                    p.extend_from_slice(b"x\0octet\0");
                    p
                },
                Ok(Request::Write {
                    filename: "x".into(),
                }),
            ),
            (
                {
                    let mut p = rrq("a", "octet", &[("tsize", "0")]);
                    p.extend_from_slice(b"blksize");
                    p
                },
                read("a", Mode::Octet, &[("tsize", "0")]),
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse_request(&bytes), want, "{bytes:?}");
        }
    }

    #[test]
    fn negotiation_table() {
        let mut o = Options::new("127.0.0.1:0".parse().unwrap(), "/");
        o.max_blksize = 8192;
        o.max_windowsize = 8;
        let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // (requested, blksize, windowsize, oack)
        type Opts = Vec<(String, String)>;
        let cases: Vec<(Opts, u16, u16, Opts)> = vec![
            (s(&[]), 512, 1, s(&[])),
            (
                s(&[("blksize", "1468")]),
                1468,
                1,
                s(&[("blksize", "1468")]),
            ),
            (
                s(&[("blksize", "65464")]),
                8192,
                1,
                s(&[("blksize", "8192")]),
            ),
            (s(&[("blksize", "7")]), 512, 1, s(&[])),
            (s(&[("blksize", "x")]), 512, 1, s(&[])),
            (s(&[("tsize", "0")]), 512, 1, s(&[("tsize", "1000")])),
            (s(&[("windowsize", "4")]), 512, 4, s(&[("windowsize", "4")])),
            (
                s(&[("windowsize", "64")]),
                512,
                8,
                s(&[("windowsize", "8")]),
            ),
            (s(&[("windowsize", "0")]), 512, 1, s(&[])),
            (s(&[("timeout", "3")]), 512, 1, s(&[("timeout", "3")])),
            (s(&[("timeout", "0")]), 512, 1, s(&[])),
            (s(&[("multicast", "")]), 512, 1, s(&[])),
            (
                s(&[("tsize", "0"), ("blksize", "1024"), ("blksize", "2048")]),
                1024,
                1,
                s(&[("tsize", "1000"), ("blksize", "1024")]),
            ),
        ];
        for (req, blk, win, oack) in cases {
            let n = negotiate(&req, 1000, &o);
            assert_eq!(
                (n.blksize, n.windowsize, &n.oack),
                (blk, win, &oack),
                "{req:?}"
            );
        }
    }

    #[test]
    fn lexical_jail_table() {
        let cases: Vec<(&str, Result<&str, Refusal>)> = vec![
            ("undionly.kpxe", Ok("undionly.kpxe")),
            ("efi/snponly.efi", Ok("efi/snponly.efi")),
            ("efi\\snponly.efi", Ok("efi/snponly.efi")),
            ("./a//b", Ok("a/b")),
            ("/etc/passwd", Err(Refusal::Absolute)),
            ("\\etc\\passwd", Err(Refusal::Absolute)),
            ("../etc/passwd", Err(Refusal::Traversal)),
            ("a/../../etc/passwd", Err(Refusal::Traversal)),
            ("a/..", Err(Refusal::Traversal)),
            ("..\\x", Err(Refusal::Traversal)),
            (".", Err(Refusal::NotFound)),
        ];
        for (name, want) in cases {
            assert_eq!(lexical_path(name), want.map(PathBuf::from), "{name:?}");
        }
    }

    #[tokio::test]
    async fn the_request_socket_gets_a_larger_receive_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::bind(Options::new("127.0.0.1:0".parse().unwrap(), dir.path()))
            .await
            .unwrap();
        crate::udp::assert_enlarged(&server.socket);
    }

    #[tokio::test]
    async fn resolve_refuses_symlinks_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/inner"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/inner", root.join("in")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("updir")).unwrap();
        let root = std::fs::canonicalize(&root).unwrap();
        assert_eq!(resolve(&root, "out").await, Err(Refusal::Escapes));
        assert_eq!(resolve(&root, "updir/secret").await, Err(Refusal::Escapes));
        assert_eq!(resolve(&root, "sub").await, Err(Refusal::NotAFile));
        assert_eq!(resolve(&root, "missing").await, Err(Refusal::NotFound));
        assert_eq!(resolve(&root, "in").await, Ok(root.join("sub/inner")));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, .. ProptestConfig::default() })]

        #[test]
        fn parse_request_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_request(&bytes);
        }

        #[test]
        fn parse_request_reads_back_what_a_client_writes(
            name in "[a-zA-Z0-9._/-]{1,40}",
            opts in proptest::collection::vec(("[a-z]{1,10}", "[0-9]{0,6}"), 0..5),
        ) {
            let o: Vec<(&str, &str)> = opts.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let parsed = parse_request(&rrq(&name, "octet", &o)).unwrap();
            prop_assert_eq!(parsed, Request::Read { filename: name, mode: Mode::Octet, options: opts });
        }

        #[test]
        fn lexical_path_never_leaves_the_root(name in "[a-z./\\\\]{0,30}") {
            if let Ok(p) = lexical_path(&name) {
                prop_assert!(p.components().all(|c| matches!(c, Component::Normal(_))));
            }
        }
    }
}
