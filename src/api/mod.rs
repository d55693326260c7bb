//! The HTTP APIs: the management API (`/api/2.0/...`, RackHD's paths) and the node-facing
//! API on its own listener. The engine knows nothing of HTTP; this module translates.

pub mod error;
pub mod extract;
pub mod grpc;
pub mod http;

use metalgraph_engine::Engine;

pub use error::ApiError;
pub use http::{app, node_app};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Engine,
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
}

impl AppState {
    pub fn new(engine: Engine, body_limit: usize) -> Self {
        Self { engine, body_limit }
    }
}
