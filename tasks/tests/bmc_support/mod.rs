//! Fixtures shared by the BMC tests: a job context over an in-memory node store, and the
//! real peers (sushy-tools' `sushy-emulator`, OpenIPMI's `ipmi_sim`) started per test on
//! free ports in fresh temporary directories, and killed when dropped.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalgraph_engine::job::{BoxFuture, JobContext, JobServices, Options};
use metalgraph_engine::nodes::{Node, Nodes, Obm, ObmConfig, Secret};
use metalgraph_engine::{Job, JobError, JobResult};
use metalgraph_store::MemStore;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// Engine services for provisioning jobs: nodes in memory, and notifications answered at
/// once with a fixed body.
pub struct TestServices {
    pub nodes: Nodes,
    pub notification: Mutex<Option<Value>>,
}

impl JobServices for TestServices {
    fn run_subgraph(&self, _: &JobContext, _: &str, _: Options) -> BoxFuture<'static, JobResult> {
        Box::pin(async { Err(JobError::new("no subgraphs in BMC tests")) })
    }

    fn wait_notification(&self, _ctx: &JobContext) -> BoxFuture<'static, JobResult> {
        let body = self.notification.lock().unwrap().clone();
        Box::pin(async move {
            match body {
                Some(b) => Ok(b),
                // No callback configured: wait like a node that never calls.
                None => std::future::pending().await,
            }
        })
    }

    fn nodes(&self) -> &Nodes {
        &self.nodes
    }
}

/// A test world: a node store and the services jobs see.
pub struct World {
    pub services: Arc<TestServices>,
}

impl Default for World {
    fn default() -> Self {
        Self {
            services: Arc::new(TestServices {
                nodes: Nodes::new(Arc::new(MemStore::new())),
                notification: Mutex::new(None),
            }),
        }
    }
}

impl World {
    pub fn nodes(&self) -> &Nodes {
        &self.services.nodes
    }

    /// Stores a node with one OBM and returns it.
    pub fn node(&self, name: &str, obm: Obm) -> Node {
        self.nodes()
            .create(Node {
                id: String::new(),
                name: name.to_owned(),
                identifiers: Vec::new(),
                node_type: "compute".to_owned(),
                tags: Vec::new(),
                obms: vec![obm],
                created_at: String::new(),
                updated_at: String::new(),
            })
            .expect("create node")
    }

    /// A context as the engine builds it: job defaults merged under `options`, coerced and
    /// checked against the schema.
    pub fn ctx(&self, job: &dyn Job, options: Value, node: Option<&Node>) -> JobContext {
        let schema = job.schema();
        let mut merged = schema.defaults();
        let Value::Object(given) = options else {
            panic!("options must be an object, got {options}");
        };
        merged.extend(given);
        schema.coerce(&mut merged);
        if let Err((field, msg)) = schema.check(&merged, true) {
            panic!("{}: option {field} {msg}", job.name());
        }
        JobContext {
            options: merged,
            node: node.cloned(),
            workflow_id: "wf-1".to_owned(),
            task_id: "task-1".to_owned(),
            label: "under-test".to_owned(),
            attempt: 1,
            retry: 0,
            token: "token-1".to_owned(),
            cancel: CancellationToken::new(),
            services: self.services.clone(),
        }
    }

    /// Runs `job` once on `node`.
    pub async fn run(&self, job: &dyn Job, options: Value, node: Option<&Node>) -> JobResult {
        job.run(self.ctx(job, options, node)).await
    }
}

/// An OBM record.
pub fn obm(service: &str, host: &str, user: &str, password: &str, system_id: Option<&str>) -> Obm {
    Obm {
        service: service.to_owned(),
        config: ObmConfig {
            host: host.to_owned(),
            user: Some(user.to_owned()),
            password: Some(Secret(password.to_owned())),
            system_id: system_id.map(str::to_owned),
            ..ObmConfig::default()
        },
    }
}

/// Where scripts/install-peers.sh put the peers.
pub fn peers_dir() -> PathBuf {
    match std::env::var_os("METALGRAPH_PEERS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
            .join(".cache/metalgraph-peers"),
    }
}

/// The venv's python, or a failure that says how to get it.
pub fn venv_python() -> PathBuf {
    let py = peers_dir().join("venv/bin/python");
    let emulator = peers_dir().join("venv/bin/sushy-emulator");
    assert!(
        py.exists() && emulator.exists(),
        "sushy-tools is not installed at {}; run scripts/install-peers.sh (as root) first",
        peers_dir().join("venv").display()
    );
    py
}

/// A free TCP port on 127.0.0.1 (bound, then released for the peer to take).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind udp 127.0.0.1:0")
        .port()
}

/// A child process killed (and reaped) when dropped.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Proc {
            child: Some(child),
            log: log.to_owned(),
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The fixed UUID of fake system `i` (as the COOKBOOK's generator spells it).
pub fn system_uuid(i: usize) -> String {
    format!("27946b59-9e44-4fa7-8e91-{i:012x}")
}

pub fn system_mac(i: usize) -> String {
    format!("52:54:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
}

/// How a sushy-emulator is started.
#[derive(Default)]
pub struct SushyOptions {
    pub systems: usize,
    /// Power changes visible at once (the random 1-11 s delay patched out).
    pub instant: bool,
    /// Basic auth with this user and password (bcrypt htpasswd).
    pub auth: Option<(String, String)>,
    /// Serve HTTPS with a self-signed certificate for 127.0.0.1.
    pub tls: bool,
}

/// A running sushy-emulator with the fake driver.
pub struct Sushy {
    pub proc: Proc,
    pub base: String,
    pub dir: TempDir,
}

/// Removes the fake driver's random power delay, so power changes show on the next GET.
/// (Our own take on the COOKBOOK's recipe.)
const INSTANT_WRAPPER: &str = "\
import sys
from sushy_tools.emulator.resources.systems import fakedriver

class _NoDelay:
    @staticmethod
    def randint(a, b):
        return 0

fakedriver.random = _NoDelay()
from sushy_tools.emulator.main import main
sys.exit(main())
";

impl Sushy {
    pub async fn start(opts: SushyOptions) -> Sushy {
        let py = venv_python();
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        let port = free_tcp_port();
        let systems: Vec<String> = (0..opts.systems.max(1))
            .map(|i| {
                format!(
                    "{{'uuid': '{}', 'name': 'node-{i}', 'power_state': 'Off', \
                     'external_notifier': False, 'nics': [{{'mac': '{}', 'ip': '10.0.0.{i}'}}]}}",
                    system_uuid(i),
                    system_mac(i)
                )
            })
            .collect();
        let mut conf = format!(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n\
             SUSHY_EMULATOR_LISTEN_PORT = {port}\n\
             SUSHY_EMULATOR_FAKE_DRIVER = True\n\
             SUSHY_EMULATOR_STATE_DIR = '{}'\n\
             SUSHY_EMULATOR_FAKE_SYSTEMS = [{}]\n",
            state.display(),
            systems.join(", ")
        );
        if let Some((user, password)) = &opts.auth {
            let htpasswd = dir.path().join("htpasswd");
            let out = Command::new(&py)
                .args([
                    "-c",
                    "import bcrypt,sys;print(sys.argv[1]+':'+bcrypt.hashpw(sys.argv[2].encode(),bcrypt.gensalt(4)).decode())",
                    user,
                    password,
                ])
                .output()
                .expect("run python bcrypt");
            assert!(
                out.status.success(),
                "bcrypt: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::fs::write(&htpasswd, &out.stdout).expect("write htpasswd");
            conf.push_str(&format!(
                "SUSHY_EMULATOR_AUTH_FILE = '{}'\n",
                htpasswd.display()
            ));
        }
        let scheme = if opts.tls {
            let (cert, key) = self_signed_cert(dir.path());
            conf.push_str(&format!(
                "SUSHY_EMULATOR_SSL_CERT = '{}'\nSUSHY_EMULATOR_SSL_KEY = '{}'\n",
                cert.display(),
                key.display()
            ));
            "https"
        } else {
            "http"
        };
        let conf_path = dir.path().join("sushy.conf");
        std::fs::write(&conf_path, conf).expect("write config");
        let mut cmd = if opts.instant {
            let wrapper = dir.path().join("sushy-instant.py");
            std::fs::write(&wrapper, INSTANT_WRAPPER).expect("write wrapper");
            let mut c = Command::new(&py);
            c.arg(wrapper);
            c
        } else {
            Command::new(peers_dir().join("venv/bin/sushy-emulator"))
        };
        cmd.arg("--config").arg(&conf_path).env("TMPDIR", &tmp);
        let proc = Proc::spawn(cmd, &dir.path().join("sushy.log"));
        let base = format!("{scheme}://127.0.0.1:{port}");
        let sushy = Sushy { proc, base, dir };
        sushy.wait_ready().await;
        sushy
    }

    async fn wait_ready(&self) {
        let client = raw_client();
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/redfish/v1/Systems", self.base);
        loop {
            // The first Systems GET also seeds sushy's sqlite state, which is slow.
            if let Ok(r) = client.get(&url).send().await
                && (r.status().is_success() || r.status().as_u16() == 401)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sushy-emulator did not come up at {url}; log:\n{}",
                self.proc.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The path of fake system `i`.
    pub fn system_path(&self, i: usize) -> String {
        format!("/redfish/v1/Systems/{}", system_uuid(i))
    }

    /// GETs a document straight from sushy (not through our driver).
    pub async fn get(&self, path: &str, auth: Option<(&str, &str)>) -> Value {
        let mut req = raw_client().get(format!("{}{path}", self.base));
        if let Some((u, p)) = auth {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await.expect("GET from sushy");
        assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
        resp.json().await.expect("JSON")
    }

    /// The PowerState sushy itself reports for system `i`.
    pub async fn power_state(&self, i: usize) -> String {
        self.get(&self.system_path(i), None).await["PowerState"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// A client for reading sushy's own API in assertions, accepting self-signed
/// certificates.
pub fn raw_client() -> reqwest::Client {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// A self-signed certificate for 127.0.0.1 and its key, made with openssl.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg("/CN=127.0.0.1")
        .args(["-addext", "subjectAltName=IP:127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A JSON object for options.
pub fn opts(v: Value) -> Value {
    assert!(v.is_object());
    v
}

pub fn no_opts() -> Value {
    json!({})
}
