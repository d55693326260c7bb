//! Boot files at rack scale: metalgraph's TFTP server and its node-facing `/files/` beside
//! the daemons operators would otherwise run for them, tftpd-hpa and nginx, in the same
//! run, each under the same load of concurrent `curl` downloads on loopback.
//!
//! Every process this scenario starts (metalgraph, `in.tftpd`, nginx and its workers, the
//! `curl`s) is its own child, and the daemons run in process groups of their own that are
//! killed when they are dropped, whatever happened. Ports are free loopback ports.

use std::ffi::OsString;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;

use crate::netns::{Transport, port_bound};
use crate::server::Server;

/// Which protocol a load uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `curl tftp://...` with `--tftp-blksize`; the peer is tftpd-hpa.
    Tftp,
    /// `curl http://.../files/...`; the peer is nginx with `sendfile on`.
    Http,
}

/// One load: `clients` concurrent `curl`s, each downloading the same file of `bytes`.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Load {
    pub protocol: Protocol,
    pub clients: usize,
    pub bytes: u64,
    /// The speed ratio (peer time / metalgraph time) this load should reach.
    pub target: f64,
}

/// The scenario's sizes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootSizes {
    pub loads: Vec<Load>,
    /// The TFTP block size `curl` asks for (1468 fills an Ethernet frame).
    pub blksize: u16,
    /// Each load runs this many times against each server, alternating which goes first.
    pub rounds: usize,
}

impl BootSizes {
    /// What the issue asks for: 50 TFTP fetches of 1 MiB, and 20 HTTP downloads of 64 MiB;
    /// plus large files over TFTP.
    pub fn full() -> BootSizes {
        BootSizes {
            loads: vec![
                Load {
                    protocol: Protocol::Tftp,
                    clients: 50,
                    bytes: 1 << 20,
                    target: 1.0,
                },
                Load {
                    protocol: Protocol::Tftp,
                    clients: 4,
                    bytes: 64 << 20,
                    target: 1.0,
                },
                Load {
                    protocol: Protocol::Http,
                    clients: 20,
                    bytes: 64 << 20,
                    target: 0.9,
                },
            ],
            blksize: 1468,
            rounds: 5,
        }
    }

    pub fn quick() -> BootSizes {
        BootSizes {
            rounds: 3,
            ..BootSizes::full()
        }
    }

    pub fn smoke() -> BootSizes {
        BootSizes {
            loads: vec![
                Load {
                    protocol: Protocol::Tftp,
                    clients: 4,
                    bytes: 200_000,
                    target: 1.0,
                },
                Load {
                    protocol: Protocol::Http,
                    clients: 2,
                    bytes: 3 << 20,
                    target: 0.9,
                },
            ],
            blksize: 1468,
            rounds: 1,
        }
    }
}

/// The wall times of one server under one load, one per round.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Walls {
    pub walls_s: Vec<f64>,
}

impl Walls {
    pub fn median(&self) -> f64 {
        let mut w = self.walls_s.clone();
        w.sort_by(f64::total_cmp);
        match w.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => w[n / 2],
            n => (w[n / 2 - 1] + w[n / 2]) / 2.0,
        }
    }

    pub fn min(&self) -> f64 {
        self.walls_s.iter().copied().fold(f64::INFINITY, f64::min)
    }

    pub fn max(&self) -> f64 {
        self.walls_s
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
}

/// One load's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadResult {
    pub load: Load,
    pub metalgraph: Walls,
    /// `tftpd-hpa` or `nginx`.
    pub peer: String,
    /// The peer's times, or why it did not run.
    pub peer_walls: Result<Walls, String>,
}

impl LoadResult {
    /// Peer time over metalgraph time (medians): above 1, metalgraph is faster.
    pub fn speed_ratio(&self) -> Option<f64> {
        let peer = self.peer_walls.as_ref().ok()?;
        Some(peer.median() / self.metalgraph.median())
    }
}

/// What the scenario measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BootResult {
    pub blksize: u16,
    pub rounds: usize,
    pub loads: Vec<LoadResult>,
    /// `curl`, `in.tftpd` and nginx as they name their versions.
    pub versions: Vec<(String, String)>,
}

/// Whether `curl` is installed (the scenario needs it; the peers are optional).
pub fn curl_available() -> bool {
    version_line("curl", &["--version"]).is_some()
}

/// The first line a program prints (on stdout or stderr) when asked its version.
pub fn version_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    (!line.is_empty()).then_some(line)
}

/// Writes `bytes` of a position-dependent pattern (each MiB differs), so that a
/// misplaced block shows.
pub fn write_pattern(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut mib: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = bytes;
    let mut i = 0u64;
    while left > 0 {
        mib[..8].copy_from_slice(&i.to_be_bytes());
        let n = left.min(mib.len() as u64) as usize;
        file.write_all(&mib[..n])?;
        left -= n as u64;
        i += 1;
    }
    file.flush()?;
    Ok(())
}

fn file_name(load: &Load) -> String {
    format!("boot-{}.bin", load.bytes)
}

/// A free port on loopback for `protocol` (the socket is closed again, so another process
/// could take it before the server does; a server that cannot bind fails the scenario).
fn free_port(protocol: Protocol) -> anyhow::Result<u16> {
    Ok(match protocol {
        Protocol::Tftp => UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port(),
        Protocol::Http => std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port(),
    })
}

/// `127.0.0.1:port` in this network namespace.
fn loopback(port: u16) -> Listen<'static> {
    Listen {
        netns: None,
        addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
    }
}

/// A peer daemon in a process group of its own; dropping it kills the group (the daemon,
/// and the workers or per-transfer children it forked).
pub struct Daemon {
    child: Child,
    name: &'static str,
}

impl Daemon {
    pub fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> anyhow::Result<Daemon> {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Daemon { child, name })
    }

    /// The daemon's process id (also its process group's).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the daemon has already exited (it could not bind, say).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited at once ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-TERM", "--", &group])
            .stderr(Stdio::null())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (the daemon if it ignored SIGTERM, forked children).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.wait();
    }
}

/// The current user's name, which the peers run as.
fn user_name() -> anyhow::Result<String> {
    let out = Command::new("id").arg("-un").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Where a peer daemon listens: an IPv4 address and port, inside network namespace `netns`
/// (through `ip netns exec`, which execs the daemon in place) or, when `None`, this one.
#[derive(Debug, Clone, Copy)]
pub struct Listen<'a> {
    pub netns: Option<&'a str>,
    pub addr: SocketAddrV4,
}

impl Listen<'_> {
    /// `program` as a command that runs where this listener is.
    fn command(&self, program: &str) -> Command {
        match self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// Waits until `daemon` has bound this listener's port (`what`, for errors), failing
    /// at once if it exits, with `log`'s content.
    fn wait(
        &self,
        daemon: &mut Daemon,
        transport: Transport,
        log: &Path,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        while !port_bound(daemon.pid(), transport, self.addr.port()) {
            daemon
                .check_running()
                .with_context(|| std::fs::read_to_string(log).unwrap_or_default())?;
            if start.elapsed() > limit {
                bail!(
                    "{} did not listen on {} within {limit:?}",
                    daemon.name,
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

/// tftpd-hpa in the foreground (`-L`), serving `root` (`-s`: chrooted to it, which needs
/// root) at `at`, as the current user.
pub fn start_tftpd_hpa(root: &Path, at: Listen<'_>, dir: &Path) -> anyhow::Result<Daemon> {
    if !is_root() {
        bail!("in.tftpd -s chroots into its root, which needs root");
    }
    let mut cmd = at.command("in.tftpd");
    cmd.args(["-L", "-s", "-u", &user_name()?])
        .arg("-a")
        .arg(at.addr.to_string())
        .arg(root);
    let log = dir.join("tftpd-hpa.log");
    let mut d = Daemon::spawn("in.tftpd", cmd, &log)?;
    at.wait(&mut d, Transport::Udp, &log, Duration::from_secs(10))?;
    Ok(d)
}

/// nginx with a generated configuration: `root` under `/files/` at `at`, `sendfile on`,
/// its pid, logs and temporary files in `dir`, one worker per CPU (`auto`), as the current
/// user.
pub fn start_nginx(root: &Path, at: Listen<'_>, dir: &Path) -> anyhow::Result<Daemon> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(&prefix)?;
    let p = |name: &str| prefix.join(name).display().to_string();
    // `user` only means something to a master running as root; otherwise nginx warns.
    let user = if is_root() {
        format!("user {};\n", user_name()?)
    } else {
        String::new()
    };
    let conf = format!(
        "{user}daemon off;\nworker_processes auto;\npid {pid};\nerror_log {err} warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n  \
         default_type application/octet-stream;\n  client_body_temp_path {cb};\n  proxy_temp_path {px};\n  \
         fastcgi_temp_path {fc};\n  uwsgi_temp_path {uw};\n  scgi_temp_path {sc};\n  \
         server {{\n    listen {listen};\n    location /files/ {{ alias {root}/; }}\n  }}\n}}\n",
        pid = p("nginx.pid"),
        err = p("error.log"),
        cb = p("client_body"),
        px = p("proxy"),
        fc = p("fastcgi"),
        uw = p("uwsgi"),
        sc = p("scgi"),
        listen = at.addr,
        root = root.display(),
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = at.command("nginx");
    cmd.arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path);
    let mut d = Daemon::spawn("nginx", cmd, &prefix.join("stderr.log"))?;
    at.wait(
        &mut d,
        Transport::Tcp,
        &prefix.join("error.log"),
        Duration::from_secs(10),
    )?;
    Ok(d)
}

/// The URL of `file` on a server of `protocol` at `addr`.
fn url(protocol: Protocol, addr: &str, file: &str) -> String {
    match protocol {
        Protocol::Tftp => format!("tftp://{addr}/{file}"),
        Protocol::Http => format!("http://{addr}/files/{file}"),
    }
}

fn curl(protocol: Protocol, blksize: u16, url: &str, out: &Path) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--fail",
        "--max-time",
        "300",
        "-w",
        "%{size_download}",
    ]);
    if protocol == Protocol::Tftp {
        cmd.args(["--tftp-blksize", &blksize.to_string()]);
    }
    cmd.arg("-o").arg(out).arg(url).stdin(Stdio::null());
    cmd
}

/// Downloads `url` once to a file and compares it with `original`: the warm-up, and proof
/// that the server serves the file intact (the timed runs write to `/dev/null`).
fn verify(
    protocol: Protocol,
    blksize: u16,
    url: &str,
    original: &Path,
    scratch: &Path,
) -> anyhow::Result<()> {
    let out = curl(protocol, blksize, url, scratch)
        .output()
        .context("cannot run curl")?;
    if !out.status.success() {
        bail!(
            "curl {url} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let same = std::fs::read(scratch)? == std::fs::read(original)?;
    let _ = std::fs::remove_file(scratch);
    if !same {
        bail!("{url} differs from the file served");
    }
    Ok(())
}

/// `clients` concurrent `curl`s of `url`, each of which must download `bytes`; the wall
/// time from the first spawn to the last exit.
fn run_load(
    protocol: Protocol,
    blksize: u16,
    url: &str,
    clients: usize,
    bytes: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut children = Vec::with_capacity(clients);
    for _ in 0..clients {
        let child = curl(protocol, blksize, url, Path::new("/dev/null"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run curl")?;
        children.push(child);
    }
    let mut failures = Vec::new();
    for child in children {
        let out = child.wait_with_output()?;
        let got = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || got != bytes.to_string() {
            failures.push(format!(
                "{} ({got} bytes): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let wall = start.elapsed();
    if let Some(first) = failures.first() {
        bail!(
            "{} of {clients} downloads of {url} failed; the first: {first}",
            failures.len()
        );
    }
    Ok(wall)
}

/// Runs the scenario: writes the files, starts metalgraph (sled, TFTP and the node-facing
/// listener on loopback) and the peers that are installed, and times every load against
/// each, round after round.
pub fn boot_files(
    dir: &Path,
    log: &Path,
    sizes: &BootSizes,
    limit: Duration,
) -> anyhow::Result<BootResult> {
    let root = dir.join("root");
    std::fs::create_dir_all(&root)?;
    // `curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 ...`: the first two words.
    let curl = version_line("curl", &["--version"]).context("curl is not installed")?;
    let curl: Vec<&str> = curl.split_whitespace().take(2).collect();
    let mut versions = vec![("curl".to_owned(), curl.join(" "))];
    let mut written = Vec::new();
    for load in &sizes.loads {
        let name = file_name(load);
        if !written.contains(&name) {
            write_pattern(&root.join(&name), load.bytes)?;
            written.push(name);
        }
    }

    let data = dir.join("metalgraph");
    let args: Vec<OsString> = vec![
        "--node-listen".into(),
        "127.0.0.1:0".into(),
        "--files-dir".into(),
        root.clone().into(),
        "--tftp-listen".into(),
        "127.0.0.1:0".into(),
        "--tftp-root".into(),
        root.clone().into(),
    ];
    let (server, _) = Server::start_with(Backend::Sled, &data, log, &[], &args, limit)?;
    let ours_tftp = server.listener("tftp", limit)?;
    let ours_http = server
        .listener("node-facing", limit)?
        .trim_start_matches("http://")
        .to_owned();

    let wants = |p: Protocol| sizes.loads.iter().any(|l| l.protocol == p);
    let tftpd = if wants(Protocol::Tftp) {
        let r = version_line("in.tftpd", &["-V"])
            .context("in.tftpd is not installed (scripts/install-peers.sh installs tftpd-hpa)")
            .and_then(|v| {
                versions.push(("tftpd-hpa".into(), v));
                let port = free_port(Protocol::Tftp)?;
                let d = start_tftpd_hpa(&root, loopback(port), dir)?;
                Ok((d, format!("127.0.0.1:{port}")))
            });
        Some(r.map_err(|e| format!("{e:#}")))
    } else {
        None
    };
    let nginx = if wants(Protocol::Http) {
        let r = version_line("nginx", &["-v"])
            .context("nginx is not installed (scripts/install-peers.sh installs nginx-light)")
            .and_then(|v| {
                versions.push(("nginx".into(), v));
                let port = free_port(Protocol::Http)?;
                let d = start_nginx(&root, loopback(port), dir)?;
                Ok((d, format!("127.0.0.1:{port}")))
            });
        Some(r.map_err(|e| format!("{e:#}")))
    } else {
        None
    };

    let mut results = Vec::new();
    for load in &sizes.loads {
        let name = file_name(load);
        let original = root.join(&name);
        let scratch = dir.join("check.bin");
        let (ours_addr, peer_name, peer) = match load.protocol {
            Protocol::Tftp => (&ours_tftp, "tftpd-hpa", tftpd.as_ref()),
            Protocol::Http => (&ours_http, "nginx", nginx.as_ref()),
        };
        let ours_url = url(load.protocol, ours_addr, &name);
        verify(load.protocol, sizes.blksize, &ours_url, &original, &scratch)
            .context("metalgraph")?;
        let mut peer_url = match peer {
            Some(Ok((_, addr))) => {
                let u = url(load.protocol, addr, &name);
                verify(load.protocol, sizes.blksize, &u, &original, &scratch)
                    .map(|()| u)
                    .map_err(|e| format!("{peer_name}: {e:#}"))
            }
            Some(Err(e)) => Err(e.clone()),
            None => Err("not started".into()),
        };
        let mut ours = Walls::default();
        let mut theirs = Walls::default();
        for round in 0..sizes.rounds {
            // Alternate who goes first, so that neither always runs on a warmer machine.
            let order = if round % 2 == 0 {
                [true, false]
            } else {
                [false, true]
            };
            for metalgraph in order {
                let target = if metalgraph {
                    Some(&ours_url)
                } else {
                    peer_url.as_ref().ok()
                };
                let Some(target) = target else { continue };
                let wall = run_load(
                    load.protocol,
                    sizes.blksize,
                    target,
                    load.clients,
                    load.bytes,
                );
                match (metalgraph, wall) {
                    (true, Ok(w)) => ours.walls_s.push(w.as_secs_f64()),
                    (true, Err(e)) => return Err(e.context("metalgraph")),
                    (false, Ok(w)) => theirs.walls_s.push(w.as_secs_f64()),
                    (false, Err(e)) => peer_url = Err(format!("{peer_name}: {e:#}")),
                }
            }
        }
        results.push(LoadResult {
            load: *load,
            metalgraph: ours,
            peer: peer_name.to_owned(),
            peer_walls: peer_url.map(|_| theirs),
        });
    }
    drop(tftpd);
    drop(nginx);
    server.terminate(Duration::from_secs(10))?;
    Ok(BootResult {
        blksize: sizes.blksize,
        rounds: sizes.rounds,
        loads: results,
        versions,
    })
}

/// The loads' file sizes, for a description: `1 MiB`, `64 MiB`, `200 KB`.
pub fn fmt_size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else if bytes >= 1 << 10 && bytes.is_multiple_of(1 << 10) {
        format!("{} KiB", bytes >> 10)
    } else {
        format!("{bytes} bytes")
    }
}
