//! Plans stored apart from their workflows.
//!
//! A workflow's plan (its graph resolved, its options merged) is fixed when the workflow
//! is created, and the workflows of one graph run with the same options have equal plans:
//! a fleet's discovery or firmware runs, the fan-out benchmark. Written into every
//! workflow record, the plan was most of the record's bytes (2.1 KB of a ten-task
//! record's 2.6 KB) and was written again with each of the record's changes. So a workflow
//! record refers to a plan record by id (`plans/<id>`, sealed as workflow records are: the
//! options may hold secrets), and a workflow created with a plan equal to one stored
//! lately for its graph shares that record. Records that hold their plan inline (written
//! before plans were stored apart) read as they are.
//!
//! Equal plans are found in memory ([`Shared`]: the last few plans each graph stored, in
//! this process), not through a digest of the plan in the store, which would let a copy of the
//! data directory check guesses of a secret option. So a restart, or another replica,
//! stores a plan once more; equal plans share that record from then on.
//!
//! A plan record goes when no workflow refers to it any more, guarded against a workflow
//! being created with it at that moment:
//! - `plan_state/<id>` is `live` while workflows may share the plan: a creation that
//!   shares it requires that (a precondition) and adds `plan_refs/<id>/<workflow id>`,
//!   which the workflow's removal deletes.
//! - After a workflow's removal (by retention or through the API), its plan goes too if no
//!   other workflow refers to it ([`remove_unused`]): it is marked `retiring` first
//!   (requiring `live`), so that no creation can share it from then on; its references are
//!   read again; with none the plan goes (requiring `retiring`), else it is marked `live`
//!   again.
//! - A crash between those steps, or between the removal and them, leaves a plan that no
//!   workflow refers to; retention's sweep walks `plan_state` a bounded number of plans at a
//!   time ([`sweep`]) and finishes such removals the same way.
//! - A creation refused because the plan it shared is retiring or gone is committed again
//!   with a plan record of its own, which later workflows of the graph share.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use metalgraph_store::{Batch, Scan, Store};
use serde::Serializer;
use serde::ser::SerializeStruct as _;

use crate::definitions::{Plan, PlannedTask};
use crate::error::Error;
use crate::keys;

/// `plan_state` of a plan that workflows may share.
const LIVE: &[u8] = b"live";
/// `plan_state` of a plan being removed: no workflow may share it.
const RETIRING: &[u8] = b"retiring";

/// The most plans one sweep looks at.
pub(crate) const PLANS_PER_SWEEP: usize = 1000;

/// How many distinct plans of each graph [`Shared`] keeps for sharing.
const SHARED_PER_GRAPH: usize = 8;

/// The plans each graph last stored in this process (the most recently used first, at most
/// [`SHARED_PER_GRAPH`]), for workflows created with an equal one. Public for tools that
/// write workflow records directly, as the engine does.
#[derive(Default)]
pub struct Shared(Mutex<HashMap<String, Vec<Stored>>>);

/// A plan's tasks and timeout, and the id of its record.
struct Stored {
    tasks: Arc<Vec<PlannedTask>>,
    timeout_ms: Option<u64>,
    id: String,
}

impl Shared {
    /// Adds to `batch` what stores `plan` for workflow `wf`, and sets `plan.id`: when `share`,
    /// a reference to the record of an equal plan stored before, requiring it `live` (the
    /// index of that precondition is returned); else a new record.
    pub fn write(
        &self,
        batch: &mut Batch,
        wf: &str,
        plan: &mut Plan,
        share: bool,
    ) -> Option<usize> {
        let shared = if share { self.find(plan) } else { None };
        let precondition = match shared {
            Some((tasks, id)) => {
                plan.tasks = tasks;
                let index = batch.preconditions.len();
                batch.require_equals(keys::PLAN_STATE, id.as_bytes(), LIVE.to_vec());
                plan.id = Some(id);
                Some(index)
            }
            None => {
                let id = crate::new_token();
                batch.put(
                    keys::PLANS,
                    id.as_bytes(),
                    serde_json::to_vec(&*plan).unwrap_or_default(),
                );
                batch.put(keys::PLAN_STATE, id.as_bytes(), LIVE.to_vec());
                plan.id = Some(id);
                None
            }
        };
        let id = plan.id.as_deref().expect("set above");
        batch.put(keys::PLAN_REFS, ref_key(id, wf), Vec::new());
        precondition
    }

    /// The tasks and record id of a stored plan equal to `plan`, if one is kept.
    fn find(&self, plan: &Plan) -> Option<(Arc<Vec<PlannedTask>>, String)> {
        let map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&plan.graph)?
            .iter()
            .find(|s| {
                s.timeout_ms == plan.timeout_ms
                    && (Arc::ptr_eq(&s.tasks, &plan.tasks) || *s.tasks == *plan.tasks)
            })
            .map(|s| (s.tasks.clone(), s.id.clone()))
    }

    /// Records that `plan`'s record is committed: later workflows of its graph with an
    /// equal plan share it.
    pub fn stored(&self, plan: &Plan) {
        let Some(id) = &plan.id else { return };
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let recent = map.entry(plan.graph.clone()).or_default();
        if recent.first().is_some_and(|s| s.id == *id) {
            return;
        }
        recent.retain(|s| s.id != *id);
        recent.insert(
            0,
            Stored {
                tasks: plan.tasks.clone(),
                timeout_ms: plan.timeout_ms,
                id: id.clone(),
            },
        );
        recent.truncate(SHARED_PER_GRAPH);
    }
}

fn ref_key(id: &str, wf: &str) -> Vec<u8> {
    format!("{id}/{wf}").into_bytes()
}

/// Serialises a workflow record's plan: a reference (graph and id) when the plan is stored
/// apart, else the whole plan.
pub(crate) fn serialize_in_record<S: Serializer>(plan: &Plan, s: S) -> Result<S::Ok, S::Error> {
    match &plan.id {
        None => serde::Serialize::serialize(plan, s),
        Some(id) => {
            let mut m = s.serialize_struct("Plan", 2)?;
            m.serialize_field("graph", &plan.graph)?;
            m.serialize_field("id", id)?;
            m.end()
        }
    }
}

/// How many plans [`READ`] keeps.
const READ_PLANS: usize = 256;

/// Plans read lately, by id, with their tasks and timeout: a page of a hundred workflows of
/// one plan reads and parses it once, and the workflows loaded share one copy. A plan
/// record never changes and its id is random, so an id names one plan in any store.
static READ: std::sync::LazyLock<Mutex<HashMap<String, Read>>> =
    std::sync::LazyLock::new(Default::default);

/// A plan's tasks and timeout, as [`READ`] keeps them.
type Read = (Arc<Vec<PlannedTask>>, Option<u64>);

/// Reads the tasks and timeout of a plan stored apart into `plan` (blocking); a plan held
/// inline is left as it is.
pub(crate) fn resolve(store: &dyn Store, workflow: &str, plan: &mut Plan) -> Result<(), Error> {
    let Some(id) = &plan.id else { return Ok(()) };
    let read = |map: &HashMap<_, _>| map.get(id).cloned();
    if let Some((tasks, timeout_ms)) = read(&READ.lock().unwrap_or_else(PoisonError::into_inner)) {
        (plan.tasks, plan.timeout_ms) = (tasks, timeout_ms);
        return Ok(());
    }
    let raw = store.get(keys::PLANS, id.as_bytes())?.ok_or_else(|| {
        Error::Store(format!(
            "workflow {workflow} refers to plan {id}, which is missing"
        ))
    })?;
    let stored: Plan = serde_json::from_slice(&raw).map_err(|e| {
        Error::Store(format!(
            "plan {id} of workflow {workflow} is unreadable: {e}"
        ))
    })?;
    plan.tasks = stored.tasks;
    plan.timeout_ms = stored.timeout_ms;
    let mut map = READ.lock().unwrap_or_else(PoisonError::into_inner);
    if map.len() >= READ_PLANS {
        map.clear();
    }
    map.insert(id.clone(), (plan.tasks.clone(), plan.timeout_ms));
    Ok(())
}

/// Adds to `batch` the removal of workflow `wf`'s reference to its plan, if stored apart.
pub(crate) fn unref(batch: &mut Batch, wf: &str, plan: &Plan) {
    if let Some(id) = &plan.id {
        batch.delete(keys::PLAN_REFS, ref_key(id, wf));
    }
}

/// Looks at up to [`PLANS_PER_SWEEP`] plan records after `next` (from the first when
/// `None`) and removes those no workflow refers to (blocking). Returns how many it removed;
/// `next` is where the next sweep goes on (`None`: from the first again).
pub(crate) fn sweep(store: &dyn Store, next: &mut Option<Vec<u8>>) -> Result<usize, Error> {
    let page = store.scan(
        keys::PLAN_STATE,
        Scan::prefix(b"", PLANS_PER_SWEEP).after(next.as_deref()),
    )?;
    *next = match page.last() {
        Some((k, _)) if page.len() == PLANS_PER_SWEEP => Some(k.clone()),
        _ => None,
    };
    let mut removed = 0;
    for (k, state) in page {
        let id = String::from_utf8_lossy(&k).into_owned();
        if state == LIVE && referred(store, &id)? {
            continue;
        }
        if retire(store, &id, &state)? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes `plan`'s record if it is stored apart and no workflow refers to it any more
/// (blocking; after a workflow's removal): true when it went. A failure leaves it to the
/// next sweep's walk, with a warning: the workflow's removal has been committed already.
pub(crate) fn remove_unused(store: &dyn Store, plan: &Plan) -> bool {
    let Some(id) = &plan.id else { return false };
    let removed = (|| {
        if referred(store, id)? {
            return Ok(false);
        }
        match store.get(keys::PLAN_STATE, id.as_bytes())? {
            Some(state) => retire(store, id, &state),
            None => Ok(false),
        }
    })();
    removed.unwrap_or_else(|e: Error| {
        tracing::warn!(plan = %id, error = %e, "a plan no workflow refers to is left to the next sweep");
        false
    })
}

/// Whether any workflow refers to plan `id`.
fn referred(store: &dyn Store, id: &str) -> Result<bool, Error> {
    let prefix = format!("{id}/");
    Ok(!store
        .scan(keys::PLAN_REFS, Scan::prefix(prefix.as_bytes(), 1))?
        .is_empty())
}

/// Removes plan `id` (whose state is `state`) unless a workflow refers to it; true when
/// it went. Another sweep doing the same at once makes one of them find the state changed,
/// and that one leaves the plan to the other.
fn retire(store: &dyn Store, id: &str, state: &[u8]) -> Result<bool, Error> {
    if state == LIVE {
        let mut batch = Batch::new();
        batch.require_equals(keys::PLAN_STATE, id.as_bytes(), LIVE.to_vec());
        batch.put(keys::PLAN_STATE, id.as_bytes(), RETIRING.to_vec());
        if let Err(e) = store.commit(batch) {
            return conflict_is_none(e);
        }
    }
    // No creation can share the plan from here: every reference is in.
    let mut batch = Batch::new();
    batch.require_equals(keys::PLAN_STATE, id.as_bytes(), RETIRING.to_vec());
    let gone = !referred(store, id)?;
    if gone {
        batch.delete(keys::PLANS, id.as_bytes());
        batch.delete(keys::PLAN_STATE, id.as_bytes());
    } else {
        batch.put(keys::PLAN_STATE, id.as_bytes(), LIVE.to_vec());
    }
    match store.commit(batch) {
        Ok(()) => Ok(gone),
        Err(e) => conflict_is_none(e),
    }
}

/// A refused precondition means another sweep changed the plan's state first.
fn conflict_is_none(e: metalgraph_store::Error) -> Result<bool, Error> {
    match e {
        metalgraph_store::Error::Conflict { .. } => Ok(false),
        e => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalgraph_store::MemStore;

    fn plan(graph: &str, labels: &[&str]) -> Plan {
        Plan {
            graph: graph.into(),
            tasks: Arc::new(labels.iter().map(|l| PlannedTask::noop(l)).collect()),
            timeout_ms: Some(60_000),
            id: None,
        }
    }

    fn keys_of(store: &dyn Store, keyspace: &str) -> Vec<String> {
        store
            .scan_prefix(keyspace, b"")
            .unwrap()
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    }

    /// The plan records left, each with its state.
    fn plans_left(store: &dyn Store) -> Vec<(String, Vec<u8>)> {
        let states = store.scan_prefix(keys::PLAN_STATE, b"").unwrap();
        let left: Vec<(String, Vec<u8>)> = states
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), v))
            .collect();
        let ids: Vec<String> = left.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(keys_of(store, keys::PLANS), ids, "a state for each plan");
        left
    }

    /// Stores `plan` for workflow `wf` as a creation does.
    fn create(store: &dyn Store, shared: &Shared, wf: &str, plan: &mut Plan) {
        let mut batch = Batch::new();
        shared.write(&mut batch, wf, plan, true);
        store.commit(batch).unwrap();
        shared.stored(plan);
    }

    #[test]
    fn equal_plans_share_a_record_and_a_record_refers_to_it_by_id() {
        let store = MemStore::new();
        let shared = Shared::default();
        let (mut a, mut b, mut c) = (
            plan("G", &["x", "y"]),
            plan("G", &["x", "y"]),
            plan("G", &["x"]),
        );
        create(&store, &shared, "w1", &mut a);
        create(&store, &shared, "w2", &mut b);
        assert_eq!(a.id, b.id);
        assert!(Arc::ptr_eq(&a.tasks, &b.tasks), "one copy in memory too");
        create(&store, &shared, "w3", &mut c);
        assert_ne!(c.id, a.id, "a different plan has a record of its own");
        let (ida, idc) = (a.id.clone().unwrap(), c.id.clone().unwrap());
        let mut records = vec![ida.clone(), idc.clone()];
        records.sort();
        assert_eq!(keys_of(&store, keys::PLANS), records);
        assert_eq!(keys_of(&store, keys::PLAN_REFS), {
            let mut refs = vec![
                format!("{ida}/w1"),
                format!("{ida}/w2"),
                format!("{idc}/w3"),
            ];
            refs.sort();
            refs
        });

        // In a workflow record: the graph and the id, no tasks; read back whole.
        let mut out = Vec::new();
        serialize_in_record(&a, &mut serde_json::Serializer::new(&mut out)).unwrap();
        let stored: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(stored, serde_json::json!({"graph": "G", "id": ida}));
        let mut read: Plan = serde_json::from_value(stored.clone()).unwrap();
        assert!(read.tasks.is_empty());
        resolve(&store, "w1", &mut read).unwrap();
        assert_eq!(read, a);
        // Read again, it is not parsed again: the two share one copy.
        let mut again: Plan = serde_json::from_value(stored).unwrap();
        resolve(&store, "w2", &mut again).unwrap();
        assert!(Arc::ptr_eq(&again.tasks, &read.tasks));

        // A plan held inline (records written before) reads as it is.
        let mut out = Vec::new();
        serialize_in_record(
            &plan("G", &["x"]),
            &mut serde_json::Serializer::new(&mut out),
        )
        .unwrap();
        let mut inline: Plan = serde_json::from_slice(&out).unwrap();
        resolve(&store, "w0", &mut inline).unwrap();
        assert_eq!(inline, plan("G", &["x"]));

        // A missing record is an error naming the workflow and the plan.
        let mut lost = Plan {
            id: Some("nope".into()),
            ..plan("G", &[])
        };
        let err = resolve(&store, "w9", &mut lost).unwrap_err().to_string();
        assert!(err.contains("w9") && err.contains("nope"), "{err}");
    }

    #[test]
    fn a_sweep_removes_plans_no_workflow_refers_to_and_finishes_a_removal_cut_short() {
        let store = MemStore::new();
        let shared = Shared::default();
        let (mut a, mut b) = (plan("G", &["x"]), plan("H", &["x"]));
        create(&store, &shared, "w1", &mut a);
        create(&store, &shared, "w2", &mut a.clone());
        create(&store, &shared, "w3", &mut b);
        let (ida, idb) = (a.id.clone().unwrap(), b.id.clone().unwrap());
        let mut next = None;
        assert_eq!(
            sweep(&store, &mut next).unwrap(),
            0,
            "every plan is referred to"
        );

        // w1 and w3 go: a is still w2's, b is nobody's.
        for (wf, p) in [("w1", &a), ("w3", &b)] {
            let mut batch = Batch::new();
            unref(&mut batch, wf, p);
            store.commit(batch).unwrap();
        }
        assert_eq!(sweep(&store, &mut next).unwrap(), 1);
        assert_eq!(plans_left(&store), [(ida.clone(), LIVE.to_vec())]);

        // A removal cut short after its first step: a plan left `retiring` with a
        // reference is made live again; one without goes.
        let mut batch = Batch::new();
        batch.put(keys::PLAN_STATE, ida.as_bytes(), RETIRING.to_vec());
        batch.put(keys::PLANS, idb.as_bytes(), b"{}".to_vec());
        batch.put(keys::PLAN_STATE, idb.as_bytes(), RETIRING.to_vec());
        store.commit(batch).unwrap();
        assert_eq!(sweep(&store, &mut next).unwrap(), 1);
        assert_eq!(plans_left(&store), [(ida.clone(), LIVE.to_vec())]);

        // A creation that shares a plan being removed is refused at the shared plan's
        // precondition, and one that does not share it stores a record of its own.
        let mut batch = Batch::new();
        batch.put(keys::PLAN_STATE, ida.as_bytes(), RETIRING.to_vec());
        store.commit(batch).unwrap();
        let mut c = plan("G", &["x"]);
        let mut batch = Batch::new();
        let at = shared.write(&mut batch, "w4", &mut c, true);
        assert_eq!(c.id.as_deref(), Some(ida.as_str()));
        match store.commit(batch) {
            Err(metalgraph_store::Error::Conflict { index, .. }) => assert_eq!(Some(index), at),
            other => panic!("{other:?}"),
        }
        let mut batch = Batch::new();
        assert_eq!(shared.write(&mut batch, "w4", &mut c, false), None);
        store.commit(batch).unwrap();
        assert_ne!(c.id.as_deref(), Some(ida.as_str()));
    }
}
