//! A throwaway PostgreSQL cluster per test process: `initdb` into a temporary directory (as
//! the `postgres` user when the tests run as root, since PostgreSQL refuses to run as root),
//! the server on a free loopback port with fsync off (a commit still reaches the kernel
//! before it is acknowledged, so a crash of the server, not of the machine, loses nothing;
//! `synchronous_commit` stays on, or an immediate restart would lose acknowledged commits), trust authentication for loopback
//! only, and a fresh schema per store.
//!
//! A small keeper shell holds a pipe from this process: when the test process ends,
//! however it ends, the pipe closes and the keeper stops the server (`pg_ctl stop -m
//! immediate`) and removes the directory. Nothing outlives the test binary.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::free_tcp_port;

/// The cluster of this test process.
pub struct Postgres {
    pub port: u16,
    /// Whether the server flushes its log to disk at commit (`fsync`), as in production.
    durable: bool,
    bin: PathBuf,
    data: PathBuf,
    /// Who runs the server: the `postgres` user when the tests run as root.
    user: Option<(u32, u32)>,
    /// The keeper shell's stdin: closing it stops the server.
    keeper: Mutex<Option<ChildStdin>>,
    log: PathBuf,
}

static CLUSTER: OnceLock<Postgres> = OnceLock::new();
static DURABLE: OnceLock<Postgres> = OnceLock::new();
static SCHEMAS: AtomicUsize = AtomicUsize::new(0);

/// The directory of PostgreSQL's server binaries (the newest installed version).
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop().expect(
        "PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/initdb); run \
         scripts/install-peers.sh (as root) first",
    )
}

/// `(uid, gid)` of the `postgres` user when running as root, else none.
fn run_as() -> Option<(u32, u32)> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"])? != 0 {
        return None;
    }
    Some((id(&["-u", "postgres"])?, id(&["-g", "postgres"])?))
}

/// The cluster, started on first use.
pub fn postgres() -> &'static Postgres {
    CLUSTER.get_or_init(|| Postgres::start(false))
}

/// A cluster that fsyncs as production does, for benchmarks that compare stores' commit
/// costs (sled and the file store fsync every commit).
pub fn postgres_durable() -> &'static Postgres {
    DURABLE.get_or_init(|| Postgres::start(true))
}

impl Postgres {
    fn start(durable: bool) -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("metalgraph-pg-")
            .tempdir()
            .expect("a temp dir")
            .keep();
        let user = run_as();
        let own = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                use std::os::unix::process::CommandExt as _;
                cmd.uid(uid).gid(gid);
            }
        };
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown the cluster dir");
        }
        let data = dir.join("data");
        let mut init = Command::new(bin.join("initdb"));
        init.args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-sync",
            "-D",
        ])
        .arg(&data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        own(&mut init);
        let out = init.output().expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // TLS for connections that ask for it, with a certificate for 127.0.0.1 from a
        // private CA (`ca_pem`); the server reads its key only when it owns it, mode 0600.
        let (cert, key) = crate::loopback_certificate(&dir);
        for file in [&cert, &key] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                .expect("chmod the server's TLS files");
            if let Some((uid, gid)) = user {
                std::os::unix::fs::chown(file, Some(uid), Some(gid))
                    .expect("chown the server's TLS files");
            }
        }
        let port = free_tcp_port();
        let log = dir.join("postgres.log");
        let pg = Postgres {
            port,
            durable,
            bin,
            data,
            user,
            keeper: Mutex::new(None),
            log,
        };
        pg.pg_ctl(&["start", "-w"]);
        // The keeper stops the server and removes its directory once this process has
        // gone: its stdin is a pipe only this process holds.
        let script = format!(
            "read _ignored; '{bin}/pg_ctl' -D '{data}' stop -m immediate >/dev/null 2>&1; rm -rf '{dir}'",
            bin = pg.bin.display(),
            data = pg.data.display(),
            dir = dir.display(),
        );
        let mut keeper = Command::new("sh");
        keeper
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        own(&mut keeper);
        let mut child = keeper.spawn().expect("the PostgreSQL keeper starts");
        *pg.keeper.lock().unwrap_or_else(|p| p.into_inner()) = child.stdin.take();
        // The keeper is reaped by nobody: it ends with this process.
        std::mem::forget(child);
        pg.wait_ready();
        pg
    }

    /// Runs `pg_ctl` on the cluster, as its owner, with the server's settings.
    fn pg_ctl(&self, args: &[&str]) {
        let dir = self.data.parent().unwrap_or(&self.data).display();
        let options = format!(
            "-p {} -k '{dir}' -c listen_addresses=127.0.0.1 -c fsync={} -c max_connections=200 \
             -c ssl=on -c ssl_cert_file='{dir}/cert.pem' -c ssl_key_file='{dir}/key.pem'",
            self.port,
            if self.durable { "on" } else { "off" },
        );
        let mut cmd = Command::new(self.bin.join("pg_ctl"));
        cmd.arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-o", &options])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = self.user {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().expect("pg_ctl runs");
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Restarts the server at once, as a crash would (`pg_ctl restart -m immediate`):
    /// connections are cut, and what was committed survives.
    pub fn restart_immediate(&self) {
        self.pg_ctl(&["restart", "-m", "immediate", "-w"]);
        self.wait_ready();
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not come up on port {}; log:\n{}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The private CA (PEM) that signed the server's TLS certificate.
    pub fn ca_pem(&self) -> String {
        let dir = self.data.parent().unwrap_or(&self.data);
        std::fs::read_to_string(dir.join("ca.pem")).expect("the cluster's CA")
    }

    /// Runs one SQL statement as the superuser.
    pub fn sql(&self, db: &str, statement: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                statement,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {statement}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The store URL belonging to directory `dir`: a new schema the first time (remembered
    /// in a file there), the same one when `dir` is opened again, so that tests and
    /// benchmarks that "reopen a store's directory" reopen its database.
    pub fn store_url_for(&self, dir: &std::path::Path) -> String {
        let marker = dir.join("database-url");
        if let Ok(url) = std::fs::read_to_string(&marker) {
            return url;
        }
        let url = self.store_url();
        std::fs::create_dir_all(dir).expect("the store's directory");
        std::fs::write(&marker, &url).expect("remember the database");
        url
    }

    /// The URL of a new, empty place for one store: a schema of its own in the shared
    /// test database (the connection's `search_path`), since a schema is made in a moment
    /// and a database is not.
    pub fn store_url(&self) -> String {
        static SHARED: OnceLock<()> = OnceLock::new();
        SHARED.get_or_init(|| {
            self.sql("postgres", "CREATE DATABASE metalgraph");
        });
        let schema = format!("s{}", SCHEMAS.fetch_add(1, Ordering::SeqCst));
        self.sql("metalgraph", &format!("CREATE SCHEMA {schema}"));
        format!(
            "postgresql://postgres@127.0.0.1:{}/metalgraph?sslmode=disable&options=-csearch_path%3D{schema}",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = stdin.write_all(b"stop\n");
        }
    }
}
