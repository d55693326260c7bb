//! metalgraph's built-in jobs: the basic ones every graph library leans on (`noop`,
//! `sleep`, `fail`, `evaluate.condition`, `http.request`, `graph.run`).
//!
//! Every job here keeps the contract of [`metalgraph_engine::Job`]: it is idempotent, it
//! stops promptly when its task's cancellation token fires, it returns an output or an
//! error and never writes workflow state, and neither its output nor its errors carry a
//! secret. Options reach a job merged, rendered, coerced and checked against its schema,
//! so the jobs only re-check what the schema cannot express.

mod condition;
mod fail;
mod http;
mod noop;
mod sleep;

pub use condition::EvaluateConditionJob;
pub use fail::FailJob;
pub use http::{HttpRequestJob, MAX_RESPONSE_BYTES};
pub use noop::NoopJob;
pub use sleep::SleepJob;

use metalgraph_engine::{GraphRunJob, JobRegistry};

/// Registers the basic jobs, `graph.run` (which lives in the engine, since it needs the
/// scheduler) among them.
pub fn register_basic(reg: &mut JobRegistry) {
    reg.register(NoopJob::default())
        .register(SleepJob::default())
        .register(FailJob::default())
        .register(EvaluateConditionJob::default())
        .register(HttpRequestJob::default())
        .register(GraphRunJob::default());
}
