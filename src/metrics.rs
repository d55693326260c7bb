//! `GET /metrics`: every metric of the process in the OpenMetrics text format, under the
//! `metalgraph_` prefix — the engine's (workflows, tasks, job slots), the BMC drivers',
//! network boot's, the store's (commit latency and batch size, measured by [`MeteredStore`]
//! around whatever backend is open), webhooks' deliveries, and the build.

use std::sync::{Arc, LazyLock};
use std::time::Instant;

use metalgraph_store::{Batch, Bytes, Store};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

struct Metrics {
    commit_duration: Histogram,
    commit_ops: Histogram,
    commit_errors: Counter,
    hook_deliveries: Family<OutcomeLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    // An fsync takes from tens of microseconds to a second on a struggling disk.
    commit_duration: Histogram::new(exponential_buckets(0.000_05, 2.5, 14)),
    // A commit writes from one record to a group commit's thousands.
    commit_ops: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
    commit_errors: Counter::default(),
    hook_deliveries: Family::default(),
});

/// The registry of every metric, built once.
static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("metalgraph");
    registry.register(
        "build",
        "The build of this process",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    metalgraph_engine::metrics::register(&mut registry);
    metalgraph_tasks::bmc::register_metrics(&mut registry);
    metalgraph_pxe::metrics::register(&mut registry);
    let m = &*METRICS;
    registry.register(
        "store_commit_duration_seconds",
        "How long store commits took, durable write included",
        m.commit_duration.clone(),
    );
    registry.register(
        "store_commit_ops",
        "Writes and deletes per store commit",
        m.commit_ops.clone(),
    );
    registry.register(
        "store_commit_errors",
        "Store commits that failed (precondition conflicts excluded)",
        m.commit_errors.clone(),
    );
    registry.register(
        "hook_deliveries",
        "Webhook delivery attempts, by outcome (delivered, failed)",
        m.hook_deliveries.clone(),
    );
    registry
});

/// Every metric, encoded.
pub fn render() -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &REGISTRY)
        .expect("writing to a String cannot fail");
    out
}

/// Counts a webhook delivery attempt.
pub fn hook_delivery(delivered: bool) {
    let outcome = if delivered { "delivered" } else { "failed" };
    METRICS
        .hook_deliveries
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
}

/// A store whose commits are timed and sized.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(MeteredStore { inner })
    }
}

impl Store for MeteredStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> metalgraph_store::Result<Option<Bytes>> {
        self.inner.get(keyspace, key)
    }

    fn scan_prefix(
        &self,
        keyspace: &str,
        prefix: &[u8],
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan_prefix(keyspace, prefix)
    }

    fn scan(
        &self,
        keyspace: &str,
        scan: metalgraph_store::Scan<'_>,
    ) -> metalgraph_store::Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan(keyspace, scan)
    }

    fn commit(&self, batch: Batch) -> metalgraph_store::Result<()> {
        let ops = batch.ops.len();
        let started = Instant::now();
        let res = self.inner.commit(batch);
        let m = &*METRICS;
        m.commit_duration.observe(started.elapsed().as_secs_f64());
        m.commit_ops.observe(ops as f64);
        if matches!(&res, Err(e) if !matches!(e, metalgraph_store::Error::Conflict { .. })) {
            m.commit_errors.inc();
        }
        res
    }

    fn close(&self) -> metalgraph_store::Result<()> {
        self.inner.close()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn now_ms(&self) -> metalgraph_store::Result<u64> {
        self.inner.now_ms()
    }
}
