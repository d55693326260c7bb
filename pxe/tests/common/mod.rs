//! Helpers shared by the tests that drive real peers (curl, tftp-hpa, perfdhcp, udhcpc,
//! dhclient, nmap, Kea): finding the tools, free ports, a TFTP root with known content.

#![allow(dead_code)]

use std::path::Path;

/// Whether `bin` can be run. When it cannot, the test fails and names the package list,
/// unless `METALGRAPH_SKIP_PEER_TESTS=1` asks to skip tests that need real peers.
pub fn require(bins: &[&str], needs_root: bool) -> bool {
    let missing: Vec<&str> = bins
        .iter()
        .copied()
        .filter(|b| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {b}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    let root = !needs_root || is_root();
    if missing.is_empty() && root {
        return true;
    }
    let why = format!(
        "missing tools {missing:?}{} (install the packages in pxe/tests/PACKAGES)",
        if root { "" } else { " and not running as root" }
    );
    if std::env::var("METALGRAPH_SKIP_PEER_TESTS").as_deref() == Ok("1") {
        eprintln!("skipping: {why}");
        return false;
    }
    panic!("{why}; set METALGRAPH_SKIP_PEER_TESTS=1 to skip");
}

/// Whether the tests run as root (network namespaces need it).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for tools that need a fixed port).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Deterministic content of `len` bytes.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

/// Fills `root` with boot-file stand-ins and puts a secret beside it, reachable only by
/// escaping the root.
pub fn populate_tftp_root(root: &Path) {
    std::fs::create_dir_all(root.join("efi")).unwrap();
    std::fs::write(root.join("undionly.kpxe"), pattern(70_001)).unwrap();
    std::fs::write(root.join("efi/snponly.efi"), pattern(1_000_000)).unwrap();
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    let secret = root.parent().unwrap().join("secret");
    std::fs::write(&secret, b"outside the root").unwrap();
    std::os::unix::fs::symlink(&secret, root.join("escape")).unwrap();
}
