//! `metalgraph serve`: opens the store, starts the engine, serves the APIs, and shuts down
//! in order when the root token is cancelled: stop accepting and drain requests, stop the
//! engine (running jobs are left `running` in the store and resume on the next start), then
//! close the store. Every listener serves under the `[limits]` of `conn`.

mod conn;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metalgraph_engine::nodes::{Node, Obm, ObmConfig};
use metalgraph_engine::ownership::{Leases, Ownership};
use metalgraph_engine::{ApiUrls, Engine, EngineOptions, JobRegistry};
use metalgraph_store::Store;
use metalgraph_tasks::ConfigMediaSite;
use metalgraph_tasks::bmc::Drivers;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::api::{self, AppState};
use crate::config::{Config, StoreKind};

/// How long open connections get to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long health checks see a failed engine's 503 before the service shuts down.
const FAILURE_GRACE: Duration = Duration::from_secs(3);

/// How many simulated nodes `--demo` registers.
const DEMO_NODES: usize = 8;

/// The jobs this build can run: the basic ones, the provisioning ones with their BMC
/// drivers (Redfish, IPMI, simulated), and RackHD's base tasks over both. `serve` and `validate` both use it, so that offline
/// validation judges graphs exactly as the server does.
pub fn jobs() -> JobRegistry {
    jobs_with(Arc::default(), Arc::default())
}

/// [`jobs`] whose BMC jobs use `drivers` and whose `config-media.build` writes into
/// `media` (`serve` lends it the files and templates directories and the node-facing URLs).
fn jobs_with(drivers: Arc<Drivers>, media: Arc<ConfigMediaSite>) -> JobRegistry {
    let mut jobs = JobRegistry::new();
    metalgraph_tasks::register_basic(&mut jobs);
    metalgraph_tasks::register_provisioning(&mut jobs, drivers);
    metalgraph_tasks::register_config_media(&mut jobs, media);
    metalgraph_tasks::rackhd::register(&mut jobs);
    jobs
}

/// Runs the server until `shutdown` is cancelled, then shuts down in order.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    // On PostgreSQL every process is a replica; its id lives in its data directory, locked
    // for as long as it serves.
    let replica = match config.store {
        StoreKind::Postgres => Some(replica_id(&config.data_dir)?),
        StoreKind::Sled | StoreKind::File => None,
    };
    let store = open_store(&config).await?;
    let library = crate::library::library()?;

    let mgmt = bind(config.listen, "management API").await?;
    let mgmt_addr = mgmt
        .local_addr()
        .context("the management listener has no address")?;
    let node = match config.effective_node_listen() {
        Some(addr) => Some(bind(addr, "node-facing API").await?),
        None => None,
    };
    let grpc = match config.effective_grpc_listen() {
        Some(addr) => Some(bind(addr, "gRPC API").await?),
        None => None,
    };
    let metrics = match config.metrics_listen {
        Some(addr) => Some(bind(addr, "metrics").await?),
        None => None,
    };
    let node_addr = match &node {
        Some(l) => Some(
            l.local_addr()
                .context("the node-facing listener has no address")?,
        ),
        None => None,
    };

    let tls = {
        let mut listen = vec![mgmt_addr];
        if let Some(g) = &grpc {
            listen.push(g.local_addr().context("the gRPC listener has no address")?);
        }
        let names: Vec<String> = config
            .api_base_url
            .iter()
            .filter_map(|u| crate::tls::url_host(u))
            .collect();
        let (security, data_dir) = (config.security.clone(), config.data_dir.clone());
        tokio::task::spawn_blocking(move || crate::tls::load(&security, &data_dir, &listen, &names))
            .await
            .context("setting up TLS failed")??
    };
    let scheme = if tls.is_some() { "https" } else { "http" };

    for (field, dir) in [
        ("files_dir", &config.files_dir),
        ("templates_dir", &config.templates_dir),
    ] {
        if let Some(dir) = dir {
            anyhow::ensure!(dir.is_dir(), "{field} {} is not a directory", dir.display());
            if node.is_none() {
                warn!(field, dir = %dir.display(), "the node-facing API is off, so this directory is not served; set node_listen");
            }
        }
    }

    let key_file = config.effective_secret_key_file();
    let shown = key_file.display().to_string();
    let pending = crate::rekey::pending_key_file(&key_file);
    anyhow::ensure!(
        !pending.exists(),
        "a rekey was cut short ({} exists): run `metalgraph rekey` again to finish it before serving",
        pending.display()
    );
    let checked = store.clone();
    let sealer = tokio::task::spawn_blocking(move || {
        let sealer = metalgraph_engine::seal::Sealer::load_or_create(&key_file)?;
        metalgraph_engine::seal::check_key(checked.as_ref(), &sealer)?;
        Ok::<_, String>(sealer)
    })
    .await
    .context("loading the secret key failed")?
    .map_err(|e| anyhow::anyhow!("secret key {shown}: {e}"))?;
    let sealer = Arc::new(sealer);
    // Workflow and task records are sealed whole; node passwords and webhook secrets field
    // by field (the engine and the hooks do that with the same key).
    let sealed = metalgraph_engine::seal::SealedStore::wrap(store.clone(), sealer.clone());
    let api_urls = ApiUrls {
        base: config
            .api_base_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{mgmt_addr}/api/2.0")),
        node_base: config
            .node_api_base_url
            .clone()
            .or_else(|| {
                node_addr.map(|a| {
                    let a = crate::boot::reachable(a, config.boot.boot_address);
                    format!("http://{a}/api/2.0")
                })
            })
            .unwrap_or_default(),
    };
    let media = Arc::new(ConfigMediaSite::new(
        config.files_dir.clone(),
        config.templates_dir.clone(),
        api_urls.clone(),
    ));
    let drivers: Arc<Drivers> = Arc::default();
    let mut opts = EngineOptions::new(sealed, jobs_with(drivers.clone(), media.clone()), library);
    opts.sealer = Some(sealer);
    opts.max_running_jobs = config.max_running_jobs;
    opts.cancel_grace = Duration::from_millis(config.cancel_grace_ms);
    opts.max_tasks_per_graph = config.limits.max_tasks_per_graph;
    opts.retention = config.retention.policy();
    opts.api = api_urls.clone();
    if let Some((me, _)) = &replica {
        info!(replica = %me, "serving as a replica of the database (docs/scale-out.md)");
        let leases = Leases::new(store.clone(), me.clone(), config.lease_timings());
        opts.ownership = Ownership::Leased(leases);
    }
    let node_base = opts.api.node_base.clone();
    // The engine has its own token: it must keep running while the listeners drain, so that
    // requests in flight (a cancel, a run) are answered rather than refused.
    let engine_stop = CancellationToken::new();
    let (engine, engine_task) = Engine::start(opts, engine_stop.clone());
    // A scheduler that stops on its own (a store failure: a full disk, a broken database)
    // leaves nothing to serve. Health answers 503 naming why at once; after a short grace,
    // in which health checks can see that, the service drains and exits non-zero, so that a
    // supervisor restarts it.
    let engine_watch = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let res = match engine_task.await {
                Ok(res) => res.map_err(anyhow::Error::from),
                Err(e) => Err(anyhow::anyhow!("the engine task failed: {e}")),
            };
            if let Err(e) = &res {
                error!(error = %e, grace_ms = FAILURE_GRACE.as_millis() as u64, "the engine stopped; health answers 503 and the service shuts down");
                tokio::time::sleep(FAILURE_GRACE).await;
                shutdown.cancel();
            }
            res.context("the engine stopped")
        })
    };
    check_library(&engine).await;
    if config.demo {
        register_demo_nodes(&engine).await?;
    }

    let base = match AppState::with_hooks(
        engine.clone(),
        config.body_limit_bytes,
        config.hooks.settings(),
        config.security.auth,
    ) {
        Ok(base) => base,
        Err(e) => {
            engine_stop.cancel();
            let _ = engine_watch.await;
            return Err(anyhow::Error::new(e).context("cannot read the tokens or the audit log"));
        }
    };
    if config.security.auth {
        let file = config.data_dir.join("admin.token");
        match base.tokens.bootstrap(&file).await {
            Ok(Some(path)) => {
                info!(file = %path.display(), "made the first admin token; it is in this file (mode 0600)")
            }
            Ok(None) => {}
            Err(e) => {
                engine_stop.cancel();
                let _ = engine_watch.await;
                return Err(e.context("cannot make the first admin token"));
            }
        }
    } else {
        crate::auth::warn_off();
    }
    if replica.is_some() {
        // Tokens created or revoked through another replica hold here within a second.
        tokio::spawn(base.tokens.clone().keep_fresh(shutdown.clone()));
    }
    let state = AppState {
        files_dir: config.files_dir.clone(),
        // The iPXE binaries, for UEFI HTTP Boot, wherever network boot runs (with or
        // without TFTP).
        boot_dir: config.boot.enabled().then(|| config.boot.tftp_root.clone()),
        file_transfers: api::files::FileTransfers::new(config.limits.max_file_transfers),
        templates_dir: config.templates_dir.clone(),
        discovery_graph: config.boot.discovery_graph.clone(),
        api: api_urls,
        // With full DHCP, metalgraph knows which address it leased to which MAC, so a
        // request from that address is the node's; otherwise only the capability proves it.
        node_access: match (config.boot.node_tokens, config.boot.dhcp) {
            (crate::boot::NodeTokens::Open, _) => {
                warn!(
                    "node_tokens = open: any request to the node-facing listener is shown a waiting node's callback token, and can complete its install; not recommended"
                );
                crate::boot::NodeAccess::open()
            }
            (_, crate::boot::DhcpSetting::Full) => {
                crate::boot::NodeAccess::with_leases(store.clone())
            }
            _ => crate::boot::NodeAccess::capability_only(),
        },
        enrolment: Arc::new(crate::boot::Enrolment::new(
            config.boot.enrolment_on(),
            config.boot.enrolment_rate,
            config.boot.enrolment_burst,
        )),
        drivers,
        ..base
    };
    let hooks = state.hooks.clone();
    // Network boot binds before anything is served, so that a port in use or a missing
    // TFTP root stops the start; the engine is stopped cleanly first.
    let pxe =
        match crate::boot::bind_service(&config.boot, &engine, store.clone(), &node_base).await {
            Ok(pxe) => pxe,
            Err(e) => {
                engine_stop.cancel();
                let _ = engine_watch.await;
                return Err(e);
            }
        };

    let mut servers = JoinSet::new();
    // Ended workflows' configuration media go; it stops with the listeners, and what ends
    // after that is swept at the next start.
    {
        let (engine, stop) = (engine.clone(), shutdown.clone());
        servers.spawn(async move {
            crate::config_media::run(engine, media, stop).await;
            Ok(())
        });
    }
    if let Some(pxe) = pxe {
        let (dhcp, tftp) = (pxe.dhcp_addr(), pxe.tftp_addr());
        // It stops with the listeners, before the engine drains, like every other server.
        let stop = shutdown.clone();
        servers.spawn(async move {
            pxe.run(stop).await;
            Ok(())
        });
        if let Some(addr) = dhcp {
            announce(&format!("metalgraph dhcp listening on {addr}"));
        }
        if let Some(addr) = tftp {
            announce(&format!("metalgraph tftp listening on {addr}"));
        }
        info!(dhcp = ?dhcp, tftp = ?tftp, mode = ?config.boot.dhcp, interface = ?config.boot.dhcp_interface, enrolment = config.boot.enrolment_on(), "network boot serving");
    }
    let limits = conn::Limits::from(&config.limits);
    conn::check_descriptor_budget(
        &limits,
        1 + usize::from(node.is_some())
            + usize::from(grpc.is_some())
            + usize::from(metrics.is_some()),
    );
    servers.spawn(run_http(
        "management API",
        mgmt,
        api::app(state.clone()),
        limits,
        tls.as_ref().map(|t| t.http.clone()),
        shutdown.clone(),
    ));
    announce(&format!("metalgraph listening on {scheme}://{mgmt_addr}"));
    info!(addr = %mgmt_addr, store = store.backend(), data_dir = %config.data_dir.display(), "management API listening");
    if let Some(listener) = metrics {
        let addr = listener
            .local_addr()
            .context("the metrics listener has no address")?;
        servers.spawn(run_http(
            "metrics",
            listener,
            api::metrics_app(state.clone()),
            limits,
            None,
            shutdown.clone(),
        ));
        announce(&format!("metalgraph metrics listening on http://{addr}"));
        info!(%addr, "metrics listening");
    }
    if let (Some(listener), Some(addr)) = (node, node_addr) {
        servers.spawn(run_http(
            "node-facing API",
            listener,
            api::node_app(state.clone()),
            limits,
            None,
            shutdown.clone(),
        ));
        announce(&format!(
            "metalgraph node-facing listening on http://{addr}"
        ));
        info!(%addr, "node-facing API listening");
    }

    if let Some(listener) = grpc {
        let addr = listener
            .local_addr()
            .context("the gRPC listener has no address")?;
        let router = api::grpc::router(
            engine.clone(),
            conn::grpc_server(&config.limits),
            config.body_limit_bytes,
            &state,
        )?;
        let stop = shutdown.clone();
        let tls = tls.as_ref().map(|t| t.grpc.clone());
        servers.spawn(async move {
            let (incoming, accept) = conn::grpc_incoming(listener, limits, tls, stop.clone());
            let signal = stop.clone().cancelled_owned();
            let serve = async move {
                let (served, ()) = tokio::join!(
                    router.serve_with_incoming_shutdown(incoming, signal),
                    accept
                );
                served.context("the gRPC server failed")
            };
            drained("gRPC API", serve, stop).await
        });
        announce(&format!("metalgraph grpc listening on {scheme}://{addr}"));
        info!(%addr, "gRPC API listening");
    }

    let mut result = Ok(());
    while let Some(joined) = servers.join_next().await {
        let outcome =
            joined.unwrap_or_else(|e| Err(anyhow::anyhow!("an HTTP server task failed: {e}")));
        if let Err(e) = outcome {
            error!(error = %format!("{e:#}"), "an HTTP server stopped; shutting down");
            shutdown.cancel();
            if result.is_ok() {
                result = Err(e);
            }
        }
    }

    info!("listeners closed; stopping webhook deliveries and the engine");
    hooks.shutdown().await;
    engine_stop.cancel();
    let engine_result = engine_watch
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the engine watch failed: {e}")));
    if let Err(e) = engine_result
        && result.is_ok()
    {
        result = Err(e);
    }
    drop(engine);
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close())
        .await
        .context("closing the store failed")?
        .context("closing the store failed")?;
    info!("stopped");
    result
}

/// Prints a line tests and scripts read (`metalgraph listening on http://ADDR`) to stdout,
/// flushed at once so that a pipe reader sees it while the server runs.
fn announce(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// This process's replica id, kept in `<data-dir>/replica-id` (made on the first start),
/// with the lock that keeps a second process from serving with the same data directory.
/// A restarted replica keeps its id, so it takes its own partitions back at once instead of
/// waiting for their leases to run out.
fn replica_id(data_dir: &std::path::Path) -> anyhow::Result<(String, std::fs::File)> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data_dir {}", data_dir.display()))?;
    let path = data_dir.join("replica-id");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    file.try_lock().map_err(|_| {
        anyhow::anyhow!(
            "another metalgraph process serves with the data directory {}; give each replica \
             a data directory of its own",
            data_dir.display()
        )
    })?;
    let mut id = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .trim()
        .to_owned();
    let valid = |id: &str| {
        !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !valid(&id) {
        anyhow::ensure!(
            id.is_empty(),
            "{} holds no valid replica id (letters, digits, '-' and '.', at most 64)",
            path.display()
        );
        id = metalgraph_engine::new_token()[..16].to_owned();
        std::fs::write(&path, format!("{id}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok((id, file))
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let backend = config.store.backend();
    let dir = config.data_dir.clone();
    let shown = dir.display().to_string();
    let options = metalgraph_store::OpenOptions {
        sled_cache_bytes: config.sled_cache_mb << 20,
        database: database_options(
            config.database_url.as_ref().map(|u| u.0.clone()),
            config.database_ca_file.as_deref(),
        )?,
    };
    let store =
        tokio::task::spawn_blocking(move || metalgraph_store::open_with(backend, &dir, &options))
            .await
            .context("opening the store failed")?
            .with_context(|| {
                format!("cannot open the {} store in {shown}", config.store.as_str())
            })?;
    Ok(crate::metrics::MeteredStore::wrap(store))
}

/// How the PostgreSQL store reaches its database (`serve` and `rekey`): its URL, and the
/// CA certificates of `ca_file` to trust for TLS.
pub fn database_options(
    url: Option<String>,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<metalgraph_store::PgOptions>> {
    let Some(url) = url else {
        return Ok(None);
    };
    let ca_pem = match ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read database_ca_file {}", path.display()))?,
        ),
        None => None,
    };
    Ok(Some(metalgraph_store::PgOptions { url, ca_pem }))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for the {what}"))
}

/// Serves one router under `limits` until `shutdown`; connections still open
/// `DRAIN_TIMEOUT` after that are dropped.
async fn run_http(
    what: &'static str,
    listener: TcpListener,
    router: axum::Router,
    limits: conn::Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    conn::serve_http(what, listener, router, limits, tls, shutdown, DRAIN_TIMEOUT).await;
    Ok(())
}

/// Runs `server` until it ends; once `shutdown` is cancelled it gets `DRAIN_TIMEOUT` to
/// finish (its connections to close), then it is dropped.
async fn drained(
    what: &'static str,
    server: impl Future<Output = anyhow::Result<()>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_TIMEOUT).await;
    };
    tokio::select! {
        r = server => r,
        () = deadline => {
            warn!(what, timeout_s = DRAIN_TIMEOUT.as_secs(), "connections still open after the drain timeout; dropping them");
            Ok(())
        }
    }
}

/// Logs every shipped definition that does not validate against this build's jobs: such a
/// definition exists but cannot run.
async fn check_library(engine: &Engine) {
    let defs = engine.definitions();
    for task in defs.library().tasks.values() {
        if let Err(problems) = metalgraph_engine::definitions::validate_task(task, defs.jobs()) {
            warn!(task = %task.injectable_name, problems = %problems, "a shipped task definition cannot run in this build");
        }
    }
    for graph in defs.library().graphs.values() {
        if let Err(problems) = defs.validate_graph(graph.clone()).await {
            warn!(graph = %graph.injectable_name, problems = %problems, "a shipped graph cannot run in this build");
        }
    }
}

/// The id of the `i`th demo node, counting from 1.
pub fn demo_node_id(i: usize) -> String {
    format!("demo-node-{i:02}")
}

/// Registers the demo's simulated nodes unless they exist, so restarts with `--demo` keep
/// them (and their catalogs) as they are.
pub async fn register_demo_nodes(engine: &Engine) -> anyhow::Result<()> {
    let nodes = engine.nodes();
    for i in 1..=DEMO_NODES {
        let id = demo_node_id(i);
        if nodes.get(&id).await?.is_some() {
            continue;
        }
        let node = Node {
            id: id.clone(),
            name: id.clone(),
            identifiers: vec![format!("02:00:00:00:00:{i:02x}")],
            node_type: "compute".to_owned(),
            tags: vec!["demo".to_owned()],
            obms: vec![Obm {
                service: "sim-obm-service".to_owned(),
                config: ObmConfig {
                    host: "sim".to_owned(),
                    ..ObmConfig::default()
                },
            }],
            created_at: String::new(),
            updated_at: String::new(),
        };
        match nodes.create(node).await {
            Ok(_) | Err(metalgraph_engine::Error::AlreadyExists(_)) => {}
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("cannot register demo node {id}"))
                );
            }
        }
    }
    info!(nodes = DEMO_NODES, "demo nodes ready");
    Ok(())
}
