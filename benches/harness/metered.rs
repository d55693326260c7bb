//! A [`Store`] wrapper that counts commits and the time spent inside them, so that a
//! figure can be split into "waiting for the disk" and "everything else".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use metalgraph_store::{Batch, Bytes, Result, Store};

/// What a [`Metered`] store saw.
#[derive(Debug, Default)]
pub struct Meter {
    commits: AtomicU64,
    ops: AtomicU64,
    commit_nanos: AtomicU64,
}

/// A snapshot of a [`Meter`].
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct Metered {
    /// Commits that wrote something.
    pub commits: u64,
    /// Puts and deletes in those commits.
    pub ops: u64,
    /// Wall time spent inside `commit`, summed over callers. With concurrent callers this
    /// counts each one's wait for the store's lock too, so it can exceed the wall time; it
    /// is the disk's share only when commits are sequential (the chain).
    #[serde(with = "crate::util::secs")]
    pub commit_time: Duration,
}

impl Meter {
    pub fn snapshot(&self) -> Metered {
        Metered {
            commits: self.commits.load(Ordering::Relaxed),
            ops: self.ops.load(Ordering::Relaxed),
            commit_time: Duration::from_nanos(self.commit_nanos.load(Ordering::Relaxed)),
        }
    }
}

impl Metered {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &Metered) -> Metered {
        Metered {
            commits: self.commits - earlier.commits,
            ops: self.ops - earlier.ops,
            commit_time: self.commit_time.saturating_sub(earlier.commit_time),
        }
    }
}

/// The wrapper itself: every call goes to `inner`; commits are counted and timed.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    meter: Arc<Meter>,
}

impl MeteredStore {
    pub fn wrap(inner: Arc<dyn Store>) -> (Arc<dyn Store>, Arc<Meter>) {
        let meter = Arc::new(Meter::default());
        let store = Arc::new(MeteredStore {
            inner,
            meter: meter.clone(),
        });
        (store, meter)
    }
}

impl Store for MeteredStore {
    fn get(&self, keyspace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.inner.get(keyspace, key)
    }

    fn scan_prefix(&self, keyspace: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan_prefix(keyspace, prefix)
    }

    fn scan(
        &self,
        keyspace: &str,
        scan: metalgraph_store::Scan<'_>,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.inner.scan(keyspace, scan)
    }

    fn commit(&self, batch: Batch) -> Result<()> {
        let ops = batch.ops.len() as u64;
        let start = Instant::now();
        let result = self.inner.commit(batch);
        let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if ops > 0 {
            self.meter.commits.fetch_add(1, Ordering::Relaxed);
            self.meter.ops.fetch_add(ops, Ordering::Relaxed);
            self.meter.commit_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        result
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }

    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn now_ms(&self) -> metalgraph_store::Result<u64> {
        self.inner.now_ms()
    }
}
