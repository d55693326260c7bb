//! Real clients against our servers on loopback: curl and tftp-hpa fetch files from the
//! TFTP server byte for byte (and are refused outside the root), and Kea's perfdhcp, acting
//! as a relay, gets leases from full-mode DHCP.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use metalgraph_pxe::dhcp::{self, FullOptions, Mode};
use metalgraph_pxe::{MemPlanner, tftp};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

struct Tftp {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Drop for Tftp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn tftp_server() -> Tftp {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    common::populate_tftp_root(&root);
    let mut o = tftp::Options::new("127.0.0.1:0".parse().unwrap(), &root);
    o.max_blksize = 65464;
    let server = tftp::Server::bind(o).await.unwrap();
    let addr = server.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(server.run(cancel.clone()));
    Tftp { addr, dir, cancel }
}

#[tokio::test]
async fn curl_fetches_byte_identical_files_and_is_refused_outside_the_root() {
    if !common::require(&["curl"], false) {
        return;
    }
    let t = tftp_server().await;
    let out = t.dir.path().join("out");
    let port = t.addr.port();
    // (curl arguments, expected exit code, file to compare with)
    let cases: Vec<(Vec<String>, i32, Option<&str>)> = vec![
        (
            vec![format!("tftp://127.0.0.1:{port}/efi/snponly.efi")],
            0,
            Some("efi/snponly.efi"),
        ),
        (
            vec![
                "--tftp-blksize".into(),
                "1468".into(),
                format!("tftp://127.0.0.1:{port}/undionly.kpxe"),
            ],
            0,
            Some("undionly.kpxe"),
        ),
        (
            vec![
                "--tftp-blksize".into(),
                "65464".into(),
                format!("tftp://127.0.0.1:{port}/efi/snponly.efi"),
            ],
            0,
            Some("efi/snponly.efi"),
        ),
        (
            vec![
                "--tftp-no-options".into(),
                format!("tftp://127.0.0.1:{port}/hello.txt"),
            ],
            0,
            Some("hello.txt"),
        ),
        // curl normalises "/../" away unless told not to; both must stay inside the root.
        (vec![format!("tftp://127.0.0.1:{port}/../secret")], 68, None),
        (
            vec![
                "--path-as-is".into(),
                format!("tftp://127.0.0.1:{port}/../secret"),
            ],
            68,
            None,
        ),
        (
            vec![
                "--path-as-is".into(),
                format!("tftp://127.0.0.1:{port}/efi/../../secret"),
            ],
            68,
            None,
        ),
        (
            vec![format!("tftp://127.0.0.1:{port}//etc/passwd")],
            68,
            None,
        ),
        (vec![format!("tftp://127.0.0.1:{port}/escape")], 68, None),
        (vec![format!("tftp://127.0.0.1:{port}/missing")], 68, None),
    ];
    let completed = "tftp_transfers_total{outcome=\"completed\"}";
    let refused = "tftp_transfers_total{outcome=\"refused\"}";
    let series = [completed, refused, "tftp_sent_bytes_total"];
    let before = series.map(counter);
    let mut want = [0u64; 3];
    for (args, want_rc, compare) in cases {
        let _ = std::fs::remove_file(&out);
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "10", "-o"])
            .arg(&out)
            .args(&args)
            .output()
            .await
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(want_rc),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        if let Some(name) = compare {
            let want_bytes = std::fs::read(t.dir.path().join("root").join(name)).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == want_bytes,
                "curl {args:?}: content differs"
            );
            want[0] += 1;
            want[2] += want_bytes.len() as u64;
        } else {
            let got = std::fs::read(&out).unwrap_or_default();
            assert!(
                !got.starts_with(b"outside"),
                "curl {args:?} read the secret"
            );
            want[1] += 1;
        }
    }
    // The counters saw at least these transfers (other tests of this binary add theirs).
    let after = series.map(counter);
    for i in 0..3 {
        assert!(
            after[i] - before[i] >= want[i],
            "{}: {} → {}, want at least {} more",
            series[i],
            before[i],
            after[i],
            want[i]
        );
    }
}

#[tokio::test]
async fn tftp_hpa_fetches_byte_identical_files_and_is_refused_outside_the_root() {
    if !common::require(&["tftp"], false) {
        return;
    }
    let t = tftp_server().await;
    let out = t.dir.path().join("out");
    let port = t.addr.port().to_string();
    // (remote name, expected success)
    let cases = [
        ("efi/snponly.efi", true),
        ("undionly.kpxe", true),
        ("../secret", false),
        ("/etc/passwd", false),
        ("escape", false),
    ];
    for (name, ok) in cases {
        let _ = std::fs::remove_file(&out);
        let o = Command::new("tftp")
            .args(["127.0.0.1", &port, "-m", "binary", "-c", "get", name])
            .arg(&out)
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        if ok {
            let want = std::fs::read(t.dir.path().join("root").join(name)).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == want,
                "tftp get {name}: content differs; {text}"
            );
        } else {
            assert!(
                text.contains("Error code 1: file not found"),
                "tftp get {name}: {text}"
            );
            assert!(
                !text.contains(&t.dir.path().display().to_string()),
                "{text}"
            );
        }
    }
    // The tftp-hpa client cannot send options; busybox's can (blksize and tsize, as PXE
    // ROMs send them), and its put must be refused.
    if !common::require(&["busybox"], false) {
        return;
    }
    let _ = std::fs::remove_file(&out);
    let o = Command::new("busybox")
        .args(["tftp", "-g", "-r", "efi/snponly.efi", "-b", "1428", "-l"])
        .arg(&out)
        .args(["127.0.0.1", &port])
        .output()
        .await
        .unwrap();
    let want = std::fs::read(t.dir.path().join("root/efi/snponly.efi")).unwrap();
    assert!(
        std::fs::read(&out).unwrap_or_default() == want,
        "busybox tftp -b 1428: {o:?}"
    );
    let o = Command::new("busybox")
        .args(["tftp", "-p", "-r", "upload", "-l"])
        .arg(&out)
        .args(["127.0.0.1", &port])
        .output()
        .await
        .unwrap();
    assert!(!o.status.success(), "busybox tftp put must fail");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read-only"),
        "{o:?}"
    );
    assert!(!t.dir.path().join("root/upload").exists());
}

/// One line of perfdhcp's statistics: `(sent, received, drops)` for the first and second
/// exchange (DISCOVER-OFFER, REQUEST-ACK).
fn perfdhcp_counts(text: &str) -> Vec<(u64, u64, u64)> {
    let num = |line: &str| {
        line.split(':')
            .nth(1)
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let mut out = Vec::new();
    let (mut sent, mut recv) = (None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with("sent packets:") {
            sent = num(line);
        } else if line.starts_with("received packets:") {
            recv = num(line);
        } else if line.starts_with("drops:")
            && let (Some(s), Some(r), Some(d)) = (sent, recv, num(line))
        {
            out.push((s, r, d));
        }
    }
    out
}

#[tokio::test]
async fn perfdhcp_gets_leases_from_full_mode_through_a_relay() {
    if !common::require(&["perfdhcp"], true) {
        return;
    }
    let planner = Arc::new(MemPlanner::new("http://127.0.0.1:8090/api/2.0/profiles"));
    let relay_port = common::free_udp_port();
    let mut full = FullOptions::new(Ipv4Addr::new(10, 50, 0, 1), Ipv4Addr::new(10, 50, 3, 250));
    full.subnet_mask = Ipv4Addr::new(255, 255, 0, 0);
    let mut o = dhcp::Options::new(Mode::Full(full), Ipv4Addr::LOCALHOST);
    o.listen = Ipv4Addr::LOCALHOST;
    o.ports.server = 0;
    o.ports.relay = relay_port;
    let server = dhcp::Server::bind(o, planner.clone()).await.unwrap();
    let port = server.local_addr().unwrap().port();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(cancel.clone()));

    // perfdhcp acts as a relay (giaddr = 127.0.0.1) and listens for replies on -L. Option 60
    // makes its clients PXE clients; others would be ignored by design.
    let o = Command::new("perfdhcp")
        .args([
            "-4",
            "-l",
            "127.0.0.1",
            "-L",
            &relay_port.to_string(),
            "-N",
            &port.to_string(),
        ])
        .args([
            "-r",
            "100",
            "-R",
            "150",
            "-p",
            "3",
            "-o",
            "60,505845436c69656e743a417263683a30303030303a554e44493a303032303031",
        ])
        .arg("127.0.0.1")
        .output()
        .await
        .unwrap();
    cancel.cancel();
    task.await.unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let counts = perfdhcp_counts(&text);
    eprintln!("perfdhcp (sent, received, drops) per exchange: {counts:?}");
    assert_eq!(
        counts.len(),
        2,
        "perfdhcp reports two exchanges:\n{text}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (i, (sent, received, drops)) in counts.iter().enumerate() {
        assert!(*sent >= 100, "exchange {i}: only {sent} sent\n{text}");
        // A packet still in flight when the test period ends counts as a drop.
        assert!(
            *drops <= 2 && received + drops >= *sent,
            "exchange {i}: {counts:?}\n{text}"
        );
    }
    let leases = planner.leases();
    assert!(leases.len() >= 100, "only {} leases stored", leases.len());
    assert!(
        leases
            .iter()
            .all(|l| (u32::from(l.ip) >> 16) == u32::from(Ipv4Addr::new(10, 50, 0, 0)) >> 16)
    );

    // The counters saw the same exchanges: every DISCOVER offered to, every REQUEST
    // acknowledged, at least as many of each as perfdhcp got answers to.
    let metric = counter;
    let (discovers, offers) = (
        metric("dhcp_requests_total{message_type=\"discover\"}"),
        metric("dhcp_replies_total{message_type=\"offer\"}"),
    );
    let (requests, acks) = (
        metric("dhcp_requests_total{message_type=\"request\"}"),
        metric("dhcp_replies_total{message_type=\"ack\"}"),
    );
    assert_eq!(offers, discovers, "{counts:?}");
    assert_eq!(acks, requests, "{counts:?}");
    assert!(offers >= counts[0].1 && acks >= counts[1].1, "{counts:?}");
    assert_eq!(metric("dhcp_malformed_total"), 0);
}

/// A counter's value as network boot's metrics encode it (0 when absent).
fn counter(series: &str) -> u64 {
    let mut registry = prometheus_client::registry::Registry::default();
    metalgraph_pxe::metrics::register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}
