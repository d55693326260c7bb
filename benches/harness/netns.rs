//! Network namespaces for the scenarios that put a server and its clients on a wire of
//! their own (DHCP, the rack power-on): two namespaces joined by a veth pair, removed when
//! dropped; waiting until a process in one of them has bound a port; and running async code
//! with its sockets inside a namespace.
//!
//! Root only. Only the namespaces created here (named after this process) and their own
//! loopbacks are touched.

use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// The server's address on its veth; the client side has [`CLIENT_ADDR`] (a DHCP relay's
/// `giaddr`, which selects the subnet).
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);
/// The prefix length of both addresses: the served subnet is 10.77.0.0/16.
pub const PREFIX_LEN: u8 = 16;
pub const SUBNET: &str = "10.77.0.0/16";
pub const NETMASK: &str = "255.255.0.0";

/// Runs `program` with `args`, failing with its standard error if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two namespaces joined by a veth pair; removed on drop (which removes the pair too).
pub struct Netns {
    pub server: String,
    pub client: String,
    pub server_if: String,
    pub client_if: String,
}

impl Netns {
    /// The namespaces, their loopbacks up, [`SERVER_ADDR`] and [`CLIENT_ADDR`] on the two
    /// ends of the pair.
    pub fn create() -> anyhow::Result<Netns> {
        let tag = std::process::id();
        let net = Netns {
            server: format!("mgbench-{tag}-srv"),
            client: format!("mgbench-{tag}-cli"),
            // Interface names have at most 15 bytes.
            server_if: format!("mgb{tag}s"),
            client_if: format!("mgb{tag}c"),
        };
        // Leftovers of an earlier run with the same process id would make `add` fail.
        net.remove();
        let made = net.setup();
        // On failure `net` is dropped here, which removes what was made.
        made.map(|()| net)
    }

    fn setup(&self) -> anyhow::Result<()> {
        for ns in [&self.server, &self.client] {
            run("ip", &["netns", "add", ns])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &self.server_if,
                "type",
                "veth",
                "peer",
                "name",
                &self.client_if,
            ],
        )?;
        for (ns, iface, addr) in [
            (&self.server, &self.server_if, SERVER_ADDR),
            (&self.client, &self.client_if, CLIENT_ADDR),
        ] {
            run("ip", &["link", "set", iface, "netns", ns])?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{addr}/{PREFIX_LEN}"),
                    "dev",
                    iface,
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", iface, "up"])?;
        }
        Ok(())
    }

    /// Deletes the namespaces (with the veth ends inside them) and the pair, in case it
    /// was left in this namespace by a setup that failed half way.
    fn remove(&self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        };
        for ns in [&self.server, &self.client] {
            quiet(&["netns", "del", ns]);
        }
        quiet(&["link", "del", &self.server_if]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A transport, for [`wait_for_port`].
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    Udp,
    /// A listening TCP socket.
    Tcp,
}

/// Whether the namespace of process `pid` has a socket bound to `port` (for TCP, one
/// listening): `/proc/PID/net/{udp,tcp}` is the table of the process's namespace.
pub fn port_bound(pid: u32, transport: Transport, port: u16) -> bool {
    let table = match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    };
    let suffix = format!(":{port:04X}");
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
    // `local_address` is `HEXIP:HEXPORT`; `st` 0A is LISTEN (UDP sockets show 07).
    text.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or_default();
        let state = f.nth(1).unwrap_or_default();
        local.ends_with(&suffix) && (matches!(transport, Transport::Udp) || state == "0A")
    })
}

/// Waits until [`port_bound`], or fails after `limit`.
pub fn wait_for_port(
    pid: u32,
    transport: Transport,
    port: u16,
    what: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !port_bound(pid, transport, port) {
        if start.elapsed() > limit {
            bail!("{what} did not bind {transport:?} port {port} within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The UDP datagrams dropped so far on full receive buffers (`RcvbufErrors`) in the network
/// namespace of `/proc/{task}` (a process id, or `thread-self`); 0 when unreadable.
pub fn udp_rcvbuf_errors(task: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{task}/net/snmp")).unwrap_or_default();
    // Two `Udp:` lines: the names, then the values.
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Runs `work` to completion on a tokio runtime of `threads` workers whose threads are all
/// in network namespace `ns`, so that every socket the work opens is that namespace's. The
/// runtime lives on a thread of its own that moves into the namespace before it builds the
/// runtime; threads inherit the namespace of the thread that creates them, so the workers
/// and the blocking pool are in it too. The caller's thread stays where it is.
pub fn block_on_in<T, F>(ns: &str, threads: usize, work: F) -> anyhow::Result<T>
where
    T: Send,
    F: AsyncFnOnce() -> anyhow::Result<T> + Send,
{
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path)
                    .with_context(|| format!("cannot open network namespace {path}"))?;
                rustix::thread::move_into_link_name_space(
                    file.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .with_context(|| format!("cannot enter network namespace {ns}"))?;
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .enable_all()
                    .build()?;
                runtime.block_on(work())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in network namespace {ns} panicked"))?
    })
}
