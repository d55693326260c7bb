//! Connection limits through the real binary (docs/limits-network.md): slow and idle
//! sockets are closed after the header-read and idle timeouts on every listener, a
//! listener serves at most `max_connections` at once, health still answers at the limit,
//! and ordinary requests are served again once the idle sockets are gone. The limits are
//! set through `METALGRAPH_LIMITS_*` with timeouts of a second or so.

mod support;

use std::time::{Duration, Instant};

use metalgraph::api::grpc::pb;
use pb::definitions_client::DefinitionsClient;
use serde_json::Value;
use support::{Launch, Server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HEADER_READ_TIMEOUT: Duration = Duration::from_millis(1000);
const IDLE_TIMEOUT: Duration = Duration::from_millis(3000);

/// Starts the binary with a management, a node-facing and a gRPC listener under
/// `max_connections` and the short timeouts above.
fn start(dir: &std::path::Path, max_connections: usize) -> Server {
    let max = max_connections.to_string();
    let header = HEADER_READ_TIMEOUT.as_millis().to_string();
    let idle = IDLE_TIMEOUT.as_millis().to_string();
    Server::launch_with_env(
        dir,
        "sled",
        Launch {
            // Plain HTTP and gRPC: these tests write raw bytes to the sockets, under the
            // connection layer TLS would sit on (tests/security.rs covers a silent TLS
            // client). Tokens stay on.
            args: [
                "--node-listen",
                "127.0.0.1:0",
                "--grpc-listen",
                "127.0.0.1:0",
                "--no-tls",
            ]
            .map(String::from)
            .to_vec(),
            ..Launch::default()
        },
        &[
            ("METALGRAPH_LIMITS_MAX_CONNECTIONS", &max),
            ("METALGRAPH_LIMITS_HEADER_READ_TIMEOUT_MS", &header),
            ("METALGRAPH_LIMITS_IDLE_TIMEOUT_MS", &idle),
            // An idle timeout must outlast the cancel grace (a cancel request waits it).
            ("METALGRAPH_CANCEL_GRACE_MS", "1000"),
        ],
    )
}

/// `host:port` of a URL the server announced.
fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned()
}

/// The gRPC listener's address, from the line the server printed.
fn grpc_addr(server: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = server
            .logs()
            .lines()
            .find(|l| l.starts_with("metalgraph grpc listening on "))
        {
            return addr_of(line.trim_start_matches("metalgraph grpc listening on "));
        }
        assert!(
            Instant::now() < deadline,
            "no gRPC address in:\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads from `stream` until the server closes it (end of stream or reset) and returns how
/// long that took, or `None` if it is still open after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends one keep-alive request and reads its whole response; returns the status line.
async fn request(stream: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("written");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response in time")
            .expect("read");
        assert!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if body.len() >= len {
                return head.lines().next().unwrap_or_default().to_owned();
            }
        }
    }
}

/// A client that opens a new connection for every request, with the server's token.
fn fresh_client(server: &Server) -> reqwest::Client {
    server
        .client_builder(server.token.as_deref())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("a client")
}

#[tokio::test]
async fn slow_and_silent_sockets_are_closed_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start(dir.path(), 64);
    let mgmt = addr_of(&server.base);
    let node = addr_of(server.node_base.as_deref().expect("the node-facing API"));
    let limit = HEADER_READ_TIMEOUT * 4;

    // Sockets that never complete a header, on both HTTP listeners: silent ones, ones that
    // stop in the middle of a header, and one that trickles a header byte every 100 ms.
    let mut socks = Vec::new();
    for addr in [&mgmt, &node] {
        for partial in ["", "GET /api/2.0/health HTTP/1.1\r\nHost: t\r\n"] {
            for _ in 0..5 {
                let mut s = TcpStream::connect(addr).await.expect("connects");
                s.write_all(partial.as_bytes()).await.expect("written");
                socks.push(s);
            }
        }
    }
    let trickle = TcpStream::connect(&mgmt).await.expect("connects");
    let (mut trickle_rx, mut trickle_tx) = trickle.into_split();
    let trickler = tokio::spawn(async move {
        let header = b"GET /api/2.0/health HTTP/1.1\r\nX-Slow: ".iter().copied();
        for b in header.chain(std::iter::repeat(b'a')) {
            if trickle_tx.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let started = Instant::now();
    for (i, s) in socks.iter_mut().enumerate() {
        let took = closed_within(s, limit).await;
        assert!(took.is_some(), "socket {i} was still open after {limit:?}");
    }
    let mut buf = [0u8; 64];
    let trickled = tokio::time::timeout(limit, async {
        loop {
            match trickle_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        trickled.is_ok(),
        "a trickled header kept its socket open past {limit:?}"
    );
    trickler.abort();
    let elapsed = started.elapsed();
    assert!(
        elapsed >= HEADER_READ_TIMEOUT / 2,
        "closed after {elapsed:?}: too early for a {HEADER_READ_TIMEOUT:?} timeout"
    );

    // A client that sends its request in time is served as before.
    let r = fresh_client(&server)
        .get(server.url("/api/2.0/health"))
        .send()
        .await
        .expect("health answers");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn at_the_limit_health_still_answers_and_others_are_served_once_idle_sockets_close() {
    const MAX: usize = 16;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start(dir.path(), MAX);
    let mgmt = addr_of(&server.base);

    // Take every slot with a kept-alive connection that made one request and went idle.
    let mut idle = Vec::new();
    for _ in 0..MAX {
        let mut s = TcpStream::connect(&mgmt).await.expect("connects");
        assert_eq!(request(&mut s, "/api/2.0/health").await, "HTTP/1.1 200 OK");
        idle.push(s);
    }
    let full_since = Instant::now();
    // And a few more than the limit, which say nothing.
    let mut beyond = Vec::new();
    for _ in 0..4 {
        beyond.push(TcpStream::connect(&mgmt).await.expect("connects"));
    }

    // At the limit: health answers, anything else is a fast 503 saying why.
    let http = fresh_client(&server);
    let health = http
        .get(server.url("/api/2.0/health"))
        .send()
        .await
        .expect("health answers at the limit");
    assert_eq!(health.status(), 200);
    let busy = http
        .get(server.url("/api/2.0/nodes"))
        .send()
        .await
        .expect("an answer at the limit");
    assert_eq!(busy.status(), 503);
    assert_eq!(
        busy.headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: Value = busy.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "too_many_connections", "{body}");
    assert!(
        full_since.elapsed() < IDLE_TIMEOUT,
        "the probes came too late to see the limit"
    );

    // Those beyond the limit are closed after the header-read timeout, the idle ones after
    // the idle timeout, and then ordinary requests are served again.
    for (i, s) in beyond.iter_mut().enumerate() {
        let took = closed_within(s, HEADER_READ_TIMEOUT * 4).await;
        assert!(
            took.is_some(),
            "silent connection {i} beyond the limit was never closed"
        );
    }
    for (i, s) in idle.iter_mut().enumerate() {
        let took = closed_within(s, IDLE_TIMEOUT * 3).await;
        assert!(took.is_some(), "idle connection {i} was never closed");
    }
    assert!(
        full_since.elapsed() >= IDLE_TIMEOUT / 2,
        "idle connections closed after {:?}, long before the idle timeout",
        full_since.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http
            .get(server.url("/api/2.0/nodes"))
            .send()
            .await
            .expect("an answer");
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 503);
        assert!(
            Instant::now() < deadline,
            "ordinary requests stayed refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = server.terminate();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn grpc_connections_are_bounded_and_silent_ones_are_closed() {
    const MAX: usize = 4;
    let dir = tempfile::tempdir().expect("a temp dir");
    let server = start(dir.path(), MAX);
    let grpc = grpc_addr(&server);

    // Take every gRPC slot with a socket that never sends the HTTP/2 preface.
    let mut silent = Vec::new();
    for _ in 0..MAX {
        silent.push(TcpStream::connect(&grpc).await.expect("connects"));
    }
    let opened = Instant::now();

    // A real client waits in the accept queue until the silent sockets are closed, then
    // is served.
    let call = tokio::spawn({
        let url = format!("http://{grpc}");
        let bearer: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", server.token.clone().unwrap())
                .parse()
                .unwrap();
        async move {
            let channel = tonic::transport::Channel::from_shared(url)
                .expect("a URL")
                .connect()
                .await
                .expect("the gRPC client connects");
            let graphs =
                DefinitionsClient::with_interceptor(channel, move |mut req: tonic::Request<()>| {
                    req.metadata_mut().insert("authorization", bearer.clone());
                    Ok(req)
                })
                .list_graphs(pb::ListGraphsRequest::default())
                .await
                .expect("ListGraphs answers");
            (Instant::now(), graphs.into_inner())
        }
    });
    for (i, s) in silent.iter_mut().enumerate() {
        let took = closed_within(s, HEADER_READ_TIMEOUT * 4).await;
        assert!(took.is_some(), "silent gRPC socket {i} was never closed");
    }
    let (answered, graphs) = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call ends")
        .expect("the call task");
    assert!(!graphs.graphs.is_empty(), "the shipped library is listed");
    let waited = answered - opened;
    assert!(
        waited >= HEADER_READ_TIMEOUT / 2,
        "the call was answered after {waited:?}, while every slot was held"
    );
    let status = server.terminate();
    assert!(status.success(), "{status}");
}
