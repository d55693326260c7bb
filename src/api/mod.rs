//! The HTTP APIs: the management API (`/api/2.0/...`, RackHD's paths) and the node-facing
//! API on its own listener, and the web view (`/ui/`) on the management listener. The
//! engine knows nothing of HTTP; this module translates.

pub mod codec;
pub mod error;
pub mod events;
pub mod extract;
pub mod files;
pub mod fleet;
pub mod grpc;
pub mod http;
pub mod openapi;
pub mod profiles;
pub mod security;
pub mod ui;

use std::path::PathBuf;
use std::sync::Arc;

use metalgraph_engine::{ApiUrls, Engine};

use crate::audit::Audit;
use crate::auth::Tokens;
use crate::hooks::Hooks;

pub use error::ApiError;
pub use http::{app, metrics_app, node_app};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Engine,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// The directory served under `/files/` on the node-facing API; none serves nothing.
    pub files_dir: Option<PathBuf>,
    /// The boot files directory served under `/boot/` on the node-facing API (`[boot]
    /// tftp_root`, while network boot is on); none serves nothing.
    pub boot_dir: Option<PathBuf>,
    /// The bound on concurrent `/files/` and `/boot/` downloads (`[limits]
    /// max_file_transfers`).
    pub file_transfers: files::FileTransfers,
    /// The directory `/api/2.0/templates/{name}` renders from; none renders nothing.
    pub templates_dir: Option<PathBuf>,
    /// The base URLs templates see as `api` (the engine renders task options with the
    /// same ones).
    pub api: ApiUrls,
    /// The graph an unknown machine runs when it asks `/api/2.0/profiles` (`[boot]
    /// discovery_graph`).
    pub discovery_graph: String,
    /// The webhooks, delivering.
    pub hooks: Hooks,
    /// The bearer tokens the management API checks.
    pub tokens: Tokens,
    /// The audit log of calls that change something.
    pub audit: Audit,
    /// How node-facing requests prove they come from the node they ask about, which they
    /// must to be shown its callback token (`boot::access`).
    pub node_access: crate::boot::NodeAccess,
    /// Whether and how fast unknown machines are enrolled (`[boot] enrolment`).
    pub enrolment: Arc<crate::boot::Enrolment>,
    /// The BMC drivers the jobs use, shared so that the fleet API's live reads of an
    /// endpoint go through its one client and concurrency limit.
    pub drivers: Arc<metalgraph_tasks::bmc::Drivers>,
}

impl AppState {
    /// A state with the node-facing files and templates off (downloads bounded by the
    /// default `max_file_transfers`), webhooks delivered with the
    /// default settings, tokens required, node-facing requests proven by capability only,
    /// and enrolment on at the default rate. It starts delivering the stored webhooks and
    /// reads the stored tokens: make one per engine.
    pub fn new(engine: Engine, body_limit: usize) -> Result<Self, metalgraph_engine::Error> {
        Self::with_hooks(engine, body_limit, crate::hooks::Settings::default(), true)
    }

    /// [`AppState::new`] with webhooks delivered under `hooks`, and tokens required or not.
    pub fn with_hooks(
        engine: Engine,
        body_limit: usize,
        hooks: crate::hooks::Settings,
        tokens_required: bool,
    ) -> Result<Self, metalgraph_engine::Error> {
        let store = engine.store();
        Ok(Self {
            tokens: Tokens::load(store.clone(), tokens_required)?,
            audit: Audit::start(store)?,
            hooks: Hooks::start(engine.clone(), hooks),
            engine,
            body_limit,
            files_dir: None,
            boot_dir: None,
            file_transfers: files::FileTransfers::default(),
            templates_dir: None,
            api: ApiUrls::default(),
            discovery_graph: crate::boot::DEFAULT_DISCOVERY_GRAPH.to_owned(),
            node_access: crate::boot::NodeAccess::capability_only(),
            enrolment: Arc::new(crate::boot::Enrolment::default()),
            drivers: Arc::default(),
        })
    }
}
