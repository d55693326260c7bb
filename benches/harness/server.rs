//! The real `metalgraph serve` binary, for the scenarios that need a process (recovery after
//! SIGKILL, the HTTP API): starting it on a free loopback port, reading its listening line,
//! killing it, and a small HTTP client for its management API.

use std::ffi::OsString;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use metalgraph_store::Backend;
use serde_json::{Value, json};

/// The binary cargo built alongside this harness (release for `cargo bench`), or the one
/// `METALGRAPH_BENCH_BINARY` names: another build of metalgraph timed by the same harness
/// (an A/B of a change, say).
pub fn binary() -> PathBuf {
    std::env::var_os("METALGRAPH_BENCH_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_metalgraph")))
}

pub fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sled => "sled",
        Backend::File => "file",
        Backend::Postgres => "postgres",
    }
}

/// A running `metalgraph serve`. Dropping it kills the process, so that no server outlives
/// the harness.
pub struct Server {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    pub base: String,
    log: PathBuf,
    /// The admin token the server wrote in its data directory (none with `--no-auth`).
    pub token: Option<String>,
    /// The CA its certificate is signed by (none with `--no-tls`).
    ca_pem: Option<Vec<u8>>,
    /// Every `metalgraph KIND listening on ADDR` line so far, as `(KIND, ADDR)` (`KIND` is
    /// empty for the management API).
    listeners: Arc<Mutex<Vec<(String, String)>>>,
}

impl Server {
    /// Starts the server on `data_dir` with the `backend` store and extra environment
    /// `env`, logging to `log` (appended), and waits for its listening line. Returns the
    /// server and the time from spawning the process to that line.
    pub fn start(
        backend: Backend,
        data_dir: &Path,
        log: &Path,
        env: &[(&str, String)],
        limit: Duration,
    ) -> anyhow::Result<(Server, Duration)> {
        Self::start_with(backend, data_dir, log, env, &[], limit)
    }

    /// [`Server::start`] with extra `serve` arguments (other listeners, say; see
    /// [`Server::listener`]).
    pub fn start_with(
        backend: Backend,
        data_dir: &Path,
        log: &Path,
        env: &[(&str, String)],
        args: &[OsString],
        limit: Duration,
    ) -> anyhow::Result<(Server, Duration)> {
        Self::start_in(None, backend, data_dir, log, env, args, limit)
    }

    /// [`Server::start_with`] inside the network namespace `netns`, when given (through
    /// `ip netns exec`, which execs the binary in place, so the child is the server itself).
    /// Its management API then listens on the namespace's loopback, out of the harness's
    /// reach; the scenarios that use it run the server outside any namespace.
    pub fn start_in(
        netns: Option<&str>,
        backend: Backend,
        data_dir: &Path,
        log: &Path,
        env: &[(&str, String)],
        args: &[OsString],
        limit: Duration,
    ) -> anyhow::Result<(Server, Duration)> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(binary());
                cmd
            }
            None => Command::new(binary()),
        };
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            backend_name(backend),
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(
            crate::util::database_url(backend, data_dir)
                .map(|url| ["--database-url".to_owned(), url])
                .into_iter()
                .flatten(),
        )
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
        // The server's configuration comes from this harness alone, not from whatever
        // METALGRAPH_* variables the caller's shell holds; logs are at the default level.
        for (k, _) in std::env::vars() {
            if k.starts_with("METALGRAPH_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let start = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", binary().display()))?;
        let stdout = child.stdout.take().context("the server has no stdout")?;
        let (tx, rx) = mpsc::channel();
        let listeners = Arc::new(Mutex::new(Vec::new()));
        let seen = listeners.clone();
        // The reader keeps draining stdout after the listening line, so that the server
        // never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(url) = line.strip_prefix("metalgraph listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                } else if let Some((kind, addr)) = line
                    .strip_prefix("metalgraph ")
                    .and_then(|rest| rest.split_once(" listening on "))
                {
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.push((kind.to_owned(), addr.trim().to_owned()));
                }
            }
        });
        let mut server = Server {
            child,
            base: String::new(),
            log: log.to_owned(),
            token: None,
            ca_pem: None,
            listeners,
        };
        match rx.recv_timeout(limit) {
            Ok(url) => {
                let elapsed = start.elapsed();
                server.base = url;
                // Written before the server listens.
                server.token = std::fs::read_to_string(data_dir.join("admin.token"))
                    .ok()
                    .map(|t| t.trim().to_owned());
                if server.base.starts_with("https://") {
                    server.ca_pem = Some(
                        std::fs::read(data_dir.join("tls/ca.pem"))
                            .context("the server's CA certificate")?,
                    );
                }
                Ok((server, elapsed))
            }
            Err(e) => {
                let status = server.child.try_wait().ok().flatten();
                bail!(
                    "metalgraph serve did not print its listening line ({e}; exit status {status:?}); \
                     the end of its log:\n{}",
                    server.log_tail()
                )
            }
        }
    }

    /// An HTTP client that trusts the server's CA and sends its admin token, when it has
    /// them.
    pub fn http(&self) -> anyhow::Result<reqwest::Client> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = &self.token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse()?,
            );
        }
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120))
            .default_headers(headers);
        if let Some(ca) = &self.ca_pem {
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(ca)?);
        }
        Ok(builder.build()?)
    }

    /// The management API as the admin.
    pub fn api(&self) -> anyhow::Result<Api> {
        Ok(Api {
            http: self.http()?,
            base: format!("{}/api/2.0", self.base),
        })
    }

    /// The address of the listener the server announced as `metalgraph KIND listening on
    /// ADDR` (`tftp`, `node-facing`, ...), waiting up to `limit` for the line.
    pub fn listener(&self, kind: &str, limit: Duration) -> anyhow::Result<String> {
        let start = Instant::now();
        loop {
            let found = self
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(k, _)| k == kind)
                .map(|(_, addr)| addr.clone());
            if let Some(addr) = found {
                return Ok(addr);
            }
            if start.elapsed() > limit {
                bail!(
                    "metalgraph serve announced no {kind} listener; the end of its log:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Kills the server with SIGKILL and reaps it: no shutdown code runs.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().context("cannot SIGKILL the server")?;
        self.child.wait().context("cannot reap the server")?;
        Ok(())
    }

    /// Asks the server to stop with SIGTERM and waits for it, killing it after `limit`.
    pub fn terminate(mut self, limit: Duration) -> anyhow::Result<()> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A client of the management API at `base`.
#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// Stores a user graph.
    pub async fn put_graph(&self, graph: &Value) -> anyhow::Result<()> {
        let resp = self
            .http
            .put(format!("{}/workflows/graphs", self.base))
            .json(graph)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("PUT graph: {} {}", resp.status(), resp.text().await?);
        }
        Ok(())
    }

    /// Runs a graph without a node; returns the workflow's id.
    pub async fn run(&self, graph: &str) -> anyhow::Result<String> {
        self.create("workflows", &json!({"name": graph}), "instanceId")
            .await
    }

    /// Registers a node (`{name, identifiers, tags, ...}`); returns its id.
    pub async fn create_node(&self, node: &Value) -> anyhow::Result<String> {
        self.create("nodes", node, "id").await
    }

    /// `POST /{path}` with `body`, which must answer `201`; returns the field `id_field` of
    /// what was created.
    async fn create(&self, path: &str, body: &Value, id_field: &str) -> anyhow::Result<String> {
        let resp = self
            .http
            .post(format!("{}/{path}", self.base))
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let created: Value = resp.json().await?;
        if status.as_u16() != 201 {
            bail!("POST /{path}: {status} {created}");
        }
        created[id_field]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("the reply to POST /{path} has no {id_field}"))
    }

    /// One workflow.
    pub async fn workflow(&self, id: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}/workflows/{id}", self.base))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("GET workflow {id}: {}", resp.status());
        }
        Ok(resp.json().await?)
    }

    /// `GET /workflows?active=...`, every page (following `Link: rel="next"`).
    pub async fn workflows(&self, active: Option<bool>) -> anyhow::Result<Vec<Value>> {
        let origin = self.base.trim_end_matches("/api/2.0");
        let mut url = match active {
            Some(a) => format!("{}/workflows?active={a}&$top=1000", self.base),
            None => format!("{}/workflows?$top=1000", self.base),
        };
        let mut all = Vec::new();
        loop {
            let resp = self.http.get(&url).send().await?;
            if !resp.status().is_success() {
                bail!("GET workflows: {}", resp.status());
            }
            let next =
                metalgraph::client::next_link(resp.headers()).map(|path| format!("{origin}{path}"));
            let page: Vec<Value> = resp.json().await?;
            all.extend(page);
            match next {
                Some(n) => url = n,
                None => return Ok(all),
            }
        }
    }
}
