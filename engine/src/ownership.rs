//! Who drives which workflows when several engine replicas share one store
//! (docs/scale-out.md).
//!
//! Work is divided into [`PARTITIONS`] partitions: a workflow belongs to the partition of
//! its node, so that one server's workflows are always serialised in one owner; a workflow
//! without a node to that of its own id; a subgraph to its parent's. A replica drives the
//! workflows of the partitions it holds, under leases kept in the store itself:
//!
//! | key in `partitions` | value |
//! |---|---|
//! | `lease/{p:03}` | `{"owner", "epoch", "expires"}`: who holds partition `p`, since which takeover, until when (the store's clock, ms) |
//! | `fence/{p:03}` | `{owner} {epoch}`: changed only when the partition changes hands |
//! | `replica/{id}` | `{"expires"}`: a live replica's heartbeat, renewed with its leases |
//!
//! Every lease change is a compare-and-swap commit on the lease's record, so two replicas
//! never both take a partition. Every commit a scheduler makes carries a precondition on
//! the fences of the partitions it touches ([`Ownership::fence`]): once another replica
//! took a partition over (a new epoch), the old owner's commits fail and it drops the
//! partition at once. Leases are measured on the store's clock
//! ([`metalgraph_store::Store::now_ms`]: the database's), so replicas' clocks need not
//! agree; a replica counts its own lease as valid only until its TTL has passed on its own
//! monotonic clock since it asked for the renewal, and stops starting jobs in a partition
//! past that, whether or not anybody took it. A replica holds about its share of the
//! partitions (the count divided by the live replicas, rounded up): it takes free or
//! expired ones up to that share and releases what is above it, after its scheduler has
//! stopped driving them.
//!
//! The embedded stores are the degenerate case: one process owns every partition
//! ([`Ownership::Sole`]), with no leases and no fences.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metalgraph_store::{Batch, Error as StoreError, Store};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// How many partitions work is divided into. Fixed: every replica must agree on it.
pub const PARTITIONS: u32 = 64;

/// One more partition, held like the others, holds no workflows: its holder numbers the
/// events every replica stages (`sequencer.rs`).
pub const SEQUENCER: u32 = PARTITIONS;

/// How many partitions are leased: the workflows' and the sequencer's.
const LEASED: u32 = PARTITIONS + 1;

/// The keyspace of leases, fences and heartbeats.
pub const KEYSPACE: &str = "partitions";

/// The partition of a routing key (a node id, or a workflow id when there is no node).
pub fn partition_of(key: &str) -> u32 {
    // FNV-1a: stable across builds and processes, which a std hasher is not.
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % PARTITIONS
}

/// How leases are timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a lease lasts after its last renewal.
    pub ttl: Duration,
    /// How often held leases are renewed.
    pub renew: Duration,
    /// How often the replica looks for free and expired partitions (and the others'
    /// heartbeats).
    pub scan: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        LeaseTimings {
            ttl: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            scan: Duration::from_secs(2),
        }
    }
}

impl LeaseTimings {
    /// Checks that a lease outlives a few renewals: `renew` and `scan` below `ttl / 2`.
    pub fn check(&self) -> Result<(), String> {
        if self.ttl.is_zero() || self.renew.is_zero() || self.scan.is_zero() {
            return Err("lease timings must be above zero".into());
        }
        if self.renew * 2 > self.ttl || self.scan * 2 > self.ttl {
            return Err(format!(
                "the lease renewal ({:?}) and the takeover scan ({:?}) must each be at most \
                 half the lease TTL ({:?}), or a live replica loses its partitions",
                self.renew, self.scan, self.ttl
            ));
        }
        Ok(())
    }
}

/// Who owns what: one process everything, or partitions under leases.
#[derive(Clone)]
pub enum Ownership {
    /// This process owns every partition (the embedded stores).
    Sole,
    /// Partitions held under leases in a shared store.
    Leased(Arc<Leases>),
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ownership::Sole => f.write_str("Sole"),
            Ownership::Leased(l) => write!(f, "Leased({})", l.me),
        }
    }
}

impl Ownership {
    /// Whether this replica may drive partition `p` now: it holds the partition and its
    /// lease has not run out on this replica's own clock.
    pub fn owns(&self, p: u32) -> bool {
        match self {
            Ownership::Sole => true,
            Ownership::Leased(l) => l.owns(p),
        }
    }

    /// Adds to `batch` the precondition that this replica still holds partition `p` at the
    /// epoch it took it with. Returns false (adding nothing) when it does not hold it.
    pub fn fence(&self, p: u32, batch: &mut Batch) -> bool {
        match self {
            Ownership::Sole => true,
            Ownership::Leased(l) => l.fence(p, batch),
        }
    }

    /// The partition a fence precondition of [`Self::fence`] names, when `keyspace/key` is one.
    pub fn fenced_partition(keyspace: &str, key: &str) -> Option<u32> {
        if keyspace != KEYSPACE {
            return None;
        }
        key.strip_prefix("fence/")?.parse().ok()
    }
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    owner: String,
    epoch: u64,
    /// When it runs out, on the store's clock (ms since the epoch); 0 once released.
    expires: u64,
}

/// A lease as read: its stored bytes (which a compare-and-swap names) and its fields.
type Stored = (Vec<u8>, Lease);

/// A replica's heartbeat as stored.
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    expires: u64,
}

/// A partition this replica holds.
#[derive(Debug, Clone)]
struct Held {
    /// The lease as last written, which the next renewal must find unchanged.
    lease: Vec<u8>,
    epoch: u64,
    /// Until when this replica counts the lease as its own (its monotonic clock).
    valid_until: Instant,
    /// Being given up: the scheduler stops driving it before the lease is released.
    releasing: bool,
}

/// What one round of [`Leases::tick`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Partitions taken, each with its new epoch: their workflows are to be loaded.
    pub acquired: Vec<u32>,
    /// Partitions lost to another replica, or whose lease ran out: their workflows are to
    /// be dropped at once, without writing anything.
    pub lost: Vec<u32>,
    /// Partitions above this replica's share: to be dropped by the scheduler, then given
    /// up with [`Leases::release`].
    pub release: Vec<u32>,
}

/// The leases of one replica.
pub struct Leases {
    store: Arc<dyn Store>,
    me: String,
    timings: LeaseTimings,
    held: Mutex<BTreeMap<u32, Held>>,
    /// When the held leases were last renewed (this replica's clock).
    renewed: Mutex<Option<Instant>>,
}

fn lease_key(p: u32) -> Vec<u8> {
    format!("lease/{p:03}").into_bytes()
}

fn fence_key(p: u32) -> Vec<u8> {
    format!("fence/{p:03}").into_bytes()
}

fn fence_value(owner: &str, epoch: u64) -> Vec<u8> {
    format!("{owner} {epoch}").into_bytes()
}

fn heartbeat_key(me: &str) -> Vec<u8> {
    format!("replica/{me}").into_bytes()
}

impl Leases {
    /// The leases of replica `me` (unique per process) in `store`.
    pub fn new(store: Arc<dyn Store>, me: String, timings: LeaseTimings) -> Arc<Leases> {
        Arc::new(Leases {
            store,
            me,
            timings,
            held: Mutex::new(BTreeMap::new()),
            renewed: Mutex::new(None),
        })
    }

    /// This replica's id.
    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn timings(&self) -> LeaseTimings {
        self.timings
    }

    fn held(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partitions this replica holds now, in order.
    pub fn partitions(&self) -> Vec<u32> {
        self.held().keys().copied().collect()
    }

    fn owns(&self, p: u32) -> bool {
        self.held()
            .get(&p)
            .is_some_and(|h| !h.releasing && Instant::now() < h.valid_until)
    }

    fn fence(&self, p: u32, batch: &mut Batch) -> bool {
        let held = self.held();
        match held.get(&p) {
            Some(h) if !h.releasing => {
                batch.require_equals(KEYSPACE, fence_key(p), fence_value(&self.me, h.epoch));
                true
            }
            _ => false,
        }
    }

    /// Forgets partition `p`, which a fenced commit showed another replica has taken.
    pub fn lost(&self, p: u32) {
        self.held().remove(&p);
    }

    /// One round of the protocol (blocking: it reads and commits): renews the held leases
    /// when a renewal is due, then takes free or expired partitions up to this replica's
    /// share and names those above it. Run every [`LeaseTimings::scan`].
    pub fn tick(&self) -> Result<Tick, Error> {
        let mut tick = Tick::default();
        // Counted from before the store's clock is read, so that this replica's idea of its
        // lease never outlasts the stored expiry.
        let asked = Instant::now();
        let now = self.store.now_ms()?;
        let ttl = self.timings.ttl.as_millis() as u64;
        // Leases that ran out on this replica's clock are lost, whatever the store holds:
        // another replica may already drive them.
        {
            let mut held = self.held();
            let expired: Vec<u32> = held
                .iter()
                .filter(|(_, h)| asked >= h.valid_until)
                .map(|(p, _)| *p)
                .collect();
            for p in expired {
                held.remove(&p);
                tick.lost.push(p);
            }
        }
        let due = self
            .renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|at| asked.duration_since(at) + self.timings.scan > self.timings.renew);
        if due {
            self.renew(now, ttl, asked, &mut tick)?;
        }
        self.balance(now, ttl, asked, &mut tick)?;
        Ok(tick)
    }

    /// Renews every held lease and the heartbeat in one commit; a lease found changed is
    /// lost, and the rest are tried again without it.
    fn renew(&self, now: u64, ttl: u64, asked: Instant, tick: &mut Tick) -> Result<(), Error> {
        loop {
            let held: Vec<(u32, Held)> = self.held().iter().map(|(p, h)| (*p, h.clone())).collect();
            let mut batch = Batch::new();
            let mut renewed = Vec::new();
            for (p, h) in &held {
                let lease = Lease {
                    owner: self.me.clone(),
                    epoch: h.epoch,
                    expires: now + ttl,
                };
                let value = serde_json::to_vec(&lease).expect("a lease serialises");
                batch.require_equals(KEYSPACE, lease_key(*p), h.lease.clone());
                batch.put(KEYSPACE, lease_key(*p), value.clone());
                renewed.push((*p, value));
            }
            let beat = Heartbeat { expires: now + ttl };
            batch.put(
                KEYSPACE,
                heartbeat_key(&self.me),
                serde_json::to_vec(&beat).expect("a heartbeat serialises"),
            );
            match self.store.commit(batch) {
                Ok(()) => {
                    let mut current = self.held();
                    for (p, value) in renewed {
                        if let Some(h) = current.get_mut(&p) {
                            h.lease = value;
                            h.valid_until = asked + self.timings.ttl;
                        }
                    }
                    *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Some(asked);
                    return Ok(());
                }
                Err(StoreError::Conflict { index, .. }) => {
                    let p = held[index].0;
                    self.held().remove(&p);
                    tick.lost.push(p);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Takes free or expired partitions up to this replica's share, and names those above
    /// it for release.
    fn balance(&self, now: u64, ttl: u64, asked: Instant, tick: &mut Tick) -> Result<(), Error> {
        let rows = self.store.scan_prefix(KEYSPACE, b"")?;
        let mut leases: BTreeMap<u32, Stored> = BTreeMap::new();
        let mut live = 1; // this replica
        for (k, v) in rows {
            let k = String::from_utf8_lossy(&k);
            if let Some(p) = k.strip_prefix("lease/").and_then(|p| p.parse::<u32>().ok()) {
                let lease: Lease = serde_json::from_slice(&v).map_err(|e| {
                    Error::Store(format!("the lease of partition {p} is unreadable: {e}"))
                })?;
                leases.insert(p, (v, lease));
            } else if let Some(id) = k.strip_prefix("replica/")
                && id != self.me
                && serde_json::from_slice::<Heartbeat>(&v).is_ok_and(|h| h.expires > now)
            {
                live += 1;
            }
        }
        let share = LEASED.div_ceil(live) as usize;
        let holding = self.held().values().filter(|h| !h.releasing).count();
        if holding > share {
            let mut held = self.held();
            let extra: Vec<u32> = held
                .iter()
                .rev()
                .filter(|(_, h)| !h.releasing)
                .take(holding - share)
                .map(|(p, _)| *p)
                .collect();
            for p in extra {
                if let Some(h) = held.get_mut(&p) {
                    h.releasing = true;
                }
                tick.release.push(p);
            }
            return Ok(());
        }
        let held: Vec<u32> = self.partitions();
        let mut free: Vec<(u32, Option<Stored>)> = (0..LEASED)
            .filter(|p| !held.contains(p))
            .filter_map(|p| match leases.remove(&p) {
                None => Some((p, None)),
                // Run out, or this replica's own from before a restart (it keeps its id).
                Some((raw, lease)) if lease.expires <= now || lease.owner == self.me => {
                    Some((p, Some((raw, lease))))
                }
                Some(_) => None,
            })
            .take(share - holding)
            .collect();
        while !free.is_empty() {
            let mut batch = Batch::new();
            let mut taken = Vec::new();
            for (p, old) in &free {
                let epoch = old.as_ref().map_or(0, |(_, l)| l.epoch) + 1;
                let lease = Lease {
                    owner: self.me.clone(),
                    epoch,
                    expires: now + ttl,
                };
                let value = serde_json::to_vec(&lease).expect("a lease serialises");
                match old {
                    Some((raw, _)) => batch.require_equals(KEYSPACE, lease_key(*p), raw.clone()),
                    None => batch.require_absent(KEYSPACE, lease_key(*p)),
                };
                batch.put(KEYSPACE, lease_key(*p), value.clone());
                batch.put(KEYSPACE, fence_key(*p), fence_value(&self.me, epoch));
                taken.push((*p, epoch, value));
            }
            match self.store.commit(batch) {
                Ok(()) => {
                    let mut held = self.held();
                    for (p, epoch, lease) in taken {
                        held.insert(
                            p,
                            Held {
                                lease,
                                epoch,
                                valid_until: asked + self.timings.ttl,
                                releasing: false,
                            },
                        );
                        tick.acquired.push(p);
                    }
                    return Ok(());
                }
                // Another replica took that one first: try the others.
                Err(StoreError::Conflict { index, .. }) => {
                    free.remove(index);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Gives up every partition and the heartbeat, once this replica's scheduler has
    /// stopped: the others take the partitions at their next scan instead of after the
    /// TTL. A lease changed meanwhile is left as it is.
    pub fn release_all(&self) -> Result<(), Error> {
        self.release(&self.partitions())?;
        let mut batch = Batch::new();
        batch.delete(KEYSPACE, heartbeat_key(&self.me));
        self.store.commit(batch)?;
        Ok(())
    }

    /// Gives up partitions [`Tick::release`] named, once the scheduler no longer drives
    /// them: their leases are marked run out, so another replica takes them at its next
    /// scan. A lease that changed meanwhile is simply forgotten.
    pub fn release(&self, partitions: &[u32]) -> Result<(), Error> {
        for &p in partitions {
            let Some(h) = self.held().get(&p).cloned() else {
                continue;
            };
            let lease = Lease {
                owner: self.me.clone(),
                epoch: h.epoch,
                expires: 0,
            };
            let mut batch = Batch::new();
            batch.require_equals(KEYSPACE, lease_key(p), h.lease.clone());
            batch.put(
                KEYSPACE,
                lease_key(p),
                serde_json::to_vec(&lease).expect("a lease serialises"),
            );
            match self.store.commit(batch) {
                Ok(()) | Err(StoreError::Conflict { .. }) => {
                    self.held().remove(&p);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// The ids of the replicas whose heartbeat in `store` has not run out (blocking): the
/// processes serving a shared database now, or stopped without a clean shutdown less than a
/// lease's TTL ago.
pub fn live_replicas(store: &dyn Store) -> Result<Vec<String>, Error> {
    let now = store.now_ms()?;
    let mut live = Vec::new();
    for (k, v) in store.scan_prefix(KEYSPACE, b"replica/")? {
        if serde_json::from_slice::<Heartbeat>(&v).is_ok_and(|h| h.expires > now) {
            live.push(String::from_utf8_lossy(&k["replica/".len()..]).into_owned());
        }
    }
    Ok(live)
}

/// Runs [`Leases::tick`] every scan interval (sooner when a held lease would run out
/// first) until `stopped`, and sends each round that changed something to the scheduler.
pub(crate) async fn keep(
    leases: Arc<Leases>,
    ticks: tokio::sync::mpsc::UnboundedSender<Tick>,
    stopped: tokio_util::sync::CancellationToken,
) {
    loop {
        let l = leases.clone();
        match crate::error::blocking(move || l.tick()).await {
            Ok(tick) if tick != Tick::default() => {
                if ticks.send(tick).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "renewing the partition leases failed; trying again")
            }
        }
        let next = Instant::now() + leases.timings.scan;
        let at = leases
            .held()
            .values()
            .map(|h| h.valid_until)
            .min()
            .map_or(next, |expiry| expiry.min(next));
        tokio::select! {
            () = stopped.cancelled() => return,
            () = tokio::time::sleep_until(at.into()) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalgraph_store::MemStore;

    fn timings() -> LeaseTimings {
        LeaseTimings {
            ttl: Duration::from_millis(300),
            renew: Duration::from_millis(100),
            scan: Duration::from_millis(50),
        }
    }

    fn replica(store: &Arc<dyn Store>, me: &str) -> Arc<Leases> {
        Leases::new(store.clone(), me.into(), timings())
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(partition_of("node-1"), partition_of("node-1"));
        let used: std::collections::HashSet<u32> = (0..1000)
            .map(|i| partition_of(&format!("node-{i}")))
            .collect();
        assert_eq!(used.len(), PARTITIONS as usize);
    }

    #[test]
    fn one_replica_takes_every_partition_and_fences_its_commits() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let a = replica(&store, "a");
        let tick = a.tick().unwrap();
        assert_eq!(tick.acquired, (0..LEASED).collect::<Vec<_>>());
        let own = Ownership::Leased(a.clone());
        assert!(own.owns(7));
        let mut batch = Batch::new();
        assert!(own.fence(7, &mut batch));
        batch.put("x", b"k".to_vec(), b"v".to_vec());
        store.commit(batch).unwrap();
    }

    #[test]
    fn a_second_replica_gets_its_share_once_the_first_releases_it() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let (a, b) = (replica(&store, "a"), replica(&store, "b"));
        a.tick().unwrap();
        // b is live (its heartbeat is written) but finds nothing free.
        assert!(b.tick().unwrap().acquired.is_empty());
        let tick = a.tick().unwrap();
        assert_eq!(tick.release.len(), (LEASED / 2) as usize);
        assert!(
            tick.release
                .iter()
                .all(|p| !Ownership::Leased(a.clone()).owns(*p))
        );
        a.release(&tick.release).unwrap();
        let mut got = b.tick().unwrap().acquired;
        got.sort_unstable();
        assert_eq!(got, tick.release.iter().rev().copied().collect::<Vec<_>>());
        assert_eq!(a.partitions().len() + b.partitions().len(), LEASED as usize);
    }

    #[test]
    fn a_replica_that_stops_renewing_is_taken_over_and_fenced_out() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let a = replica(&store, "a");
        a.tick().unwrap();
        let own_a = Ownership::Leased(a.clone());
        // a is frozen past its TTL; b starts and takes every partition over.
        std::thread::sleep(timings().ttl + Duration::from_millis(20));
        assert!(
            !own_a.owns(3),
            "a counts its lease as run out on its own clock"
        );
        let b = replica(&store, "b");
        assert_eq!(b.tick().unwrap().acquired.len(), LEASED as usize);
        // a wakes: a commit fenced with its old epoch fails ...
        let mut batch = Batch::new();
        assert!(own_a.fence(3, &mut batch));
        batch.put("x", b"k".to_vec(), b"from a".to_vec());
        let err = store.commit(batch).unwrap_err();
        let StoreError::Conflict { keyspace, key, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(Ownership::fenced_partition(&keyspace, &key), Some(3));
        assert_eq!(store.get("x", b"k").unwrap(), None);
        // ... and its next round reports every partition lost and takes none back.
        let tick = a.tick().unwrap();
        assert_eq!(tick.lost.len(), LEASED as usize);
        assert!(tick.acquired.is_empty());
        assert!(a.partitions().is_empty());
    }

    #[test]
    fn a_restarted_replica_takes_its_own_partitions_back_at_once() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let before = replica(&store, "a");
        before.tick().unwrap();
        // The same replica id, started again: its leases have not run out.
        let after = replica(&store, "a");
        assert_eq!(after.tick().unwrap().acquired.len(), LEASED as usize);
        // Under a new epoch, so that anything the earlier process still sends is refused.
        let mut batch = Batch::new();
        assert!(Ownership::Leased(before).fence(0, &mut batch));
        batch.put("x", b"k".to_vec(), b"v".to_vec());
        assert!(matches!(
            store.commit(batch),
            Err(StoreError::Conflict { .. })
        ));
    }

    #[test]
    fn a_clean_stop_frees_every_partition_at_once() {
        let store: Arc<dyn Store> = Arc::new(MemStore::new());
        let a = replica(&store, "a");
        a.tick().unwrap();
        assert_eq!(live_replicas(store.as_ref()).unwrap(), ["a"]);
        a.release_all().unwrap();
        assert!(a.partitions().is_empty());
        assert!(live_replicas(store.as_ref()).unwrap().is_empty());
        // Another replica takes everything at its first round, long before the TTL.
        let b = replica(&store, "b");
        assert_eq!(b.tick().unwrap().acquired.len(), LEASED as usize);
    }

    #[test]
    fn timings_must_leave_room_for_renewals() {
        assert!(LeaseTimings::default().check().is_ok());
        let bad = LeaseTimings {
            renew: Duration::from_secs(10),
            ..LeaseTimings::default()
        };
        assert!(bad.check().unwrap_err().contains("half the lease TTL"));
    }
}
