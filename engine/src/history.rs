//! Workflow history: the index that lists workflows newest first by page, in O(page) rather
//! than O(history), and the paged list built on it.
//!
//! The `workflow_index` keyspace holds, for each workflow, three keys written in the commit
//! that creates the workflow and deleted in the commit that deletes it:
//!
//! | key | value |
//! |---|---|
//! | `c/{created}{id}` | the id |
//! | `n/{node}\0{created}{id}` | the id (workflows with a node) |
//! | `g/{graph}\0{created}{id}` | the id |
//!
//! `created` is the creation time in epoch milliseconds, 8 bytes big-endian, so keys sort by
//! time; a list reads its family backwards from a cursor. Node ids and graph names hold no
//! control characters, so `\0` ends them. A SQL store serves the same queries from an index
//! on `(node, created_at, id)` and `(graph, created_at, id)`.

use std::sync::Arc;

use metalgraph_store::{Batch, Scan, Store};

use crate::error::Error;
use crate::keys;
use crate::model::WorkflowStatus;
use crate::workflow::{ParentRef, TaskRecord, WorkflowRecord, load_records};

/// The page size when none is asked for.
pub const DEFAULT_PAGE: usize = 100;
/// The largest page.
pub const MAX_PAGE: usize = 1000;

/// The page size asked for (`None`: [`DEFAULT_PAGE`]), or why it is refused; `what` names
/// what is listed (`nodes`, `batches`, ...). The one rule every list keeps.
pub fn page_size(limit: Option<usize>, what: &str) -> Result<usize, Error> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(Error::BadRequest(format!(
            "a page holds 1 to {MAX_PAGE} {what}, not {limit}"
        )));
    }
    Ok(limit)
}

/// Which page of a list kept in key order: `skip` passed over, then at most `limit`
/// (default 100, at most 1000) after `cursor`, the last key of the previous page.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub skip: usize,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}
/// The most index entries one list request reads when filters it cannot serve from the
/// index (status, finished) skip entries: a page may come back short, with a cursor to go on.
const MAX_SCAN: usize = 10_000;

/// The `meta` key that says the index covers every workflow.
pub(crate) const INDEX_BUILT: &[u8] = b"workflow_index";

/// Filters and paging for listing workflows; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// `Some(true)`: only unfinished; `Some(false)`: only finished.
    pub active: Option<bool>,
    pub node: Option<String>,
    pub graph: Option<String>,
    pub status: Option<WorkflowStatus>,
    /// Only workflows created at or after this time (epoch ms).
    pub created_after: Option<u64>,
    /// Only workflows created before this time (epoch ms).
    pub created_before: Option<u64>,
    /// How many matching workflows to pass over first (RackHD's `$skip`); each costs a
    /// read, so deep pages should follow `cursor` instead.
    pub skip: usize,
    /// The page size (`$top`); `None` is [`DEFAULT_PAGE`]; at most [`MAX_PAGE`].
    pub limit: Option<usize>,
    /// Where the previous page ended ([`Page::next`]).
    pub cursor: Option<String>,
}

/// One page of a list, newest first, and where the next one starts.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// The cursor of the next page; `None` on the last one.
    pub next: Option<String>,
}

/// A position in the list: the last workflow returned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cursor {
    created: u64,
    id: String,
}

impl Cursor {
    fn parse(s: &str) -> Result<Cursor, Error> {
        let bad = || Error::BadRequest(format!("cursor {s:?} is not one this server gave"));
        let (created, id) = s.split_once('.').ok_or_else(bad)?;
        if created.len() != 16 || id.is_empty() {
            return Err(bad());
        }
        let created = u64::from_str_radix(created, 16).map_err(|_| bad())?;
        Ok(Cursor {
            created,
            id: id.to_owned(),
        })
    }

    fn format(&self) -> String {
        format!("{:016x}.{}", self.created, self.id)
    }

    /// The index key of this position in `family`.
    fn key(&self, family: &[u8]) -> Vec<u8> {
        entry_key(family, self.created, &self.id)
    }
}

fn entry_key(family: &[u8], created: u64, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(family.len() + 8 + id.len());
    k.extend_from_slice(family);
    k.extend_from_slice(&created.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The index families of a workflow: every list, its node's, its graph's.
fn families(rec: &WorkflowRecord) -> Vec<Vec<u8>> {
    let mut out = vec![b"c/".to_vec(), family(b"g/", &rec.plan.graph)];
    if let Some(node) = &rec.node {
        out.push(family(b"n/", node));
    }
    out
}

fn family(kind: &[u8], name: &str) -> Vec<u8> {
    let mut f = kind.to_vec();
    f.extend_from_slice(name.as_bytes());
    f.push(0);
    f
}

/// Adds a workflow's index keys to `batch`.
pub(crate) fn index(batch: &mut Batch, rec: &WorkflowRecord) {
    for f in families(rec) {
        batch.put(
            keys::WORKFLOW_INDEX,
            entry_key(&f, rec.created_at, &rec.id),
            rec.id.as_bytes().to_vec(),
        );
    }
}

/// Deletes a workflow's index keys in `batch`.
pub(crate) fn unindex(batch: &mut Batch, rec: &WorkflowRecord) {
    for f in families(rec) {
        batch.delete(keys::WORKFLOW_INDEX, entry_key(&f, rec.created_at, &rec.id));
    }
}

/// What [`delete`] did besides removing the workflow.
pub(crate) struct Deleted {
    /// The ids of its subgraphs, which are left in place.
    pub(crate) children: Vec<String>,
    /// Whether its plan's record went with it (no other workflow referred to it).
    pub(crate) plan: bool,
}

/// Deletes a finished workflow: its record, its tasks, its index keys, its children links
/// and its reference to its plan, then the plan's record if no other workflow refers to it
/// (blocking). A subgraph cannot be deleted while its parent is unfinished: the parent may
/// still read it.
pub(crate) fn delete(store: &dyn Store, id: &str) -> Result<Deleted, Error> {
    let Some((rec, tasks)) = load_records(store, id)? else {
        return Err(Error::NotFound {
            kind: "workflow",
            id: id.to_owned(),
        });
    };
    if !rec.status.is_terminal() {
        return Err(Error::Conflict(format!(
            "workflow {id} is {}; cancel it before deleting it",
            rec.status
        )));
    }
    let parent_busy = |p: &ParentRef| {
        Error::Conflict(format!(
            "workflow {id} is a subgraph of workflow {}, which is still running; \
             delete it after its parent has finished",
            p.workflow_id
        ))
    };
    let mut batch = Batch::new();
    batch.require_absent(keys::ACTIVE, id.as_bytes());
    if let Some(p) = &rec.parent {
        if store.get(keys::ACTIVE, p.workflow_id.as_bytes())?.is_some() {
            return Err(parent_busy(p));
        }
        batch.require_absent(keys::ACTIVE, p.workflow_id.as_bytes());
    }
    batch.delete(keys::WORKFLOWS, id.as_bytes());
    crate::plans::unref(&mut batch, id, &rec.plan);
    unindex(&mut batch, &rec);
    for i in 0..tasks.len() {
        batch.delete(keys::TASKS, keys::task_key(id, i));
    }
    // The links from this workflow's `graph.run` tasks to the subgraphs they started.
    let mut children = Vec::new();
    for (k, child) in store.scan_prefix(keys::CHILDREN, format!("{id}.").as_bytes())? {
        children.push(String::from_utf8_lossy(&child).into_owned());
        batch.delete(keys::CHILDREN, k);
    }
    match store.commit(batch) {
        Ok(()) => {
            let plan = crate::plans::remove_unused(store, &rec.plan);
            Ok(Deleted { children, plan })
        }
        Err(metalgraph_store::Error::Conflict { index: 1, .. }) => Err(parent_busy(
            rec.parent.as_ref().expect("precondition 1 is the parent"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Builds the workflow and node indexes of a store written before they existed (blocking;
/// each once per store, idempotent); returns how many workflows and nodes it indexed. The
/// engine does this on start; tools that write records directly call it after.
pub fn build_indexes(store: &Arc<dyn Store>) -> Result<(usize, usize), Error> {
    let workflows = build_index(store.as_ref())?;
    let (nodes, _) = crate::nodes::Nodes::new(store.clone()).migrate_blocking()?;
    Ok((workflows, nodes))
}

/// Indexes every workflow of a store written before the index existed (blocking; once per
/// store). Idempotent, so a crash midway only repeats work.
pub(crate) fn build_index(store: &dyn Store) -> Result<usize, Error> {
    if store.get(keys::META, INDEX_BUILT)?.is_some() {
        return Ok(0);
    }
    let mut n = 0;
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan(
            keys::WORKFLOWS,
            Scan::prefix(b"", 500).after(after.as_deref()),
        )?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut batch = Batch::new();
        for (k, v) in &page {
            let rec: WorkflowRecord = serde_json::from_slice(v).map_err(|e| {
                Error::Store(format!(
                    "workflow {} is unreadable: {e}",
                    String::from_utf8_lossy(k)
                ))
            })?;
            index(&mut batch, &rec);
            n += 1;
        }
        store.commit(batch)?;
    }
    let mut batch = Batch::new();
    batch.put(keys::META, INDEX_BUILT, b"1".to_vec());
    store.commit(batch)?;
    Ok(n)
}

/// A workflow's records as committed.
pub type Records = (WorkflowRecord, Vec<TaskRecord>);

/// One page of workflows, newest first (blocking).
pub(crate) fn list(store: &dyn Store, f: &ListFilter) -> Result<Page<Records>, Error> {
    let limit = page_size(f.limit, "workflows")?;
    let cursor = f.cursor.as_deref().map(Cursor::parse).transpose()?;
    if f.active == Some(true) {
        return list_active(store, f, limit, cursor);
    }
    let fam = match (&f.node, &f.graph) {
        (Some(node), _) => family(b"n/", node),
        (None, Some(graph)) => family(b"g/", graph),
        (None, None) => b"c/".to_vec(),
    };
    // Newest first: backwards from the cursor, or from just before `created_before`.
    let mut start = cursor.as_ref().map(|c| c.key(&fam));
    if let Some(before) = f.created_before {
        let bound = entry_key(&fam, before, "");
        if start.as_ref().is_none_or(|s| bound < *s) {
            start = Some(bound);
        }
    }
    let scan = Scan::prefix(&fam, 0).after(start.as_deref()).reverse();
    page_index(store, keys::WORKFLOW_INDEX, scan, limit, f.skip, |k, id| {
        let created = created_of(k, fam.len())?;
        if f.created_after.is_some_and(|a| created < a) {
            return Ok(Visit::End);
        }
        let id = String::from_utf8_lossy(id).into_owned();
        let at = Cursor {
            created,
            id: id.clone(),
        }
        .format();
        // Gone between the index read and this one, or not what the filters want.
        Ok(match load_records(store, &id)? {
            Some(records) if matches(f, &records.0) => Visit::Take(records, at),
            _ => Visit::Pass(at),
        })
    })
}

/// What [`page_index`] does with one index entry.
pub(crate) enum Visit<T> {
    /// Counts it (after `skip`) with its position.
    Take(T, String),
    /// Passes over it; the position is where a next page would go on.
    Pass(String),
    /// Ends the list here.
    End,
}

/// Reads one page through an index: entries of `scan` (its limit is ignored) in chunks,
/// each given to `visit`, until `limit` items are taken after `skip`, the index ends, or
/// [`MAX_SCAN`] entries were read (then the page comes back short with where to go on).
/// The next page's cursor is the last entry's position. Shared by every paged list.
pub(crate) fn page_index<T>(
    store: &dyn Store,
    keyspace: &str,
    scan: Scan<'_>,
    limit: usize,
    mut skip: usize,
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<Visit<T>, Error>,
) -> Result<Page<T>, Error> {
    let mut items = Vec::new();
    let mut after = scan.after.map(<[u8]>::to_vec);
    let mut last: Option<String> = None;
    let mut scanned = 0;
    loop {
        let want = (limit - items.len() + skip).clamp(1, 500);
        let chunk = store.scan(
            keyspace,
            Scan {
                after: after.as_deref(),
                limit: want,
                ..scan
            },
        )?;
        let exhausted = chunk.len() < want;
        for (k, v) in &chunk {
            after = Some(k.clone());
            scanned += 1;
            let at = match visit(k, v)? {
                Visit::End => return Ok(Page { items, next: None }),
                Visit::Pass(at) => at,
                Visit::Take(_, at) if skip > 0 => {
                    skip -= 1;
                    at
                }
                Visit::Take(item, at) => {
                    items.push(item);
                    if items.len() == limit {
                        return Ok(Page {
                            items,
                            next: Some(at),
                        });
                    }
                    at
                }
            };
            last = Some(at);
        }
        if exhausted {
            return Ok(Page { items, next: None });
        }
        if scanned >= MAX_SCAN {
            return Ok(Page { items, next: last });
        }
    }
}

/// The filters the index family does not already apply.
fn matches(f: &ListFilter, rec: &WorkflowRecord) -> bool {
    f.node.as_ref().is_none_or(|n| rec.node.as_ref() == Some(n))
        && f.graph.as_ref().is_none_or(|g| *g == rec.plan.graph)
        && f.status.is_none_or(|s| s == rec.status)
        && f.active.is_none_or(|a| a != rec.status.is_terminal())
        && f.created_after.is_none_or(|a| rec.created_at >= a)
        && f.created_before.is_none_or(|b| rec.created_at < b)
}

/// Unfinished workflows: as many as there is work in flight, read from the `active` index.
fn list_active(
    store: &dyn Store,
    f: &ListFilter,
    limit: usize,
    cursor: Option<Cursor>,
) -> Result<Page<Records>, Error> {
    let mut found = Vec::new();
    for (k, _) in store.scan_prefix(keys::ACTIVE, b"")? {
        let id = String::from_utf8_lossy(&k).into_owned();
        if let Some((rec, tasks)) = load_records(store, &id)?
            && matches(f, &rec)
        {
            found.push((rec.created_at, rec.id.clone(), rec, tasks));
        }
    }
    found.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    let rest = found
        .into_iter()
        .filter(|(created, id, ..)| {
            cursor
                .as_ref()
                .is_none_or(|c| (*created, id) < (c.created, &c.id))
        })
        .skip(f.skip);
    let mut items = Vec::new();
    let mut last = None;
    let mut more = false;
    for (created, id, rec, tasks) in rest {
        if items.len() == limit {
            more = true;
            break;
        }
        items.push((rec, tasks));
        last = Some(Cursor { created, id });
    }
    Ok(Page {
        items,
        next: last.filter(|_| more).map(|c| c.format()),
    })
}

pub(crate) fn created_of(key: &[u8], family_len: usize) -> Result<u64, Error> {
    key.get(family_len..family_len + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| Error::Store(format!("workflow index key {key:?} is malformed")))
}
