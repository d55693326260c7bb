//! metalgraph's configuration, layered lowest first: built-in defaults, a TOML file
//! (`--config FILE` or `METALGRAPH_CONFIG`), `METALGRAPH_*` environment variables, then the
//! flags of `metalgraph serve`.
//!
//! Every layer may set every field. The environment is passed in as a function so that tests
//! can layer configurations without touching the process environment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "METALGRAPH_CONFIG";

/// Where `--demo` puts the node-facing listener unless one is configured.
pub const DEMO_NODE_LISTEN: &str = "127.0.0.1:8090";
/// Where `--demo` serves gRPC unless told otherwise.
const DEMO_GRPC_LISTEN: &str = "127.0.0.1:50051";

/// Why a configuration could not be loaded. Each message names the file, variable or field
/// at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}={value:?} is invalid: {message}")]
    Env {
        var: String,
        value: String,
        message: String,
    },
    #[error("config field {field} is invalid: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
}

/// Which store backend keeps metalgraph's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// The embedded sled database (the default).
    Sled,
    /// A directory holding an append-only, checksummed journal.
    File,
    /// A PostgreSQL database, which several replicas may share (`database_url`).
    Postgres,
}

impl StoreKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sled => "sled",
            StoreKind::File => "file",
            StoreKind::Postgres => "postgres",
        }
    }

    pub fn backend(self) -> metalgraph_store::Backend {
        match self {
            StoreKind::Sled => metalgraph_store::Backend::Sled,
            StoreKind::File => metalgraph_store::Backend::File,
            StoreKind::Postgres => metalgraph_store::Backend::Postgres,
        }
    }
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sled" => Ok(StoreKind::Sled),
            "file" => Ok(StoreKind::File),
            "postgres" => Ok(StoreKind::Postgres),
            other => Err(format!(
                "unknown store {other:?} (expected sled, file or postgres)"
            )),
        }
    }
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?} (expected text or json)"
            )),
        }
    }
}

/// A database URL, which may carry a password: kept as given, never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<database URL>")
    }
}

/// The server's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The management API's address (`METALGRAPH_LISTEN`, `--listen`). Port 0 picks a free
    /// port; the bound address is printed as `metalgraph listening on http://ADDR`.
    pub listen: SocketAddr,
    /// The node-facing API's address (`METALGRAPH_NODE_LISTEN`, `--node-listen`): node
    /// callbacks and boot profiles. Off unless set; `--demo` sets `127.0.0.1:8090`.
    pub node_listen: Option<SocketAddr>,
    /// The gRPC API's address (`METALGRAPH_GRPC_LISTEN`, `--grpc-listen`). Off unless set.
    pub grpc_listen: Option<SocketAddr>,
    /// An address of its own for `GET /metrics` (`METALGRAPH_METRICS_LISTEN`,
    /// `--metrics-listen`), for a scraper that should reach nothing else. Off unless set;
    /// the management listener serves `/metrics` either way.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the store keeps its data (`METALGRAPH_DATA_DIR`, `--data-dir`).
    pub data_dir: PathBuf,
    /// The store backend, `sled`, `file` or `postgres` (`METALGRAPH_STORE`, `--store`).
    pub store: StoreKind,
    /// The PostgreSQL database of `store = "postgres"` (`METALGRAPH_DATABASE_URL`,
    /// `--database-url`): `postgresql://user:password@host:5432/db?sslmode=require`. It may
    /// hold a password, so it is never printed.
    pub database_url: Option<DatabaseUrl>,
    /// PEM certificates to trust for TLS to the database, beside the public roots
    /// (`METALGRAPH_DATABASE_CA_FILE`, `--database-ca-file`).
    pub database_ca_file: Option<PathBuf>,
    /// sled's page cache in MiB (`METALGRAPH_SLED_CACHE_MB`, `--sled-cache-mb`): how much
    /// of the database sled keeps in memory. The file store keeps everything in memory.
    pub sled_cache_mb: u64,
    /// Replicas on PostgreSQL (docs/scale-out.md): how long a partition's lease lasts after
    /// its last renewal, in milliseconds (`METALGRAPH_LEASE_TTL_MS`).
    pub lease_ttl_ms: u64,
    /// How often a replica renews its leases (`METALGRAPH_LEASE_RENEW_MS`).
    pub lease_renew_ms: u64,
    /// How often a replica looks for partitions to take over (`METALGRAPH_LEASE_SCAN_MS`).
    pub lease_scan_ms: u64,
    /// Registers eight simulated nodes (`demo-node-01` to `demo-node-08`, driven by the
    /// simulated BMC) and turns the node-facing API on (`METALGRAPH_DEMO`, `--demo`).
    pub demo: bool,
    /// `text` or `json` (`METALGRAPH_LOG_FORMAT`, `--log-format`). The level comes from
    /// `RUST_LOG` (default `info`).
    pub log_format: LogFormat,
    /// The most jobs that run at once; further ready tasks wait for a slot
    /// (`METALGRAPH_MAX_RUNNING_JOBS`).
    pub max_running_jobs: usize,
    /// The largest request body the APIs accept, in bytes; larger ones get 413
    /// (`METALGRAPH_BODY_LIMIT_BYTES`, or `METALGRAPH_BODY_LIMIT`).
    pub body_limit_bytes: usize,
    /// How long a cancelled or timed-out job gets to clean up before it is dropped, in
    /// milliseconds (`METALGRAPH_CANCEL_GRACE_MS`).
    pub cancel_grace_ms: u64,
    /// The management API's base URL as templates see it (`api.base`), e.g.
    /// `http://10.0.0.1:8080/api/2.0` (`METALGRAPH_API_BASE_URL`). Defaults to the bound
    /// `listen` address.
    pub api_base_url: Option<String>,
    /// The node-facing API's base URL as templates see it (`api.nodeBase`), which is what
    /// installers call back (`METALGRAPH_NODE_API_BASE_URL`). Defaults to the bound
    /// `node_listen` address; empty when the node-facing API is off.
    pub node_api_base_url: Option<String>,
    /// A directory served read-only on the node-facing API under `/files/` (ISO images,
    /// kernels, installer files), with HTTP range requests (`METALGRAPH_FILES_DIR`,
    /// `--files-dir`). Off unless set; nothing outside it is ever served.
    pub files_dir: Option<PathBuf>,
    /// A directory of templates (kickstarts, preseeds, scripts) rendered for a node on the
    /// node-facing API at `/api/2.0/templates/{name}?nodeId=ID`
    /// (`METALGRAPH_TEMPLATES_DIR`, `--templates-dir`). Off unless set.
    pub templates_dir: Option<PathBuf>,
    /// The key that seals stored secrets (OBM passwords, webhook secrets)
    /// (`METALGRAPH_SECRET_KEY_FILE`, `--secret-key-file`); unset: `<data_dir>/secret.key`,
    /// created (mode 0600) on first start. Keep a copy apart from backups of the data.
    pub secret_key_file: Option<PathBuf>,
    /// Network boot: DHCP, TFTP and the discovery of unknown machines (the `[boot]`
    /// section, `METALGRAPH_BOOT_*`, the flags of the same names). Off unless set.
    pub boot: crate::boot::BootConfig,
    /// What a client may hold of the listeners: connections, and how long a slow or idle
    /// one may keep its slot (the `[limits]` section, `METALGRAPH_LIMITS_*`;
    /// docs/limits-network.md).
    pub limits: LimitsConfig,
    /// How webhooks are delivered (the `[hooks]` section, `METALGRAPH_HOOKS_*`).
    pub hooks: HooksConfig,
    /// Which finished workflows are removed (the `[retention]` section,
    /// `METALGRAPH_RETENTION_*`, `--retention-days`).
    pub retention: RetentionConfig,
    /// Bearer tokens and TLS on the management and gRPC APIs (the `[security]` section,
    /// `METALGRAPH_SECURITY_*`, `--no-auth`, `--no-tls`, `--tls-*`; docs/security.md).
    pub security: SecurityConfig,
}

/// The `[security]` section. Both switches are on by default; turning one off is logged as
/// a warning on every start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// Every management and gRPC call needs a bearer token (`METALGRAPH_SECURITY_AUTH`,
    /// `--no-auth` turns it off).
    pub auth: bool,
    /// The management and gRPC APIs speak TLS (`METALGRAPH_SECURITY_TLS`, `--no-tls` turns it
    /// off). With no certificate given, a local CA and a server certificate are made under
    /// `<data_dir>/tls/` on first start and reused after.
    pub tls: bool,
    /// The server's certificate chain, PEM (`METALGRAPH_SECURITY_TLS_CERT`, `--tls-cert`);
    /// given with `tls_key`, instead of the generated one.
    pub tls_cert: Option<PathBuf>,
    /// The server certificate's private key, PEM (`METALGRAPH_SECURITY_TLS_KEY`,
    /// `--tls-key`).
    pub tls_key: Option<PathBuf>,
    /// The CA whose certificates clients must present (mutual TLS;
    /// `METALGRAPH_SECURITY_TLS_CLIENT_CA`, `--tls-client-ca`). Off unless set.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            auth: true,
            tls: true,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

impl SecurityConfig {
    /// Applies the `METALGRAPH_SECURITY_*` variables.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        for (name, field) in [("AUTH", &mut self.auth), ("TLS", &mut self.tls)] {
            let var = format!("METALGRAPH_SECURITY_{name}");
            if let Some(value) = env(&var) {
                *field = parse_bool(&var, &value)?;
            }
        }
        for (name, field) in [
            ("TLS_CERT", &mut self.tls_cert),
            ("TLS_KEY", &mut self.tls_key),
            ("TLS_CLIENT_CA", &mut self.tls_client_ca),
        ] {
            if let Some(value) = env(&format!("METALGRAPH_SECURITY_{name}")) {
                *field = optional_dir(&value);
            }
        }
        Ok(())
    }

    pub fn apply_flags(&mut self, flags: &SecurityArgs) {
        if flags.no_auth {
            self.auth = false;
        }
        if flags.no_tls {
            self.tls = false;
        }
        for (flag, field) in [
            (&flags.tls_cert, &mut self.tls_cert),
            (&flags.tls_key, &mut self.tls_key),
            (&flags.tls_client_ca, &mut self.tls_client_ca),
        ] {
            if let Some(f) = flag {
                *field = Some(f.clone());
            }
        }
    }

    /// A certificate comes with its key; TLS settings need TLS on.
    pub fn check(&self) -> Result<(), Error> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::Field {
                field: "security.tls_cert",
                message: "tls_cert and tls_key go together: give both or neither".into(),
            });
        }
        if !self.tls && (self.tls_cert.is_some() || self.tls_client_ca.is_some()) {
            return Err(Error::Field {
                field: "security.tls",
                message: "TLS is off (--no-tls), so tls_cert and tls_client_ca cannot be used"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The security flags of `metalgraph serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// Serve the management and gRPC APIs without bearer tokens: anyone who reaches them
    /// may do anything (not recommended).
    #[arg(long)]
    pub no_auth: bool,
    /// Serve the management and gRPC APIs over plain HTTP (not recommended).
    #[arg(long)]
    pub no_tls: bool,
    /// The server's certificate chain (PEM), instead of the generated one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
}

/// The `[retention]` section: finished workflows are removed in the background once older
/// than `max_age_days`, or beyond the newest `keep_per_node` of their node; unfinished ones
/// never. Each field has a `METALGRAPH_RETENTION_*` variable named after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days a finished workflow is kept; 0 keeps them whatever their age
    /// (`--retention-days`).
    pub max_age_days: u64,
    /// How many of each node's finished workflows are kept; 0 keeps them all.
    pub keep_per_node: usize,
    /// How often the sweep runs (ms).
    pub sweep_interval_ms: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let d = metalgraph_engine::retention::Retention::default();
        RetentionConfig {
            max_age_days: d.max_age.map_or(0, |a| a.as_secs() / 86_400),
            keep_per_node: d.keep_per_node.unwrap_or(0),
            sweep_interval_ms: d.interval.as_millis() as u64,
        }
    }
}

impl RetentionConfig {
    /// Applies the `METALGRAPH_RETENTION_*` variables.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        let var = |name: &str| {
            let var = format!("METALGRAPH_RETENTION_{name}");
            env(&var).map(|value| (var, value))
        };
        if let Some((v, s)) = var("MAX_AGE_DAYS") {
            self.max_age_days = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("KEEP_PER_NODE") {
            self.keep_per_node = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("SWEEP_INTERVAL_MS") {
            self.sweep_interval_ms = parse(&v, &s)?;
        }
        Ok(())
    }

    /// A sweep interval of at least a second; an age of at most 100 years.
    pub fn check(&self) -> Result<(), Error> {
        if self.sweep_interval_ms < 1000 {
            return Err(Error::Field {
                field: "retention.sweep_interval_ms",
                message: "must be at least 1000".into(),
            });
        }
        if self.max_age_days > 36_500 {
            return Err(Error::Field {
                field: "retention.max_age_days",
                message: "must be at most 36500 (0 keeps workflows whatever their age)".into(),
            });
        }
        Ok(())
    }

    /// The engine's policy; `None` when both rules are off.
    pub fn policy(&self) -> Option<metalgraph_engine::retention::Retention> {
        let max_age =
            (self.max_age_days > 0).then(|| Duration::from_secs(self.max_age_days * 86_400));
        let keep_per_node = (self.keep_per_node > 0).then_some(self.keep_per_node);
        (max_age.is_some() || keep_per_node.is_some()).then(|| {
            metalgraph_engine::retention::Retention {
                max_age,
                keep_per_node,
                interval: Duration::from_millis(self.sweep_interval_ms),
            }
        })
    }
}

/// The `[hooks]` section: how webhook deliveries are made. Every field has a
/// `METALGRAPH_HOOKS_*` variable named after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// How long one delivery may take, from connecting to the end of the response.
    pub delivery_timeout_ms: u64,
    /// The wait before the first retry of a failed delivery; it doubles with each failure.
    pub retry_backoff_ms: u64,
    /// The longest wait between retries.
    pub max_retry_backoff_ms: u64,
}

impl Default for HooksConfig {
    fn default() -> Self {
        let d = crate::hooks::Settings::default();
        HooksConfig {
            delivery_timeout_ms: d.timeout.as_millis() as u64,
            retry_backoff_ms: d.backoff.as_millis() as u64,
            max_retry_backoff_ms: d.max_backoff.as_millis() as u64,
        }
    }
}

impl HooksConfig {
    /// Applies the `METALGRAPH_HOOKS_*` variables.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        for (name, field) in [
            ("DELIVERY_TIMEOUT_MS", &mut self.delivery_timeout_ms),
            ("RETRY_BACKOFF_MS", &mut self.retry_backoff_ms),
            ("MAX_RETRY_BACKOFF_MS", &mut self.max_retry_backoff_ms),
        ] {
            let var = format!("METALGRAPH_HOOKS_{name}");
            if let Some(value) = env(&var) {
                *field = parse(&var, &value)?;
            }
        }
        Ok(())
    }

    /// Every duration is at least 1 ms and at most a day; the backoff does not exceed its
    /// maximum.
    pub fn check(&self) -> Result<(), Error> {
        const DAY_MS: u64 = 86_400_000;
        for (field, v) in [
            ("hooks.delivery_timeout_ms", self.delivery_timeout_ms),
            ("hooks.retry_backoff_ms", self.retry_backoff_ms),
            ("hooks.max_retry_backoff_ms", self.max_retry_backoff_ms),
        ] {
            if v == 0 || v > DAY_MS {
                return Err(Error::Field {
                    field,
                    message: format!("must be 1 to {DAY_MS} ms"),
                });
            }
        }
        if self.retry_backoff_ms > self.max_retry_backoff_ms {
            return Err(Error::Field {
                field: "hooks.retry_backoff_ms",
                message: "must not exceed hooks.max_retry_backoff_ms".into(),
            });
        }
        Ok(())
    }

    pub fn settings(&self) -> crate::hooks::Settings {
        crate::hooks::Settings {
            timeout: Duration::from_millis(self.delivery_timeout_ms),
            backoff: Duration::from_millis(self.retry_backoff_ms),
            max_backoff: Duration::from_millis(self.max_retry_backoff_ms),
        }
    }
}

/// The `[limits]` section: bounds on the connections of each listener (management HTTP,
/// node-facing HTTP, gRPC), so that slow or idle sockets cannot exhaust descriptors or
/// starve the APIs. Every field has a `METALGRAPH_LIMITS_*` variable named after it
/// (`max_connections` reads `METALGRAPH_LIMITS_MAX_CONNECTIONS`); the first three have
/// `serve` flags of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The most connections each listener serves at once (`--max-connections`). An HTTP
    /// listener accepts 8 more (`server::conn::SPARE_CONNECTIONS`), which answer only
    /// `GET /api/2.0/health` and a `503` to anything else; further connections, and gRPC
    /// connections beyond the limit, wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long an HTTP client gets to send a complete request header, counted from the
    /// connection's start and, on a kept-alive connection, from the first byte of the next
    /// request; for gRPC, how long a new connection gets to send the HTTP/2 preface
    /// (`--header-read-timeout-ms`).
    pub header_read_timeout_ms: u64,
    /// How long an HTTP connection may go without a byte read or written, between requests
    /// (keep-alive) or during one (a stalled upload or download), before it is closed
    /// (`--idle-timeout-ms`). Longer than `cancel_grace_ms`, which a cancel request may wait.
    pub idle_timeout_ms: u64,
    /// How long a gRPC call may take to produce its response (for `Watch`, its first
    /// message: the stream itself is not limited); clients may ask for less with
    /// `grpc-timeout`. Longer than `cancel_grace_ms`.
    pub grpc_request_timeout_ms: u64,
    /// How often the gRPC server pings an HTTP/2 connection to find dead peers.
    pub grpc_keepalive_interval_ms: u64,
    /// How long a gRPC ping may go unanswered before the connection is closed.
    pub grpc_keepalive_timeout_ms: u64,
    /// The most concurrent calls (HTTP/2 streams) on one gRPC connection.
    pub grpc_max_concurrent_streams: u32,
    /// The age at which a gRPC connection is asked to go away (HTTP/2 GOAWAY): calls in
    /// progress finish, clients reconnect. Bounds how long an idle gRPC connection holds its
    /// slot, since pings keep it alive.
    pub grpc_max_connection_age_ms: u64,
    /// The most tasks one graph may have; a larger one is refused when it is stored or run.
    pub max_tasks_per_graph: usize,
    /// The most `/files/` downloads the node-facing listener serves at once; a `GET`
    /// beyond it is answered `503` with `Retry-After` (docs/limits-network.md). Each one
    /// holds up to two 64 KiB chunks of its file in memory, besides the socket's buffers.
    pub max_file_transfers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            grpc_request_timeout_ms: 60_000,
            grpc_keepalive_interval_ms: 30_000,
            grpc_keepalive_timeout_ms: 10_000,
            grpc_max_concurrent_streams: 128,
            grpc_max_connection_age_ms: 1_800_000,
            max_tasks_per_graph: metalgraph_engine::definitions::DEFAULT_MAX_TASKS_PER_GRAPH,
            max_file_transfers: crate::api::files::DEFAULT_MAX_FILE_TRANSFERS,
        }
    }
}

/// The `serve` flags of the `[limits]` section; each one given overrides every other layer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct LimitsArgs {
    /// The most connections each listener serves at once (default 1024).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// How long a client gets to send a request header, in ms (default 10000).
    #[arg(long, value_name = "MS")]
    pub header_read_timeout_ms: Option<u64>,
    /// How long an HTTP connection may stay silent, in ms (default 60000).
    #[arg(long, value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
}

impl LimitsConfig {
    /// Applies the `METALGRAPH_LIMITS_*` variables.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        let var = |name: &str| {
            let var = format!("METALGRAPH_LIMITS_{name}");
            env(&var).map(|value| (var, value))
        };
        if let Some((v, s)) = var("MAX_CONNECTIONS") {
            self.max_connections = parse(&v, &s)?;
        }
        for (name, field) in [
            ("HEADER_READ_TIMEOUT_MS", &mut self.header_read_timeout_ms),
            ("IDLE_TIMEOUT_MS", &mut self.idle_timeout_ms),
            ("GRPC_REQUEST_TIMEOUT_MS", &mut self.grpc_request_timeout_ms),
            (
                "GRPC_KEEPALIVE_INTERVAL_MS",
                &mut self.grpc_keepalive_interval_ms,
            ),
            (
                "GRPC_KEEPALIVE_TIMEOUT_MS",
                &mut self.grpc_keepalive_timeout_ms,
            ),
            (
                "GRPC_MAX_CONNECTION_AGE_MS",
                &mut self.grpc_max_connection_age_ms,
            ),
        ] {
            if let Some((v, s)) = var(name) {
                *field = parse(&v, &s)?;
            }
        }
        if let Some((v, s)) = var("GRPC_MAX_CONCURRENT_STREAMS") {
            self.grpc_max_concurrent_streams = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("MAX_TASKS_PER_GRAPH") {
            self.max_tasks_per_graph = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("MAX_FILE_TRANSFERS") {
            self.max_file_transfers = parse(&v, &s)?;
        }
        Ok(())
    }

    /// Applies the flags that were given.
    pub fn apply_flags(&mut self, flags: &LimitsArgs) {
        if let Some(n) = flags.max_connections {
            self.max_connections = n;
        }
        if let Some(ms) = flags.header_read_timeout_ms {
            self.header_read_timeout_ms = ms;
        }
        if let Some(ms) = flags.idle_timeout_ms {
            self.idle_timeout_ms = ms;
        }
    }

    /// Checks that every limit is a limit: none may be zero.
    pub fn check(&self) -> Result<(), Error> {
        let fields: [(&'static str, u64); 10] = [
            ("limits.max_connections", self.max_connections as u64),
            ("limits.max_file_transfers", self.max_file_transfers as u64),
            (
                "limits.max_tasks_per_graph",
                self.max_tasks_per_graph as u64,
            ),
            ("limits.header_read_timeout_ms", self.header_read_timeout_ms),
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            (
                "limits.grpc_request_timeout_ms",
                self.grpc_request_timeout_ms,
            ),
            (
                "limits.grpc_keepalive_interval_ms",
                self.grpc_keepalive_interval_ms,
            ),
            (
                "limits.grpc_keepalive_timeout_ms",
                self.grpc_keepalive_timeout_ms,
            ),
            (
                "limits.grpc_max_concurrent_streams",
                u64::from(self.grpc_max_concurrent_streams),
            ),
            (
                "limits.grpc_max_connection_age_ms",
                self.grpc_max_connection_age_ms,
            ),
        ];
        match fields.into_iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(Error::Field {
                field,
                message: "must be at least 1".into(),
            }),
            None => Ok(()),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            node_listen: None,
            grpc_listen: None,
            metrics_listen: None,
            data_dir: PathBuf::from("./metalgraph-data"),
            store: StoreKind::Sled,
            database_url: None,
            database_ca_file: None,
            sled_cache_mb: metalgraph_store::OpenOptions::default().sled_cache_bytes >> 20,
            lease_ttl_ms: 15_000,
            lease_renew_ms: 5_000,
            lease_scan_ms: 2_000,
            demo: false,
            log_format: LogFormat::Text,
            max_running_jobs: 256,
            body_limit_bytes: 1024 * 1024,
            cancel_grace_ms: 5_000,
            api_base_url: None,
            node_api_base_url: None,
            files_dir: None,
            templates_dir: None,
            secret_key_file: None,
            boot: crate::boot::BootConfig::default(),
            limits: LimitsConfig::default(),
            hooks: HooksConfig::default(),
            retention: RetentionConfig::default(),
            security: SecurityConfig::default(),
        }
    }
}

/// The flags of `metalgraph serve`; each one given overrides every other layer.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// The config file (TOML); defaults to $METALGRAPH_CONFIG when set.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The management API's address (default 127.0.0.1:8080; port 0 picks a free one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// The node-facing API's address (off by default).
    #[arg(long, value_name = "ADDR")]
    pub node_listen: Option<SocketAddr>,
    /// The gRPC API's address (off by default).
    #[arg(long, value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,
    /// A listener serving only GET /metrics (off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Days a finished workflow is kept; 0 keeps them whatever their age (default 30).
    #[arg(long, value_name = "DAYS")]
    pub retention_days: Option<u64>,
    /// Where the store keeps its data (default ./metalgraph-data).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store backend.
    #[arg(long, value_enum)]
    pub store: Option<StoreKind>,
    /// The PostgreSQL database (`--store postgres`); prefer METALGRAPH_DATABASE_URL when
    /// the URL holds a password, since the command line is visible to `ps`.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// PEM certificates to trust for TLS to the database.
    #[arg(long, value_name = "FILE")]
    pub database_ca_file: Option<PathBuf>,
    /// sled's page cache in MiB (default 1024).
    #[arg(long, value_name = "MIB")]
    pub sled_cache_mb: Option<u64>,
    /// Register simulated nodes and turn the node-facing API on.
    #[arg(long)]
    pub demo: bool,
    /// The log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// A directory served on the node-facing API under /files/ (off by default).
    #[arg(long, value_name = "DIR")]
    pub files_dir: Option<PathBuf>,
    /// A directory of templates rendered on the node-facing API (off by default).
    #[arg(long, value_name = "DIR")]
    pub templates_dir: Option<PathBuf>,
    /// The key that seals stored secrets (default <data-dir>/secret.key, created on first
    /// start).
    #[arg(long, value_name = "FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// Network boot.
    #[command(flatten, next_help_heading = "Network boot")]
    pub boot: crate::boot::BootArgs,
    /// Connection limits.
    #[command(flatten, next_help_heading = "Limits")]
    pub limits: LimitsArgs,
    /// Tokens and TLS.
    #[command(flatten, next_help_heading = "Security")]
    pub security: SecurityArgs,
}

impl Config {
    /// Loads the configuration: defaults, the config file (`flags.config`, else the file
    /// named by `METALGRAPH_CONFIG`), the environment, then the flags.
    pub fn load(flags: &ServeArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, Error> {
        let file = flags
            .config
            .clone()
            .or_else(|| env(CONFIG_ENV).filter(|s| !s.is_empty()).map(PathBuf::from));
        let mut config = match file {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.apply_flags(flags);
        config.check()?;
        Ok(config)
    }

    /// Reads a TOML config file; fields it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| Error::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; unknown keys are an error naming the key.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies `METALGRAPH_*` variables. An empty value, or `off`, turns an optional
    /// listener or URL off.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Error> {
        let var = |name: &str| {
            let var = format!("METALGRAPH_{name}");
            env(&var).map(|value| (var, value))
        };
        if let Some((v, s)) = var("LISTEN") {
            self.listen = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("NODE_LISTEN") {
            self.node_listen = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("GRPC_LISTEN") {
            self.grpc_listen = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("METRICS_LISTEN") {
            self.metrics_listen = parse_optional(&v, &s)?;
        }
        if let Some((_, s)) = var("DATA_DIR") {
            self.data_dir = PathBuf::from(s);
        }
        if let Some((v, s)) = var("STORE") {
            self.store = parse(&v, &s)?;
        }
        if let Some((_, s)) = var("DATABASE_URL") {
            self.database_url = Some(DatabaseUrl(s)).filter(|u| !u.0.is_empty());
        }
        if let Some((_, s)) = var("DATABASE_CA_FILE") {
            self.database_ca_file = Some(PathBuf::from(s)).filter(|p| !p.as_os_str().is_empty());
        }
        if let Some((v, s)) = var("SLED_CACHE_MB") {
            self.sled_cache_mb = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("DEMO") {
            self.demo = parse_bool(&v, &s)?;
        }
        if let Some((v, s)) = var("LOG_FORMAT") {
            self.log_format = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("MAX_RUNNING_JOBS") {
            self.max_running_jobs = parse(&v, &s)?;
        }
        // The short name comes first so that the field's own name wins when both are set.
        for name in ["BODY_LIMIT", "BODY_LIMIT_BYTES"] {
            if let Some((v, s)) = var(name) {
                self.body_limit_bytes = parse(&v, &s)?;
            }
        }
        if let Some((v, s)) = var("CANCEL_GRACE_MS") {
            self.cancel_grace_ms = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("LEASE_TTL_MS") {
            self.lease_ttl_ms = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("LEASE_RENEW_MS") {
            self.lease_renew_ms = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("LEASE_SCAN_MS") {
            self.lease_scan_ms = parse(&v, &s)?;
        }
        if let Some((v, s)) = var("API_BASE_URL") {
            self.api_base_url = parse_optional(&v, &s)?;
        }
        if let Some((v, s)) = var("NODE_API_BASE_URL") {
            self.node_api_base_url = parse_optional(&v, &s)?;
        }
        if let Some((_, s)) = var("FILES_DIR") {
            self.files_dir = optional_dir(&s);
        }
        if let Some((_, s)) = var("TEMPLATES_DIR") {
            self.templates_dir = optional_dir(&s);
        }
        if let Some((_, s)) = var("SECRET_KEY_FILE") {
            self.secret_key_file = optional_dir(&s);
        }
        self.boot.apply_env(env)?;
        self.limits.apply_env(env)?;
        self.hooks.apply_env(env)?;
        self.retention.apply_env(env)?;
        self.security.apply_env(env)?;
        Ok(())
    }

    /// Applies the flags that were given.
    pub fn apply_flags(&mut self, flags: &ServeArgs) {
        if let Some(a) = flags.listen {
            self.listen = a;
        }
        if let Some(a) = flags.node_listen {
            self.node_listen = Some(a);
        }
        if let Some(a) = flags.grpc_listen {
            self.grpc_listen = Some(a);
        }
        if let Some(a) = flags.metrics_listen {
            self.metrics_listen = Some(a);
        }
        if let Some(days) = flags.retention_days {
            self.retention.max_age_days = days;
        }
        if let Some(d) = &flags.data_dir {
            self.data_dir = d.clone();
        }
        if let Some(s) = flags.store {
            self.store = s;
        }
        if let Some(u) = &flags.database_url {
            self.database_url = Some(DatabaseUrl(u.clone()));
        }
        if let Some(p) = &flags.database_ca_file {
            self.database_ca_file = Some(p.clone());
        }
        if let Some(mb) = flags.sled_cache_mb {
            self.sled_cache_mb = mb;
        }
        if flags.demo {
            self.demo = true;
        }
        if let Some(f) = flags.log_format {
            self.log_format = f;
        }
        if let Some(d) = &flags.files_dir {
            self.files_dir = Some(d.clone());
        }
        if let Some(d) = &flags.templates_dir {
            self.templates_dir = Some(d.clone());
        }
        if let Some(f) = &flags.secret_key_file {
            self.secret_key_file = Some(f.clone());
        }
        self.boot.apply_flags(&flags.boot);
        self.limits.apply_flags(&flags.limits);
        self.security.apply_flags(&flags.security);
    }

    /// Checks values no type can express.
    /// The lease timings of replicas on PostgreSQL.
    pub fn lease_timings(&self) -> metalgraph_engine::ownership::LeaseTimings {
        metalgraph_engine::ownership::LeaseTimings {
            ttl: Duration::from_millis(self.lease_ttl_ms),
            renew: Duration::from_millis(self.lease_renew_ms),
            scan: Duration::from_millis(self.lease_scan_ms),
        }
    }

    fn check(&self) -> Result<(), Error> {
        self.boot.check()?;
        self.limits.check()?;
        self.hooks.check()?;
        self.retention.check()?;
        self.security.check()?;
        if !(8..=1 << 20).contains(&self.sled_cache_mb) {
            return Err(Error::Field {
                field: "sled_cache_mb",
                message: "must be 8 to 1048576".into(),
            });
        }
        self.lease_timings()
            .check()
            .map_err(|message| Error::Field {
                field: "lease_ttl_ms",
                message,
            })?;
        if self.store == StoreKind::Postgres && self.database_url.is_none() {
            return Err(Error::Field {
                field: "database_url",
                message: "is required with store = \"postgres\" (METALGRAPH_DATABASE_URL, \
                          --database-url)"
                    .into(),
            });
        }
        // A cancel request waits until the workflow's jobs have stopped, each with the
        // cancel grace; a connection must not be cut as idle or timed out meanwhile.
        for (field, limit) in [
            ("limits.idle_timeout_ms", self.limits.idle_timeout_ms),
            (
                "limits.grpc_request_timeout_ms",
                self.limits.grpc_request_timeout_ms,
            ),
        ] {
            if limit <= self.cancel_grace_ms {
                return Err(Error::Field {
                    field,
                    message: format!(
                        "must be longer than cancel_grace_ms ({}), which a cancel request may wait",
                        self.cancel_grace_ms
                    ),
                });
            }
        }
        if self.max_running_jobs == 0 {
            return Err(Error::Field {
                field: "max_running_jobs",
                message: "must be at least 1".into(),
            });
        }
        if self.body_limit_bytes < 1024 {
            return Err(Error::Field {
                field: "body_limit_bytes",
                message: format!("must be at least 1024, got {}", self.body_limit_bytes),
            });
        }
        for (field, url) in [
            ("api_base_url", &self.api_base_url),
            ("node_api_base_url", &self.node_api_base_url),
        ] {
            if let Some(u) = url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                return Err(Error::Field {
                    field,
                    message: format!("{u:?} is not an http:// or https:// URL"),
                });
            }
        }
        Ok(())
    }

    /// The node-facing listener's address: the configured one, or the demo's default.
    /// Where the secret key is: the configured file, or `secret.key` in the data directory.
    pub fn effective_secret_key_file(&self) -> PathBuf {
        self.secret_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("secret.key"))
    }

    /// The gRPC listener: the configured one, or the demo default under `--demo`.
    pub fn effective_grpc_listen(&self) -> Option<SocketAddr> {
        self.grpc_listen.or_else(|| {
            self.demo
                .then(|| DEMO_GRPC_LISTEN.parse().expect("the demo address is valid"))
        })
    }

    pub fn effective_node_listen(&self) -> Option<SocketAddr> {
        self.node_listen.or_else(|| {
            self.demo
                .then(|| DEMO_NODE_LISTEN.parse().expect("the demo address is valid"))
        })
    }
}

fn parse<T: FromStr>(var: &str, value: &str) -> Result<T, Error>
where
    T::Err: std::fmt::Display,
{
    value.trim().parse().map_err(|e: T::Err| Error::Env {
        var: var.to_owned(),
        value: value.to_owned(),
        message: e.to_string(),
    })
}

fn parse_optional<T: FromStr>(var: &str, value: &str) -> Result<Option<T>, Error>
where
    T::Err: std::fmt::Display,
{
    match value.trim() {
        "" | "off" => Ok(None),
        _ => parse(var, value).map(Some),
    }
}

/// A directory from the environment; empty or `off` turns the feature off.
fn optional_dir(value: &str) -> Option<PathBuf> {
    match value.trim() {
        "" | "off" => None,
        v => Some(PathBuf::from(v)),
    }
}

fn parse_bool(var: &str, value: &str) -> Result<bool, Error> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::Env {
            var: var.to_owned(),
            value: value.to_owned(),
            message: "expected true or false".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const EXAMPLE: &str = include_str!("../metalgraph.example.toml");

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_example_file_parses_and_names_every_field() {
        let config = Config::from_toml(EXAMPLE).expect("the example parses");
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        let example: toml::Table = toml::from_str(EXAMPLE).expect("the example is TOML");
        let fields = serde_json::to_value(Config::default()).expect("serialises");
        for field in fields.as_object().expect("an object").keys() {
            assert!(
                example.contains_key(field),
                "the example file lacks field {field}"
            );
        }
        let limits = example["limits"].as_table().expect("a [limits] table");
        for field in fields["limits"].as_object().expect("an object").keys() {
            assert!(
                limits.contains_key(field),
                "the example file lacks field limits.{field}"
            );
        }
        assert_eq!(config.limits, LimitsConfig::default());
        assert_eq!(
            config.boot.tftp_max_transfers,
            crate::boot::config::DEFAULT_TFTP_TRANSFERS,
            "the example shows the default of boot.tftp_max_transfers"
        );
        let hooks = example["hooks"].as_table().expect("a [hooks] table");
        for field in fields["hooks"].as_object().expect("an object").keys() {
            assert!(
                hooks.contains_key(field),
                "the example file lacks field hooks.{field}"
            );
        }
        assert_eq!(config.hooks, HooksConfig::default());
        let retention = example["retention"]
            .as_table()
            .expect("a [retention] table");
        for field in fields["retention"].as_object().expect("an object").keys() {
            assert!(
                retention.contains_key(field),
                "the example file lacks field retention.{field}"
            );
        }
        assert_eq!(config.retention, RetentionConfig::default());
    }

    #[test]
    fn postgres_needs_a_database_url_which_is_never_shown() {
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_STORE", "postgres")]),
        )
        .expect_err("no URL")
        .to_string();
        assert!(
            err.contains("database_url") && err.contains("METALGRAPH_DATABASE_URL"),
            "{err}"
        );
        let url = "postgresql://mg:s3cret@db:5432/mg";
        let config = Config::load(
            &ServeArgs::default(),
            &env_of(&[
                ("METALGRAPH_STORE", "postgres"),
                ("METALGRAPH_DATABASE_URL", url),
            ]),
        )
        .unwrap();
        assert_eq!(config.store, StoreKind::Postgres);
        assert_eq!(config.database_url, Some(DatabaseUrl(url.to_owned())));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn the_sled_cache_is_set_in_mib_within_bounds() {
        let config = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_SLED_CACHE_MB", "64")]),
        )
        .unwrap();
        assert_eq!(config.sled_cache_mb, 64);
        assert_eq!(Config::default().sled_cache_mb, 1024);
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_SLED_CACHE_MB", "4")]),
        )
        .expect_err("4 MiB")
        .to_string();
        assert_eq!(
            err,
            "config field sled_cache_mb is invalid: must be 8 to 1048576"
        );
    }

    #[test]
    fn retention_layers_and_zero_turns_a_rule_off() {
        let config = Config::load(
            &ServeArgs {
                retention_days: Some(0),
                ..ServeArgs::default()
            },
            &env_of(&[("METALGRAPH_RETENTION_KEEP_PER_NODE", "7")]),
        )
        .unwrap();
        let policy = config.retention.policy().expect("the per-node rule is on");
        assert_eq!((policy.max_age, policy.keep_per_node), (None, Some(7)));
        let config = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_RETENTION_KEEP_PER_NODE", "0")]),
        )
        .unwrap();
        let policy = config.retention.policy().expect("the age rule is on");
        assert_eq!(
            (policy.max_age, policy.keep_per_node),
            (Some(Duration::from_secs(30 * 86_400)), None)
        );
        let off = RetentionConfig {
            max_age_days: 0,
            keep_per_node: 0,
            ..RetentionConfig::default()
        };
        assert_eq!(off.policy(), None);
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_RETENTION_SWEEP_INTERVAL_MS", "10")]),
        )
        .expect_err("a 10 ms sweep")
        .to_string();
        assert_eq!(
            err,
            "config field retention.sweep_interval_ms is invalid: must be at least 1000"
        );
    }

    #[test]
    fn hooks_settings_layer_and_are_checked() {
        let mut config = Config::from_toml("[hooks]\nretry_backoff_ms = 50\n").unwrap();
        config
            .apply_env(&env_of(&[("METALGRAPH_HOOKS_DELIVERY_TIMEOUT_MS", "700")]))
            .unwrap();
        let s = config.hooks.settings();
        assert_eq!(
            (s.timeout, s.backoff, s.max_backoff),
            (
                Duration::from_millis(700),
                Duration::from_millis(50),
                Duration::from_secs(300)
            )
        );
        for (env, field) in [
            (
                vec![("METALGRAPH_HOOKS_RETRY_BACKOFF_MS", "0")],
                "config field hooks.retry_backoff_ms is invalid: must be 1 to 86400000 ms",
            ),
            (
                vec![("METALGRAPH_HOOKS_DELIVERY_TIMEOUT_MS", "86400001")],
                "config field hooks.delivery_timeout_ms is invalid: must be 1 to 86400000 ms",
            ),
            (
                vec![
                    ("METALGRAPH_HOOKS_RETRY_BACKOFF_MS", "5000"),
                    ("METALGRAPH_HOOKS_MAX_RETRY_BACKOFF_MS", "1000"),
                ],
                "config field hooks.retry_backoff_ms is invalid: must not exceed hooks.max_retry_backoff_ms",
            ),
        ] {
            let err = Config::load(&ServeArgs::default(), &env_of(&env))
                .expect_err(field)
                .to_string();
            assert!(err.contains(field), "{env:?}: {err}");
        }
    }

    #[test]
    fn limits_layer_like_every_other_field_and_none_may_be_zero() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "[limits]\nmax_connections = 64\nidle_timeout_ms = 6000\ngrpc_max_concurrent_streams = 8\n",
        )
        .expect("written");
        let env = env_of(&[
            ("METALGRAPH_CONFIG", path.to_str().expect("utf-8")),
            ("METALGRAPH_LIMITS_MAX_CONNECTIONS", "32"),
            ("METALGRAPH_LIMITS_HEADER_READ_TIMEOUT_MS", "1500"),
            ("METALGRAPH_LIMITS_GRPC_KEEPALIVE_INTERVAL_MS", "2000"),
            ("METALGRAPH_LIMITS_MAX_FILE_TRANSFERS", "12"),
        ]);
        let config = Config::load(&ServeArgs::default(), &env).expect("loads");
        let want = LimitsConfig {
            max_connections: 32,
            header_read_timeout_ms: 1500,
            idle_timeout_ms: 6000,
            grpc_keepalive_interval_ms: 2000,
            grpc_max_concurrent_streams: 8,
            max_file_transfers: 12,
            ..LimitsConfig::default()
        };
        assert_eq!(config.limits, want);
        let flags = ServeArgs {
            limits: LimitsArgs {
                max_connections: Some(16),
                idle_timeout_ms: Some(7000),
                ..LimitsArgs::default()
            },
            ..ServeArgs::default()
        };
        let config = Config::load(&flags, &env).expect("loads");
        assert_eq!(
            (config.limits.max_connections, config.limits.idle_timeout_ms),
            (16, 7000)
        );
        assert_eq!(config.limits.header_read_timeout_ms, 1500);

        for (var, value, field) in [
            (
                "METALGRAPH_LIMITS_MAX_CONNECTIONS",
                "0",
                "limits.max_connections",
            ),
            (
                "METALGRAPH_LIMITS_IDLE_TIMEOUT_MS",
                "0",
                "limits.idle_timeout_ms",
            ),
            (
                "METALGRAPH_LIMITS_GRPC_MAX_CONCURRENT_STREAMS",
                "0",
                "limits.grpc_max_concurrent_streams",
            ),
            (
                "METALGRAPH_LIMITS_MAX_FILE_TRANSFERS",
                "0",
                "limits.max_file_transfers",
            ),
            (
                "METALGRAPH_LIMITS_MAX_CONNECTIONS",
                "many",
                "METALGRAPH_LIMITS_MAX_CONNECTIONS",
            ),
        ] {
            let err = Config::load(&ServeArgs::default(), &env_of(&[(var, value)]))
                .expect_err(var)
                .to_string();
            assert!(err.contains(field), "{var}={value}: {err}");
        }
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[
                ("METALGRAPH_CANCEL_GRACE_MS", "5000"),
                ("METALGRAPH_LIMITS_IDLE_TIMEOUT_MS", "4000"),
            ]),
        )
        .expect_err("an idle timeout shorter than a cancel")
        .to_string();
        assert!(err.contains("limits.idle_timeout_ms"), "{err}");
        let err = Config::from_toml("[limits]\nmax_conections = 3\n").expect_err("a typo");
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn a_minimal_file_keeps_the_defaults() {
        let config = Config::from_toml("listen = \"0.0.0.0:9000\"\n").expect("parses");
        assert_eq!(
            config,
            Config {
                listen: "0.0.0.0:9000".parse().expect("an address"),
                ..Config::default()
            }
        );
        assert_eq!(Config::from_toml("").expect("parses"), Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("listne = \"0.0.0.0:9000\"\n").expect_err("an unknown key");
        assert!(err.contains("listne"), "{err}");
        let err = Config::from_toml("store = \"mysql\"\n").expect_err("an unknown store");
        assert!(err.contains("mysql"), "{err}");
    }

    #[test]
    fn env_overrides_the_file_and_flags_override_env() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("m.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1000\"\nstore = \"file\"\nmax_running_jobs = 3\n\
             node_listen = \"127.0.0.1:1001\"\n",
        )
        .expect("written");
        let env = env_of(&[
            ("METALGRAPH_CONFIG", path.to_str().expect("utf-8")),
            ("METALGRAPH_LISTEN", "127.0.0.1:2000"),
            ("METALGRAPH_MAX_RUNNING_JOBS", "7"),
            ("METALGRAPH_NODE_LISTEN", "off"),
            ("METALGRAPH_BODY_LIMIT", "4096"),
            ("METALGRAPH_LOG_FORMAT", "json"),
            ("METALGRAPH_FILES_DIR", "/srv/boot"),
            ("METALGRAPH_TEMPLATES_DIR", "off"),
        ]);

        let config = Config::load(&ServeArgs::default(), &env).expect("loads");
        assert_eq!(config.listen.to_string(), "127.0.0.1:2000");
        assert_eq!(config.store, StoreKind::File, "the file's value stays");
        assert_eq!(config.max_running_jobs, 7);
        assert_eq!(
            config.node_listen, None,
            "off in the environment turns it off"
        );
        assert_eq!(config.body_limit_bytes, 4096);
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.files_dir, Some(PathBuf::from("/srv/boot")));
        assert_eq!(config.templates_dir, None);

        let flags = ServeArgs {
            listen: Some("127.0.0.1:3000".parse().expect("an address")),
            store: Some(StoreKind::Sled),
            demo: true,
            templates_dir: Some(PathBuf::from("./templates")),
            ..ServeArgs::default()
        };
        let config = Config::load(&flags, &env).expect("loads");
        assert_eq!(config.templates_dir, Some(PathBuf::from("./templates")));
        assert_eq!(config.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(config.store, StoreKind::Sled);
        assert!(config.demo);
        assert_eq!(
            config
                .effective_node_listen()
                .map(|a| a.to_string())
                .as_deref(),
            Some(DEMO_NODE_LISTEN)
        );
        assert_eq!(
            config.max_running_jobs, 7,
            "no flag, so the environment's value stays"
        );
    }

    #[test]
    fn bad_values_name_their_source() {
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_LISTEN", "nowhere")]),
        )
        .expect_err("a bad address");
        assert!(err.to_string().contains("METALGRAPH_LISTEN"), "{err}");
        let err = Config::load(
            &ServeArgs {
                config: Some(PathBuf::from("/nonexistent/metalgraph.toml")),
                ..ServeArgs::default()
            },
            &env_of(&[]),
        )
        .expect_err("a missing file");
        assert!(
            err.to_string().contains("/nonexistent/metalgraph.toml"),
            "{err}"
        );
        let err = Config::load(
            &ServeArgs::default(),
            &env_of(&[("METALGRAPH_MAX_RUNNING_JOBS", "0")]),
        )
        .expect_err("zero jobs");
        assert!(err.to_string().contains("max_running_jobs"), "{err}");
    }
}
