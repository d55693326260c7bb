//! Serving connections under limits (`[limits]`, docs/limits-network.md): at most
//! `max_connections` per listener, a header-read and an idle timeout on HTTP, a preface
//! deadline on gRPC, and an orderly drain on shutdown.
//!
//! **HTTP.** One accept loop per listener over hyper's HTTP/1 connection builder (what
//! `axum::serve` does, plus the limits it cannot express). A connection takes a slot before
//! it is accepted; with every ordinary slot taken, a few spare ones ([`SPARE_CONNECTIONS`])
//! still accept, serve one request and close: `GET /api/2.0/health` is answered as usual,
//! anything else gets a fast `503`. With the spare slots taken too, the loop stops accepting
//! and new connections wait in the kernel's accept queue, where they cost no descriptor.
//! Each connection's [`Clock`] sees every byte read and written and every request start and
//! end, and the task serving it closes it when a deadline passes.
//!
//! **gRPC.** tonic drives its connections itself, so the limits sit in what it is given:
//! an incoming stream that hands out a connection only with a slot (no spare ones: a gRPC
//! health check rides an existing connection), each connection wrapped in a [`GrpcIo`] that
//! fails its reads if the HTTP/2 preface has not arrived within the header-read timeout.
//! Keep-alive pings, the per-connection stream limit, the call timeout and the connection
//! age are tonic's settings ([`grpc_server`]).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{Method, Request, Response, StatusCode, header};
use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, error, warn};

use crate::api::ApiError;
use crate::config::LimitsConfig;

/// Connections an HTTP listener accepts beyond `max_connections`. Each serves one request
/// and closes: health is answered, anything else gets `503`. They take the same header-read
/// timeout, so a client holding them all holds them only that long.
pub const SPARE_CONNECTIONS: usize = 8;

/// The length of the HTTP/2 client preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`), which a
/// gRPC client sends first.
const H2_PREFACE_LEN: usize = 24;

/// How long the accept loop pauses after an accept error that is not the peer's doing (out
/// of descriptors, most likely), so that it does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// The limits one listener applies, read from `[limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most connections served at once (spare ones aside).
    pub max_connections: usize,
    /// How long a request header (or the HTTP/2 preface) may take to arrive.
    pub header_read_timeout: Duration,
    /// How long an HTTP connection may go without moving a byte.
    pub idle_timeout: Duration,
}

impl From<&LimitsConfig> for Limits {
    fn from(c: &LimitsConfig) -> Self {
        Limits {
            max_connections: c.max_connections,
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
        }
    }
}

/// Descriptors the process needs besides connections: the store's files, listening
/// sockets, DHCP and TFTP, BMC clients. A rough allowance, for the warning below.
const OTHER_DESCRIPTORS: u64 = 256;

/// Warns when `listeners` listeners at `limits` could take more file descriptors than the
/// process may open (`Max open files` in `/proc/self/limits`), since then descriptors run
/// out before the connection limit is reached and every API stops answering, health too.
pub fn check_descriptor_budget(limits: &Limits, listeners: usize) {
    let Ok(text) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let Some(open_files) = max_open_files(&text) else {
        return;
    };
    let needed =
        listeners as u64 * (limits.max_connections + SPARE_CONNECTIONS) as u64 + OTHER_DESCRIPTORS;
    if needed > open_files {
        warn!(
            listeners,
            max_connections = limits.max_connections,
            open_files,
            needed,
            "limits.max_connections is too high for the open-file limit: descriptors may run out first; lower it or raise the limit (ulimit -n, LimitNOFILE=)"
        );
    }
}

/// The soft `Max open files` of a `/proc/self/limits` text, if it is a number.
fn max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// Slots

/// The connection slots of one listener: `max_connections` ordinary ones and, for HTTP, a
/// few spare ones.
struct Slots {
    ordinary: Arc<Semaphore>,
    spare: Arc<Semaphore>,
}

/// A slot held by one connection for its whole life; dropping it frees it.
struct Slot {
    /// Whether it is a spare one.
    spare: bool,
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn ordinary(permit: OwnedSemaphorePermit) -> Self {
        Slot {
            spare: false,
            _permit: permit,
        }
    }

    fn spare(permit: OwnedSemaphorePermit) -> Self {
        Slot {
            spare: true,
            _permit: permit,
        }
    }
}

impl Slots {
    fn new(ordinary: usize, spare: usize) -> Self {
        Slots {
            ordinary: Arc::new(Semaphore::new(ordinary)),
            spare: Arc::new(Semaphore::new(spare)),
        }
    }

    /// Waits for a free slot, an ordinary one whenever there is one.
    async fn acquire(&self) -> Slot {
        if let Ok(p) = self.ordinary.clone().try_acquire_owned() {
            return Slot::ordinary(p);
        }
        // The semaphores are never closed, so acquiring only ever waits.
        tokio::select! {
            biased;
            Ok(p) = self.ordinary.clone().acquire_owned() => Slot::ordinary(p),
            Ok(p) = self.spare.clone().acquire_owned() => Slot::spare(p),
        }
    }

    /// Trades a spare slot for an ordinary one that came free while the connection was
    /// being accepted.
    fn upgrade(&self, slot: Slot) -> Slot {
        if !slot.spare {
            return slot;
        }
        match self.ordinary.clone().try_acquire_owned() {
            Ok(ordinary) => Slot::ordinary(ordinary),
            Err(_) => slot,
        }
    }
}

/// Logs an accept error and pauses when it is not one peer's problem.
async fn accept_error(what: &'static str, e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    ) {
        return;
    }
    error!(what, error = %e, pause_ms = ACCEPT_ERROR_PAUSE.as_millis() as u64, "cannot accept a connection (out of file descriptors?); pausing");
    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
}

// ---------------------------------------------------------------------------------------
// HTTP

/// Serves `router` on `listener` under `limits` until `shutdown`, then stops accepting,
/// lets every connection finish its request and close (idle ones close at once), and drops
/// those still open `drain` later.
pub async fn serve_http(
    what: &'static str,
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    drain: Duration,
) {
    let slots = Slots::new(limits.max_connections, SPARE_CONNECTIONS);
    let mut conns = JoinSet::new();
    // Whether the last connection took a spare slot: the warning is logged once per episode.
    let mut saturated = false;
    loop {
        while let Some(done) = conns.try_join_next() {
            report_panic(what, done);
        }
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.acquire() => slot,
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(what, e).await;
                    continue;
                }
            },
        };
        let slot = slots.upgrade(slot);
        if slot.spare && !saturated {
            warn!(
                what,
                max_connections = limits.max_connections,
                "connection limit reached; new connections get 503 except health until some close"
            );
        }
        saturated = slot.spare;
        let _ = stream.set_nodelay(true);
        conns.spawn(serve_connection(
            stream,
            slot,
            router.clone(),
            limits,
            tls.clone(),
            shutdown.clone(),
        ));
    }
    drop(listener);
    let drained = async {
        while let Some(done) = conns.join_next().await {
            report_panic(what, done);
        }
    };
    if tokio::time::timeout(drain, drained).await.is_err() {
        warn!(
            what,
            open = conns.len(),
            timeout_s = drain.as_secs(),
            "connections still open after the drain timeout; dropping them"
        );
        conns.shutdown().await;
    }
}

fn report_panic(what: &'static str, done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        error!(what, error = %e, "a connection task panicked");
    }
}

/// Serves one connection until it ends, a deadline of its [`Clock`] passes, or shutdown
/// (then its request in progress is finished and it closes).
async fn serve_connection(
    stream: TcpStream,
    slot: Slot,
    router: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let clock = Arc::new(Clock::new(Instant::now()));
    let spare = slot.spare;
    let peer = stream.peer_addr().ok();
    let watched = Watched {
        inner: stream,
        clock: clock.clone(),
    };
    let io = match tls {
        None => Either::Left(watched),
        Some(acceptor) => match handshake(watched, &acceptor, limits.header_read_timeout).await {
            Some(tls) => Either::Right(tls),
            None => return,
        },
    };
    let io = TokioIo::new(io);
    let service = Tracked {
        router: TowerToHyperService::new(router),
        clock: clock.clone(),
        spare,
        peer,
    };
    let mut builder = http1::Builder::new();
    // The clock enforces the header-read timeout, counted from the first byte of a request
    // rather than from the end of the previous one, which hyper's own timeout cannot do.
    builder.header_read_timeout(None).keep_alive(!spare);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        let (deadline, why) = clock.deadline(&limits);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(error = %e, "an HTTP connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep_until(deadline) => {
                // Activity may have moved the deadline while this slept.
                if clock.deadline(&limits).0 <= Instant::now() {
                    debug!(reason = why, "closing an HTTP connection");
                    break;
                }
            }
            () = clock.changed.notified() => {}
            () = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
    drop(slot);
}

/// The router as a hyper service that reports each request's start and end to the
/// connection's clock; on a spare connection it answers only health. Each request carries
/// the peer's address as axum's `ConnectInfo<SocketAddr>` (the node-facing API checks it
/// against DHCP leases).
struct Tracked {
    router: TowerToHyperService<Router>,
    clock: Arc<Clock>,
    spare: bool,
    /// The client's address, given to handlers as axum's `ConnectInfo`.
    peer: Option<SocketAddr>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<axum::body::Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<axum::body::Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let busy = Busy::start(self.clock.clone());
        if self.spare && !is_health(&req) {
            return Box::pin(std::future::ready(Ok(too_many_connections())));
        }
        if let Some(peer) = self.peer {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let answer = self.router.call(req);
        Box::pin(async move {
            let res = answer.await;
            drop(busy);
            res
        })
    }
}

/// Whether a request asks for health, which a spare connection answers.
fn is_health(req: &Request<Incoming>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && matches!(req.uri().path(), "/api/2.0/health" | "/api/current/health")
}

/// The answer of a spare connection to anything but health.
fn too_many_connections() -> Response<axum::body::Body> {
    let mut res = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
        "this listener serves as many connections as it may (limits.max_connections); try again shortly",
    )
    .into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    res
}

/// One request being handled, from the moment its header is complete until its response
/// (the head; the body streams afterwards) is ready or abandoned.
struct Busy(Arc<Clock>);

impl Busy {
    fn start(clock: Arc<Clock>) -> Self {
        clock.update(|s| s.request_started(Instant::now()));
        Busy(clock)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.update(|s| s.request_ended(Instant::now()));
    }
}

/// The deadlines of one HTTP connection, shared by its socket ([`Watched`]), its service
/// ([`Tracked`]) and the task serving it.
struct Clock {
    state: Mutex<ClockState>,
    /// Wakes the serving task when a request header begins, since that deadline may be
    /// earlier than the idle one it sleeps towards.
    changed: Notify,
}

impl Clock {
    fn new(now: Instant) -> Self {
        Clock {
            state: Mutex::new(ClockState::new(now)),
            changed: Notify::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ClockState) -> bool) {
        let woke = f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
        if woke {
            self.changed.notify_one();
        }
    }

    fn deadline(&self, limits: &Limits) -> (Instant, &'static str) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deadline(limits)
    }
}

/// What one connection's deadlines are measured from. Pure: the socket, the service and
/// the tests tell it what happened and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClockState {
    /// When the request header now being read began: the connection's start, or the first
    /// byte read after the previous request. `None` while a request is handled and while the
    /// connection idles between requests.
    head_since: Option<Instant>,
    /// Requests whose header is complete and whose response is not yet ready.
    in_flight: usize,
    /// The last byte read or written, or the last request's start or end.
    last_activity: Instant,
}

impl ClockState {
    fn new(now: Instant) -> Self {
        ClockState {
            head_since: Some(now),
            in_flight: 0,
            last_activity: now,
        }
    }

    /// Bytes arrived. Between requests they are the start of the next request's header.
    /// (Bytes of a request body that the handler left unread, which hyper discards after
    /// the response, start a header too; the client then has the header-read timeout
    /// rather than the idle one to send its next request. Harmless.) Returns whether a
    /// header began.
    fn read(&mut self, now: Instant) -> bool {
        self.last_activity = now;
        let begins = self.in_flight == 0 && self.head_since.is_none();
        if begins {
            self.head_since = Some(now);
        }
        begins
    }

    fn wrote(&mut self, now: Instant) -> bool {
        self.last_activity = now;
        false
    }

    fn request_started(&mut self, now: Instant) -> bool {
        self.head_since = None;
        self.in_flight += 1;
        self.last_activity = now;
        false
    }

    fn request_ended(&mut self, now: Instant) -> bool {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_activity = now;
        false
    }

    /// When the connection is closed unless something happens first, and why.
    fn deadline(&self, limits: &Limits) -> (Instant, &'static str) {
        match self.head_since {
            Some(since) => (
                since + limits.header_read_timeout,
                "the request header did not arrive within the header-read timeout",
            ),
            None => (
                self.last_activity + limits.idle_timeout,
                "no byte moved within the idle timeout",
            ),
        }
    }
}

/// The TLS handshake of an HTTP connection, within `timeout`. A client that speaks plain
/// HTTP to it is told, in plain HTTP, to use `https://`, and the connection closes; so does
/// one whose handshake fails or is too slow.
async fn handshake(
    mut stream: Watched,
    acceptor: &TlsAcceptor,
    timeout: Duration,
) -> Option<tokio_rustls::server::TlsStream<Watched>> {
    let shake = async {
        // A TLS client starts with a handshake record (22); a letter is an HTTP method.
        let mut first = [0u8; 1];
        if stream.inner.peek(&mut first).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if first[0].is_ascii_alphabetic() {
            use tokio::io::AsyncWriteExt as _;
            let _ = stream.write_all(&plain_http_to_tls()).await;
            let _ = stream.shutdown().await;
            return Err(io::Error::other("plain HTTP on the TLS port"));
        }
        acceptor.accept(stream).await
    };
    match tokio::time::timeout(timeout, shake).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            debug!(error = %e, "a TLS handshake failed");
            None
        }
        Err(_) => {
            debug!("a TLS handshake timed out");
            None
        }
    }
}

/// The answer to plain HTTP on a TLS listener.
fn plain_http_to_tls() -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "code": "tls_required",
        "message": "this listener speaks TLS: use https:// (and trust <data-dir>/tls/ca.pem)",
        "details": [],
    }})
    .to_string();
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A socket that tells its connection's [`Clock`] about every byte it moves.
struct Watched {
    inner: TcpStream,
    clock: Arc<Clock>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.update(|s| s.read(Instant::now()));
        }
        res
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.update(|s| s.wrote(Instant::now()));
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(res, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.update(|s| s.wrote(Instant::now()));
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------
// gRPC

/// tonic's server with the `[limits]` that concern gRPC: the call timeout, keep-alive pings,
/// the most concurrent calls per connection (as HTTP/2's `SETTINGS_MAX_CONCURRENT_STREAMS`
/// and as a per-connection concurrency limit) and the connection age.
pub fn grpc_server(limits: &LimitsConfig) -> tonic::transport::Server {
    let ms = Duration::from_millis;
    tonic::transport::Server::builder()
        .timeout(ms(limits.grpc_request_timeout_ms))
        .http2_keepalive_interval(Some(ms(limits.grpc_keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(ms(limits.grpc_keepalive_timeout_ms)))
        .max_concurrent_streams(limits.grpc_max_concurrent_streams)
        .concurrency_limit_per_connection(limits.grpc_max_concurrent_streams as usize)
        .max_connection_age(ms(limits.grpc_max_connection_age_ms))
}

/// The gRPC listener's connections under `limits`: a stream to hand tonic, and the accept
/// loop feeding it, which the caller runs beside tonic. At most `max_connections` are open
/// at once (a slot is taken before accepting, so the others wait in the kernel's queue);
/// each must send the HTTP/2 preface within the header-read timeout. The loop ends at
/// `shutdown` or when tonic drops the stream.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) -> (
    ReceiverStream<io::Result<GrpcIo>>,
    impl Future<Output = ()> + Send,
) {
    let (tx, rx) = mpsc::channel(1);
    let accept = async move {
        let slots = Slots::new(limits.max_connections, 0);
        loop {
            let slot = tokio::select! {
                () = shutdown.cancelled() => break,
                slot = slots.acquire() => slot,
            };
            let stream = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        accept_error("gRPC API", e).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let info = stream.connect_info();
            let Some(acceptor) = &tls else {
                if tx
                    .send(Ok(GrpcIo::new(Either::Left(stream), info, slot, &limits)))
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            };
            // The handshake runs beside the loop, so that a slow client holds only its
            // own slot.
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let shaken =
                    tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await;
                match shaken {
                    Ok(Ok(tls)) => {
                        let io = GrpcIo::new(Either::Right(Box::new(tls)), info, slot, &limits);
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "a gRPC TLS handshake failed"),
                    Err(_) => debug!("a gRPC TLS handshake timed out"),
                }
            });
        }
    };
    (ReceiverStream::new(rx), accept)
}

/// A gRPC connection's socket: it holds the connection's slot, and fails its reads once the
/// preface deadline passes without the preface.
pub struct GrpcIo {
    inner: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
    info: TcpConnectInfo,
    _slot: Slot,
    /// Until the preface is in: how many of its bytes are still due, and by when.
    preface: Option<Preface>,
}

struct Preface {
    remaining: usize,
    deadline: Pin<Box<Sleep>>,
}

impl GrpcIo {
    /// A connection whose HTTP/2 preface (after TLS, if any) is due within the header-read
    /// timeout from now.
    fn new(
        inner: Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>,
        info: TcpConnectInfo,
        slot: Slot,
        limits: &Limits,
    ) -> Self {
        GrpcIo {
            inner,
            info,
            _slot: slot,
            preface: Some(Preface {
                remaining: H2_PREFACE_LEN,
                deadline: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            }),
        }
    }
}

impl Connected for GrpcIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for GrpcIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        let Some(preface) = &mut self.preface else {
            return res;
        };
        match res {
            Poll::Ready(Ok(())) if read >= preface.remaining => self.preface = None,
            Poll::Ready(Ok(())) => preface.remaining -= read,
            Poll::Pending if preface.deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the HTTP/2 preface did not arrive within the header-read timeout",
                )));
            }
            _ => {}
        }
        res
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
    };

    /// One event on a connection, at a second.
    #[derive(Debug, Clone, Copy)]
    enum Event {
        Read(u64),
        Wrote(u64),
        Request(u64),
        Response(u64),
    }

    /// Applies `events` to a connection opened at second 0 and returns its deadline, in
    /// seconds, and whether it is the header one.
    fn check(events: &[Event]) -> (u64, bool) {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut state = ClockState::new(t0);
        for e in events {
            match *e {
                Event::Read(s) => state.read(at(s)),
                Event::Wrote(s) => state.wrote(at(s)),
                Event::Request(s) => state.request_started(at(s)),
                Event::Response(s) => state.request_ended(at(s)),
            };
        }
        let (deadline, why) = state.deadline(&LIMITS);
        ((deadline - t0).as_secs(), why.contains("header"))
    }

    #[test]
    fn deadlines_follow_the_connection() {
        use Event::*;
        let cases: &[(&str, &[Event], (u64, bool))] = &[
            ("a new connection owes a header", &[], (10, true)),
            (
                "a trickled header keeps its deadline",
                &[Read(1), Read(5), Read(9)],
                (10, true),
            ),
            (
                "a handled request has the idle timeout",
                &[Read(1), Request(2)],
                (62, false),
            ),
            (
                "reading a body while handling moves it",
                &[Request(2), Read(30)],
                (90, false),
            ),
            (
                "after the response the connection idles",
                &[Request(2), Response(3), Wrote(4)],
                (64, false),
            ),
            (
                "the next request's first byte starts a header",
                &[Request(2), Response(3), Wrote(4), Read(50), Read(55)],
                (60, true),
            ),
            (
                "a streamed download keeps an idle connection alive",
                &[Request(2), Response(3), Wrote(100), Wrote(150)],
                (210, false),
            ),
        ];
        for (name, events, want) in cases {
            assert_eq!(check(events), *want, "{name}");
        }
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63704                63704                processes \n\
                    Max open files            400                  524288               files     \n";
        assert_eq!(max_open_files(text), Some(400));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
        assert_eq!(max_open_files(""), None);
    }

    #[tokio::test]
    async fn spare_slots_are_taken_only_when_ordinary_ones_are_not_free() {
        let slots = Slots::new(1, 1);
        let first = slots.acquire().await;
        assert!(!first.spare);
        let second = slots.acquire().await;
        assert!(second.spare);
        let third = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
        assert!(third.is_err(), "both kinds taken: acquiring waits");
        drop(first);
        assert!(!slots.upgrade(second).spare);
    }
}
