//! The engine's Prometheus metrics: workflows started, finished and active, job slots, and
//! task attempts (duration, failures by reason, retries). They are process-wide, like the
//! process they describe; the binary registers them under the `metalgraph_` prefix and
//! serves them on `GET /metrics`.

use std::sync::LazyLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::WorkflowStatus;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GraphLabels {
    pub graph: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishedLabels {
    pub graph: String,
    pub status: String,
}

/// How a task attempt ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AttemptOutcome {
    succeeded,
    failed,
    timeout,
    cancelled,
}

/// Why an attempt failed: the job returned an error, overran its timeout, or panicked.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FailureReason {
    error,
    timeout,
    panic,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub job: String,
    pub outcome: AttemptOutcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub job: String,
    pub reason: FailureReason,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub job: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Task attempts take from milliseconds (a no-op) to hours (an OS install): 1 ms to ~4.5 h.
fn attempt_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

pub struct Metrics {
    pub workflows_started: Family<GraphLabels, Counter>,
    pub workflows_finished: Family<FinishedLabels, Counter>,
    pub workflows_active: Gauge,
    pub job_slots_in_use: Gauge,
    pub job_slots: Gauge,
    pub task_duration: HistogramFamily<AttemptLabels>,
    pub task_failures: Family<FailureLabels, Counter>,
    pub task_retries: Family<JobLabels, Counter>,
    pub events: Counter,
    pub retention_sweeps: Counter,
    pub retention_removed: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    workflows_started: Family::default(),
    workflows_finished: Family::default(),
    workflows_active: Gauge::default(),
    job_slots_in_use: Gauge::default(),
    job_slots: Gauge::default(),
    task_duration: Family::new_with_constructor(attempt_buckets),
    task_failures: Family::default(),
    task_retries: Family::default(),
    events: Counter::default(),
    retention_sweeps: Counter::default(),
    retention_removed: Counter::default(),
});

/// The engine's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    pub(crate) fn workflow_started(&self, graph: &str) {
        self.workflows_started
            .get_or_create(&GraphLabels {
                graph: graph.to_owned(),
            })
            .inc();
    }

    pub(crate) fn workflow_finished(&self, graph: &str, status: WorkflowStatus) {
        self.workflows_finished
            .get_or_create(&FinishedLabels {
                graph: graph.to_owned(),
                status: status.to_string(),
            })
            .inc();
    }
}

/// Registers the engine's metrics (names without the registry's prefix).
pub fn register(registry: &mut Registry) {
    let m = metrics();
    registry.register(
        "workflows_started",
        "Workflows created, by graph",
        m.workflows_started.clone(),
    );
    registry.register(
        "workflows_finished",
        "Workflows that ended, by graph and status",
        m.workflows_finished.clone(),
    );
    registry.register(
        "workflows_active",
        "Workflows not yet finished (subgraphs included)",
        m.workflows_active.clone(),
    );
    registry.register(
        "job_slots_in_use",
        "Running jobs that occupy a job slot",
        m.job_slots_in_use.clone(),
    );
    registry.register(
        "job_slots",
        "Job slots: the most slot-occupying jobs that run at once",
        m.job_slots.clone(),
    );
    registry.register(
        "task_duration_seconds",
        "How long task attempts ran, by job and outcome",
        m.task_duration.clone(),
    );
    registry.register(
        "task_failures",
        "Task attempts that failed, by job and reason (error, timeout, panic)",
        m.task_failures.clone(),
    );
    registry.register(
        "task_retries",
        "Task attempts started again after a failed one, by job",
        m.task_retries.clone(),
    );
    registry.register(
        "events",
        "Workflow and task events committed",
        m.events.clone(),
    );
    registry.register(
        "retention_sweeps",
        "Retention sweeps run",
        m.retention_sweeps.clone(),
    );
    registry.register(
        "retention_removed_workflows",
        "Finished workflows removed by retention (subgraphs included)",
        m.retention_removed.clone(),
    );
}
