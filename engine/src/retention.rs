//! Retention: finished workflows are removed in the background so that history stays
//! bounded. A finished top-level workflow goes when it is older than the policy's age, or
//! when its node has at least `keep_per_node` newer finished top-level workflows; its
//! subgraphs go with it. An unfinished workflow is never removed, nor a subgraph whose parent
//! is unfinished.
//!
//! A sweep reads the workflow index (`history.rs`) in pages and removes at most
//! [`SWEEP_BATCH`] workflows, so that it never holds the store long; a sweep that hit the
//! bound is followed at once by another. Each sweep also looks at a bounded number of plan
//! records and removes those no workflow refers to any more (`plans.rs`).

use std::time::Duration;

use metalgraph_store::{Scan, Store};

use crate::error::Error;
use crate::keys;
use crate::workflow::{WorkflowRecord, load_records};

/// The most workflows one sweep removes.
pub const SWEEP_BATCH: usize = 1000;

/// The most nodes one sweep looks at for the per-node count.
const NODES_PER_SWEEP: usize = 10_000;

/// What is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished workflows older than this go; `None` keeps them whatever their age.
    pub max_age: Option<Duration>,
    /// Of each node's finished workflows, the newest this many are kept (the age rule may
    /// still remove them); `None` keeps them all.
    pub keep_per_node: Option<usize>,
    /// How often a sweep runs.
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age: Some(Duration::from_secs(30 * 86_400)),
            keep_per_node: Some(50),
            interval: Duration::from_secs(600),
        }
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Workflows removed, subgraphs included.
    pub removed: usize,
    /// Index entries read.
    pub scanned: usize,
    /// Plan records removed: those no workflow refers to any more, with the last workflow
    /// that did or by the walk that finishes removals cut short (see `plans.rs`).
    pub plans: usize,
    /// The sweep stopped at its bound: more may be due.
    pub more: bool,
}

/// Where the per-node pass goes on: the node after which the next sweep starts.
#[derive(Debug, Default)]
pub(crate) struct SweepState {
    next_node: Option<Vec<u8>>,
    /// The plan record after which the next sweep's walk of plans goes on.
    next_plan: Option<Vec<u8>>,
}

/// One sweep at `now_ms` (blocking).
pub(crate) fn sweep(
    store: &dyn Store,
    policy: &Retention,
    now_ms: u64,
    state: &mut SweepState,
) -> Result<Sweep, Error> {
    let mut out = Sweep::default();
    if let Some(age) = policy.max_age {
        let cutoff = now_ms.saturating_sub(age.as_millis() as u64);
        by_age(store, cutoff, &mut out)?;
    }
    if let Some(keep) = policy.keep_per_node
        && !out.more
    {
        by_node_count(store, keep, state, &mut out)?;
    }
    out.plans += crate::plans::sweep(store, &mut state.next_plan)?;
    Ok(out)
}

/// Removes finished workflows created before `cutoff`, oldest first.
fn by_age(store: &dyn Store, cutoff: u64, out: &mut Sweep) -> Result<(), Error> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(
            keys::WORKFLOW_INDEX,
            Scan::prefix(b"c/", 256).after(after.as_deref()),
        )?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (k, id) in &page {
            out.scanned += 1;
            let created = crate::history::created_of(k, 2)?;
            if created >= cutoff {
                return Ok(());
            }
            let id = String::from_utf8_lossy(id).into_owned();
            let Some((rec, _)) = load_records(store, &id)? else {
                continue;
            };
            // A subgraph goes with its parent; one whose parent is gone goes alone.
            let orphan = match &rec.parent {
                None => true,
                Some(p) => store
                    .get(keys::WORKFLOWS, p.workflow_id.as_bytes())?
                    .is_none(),
            };
            if orphan && remove(store, &rec, out)? && out.removed >= SWEEP_BATCH {
                out.more = true;
                return Ok(());
            }
        }
    }
}

/// Keeps the newest `keep` finished top-level workflows of each node and removes the rest.
fn by_node_count(
    store: &dyn Store,
    keep: usize,
    state: &mut SweepState,
    out: &mut Sweep,
) -> Result<(), Error> {
    for _ in 0..NODES_PER_SWEEP {
        // The next node's family: the first key after the previous node's.
        let first = store.scan(
            keys::WORKFLOW_INDEX,
            Scan::prefix(b"n/", 1).after(state.next_node.as_deref()),
        )?;
        let Some((key, _)) = first.first() else {
            state.next_node = None; // Round done; the next sweep starts over.
            return Ok(());
        };
        out.scanned += 1;
        let end = key
            .iter()
            .skip(2)
            .position(|b| *b == 0)
            .map(|i| i + 3)
            .ok_or_else(|| Error::Store(format!("workflow index key {key:?} is malformed")))?;
        let family = key[..end].to_vec();
        // Past every key of this family: the family, then bytes no key has.
        let mut past = family.clone();
        past.extend_from_slice(&[0xff; 9]);
        state.next_node = Some(past);
        trim_node(store, &family, keep, out)?;
        if out.removed >= SWEEP_BATCH {
            out.more = true;
            return Ok(());
        }
    }
    out.more = true;
    Ok(())
}

/// Removes a node's finished top-level workflows beyond the newest `keep`.
fn trim_node(store: &dyn Store, family: &[u8], keep: usize, out: &mut Sweep) -> Result<(), Error> {
    // Index entries alone say whether the node can have more than `keep` workflows.
    let head = store.scan(
        keys::WORKFLOW_INDEX,
        Scan::prefix(family, keep + 1).reverse(),
    )?;
    out.scanned += head.len();
    if head.len() <= keep {
        return Ok(());
    }
    let mut kept = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(
            keys::WORKFLOW_INDEX,
            Scan::prefix(family, 256).after(after.as_deref()).reverse(),
        )?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        after = Some(last.clone());
        for (_, id) in &page {
            out.scanned += 1;
            let id = String::from_utf8_lossy(id).into_owned();
            let Some((rec, _)) = load_records(store, &id)? else {
                continue;
            };
            if rec.parent.is_some() || !rec.status.is_terminal() {
                continue;
            }
            if kept < keep {
                kept += 1;
                continue;
            }
            if remove(store, &rec, out)? && out.removed >= SWEEP_BATCH {
                return Ok(());
            }
        }
    }
}

/// Removes a finished workflow and, depth first, its subgraphs. False when it is not
/// finished, or is a subgraph whose parent still runs.
fn remove(store: &dyn Store, rec: &WorkflowRecord, out: &mut Sweep) -> Result<bool, Error> {
    if !rec.status.is_terminal() {
        return Ok(false);
    }
    let children = match crate::history::delete(store, &rec.id) {
        Ok(deleted) => {
            out.plans += usize::from(deleted.plan);
            deleted.children
        }
        Err(Error::Conflict(_) | Error::NotFound { .. }) => return Ok(false),
        Err(e) => return Err(e),
    };
    out.removed += 1;
    for child in children {
        if let Some((child, _)) = load_records(store, &child)? {
            remove(store, &child, out)?;
        }
    }
    Ok(true)
}
