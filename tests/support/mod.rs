//! Starting the real `metalgraph` binary for end-to-end tests: a free port, the address read
//! from its first stdout line, and a guard that kills it when the test ends. `peers` starts
//! the BMC peers (sushy-tools, ipmi_sim) the provisioning tests drive.
#![allow(dead_code)]

pub mod peers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};

/// A running `metalgraph serve`.
pub struct Server {
    child: Child,
    pub base: String,
    pub node_base: Option<String>,
    /// The admin token the server wrote in its data dir (none with `--no-auth` on a new
    /// data dir).
    pub token: Option<String>,
    /// The CA the server's certificate is signed by (none with `--no-tls`).
    pub ca_pem: Option<Vec<u8>>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Where stderr goes when the logs are captured.
    log: Option<PathBuf>,
    /// Every stdout line so far.
    stdout: Arc<Mutex<Vec<String>>>,
}

/// How `Server::launch` runs the binary beyond its data dir and store.
#[derive(Debug, Default)]
pub struct Launch {
    /// Extra arguments of `metalgraph serve`.
    pub args: Vec<String>,
    /// `RUST_LOG` (default `warn`).
    pub rust_log: Option<String>,
    /// Capture stderr into this file (else it is inherited); see `Server::logs`.
    pub log: Option<PathBuf>,
}

impl Server {
    /// Starts `metalgraph serve` on a free loopback port with the given data dir, store and
    /// extra arguments, and waits until it listens.
    pub fn start(data_dir: &Path, store: &str, extra: &[&str]) -> Server {
        Server::launch(
            data_dir,
            store,
            Launch {
                args: extra.iter().map(|a| (*a).to_owned()).collect(),
                ..Launch::default()
            },
        )
    }

    /// `start` with a log level and captured logs.
    pub fn launch(data_dir: &Path, store: &str, launch: Launch) -> Server {
        Server::launch_with_env(data_dir, store, launch, &[])
    }

    /// `launch` with extra environment variables (`METALGRAPH_*` settings).
    pub fn launch_with_env(
        data_dir: &Path,
        store: &str,
        launch: Launch,
        env: &[(&str, &str)],
    ) -> Server {
        let extra = &launch.args;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalgraph"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--store", store])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", launch.rust_log.as_deref().unwrap_or("warn"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        match &launch.log {
            Some(path) => cmd.stderr(std::fs::File::create(path).expect("the log file")),
            None => cmd.stderr(Stdio::inherit()),
        };
        let mut child = cmd.spawn().expect("the metalgraph binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let kept = lines.clone();
        std::thread::spawn(move || {
            // Forward every line, then keep draining so the child never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                kept.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let wants_node = extra.iter().any(|a| a == "--node-listen" || a == "--demo");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut got: (Option<String>, Option<String>) = (None, None);
        while Instant::now() < deadline && (got.0.is_none() || (wants_node && got.1.is_none())) {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    if let Some(rest) = line.split("node-facing listening on ").nth(1) {
                        got.1 = Some(rest.trim().to_owned());
                    } else if let Some(rest) = line.split("listening on ").nth(1) {
                        got.0.get_or_insert_with(|| rest.trim().to_owned());
                    }
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        let log = launch
                            .log
                            .as_ref()
                            .and_then(|p| std::fs::read_to_string(p).ok())
                            .unwrap_or_default();
                        panic!("metalgraph exited early: {status}\n{log}");
                    }
                }
            }
        }
        let base = got.0.expect("metalgraph printed its listening address");
        let token = std::fs::read_to_string(data_dir.join("admin.token"))
            .ok()
            .map(|t| t.trim().to_owned());
        let ca_pem = if base.starts_with("https://") {
            Some(std::fs::read(data_dir.join("tls/ca.pem")).expect("the server's CA"))
        } else {
            None
        };
        Server {
            child,
            base,
            node_base: got.1,
            token,
            ca_pem,
            data_dir: data_dir.to_owned(),
            log: launch.log,
            stdout: lines,
        }
    }

    /// Everything the server printed so far: stdout lines, then the captured stderr.
    pub fn logs(&self) -> String {
        let mut out = self.stdout.lock().unwrap().join("\n");
        out.push('\n');
        if let Some(path) = &self.log {
            out.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        out
    }

    /// A URL on the node-facing listener.
    pub fn node_url(&self, path: &str) -> String {
        let base = self
            .node_base
            .as_deref()
            .expect("the node-facing API is on");
        format!("{}{}", base.trim_end_matches('/'), path)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Kills the process with SIGKILL, as a crash would, and reaps it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself, or panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "metalgraph did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for an orderly exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                panic!("metalgraph did not exit within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base.trim_end_matches('/'), path)
    }

    /// An HTTP client that trusts the server's CA and sends its admin token.
    pub fn http(&self) -> reqwest::Client {
        self.http_as(self.token.as_deref())
    }

    /// An HTTP client that trusts the server's CA and sends `token`, if any.
    pub fn http_as(&self, token: Option<&str>) -> reqwest::Client {
        self.client_builder(token).build().unwrap()
    }

    /// A client builder that trusts the server's CA and sends `token`, if any, for a test
    /// that sets more.
    pub fn client_builder(&self, token: Option<&str>) -> reqwest::ClientBuilder {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(t) = token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {t}").parse().unwrap(),
            );
        }
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .default_headers(headers);
        if let Some(ca) = &self.ca_pem {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(ca).unwrap());
        }
        b
    }

    /// The management API as the admin.
    pub fn api(&self) -> Api {
        Api {
            http: self.http(),
            base: self.base.trim_end_matches('/').to_owned(),
        }
    }

    /// A gRPC channel to the server's gRPC listener on `port` (TLS when the server speaks
    /// it), sending the admin token, once the listener accepts connections.
    pub async fn grpc(&self, port: u16) -> Grpc {
        self.grpc_as(port, self.token.as_deref()).await
    }

    /// [`Server::grpc`] sending `token`, if any.
    pub async fn grpc_as(&self, port: u16, token: Option<&str>) -> Grpc {
        let bearer = Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()));
        let channel = grpc_channel_tls(port, self.ca_pem.as_deref()).await;
        tonic::service::interceptor::InterceptedService::new(channel, bearer)
    }
}

/// A gRPC channel that sends a bearer token with every call.
pub type Grpc = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;

/// Adds `authorization` to every gRPC call.
#[derive(Clone)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A gRPC channel to `127.0.0.1:port`: over TLS trusting `ca_pem` when given (ALPN h2),
/// plain otherwise; retried until the listener accepts.
pub async fn grpc_channel_tls(port: u16, ca_pem: Option<&[u8]>) -> tonic::transport::Channel {
    let Some(ca) = ca_pem else {
        return grpc_channel(port).await;
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    // The connector speaks TLS itself; tonic sees a plain `http://` endpoint.
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        let endpoint = tonic::transport::Channel::from_shared(url.clone()).unwrap();
        let connector = connector.clone();
        let connect = tower::service_fn(move |_uri: tonic::transport::Uri| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        if let Ok(ch) = endpoint.connect_with_connector(connect).await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gRPC server on {url} did not come up");
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP client for the management API.
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
}

impl Api {
    /// A client of the management API of the server whose data directory is `data_dir`:
    /// its admin token and (for `https://`) its CA, read from there.
    pub fn from_data_dir(base: &str, data_dir: &Path) -> Api {
        let token = std::fs::read_to_string(data_dir.join("admin.token")).expect("the token");
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()).parse().unwrap(),
        );
        let mut b = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .no_proxy()
            .default_headers(headers);
        if base.starts_with("https://") {
            let ca = std::fs::read(data_dir.join("tls/ca.pem")).expect("the CA");
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap());
        }
        Api {
            http: b.build().unwrap(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub fn new(base: &str) -> Api {
        Api {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            base: base.trim_end_matches('/').to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put_yaml(&self, path: &str, yaml: &str) -> (u16, Value) {
        let r = self
            .http
            .put(format!("{}{path}", self.base))
            .header("content-type", "application/yaml")
            .body(yaml.to_owned())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Runs `graph` (on `node` when given) and returns the new workflow's id.
    pub async fn run(&self, graph: &str, node: Option<&str>, options: Value) -> String {
        let (code, v) = match node {
            Some(n) => {
                self.send(
                    "POST",
                    &format!("/api/2.0/nodes/{n}/workflows"),
                    Some(json!({"name": graph, "options": options})),
                )
                .await
            }
            None => {
                self.send(
                    "POST",
                    "/api/2.0/workflows",
                    Some(json!({"name": graph, "options": options})),
                )
                .await
            }
        };
        assert_eq!(code, 201, "run {graph} on {node:?}: {v}");
        v["instanceId"].as_str().expect("an instanceId").to_owned()
    }

    /// Runs `graph` and waits for its end.
    pub async fn run_wait(
        &self,
        graph: &str,
        node: Option<&str>,
        options: Value,
        limit: Duration,
    ) -> Value {
        let id = self.run(graph, node, options).await;
        self.wait(&id, limit).await
    }

    /// Registers a node and returns its id.
    pub async fn create_node(&self, node: Value) -> String {
        let (code, v) = self.send("POST", "/api/2.0/nodes", Some(node)).await;
        assert_eq!(code, 201, "create node: {v}");
        v["id"].as_str().expect("an id").to_owned()
    }

    /// Polls a workflow until one of its tasks is in `state`.
    pub async fn wait_task(&self, id: &str, label: &str, state: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (code, v) = self.get(&format!("/api/2.0/workflows/{id}")).await;
            assert_eq!(code, 200, "GET workflow {id}: {v}");
            let task = v["tasks"]
                .as_array()
                .and_then(|ts| ts.iter().find(|t| t["label"] == label))
                .unwrap_or_else(|| panic!("workflow {id} has no task {label}: {v}"));
            if task["state"] == state {
                return v;
            }
            assert!(
                Instant::now() < deadline
                    && !matches!(
                        v["status"].as_str(),
                        Some("succeeded" | "failed" | "cancelled")
                    ),
                "task {label} of workflow {id} did not reach {state}: {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a workflow until it is finished, or panics after `limit`.
    pub async fn wait(&self, id: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (code, v) = self.get(&format!("/api/2.0/workflows/{id}")).await;
            assert_eq!(code, 200, "GET workflow {id}: {v}");
            if matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "workflow {id} did not finish: {v:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// An event (as SSE and webhooks send it) in short: `wf:{status}` or `{label}:{state}`.
pub fn describe_event(v: &Value) -> String {
    match v["kind"].as_str() {
        Some("workflow") => format!("wf:{}", v["status"].as_str().unwrap()),
        _ => format!(
            "{}:{}",
            v["label"].as_str().unwrap(),
            v["state"].as_str().unwrap()
        ),
    }
}

/// `label=state` pairs of a workflow view, in plan order.
pub fn states(v: &Value) -> String {
    v["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    format!(
                        "{}={}",
                        t["label"].as_str().unwrap_or("?"),
                        t["state"].as_str().unwrap_or("?")
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// A small deterministic pseudo-random generator (xorshift64*), seeded per test run.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time() -> Rng {
        let seed = std::env::var("METALGRAPH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("random seed: METALGRAPH_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo).max(1)
    }
}

/// A gRPC channel to `127.0.0.1:port`, once the server there accepts connections.
pub async fn grpc_channel(port: u16) -> tonic::transport::Channel {
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        let endpoint = tonic::transport::Channel::from_shared(url.clone()).unwrap();
        if let Ok(ch) = endpoint.connect().await {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gRPC server on {url} did not come up");
}
