//! metalgraph's engine: the graph and task-definition model, validation, option
//! templating, the durable scheduler and crash recovery.
//!
//! Architecture invariant: this crate knows nothing of HTTP, gRPC, sled or Redfish. It
//! talks to storage only through `metalgraph_store::Store` and to the world only through
//! the jobs it is given.

pub mod batches;
pub mod clock;
pub mod definitions;
pub mod endpoints;
mod engine;
mod error;
pub mod events;
pub mod history;
pub mod job;
pub mod keys;
pub mod metrics;
pub mod model;
pub mod nodes;
mod notify;
pub mod ownership;
pub mod plans;
mod rerun;
pub mod retention;
pub mod scheduler;
pub mod seal;
mod sequencer;
mod subgraph;
pub mod template;
pub mod text;
pub mod workflow;

pub use definitions::{Definitions, Library, Plan, Problem, Problems, Source};
pub use engine::{ApiUrls, Engine, EngineOptions, NodeTask, RunRequest, WaitingTask};
pub use error::Error;
pub use events::{EVENT_RETENTION, EventFilter, Numbered};
pub use history::{ListFilter, Page};
pub use job::{
    Callback, Job, JobContext, JobError, JobRegistry, JobResult, OptionKind, OptionSchema,
};
pub use model::{GraphDefinition, TaskDefinition, TaskState, WorkflowStatus};
pub use notify::{NodeCap, NodeCaps, not_waiting, query_escape, waiting_vars};
pub use subgraph::GraphRunJob;
pub use workflow::{Event, WorkflowView};

/// A new random identifier (a UUID v4).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A new random token for node callbacks (a UUID v4: 122 random bits, as 32 hex digits).
pub fn new_token() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
