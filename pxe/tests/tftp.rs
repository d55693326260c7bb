//! The TFTP server over loopback, driven by a hand-written client: plain and negotiated
//! transfers, the UEFI tsize probe, the path jail as seen on the wire, the read-only rule,
//! retransmission, block-number rollover and the bound on concurrent transfers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use metalgraph_pxe::tftp::{self, Options, Server};
use tokio::net::UdpSocket;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// A running server over a temporary root; cancelled on drop.
struct Fixture {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Fixture {
    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

async fn start(tune: impl FnOnce(&mut Options)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("efi")).unwrap();
    std::fs::write(root.join("small.txt"), b"hello from metalgraph\n").unwrap();
    std::fs::write(root.join("efi/snponly.efi"), pattern(100_000)).unwrap();
    std::fs::write(root.join("exact.bin"), pattern(1024)).unwrap();
    std::fs::write(dir.path().join("secret"), b"outside the root").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
    let mut o = Options::new("127.0.0.1:0".parse().unwrap(), &root);
    o.timeout = Duration::from_millis(200);
    o.retries = 3;
    o.max_blksize = 8192;
    tune(&mut o);
    let server = Server::bind(o).await.unwrap();
    let addr = server.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(cancel.clone()));
    Fixture { addr, dir, cancel }
}

fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    for s in [name, "octet"] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    for (k, v) in opts {
        for s in [k, v] {
            p.extend_from_slice(s.as_bytes());
            p.push(0);
        }
    }
    p
}

fn ack(block: u16) -> Vec<u8> {
    let mut p = vec![0, 4];
    p.extend_from_slice(&block.to_be_bytes());
    p
}

/// A packet as the client sees it.
#[derive(Debug, PartialEq)]
enum Pkt {
    Data(u16, Vec<u8>),
    Oack(Vec<(String, String)>),
    Error(u16, String),
}

fn decode(p: &[u8]) -> Pkt {
    let op = u16::from_be_bytes([p[0], p[1]]);
    match op {
        3 => Pkt::Data(u16::from_be_bytes([p[2], p[3]]), p[4..].to_vec()),
        5 => Pkt::Error(
            u16::from_be_bytes([p[2], p[3]]),
            String::from_utf8_lossy(&p[4..p.len() - 1]).into_owned(),
        ),
        6 => {
            let parts: Vec<String> = p[2..p.len() - 1]
                .split(|b| *b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            Pkt::Oack(
                parts
                    .chunks(2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect(),
            )
        }
        _ => panic!("unexpected opcode {op}"),
    }
}

async fn recv(sock: &UdpSocket) -> (Pkt, SocketAddr) {
    let mut buf = vec![0u8; 70_000];
    let (n, from) = timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .expect("the server answers within 3 s")
        .unwrap();
    (decode(&buf[..n]), from)
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

/// Downloads `name` with `opts`, acknowledging every `windowsize`-th block (or the last).
/// Returns the OACK (if any) and the content.
async fn fetch(
    addr: SocketAddr,
    name: &str,
    opts: &[(&str, &str)],
) -> Result<(Option<Vec<(String, String)>>, Vec<u8>), (u16, String)> {
    let sock = client().await;
    sock.send_to(&rrq(name, opts), addr).await.unwrap();
    let mut out = Vec::new();
    let mut blksize = 512;
    let mut window = 1u32;
    let mut oack = None;
    let mut expected: u16 = 1;
    let mut in_window = 0;
    loop {
        let (p, tid) = recv(&sock).await;
        assert_ne!(tid, addr, "transfers run from their own port (TID)");
        match p {
            Pkt::Error(code, msg) => return Err((code, msg)),
            Pkt::Oack(o) => {
                for (k, v) in &o {
                    match k.as_str() {
                        "blksize" => blksize = v.parse().unwrap(),
                        "windowsize" => window = v.parse().unwrap(),
                        _ => {}
                    }
                }
                oack = Some(o);
                sock.send_to(&ack(0), tid).await.unwrap();
            }
            Pkt::Data(n, data) => {
                assert_eq!(n, expected, "blocks arrive in order over loopback");
                let last = data.len() < blksize;
                out.extend_from_slice(&data);
                expected = expected.wrapping_add(1);
                in_window += 1;
                if last || in_window == window {
                    sock.send_to(&ack(n), tid).await.unwrap();
                    in_window = 0;
                }
                if last {
                    return Ok((oack, out));
                }
            }
        }
    }
}

#[tokio::test]
async fn plain_and_negotiated_transfers_are_byte_identical() {
    let f = start(|_| {}).await;
    let big = std::fs::read(f.root().join("efi/snponly.efi")).unwrap();
    let exact = std::fs::read(f.root().join("exact.bin")).unwrap();
    // (file, options, expected OACK, expected content)
    let s = |v: &[(&str, &str)]| {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    let cases = vec![
        (
            "small.txt",
            vec![],
            None,
            b"hello from metalgraph\n".to_vec(),
        ),
        ("efi/snponly.efi", vec![], None, big.clone()),
        ("efi\\snponly.efi", vec![], None, big.clone()),
        // A size that is a multiple of the block size ends with an empty block.
        ("exact.bin", vec![], None, exact.clone()),
        (
            "efi/snponly.efi",
            vec![("blksize", "1468"), ("tsize", "0")],
            Some(s(&[("blksize", "1468"), ("tsize", "100000")])),
            big.clone(),
        ),
        (
            "efi/snponly.efi",
            vec![
                ("tsize", "0"),
                ("blksize", "65464"),
                ("windowsize", "8"),
                ("timeout", "2"),
            ],
            Some(s(&[
                ("tsize", "100000"),
                ("blksize", "8192"),
                ("windowsize", "8"),
                ("timeout", "2"),
            ])),
            big.clone(),
        ),
        (
            "exact.bin",
            vec![("windowsize", "64"), ("blksize", "512"), ("unknown", "1")],
            Some(s(&[("windowsize", "16"), ("blksize", "512")])),
            exact.clone(),
        ),
    ];
    for (name, opts, want_oack, want) in cases {
        let (oack, data) = fetch(f.addr, name, &opts).await.unwrap();
        assert_eq!(oack, want_oack, "{name} {opts:?}");
        assert!(
            data == want,
            "{name} {opts:?}: content differs ({} vs {} bytes)",
            data.len(),
            want.len()
        );
    }
}

#[tokio::test]
async fn refusals_say_file_not_found_and_never_name_a_path() {
    let f = start(|_| {}).await;
    let root = f.root().display().to_string();
    let cases = [
        "../secret",
        "efi/../../secret",
        "/etc/passwd",
        "\\etc\\passwd",
        "escape",
        "missing.efi",
        "efi",
        &format!("{root}/small.txt"),
    ];
    for name in cases {
        let err = fetch(f.addr, name, &[]).await.unwrap_err();
        assert_eq!(err, (1, "file not found".to_owned()), "{name}");
        assert!(
            !err.1.contains('/'),
            "{name}: error text must not contain a path"
        );
    }
}

#[tokio::test]
async fn writes_and_unsupported_modes_are_refused() {
    let f = start(|_| {}).await;
    let sock = client().await;
    sock.send_to(b"\0\x02upload.bin\0octet\0", f.addr)
        .await
        .unwrap();
    assert_eq!(
        recv(&sock).await.0,
        Pkt::Error(2, "server is read-only".into())
    );
    sock.send_to(b"\0\x01small.txt\0mail\0", f.addr)
        .await
        .unwrap();
    assert_eq!(
        recv(&sock).await.0,
        Pkt::Error(4, "unsupported mode, use octet".into())
    );
    sock.send_to(b"\0\x01small.txt", f.addr).await.unwrap();
    assert_eq!(
        recv(&sock).await.0,
        Pkt::Error(4, "malformed request".into())
    );
    // netascii is served as octet.
    sock.send_to(b"\0\x01small.txt\0netascii\0", f.addr)
        .await
        .unwrap();
    assert_eq!(
        recv(&sock).await.0,
        Pkt::Data(1, b"hello from metalgraph\n".to_vec())
    );
    assert!(!f.root().join("upload.bin").exists());
}

#[tokio::test]
async fn uefi_tsize_probe_is_aborted_then_retried_and_frees_its_slot() {
    // One transfer at a time: the retry only succeeds if the aborted probe released it.
    let f = start(|o| o.max_transfers = 1).await;
    let sock = client().await;
    let opts = [("blksize", "1468"), ("tsize", "0")];
    sock.send_to(&rrq("efi/snponly.efi", &opts), f.addr)
        .await
        .unwrap();
    let (p, tid) = recv(&sock).await;
    assert_eq!(
        p,
        Pkt::Oack(vec![
            ("blksize".into(), "1468".into()),
            ("tsize".into(), "100000".into())
        ])
    );
    // EDK2 has what it wanted (the size) and aborts with error 8.
    sock.send_to(b"\0\x05\0\x08User aborted the transfer\0", tid)
        .await
        .unwrap();
    // The real request, from the same client port, as EDK2 does.
    let mut got = None;
    for _ in 0..20 {
        sock.send_to(&rrq("efi/snponly.efi", &opts), f.addr)
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        if let Ok(Ok((n, tid2))) =
            timeout(Duration::from_millis(100), sock.recv_from(&mut buf)).await
        {
            got = Some((decode(&buf[..n]), tid2));
            break;
        }
    }
    let (p, tid2) = got.expect("the retried request is served");
    assert!(matches!(p, Pkt::Oack(_)), "{p:?}");
    assert_ne!(tid, tid2, "a new transfer, a new TID");
    sock.send_to(&ack(0), tid2).await.unwrap();
    assert!(matches!(recv(&sock).await.0, Pkt::Data(1, d) if d.len() == 1468));
}

#[tokio::test]
async fn concurrency_is_bounded_and_dropped_requests_succeed_on_retry() {
    let f = start(|o| o.max_transfers = 1).await;
    let holder = client().await;
    holder
        .send_to(&rrq("small.txt", &[("tsize", "0")]), f.addr)
        .await
        .unwrap();
    let (p, tid) = recv(&holder).await;
    assert!(matches!(p, Pkt::Oack(_)));
    // While the first transfer waits for its ACK, a second request is dropped (not refused,
    // so the client simply retries).
    let other = client().await;
    other.send_to(&rrq("small.txt", &[]), f.addr).await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        timeout(Duration::from_millis(150), other.recv_from(&mut buf))
            .await
            .is_err()
    );
    // The holder completes; the retry is served.
    holder.send_to(&ack(0), tid).await.unwrap();
    let (p, tid) = recv(&holder).await;
    assert!(matches!(p, Pkt::Data(1, _)));
    holder.send_to(&ack(1), tid).await.unwrap();
    // Like a PXE ROM, the client retransmits its request while no answer comes (here every
    // 100 ms); it is served once the holder's transfer has freed the slot.
    let retry = client().await;
    let mut answer = None;
    for _ in 0..30 {
        retry.send_to(&rrq("small.txt", &[]), f.addr).await.unwrap();
        if let Ok(Ok((n, from))) =
            timeout(Duration::from_millis(100), retry.recv_from(&mut buf)).await
        {
            answer = Some((decode(&buf[..n]), from));
            break;
        }
    }
    let (p, tid) = answer.expect("a retransmitted request is served");
    assert_eq!(p, Pkt::Data(1, b"hello from metalgraph\n".to_vec()));
    retry.send_to(&ack(1), tid).await.unwrap();
}

#[tokio::test]
async fn lost_acks_are_retransmitted_and_silent_clients_are_abandoned() {
    let f = start(|o| o.max_transfers = 1).await;
    let sock = client().await;
    sock.send_to(&rrq("small.txt", &[]), f.addr).await.unwrap();
    let (first, tid) = recv(&sock).await;
    // No ACK: the same block comes again after the timeout.
    let (again, tid2) = recv(&sock).await;
    assert_eq!((first, tid), (again, tid2));
    // Stay silent: after 3 retries (~0.8 s) the server gives up and the slot is free again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut buf = [0u8; 1024];
    while timeout(Duration::from_millis(10), sock.recv_from(&mut buf))
        .await
        .is_ok()
    {}
    let (_, data) = fetch(f.addr, "small.txt", &[]).await.unwrap();
    assert_eq!(data, b"hello from metalgraph\n");
}

#[tokio::test]
async fn block_numbers_roll_over_past_65535() {
    let f = start(|o| o.max_windowsize = 64).await;
    // 70 000 blocks of 8 bytes.
    let content = pattern(8 * 70_000 + 3);
    std::fs::write(f.root().join("long.bin"), &content).unwrap();
    let (_, data) = fetch(
        f.addr,
        "long.bin",
        &[("blksize", "8"), ("windowsize", "64")],
    )
    .await
    .unwrap();
    assert!(data == content, "content differs after rollover");
}

#[tokio::test]
async fn bind_reports_a_missing_root_by_name() {
    let err = Server::bind(Options::new(
        "127.0.0.1:0".parse().unwrap(),
        Path::new("/nonexistent/tftp"),
    ))
    .await
    .err()
    .expect("a missing root is an error");
    assert!(matches!(err, tftp::Error::Root { .. }));
    assert!(err.to_string().contains("/nonexistent/tftp"), "{err}");
}

/// A window that crosses the end of the server's read buffer, lost once and resent, and a
/// partial acknowledgement (RFC 7440) that sends the server back to an earlier part of the
/// file than its buffer holds: every block, first sent or resent, is the file's.
#[tokio::test]
async fn windows_across_read_buffer_refills_survive_loss_and_partial_acks() {
    use std::collections::BTreeMap;

    let f = start(|o| o.max_blksize = 1468).await;
    let content = pattern(3 * tftp::READ_AHEAD + 1000);
    std::fs::write(f.root().join("large.bin"), &content).unwrap();
    let (blk, window) = (1468usize, 8u64);
    let last = (content.len() / blk + 1) as u64;
    // The block holding byte k × READ_AHEAD, where the server's buffer must be refilled.
    let boundary = |k: usize| ((k * tftp::READ_AHEAD) / blk + 1) as u64;

    let sock = client().await;
    let opts = [("blksize", "1468"), ("windowsize", "8")];
    sock.send_to(&rrq("large.bin", &opts), f.addr)
        .await
        .unwrap();
    let (oack, tid) = recv(&sock).await;
    assert_eq!(
        oack,
        Pkt::Oack(vec![
            ("blksize".into(), "1468".into()),
            ("windowsize".into(), "8".into())
        ])
    );
    sock.send_to(&ack(0), tid).await.unwrap();

    let mut blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let (mut lost, mut partial, mut resent) = (false, false, 0);
    let mut base = 1u64;
    while base <= last {
        let end = (base + window - 1).min(last);
        for idx in base..=end {
            let (p, from) = recv(&sock).await;
            assert_eq!(from, tid);
            let Pkt::Data(n, data) = p else {
                panic!("block {idx}: {p:?}")
            };
            assert_eq!(n, idx as u16, "blocks arrive in order");
            if let Some(before) = blocks.insert(idx, data.clone()) {
                assert!(before == data, "block {idx} differs when sent again");
                resent += 1;
            }
        }
        let crosses = |k: usize| (base..=end).contains(&boundary(k));
        if !lost && crosses(1) {
            // Lost: the server resends the whole window after its timeout.
            lost = true;
            continue;
        }
        if !partial && crosses(2) && boundary(2) > base {
            // Only the window's first block arrived: the server goes on from the second.
            partial = true;
            sock.send_to(&ack(base as u16), tid).await.unwrap();
            base += 1;
            continue;
        }
        sock.send_to(&ack(end as u16), tid).await.unwrap();
        base = end + 1;
    }
    assert!(lost && partial);
    assert!(
        resent >= 8 + 7,
        "a lost window and a partial one were sent again ({resent})"
    );
    let data: Vec<u8> = blocks.into_values().flatten().collect();
    assert!(
        data == content,
        "content differs ({} vs {} bytes)",
        data.len(),
        content.len()
    );
}

/// A transfer waiting for its client stops at its deadline and at shutdown, telling the
/// client "transfer aborted" both times.
#[tokio::test]
async fn transfers_stop_at_their_deadline_and_at_shutdown() {
    let f = start(|o| {
        o.timeout = Duration::from_secs(5);
        o.transfer_deadline = Duration::from_millis(300);
    })
    .await;
    let sock = client().await;
    let started = std::time::Instant::now();
    sock.send_to(&rrq("small.txt", &[]), f.addr).await.unwrap();
    let (first, _) = recv(&sock).await;
    assert!(matches!(first, Pkt::Data(1, _)));
    // No ACK, and retransmission is 5 s away: the deadline ends it.
    let (p, _) = recv(&sock).await;
    assert_eq!(p, Pkt::Error(0, "transfer aborted".into()));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );

    let f = start(|o| o.timeout = Duration::from_secs(5)).await;
    let sock = client().await;
    sock.send_to(&rrq("small.txt", &[]), f.addr).await.unwrap();
    let (first, _) = recv(&sock).await;
    assert!(matches!(first, Pkt::Data(1, _)));
    let stopped = std::time::Instant::now();
    f.cancel.cancel();
    let (p, _) = recv(&sock).await;
    assert_eq!(p, Pkt::Error(0, "transfer aborted".into()));
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopped.elapsed()
    );
}
