//! Batches: one graph run on many nodes, at most `maxConcurrent` workflows at once,
//! durably (docs/fleet.md).
//!
//! A batch is one record in the `batches` keyspace with an entry per node. One runner task
//! owns every change to running batches: it starts workflows, follows them to their end
//! and commits each step before acting on it. Before it starts a node's workflow it commits
//! the entry as `starting` with the workflow id it will use, then runs the graph with that
//! id: after a crash, an entry found `starting` is either a workflow that exists (it runs)
//! or one never created (it is started then), so no node is run twice and none is lost. An
//! entry leaves `starting`/`running` only once its workflow is seen finished, so no more
//! than `maxConcurrent` of a batch's workflows ever run at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use metalgraph_store::{Batch as StoreBatch, Scan, Store};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tracing::{info, warn};

use crate::clock::now_rfc3339;
use crate::engine::Origin;
use crate::error::{Error, blocking};
use crate::history::{DEFAULT_PAGE, Page, page_size};
use crate::keys;
use crate::model::{RunOptions, WorkflowStatus};
use crate::nodes::NodeFilter;
use crate::{Engine, RunRequest};

/// The most nodes one batch may name.
pub const MAX_BATCH_NODES: usize = 10_000;

/// How often running batches are looked at even when no event woke the runner.
const TICK: Duration = Duration::from_secs(1);

/// A new batch (`POST /api/2.0/batches`).
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewBatch {
    /// The graph to run on every node.
    pub name: String,
    /// The run options, as for one run.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub options: RunOptions,
    /// The nodes, by id.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    /// Or every node that carries all of these tags.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// The most workflows of the batch that run at once.
    pub max_concurrent: usize,
    /// After this many failures, no new workflow is started.
    #[serde(default)]
    pub stop_after_failures: Option<usize>,
}

/// Where a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum BatchState {
    /// Starting and following workflows.
    Running,
    /// Cancel was asked: no new workflow starts, running ones are being cancelled.
    Cancelling,
    /// Every entry has ended.
    Finished,
}

/// Where one node of a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub enum EntryStatus {
    /// Not started yet.
    Pending,
    /// Its workflow id is chosen and the workflow is being created.
    Starting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Never started: the node was busy or gone (`reason` says which).
    Skipped,
    /// Never started: the batch stopped after too many failures, or was cancelled.
    NotStarted,
}

impl EntryStatus {
    const ALL: [EntryStatus; 8] = [
        EntryStatus::Pending,
        EntryStatus::Starting,
        EntryStatus::Running,
        EntryStatus::Succeeded,
        EntryStatus::Failed,
        EntryStatus::Cancelled,
        EntryStatus::Skipped,
        EntryStatus::NotStarted,
    ];

    fn is_live(self) -> bool {
        matches!(self, EntryStatus::Starting | EntryStatus::Running)
    }

    fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Pending => "pending",
            EntryStatus::Starting => "starting",
            EntryStatus::Running => "running",
            EntryStatus::Succeeded => "succeeded",
            EntryStatus::Failed => "failed",
            EntryStatus::Cancelled => "cancelled",
            EntryStatus::Skipped => "skipped",
            EntryStatus::NotStarted => "notStarted",
        }
    }
}

/// One node of a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub node: String,
    pub status: EntryStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Why it was skipped or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A batch as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct BatchRecord {
    pub id: String,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub options: RunOptions,
    pub max_concurrent: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_failures: Option<usize>,
    pub state: BatchState,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Set when the batch stopped starting workflows after too many failures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    pub entries: Vec<Entry>,
}

impl BatchRecord {
    /// How many entries are in each status (every status named, zeros included).
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> =
            EntryStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect();
        for e in &self.entries {
            *counts.entry(e.status.as_str()).or_default() += 1;
        }
        counts
    }

    fn failures(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.status == EntryStatus::Failed)
            .count()
    }

    fn live(&self) -> usize {
        self.entries.iter().filter(|e| e.status.is_live()).count()
    }
}

/// The batches and their runner.
#[derive(Clone)]
pub struct Batches {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    /// Held by whoever changes a batch record: the runner's steps, creation and cancel.
    write: Mutex<()>,
    /// Wakes the runner: a batch was created or cancelled.
    wake: Notify,
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Batches")
    }
}

impl Batches {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                write: Mutex::new(()),
                wake: Notify::new(),
            }),
        }
    }

    fn load_blocking(store: &dyn Store, id: &str) -> Result<Option<BatchRecord>, Error> {
        match store.get(keys::BATCHES, id.as_bytes())? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| Error::Store(format!("stored batch {id} is unreadable: {e}"))),
        }
    }

    /// Writes a batch, and in the same commit its entry in the index of unfinished
    /// batches (`batches_active`), which is all the runner reads: finished batches cost it
    /// nothing however many there are.
    async fn save(&self, rec: &BatchRecord) -> Result<(), Error> {
        let store = self.inner.store.clone();
        let (id, raw) = (rec.id.clone(), serde_json::to_vec(rec).unwrap_or_default());
        let finished = rec.state == BatchState::Finished;
        blocking(move || {
            let mut batch = StoreBatch::new();
            batch.put(keys::BATCHES, id.as_bytes(), raw);
            if finished {
                batch.delete(keys::BATCHES_ACTIVE, id.as_bytes());
            } else {
                batch.put(keys::BATCHES_ACTIVE, id.as_bytes(), Vec::new());
            }
            store.commit(batch)?;
            Ok(())
        })
        .await
    }

    /// The ids of the unfinished batches.
    async fn active(&self) -> Result<Vec<String>, Error> {
        let store = self.inner.store.clone();
        blocking(move || {
            Ok(store
                .scan_prefix(keys::BATCHES_ACTIVE, b"")?
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect())
        })
        .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<BatchRecord>, Error> {
        let (store, id) = (self.inner.store.clone(), id.to_owned());
        blocking(move || Self::load_blocking(store.as_ref(), &id)).await
    }

    /// One page of batches, newest first (batch ids are UUIDv7, ordered by creation):
    /// at most `limit` (`None`: the default) after the batch `cursor` names.
    pub async fn page(
        &self,
        limit: Option<usize>,
        cursor: Option<String>,
    ) -> Result<Page<BatchRecord>, Error> {
        let limit = page_size(limit, "batches")?;
        let store = self.inner.store.clone();
        blocking(move || {
            let rows = store.scan(
                keys::BATCHES,
                Scan::prefix(b"", limit + 1)
                    .after(cursor.as_deref().map(str::as_bytes))
                    .reverse(),
            )?;
            let mut items = rows
                .iter()
                .map(|(k, v)| {
                    serde_json::from_slice::<BatchRecord>(v).map_err(|e| {
                        Error::Store(format!(
                            "stored batch {} is unreadable: {e}",
                            String::from_utf8_lossy(k)
                        ))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let next = (items.len() > limit).then(|| {
                items.truncate(limit);
                items.last().map(|b| b.id.clone()).unwrap_or_default()
            });
            Ok(Page { items, next })
        })
        .await
    }

    /// Asks a batch to stop: nodes not started are not, running workflows are cancelled.
    pub async fn cancel(&self, id: &str) -> Result<BatchRecord, Error> {
        let _w = self.inner.write.lock().await;
        let mut rec = self.get(id).await?.ok_or_else(|| Error::NotFound {
            kind: "batch",
            id: id.to_owned(),
        })?;
        if rec.state == BatchState::Finished {
            return Err(Error::Conflict(format!("batch {id} has finished")));
        }
        rec.state = BatchState::Cancelling;
        for e in &mut rec.entries {
            if e.status == EntryStatus::Pending {
                e.status = EntryStatus::NotStarted;
                e.reason = Some("the batch was cancelled".into());
            }
        }
        self.save(&rec).await?;
        self.inner.wake.notify_one();
        Ok(rec)
    }
}

impl Engine {
    /// Creates a batch: checks the graph and options once, resolves the nodes, commits the
    /// batch and hands it to the runner.
    pub async fn create_batch(&self, new: NewBatch) -> Result<BatchRecord, Error> {
        if new.max_concurrent == 0 || new.max_concurrent > MAX_BATCH_NODES {
            return Err(Error::BadRequest(format!(
                "field 'maxConcurrent' must be 1 to {MAX_BATCH_NODES}, not {}",
                new.max_concurrent
            )));
        }
        if new.stop_after_failures == Some(0) {
            return Err(Error::BadRequest(
                "field 'stopAfterFailures' must be at least 1 (leave it out to never stop)".into(),
            ));
        }
        let nodes = match (new.nodes, new.tags) {
            (Some(ids), None) => {
                let mut seen = std::collections::HashSet::new();
                for id in &ids {
                    if !seen.insert(id) {
                        return Err(Error::BadRequest(format!(
                            "field 'nodes' names node {id} twice"
                        )));
                    }
                }
                ids
            }
            (None, Some(tags)) if !tags.is_empty() => self.nodes_tagged(&tags).await?,
            _ => {
                return Err(Error::BadRequest(
                    "give either 'nodes' (node ids) or 'tags' (nodes carrying every tag)".into(),
                ));
            }
        };
        if nodes.is_empty() {
            return Err(Error::BadRequest("the batch names no node".into()));
        }
        if nodes.len() > MAX_BATCH_NODES {
            return Err(Error::BadRequest(format!(
                "a batch holds at most {MAX_BATCH_NODES} nodes, not {}",
                nodes.len()
            )));
        }
        // Every workflow of the batch is planned the same way: a graph or option mistake
        // is the caller's, answered now rather than once per node.
        self.definitions()
            .plan(&new.name, new.options.clone(), nodes.first().cloned())
            .await?;
        let rec = BatchRecord {
            // Time-ordered, so that the list pages newest first straight from the keyspace.
            id: uuid::Uuid::now_v7().to_string(),
            name: new.name,
            options: new.options,
            max_concurrent: new.max_concurrent,
            stop_after_failures: new.stop_after_failures,
            state: BatchState::Running,
            created_at: now_rfc3339(),
            finished_at: None,
            stopped: None,
            entries: nodes
                .into_iter()
                .map(|node| Entry {
                    node,
                    status: EntryStatus::Pending,
                    workflow: None,
                    reason: None,
                })
                .collect(),
        };
        let batches = self.batches();
        {
            let _w = batches.inner.write.lock().await;
            batches.save(&rec).await?;
        }
        info!(batch = %rec.id, graph = %rec.name, nodes = rec.entries.len(), "batch created");
        batches.inner.wake.notify_one();
        Ok(rec)
    }

    /// The ids of the nodes carrying every tag.
    async fn nodes_tagged(&self, tags: &[String]) -> Result<Vec<String>, Error> {
        let mut ids = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .nodes()
                .list_page(&NodeFilter {
                    tag: Some(tags[0].clone()),
                    limit: Some(DEFAULT_PAGE),
                    cursor,
                    ..NodeFilter::default()
                })
                .await?;
            ids.extend(
                page.items
                    .iter()
                    .filter(|n| tags.iter().all(|t| n.tags.contains(t)))
                    .map(|n| n.id.clone()),
            );
            if ids.len() > MAX_BATCH_NODES {
                break;
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        Ok(ids)
    }

    /// Runs every unfinished batch until `stop` fires.
    pub(crate) async fn run_batches(self, stop: tokio_util::sync::CancellationToken) {
        let mut events = self.subscribe();
        loop {
            // With replicas, one of them runs the batches.
            if self.leads()
                && let Err(e) = self.step_batches().await
            {
                warn!(error = %e, "advancing batches failed; trying again");
            }
            let batches = self.batches();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = batches.inner.wake.notified() => {}
                _ = workflow_ended(&mut events) => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    /// One pass over every unfinished batch.
    async fn step_batches(&self) -> Result<(), Error> {
        let batches = self.batches();
        for id in batches.active().await? {
            let _w = batches.inner.write.lock().await;
            // Read under the lock: a cancel may have changed it.
            if let Some(rec) = batches.get(&id).await?
                && rec.state != BatchState::Finished
            {
                self.advance(&batches, rec).await?;
            }
        }
        Ok(())
    }

    /// Follows a batch's running workflows, starts as many more as it may, and ends it
    /// when nothing is left; every change is committed before the next action.
    async fn advance(&self, batches: &Batches, mut rec: BatchRecord) -> Result<(), Error> {
        let before = rec.clone();
        for i in 0..rec.entries.len() {
            let Some(wf) = rec.entries[i].workflow.clone() else {
                continue;
            };
            let status = rec.entries[i].status;
            if !status.is_live() {
                continue;
            }
            match self.get(&wf).await? {
                Some(view) => {
                    let e = &mut rec.entries[i];
                    e.status = match view.status {
                        WorkflowStatus::Succeeded => EntryStatus::Succeeded,
                        WorkflowStatus::Failed => EntryStatus::Failed,
                        WorkflowStatus::Cancelled => EntryStatus::Cancelled,
                        WorkflowStatus::Pending | WorkflowStatus::Running => EntryStatus::Running,
                    };
                    if e.status == EntryStatus::Failed {
                        e.reason = view.error.clone();
                    }
                    if rec.state == BatchState::Cancelling && !view.status.is_terminal() {
                        // Not waited for (each job gets the cancel grace): the workflow's
                        // end is seen on a later pass.
                        if let Err(err) = self.request_cancel(&wf).await {
                            warn!(batch = %rec.id, workflow = %wf, error = %err, "cannot cancel a batch's workflow");
                        }
                    }
                }
                // Committed as starting, never created (the process stopped in between).
                None if status == EntryStatus::Starting && rec.state == BatchState::Running => {
                    self.start_entry(batches, &mut rec, i).await?;
                }
                None if status == EntryStatus::Starting => {
                    let e = &mut rec.entries[i];
                    e.status = EntryStatus::NotStarted;
                    e.reason = Some("the batch was cancelled".into());
                }
                None => {
                    let e = &mut rec.entries[i];
                    e.status = EntryStatus::Failed;
                    e.reason = Some(format!(
                        "workflow {wf} was deleted before it was seen to end"
                    ));
                }
            }
        }
        if rec.state == BatchState::Running
            && let Some(max) = rec.stop_after_failures
            && rec.failures() >= max
        {
            rec.stopped = Some(format!("stopped after {} failures", rec.failures()));
            for e in &mut rec.entries {
                if e.status == EntryStatus::Pending {
                    e.status = EntryStatus::NotStarted;
                    e.reason = rec.stopped.clone();
                }
            }
        }
        while rec.state == BatchState::Running && rec.live() < rec.max_concurrent {
            let Some(i) = rec
                .entries
                .iter()
                .position(|e| e.status == EntryStatus::Pending)
            else {
                break;
            };
            self.start_entry(batches, &mut rec, i).await?;
        }
        if rec
            .entries
            .iter()
            .all(|e| !e.status.is_live() && e.status != EntryStatus::Pending)
        {
            rec.state = BatchState::Finished;
            rec.finished_at = Some(now_rfc3339());
            info!(batch = %rec.id, counts = ?rec.counts(), "batch finished");
        }
        if rec != before {
            batches.save(&rec).await?;
        }
        Ok(())
    }

    /// Starts entry `i`'s workflow: the entry is committed `starting` with the workflow's
    /// id first, then the workflow is created with that id.
    async fn start_entry(
        &self,
        batches: &Batches,
        rec: &mut BatchRecord,
        i: usize,
    ) -> Result<(), Error> {
        let id = match &rec.entries[i].workflow {
            Some(id) => id.clone(),
            None => {
                let id = crate::new_id();
                let e = &mut rec.entries[i];
                e.workflow = Some(id.clone());
                e.status = EntryStatus::Starting;
                batches.save(rec).await?;
                id
            }
        };
        let node = rec.entries[i].node.clone();
        let req = RunRequest {
            graph: rec.name.clone(),
            node: Some(node.clone()),
            options: rec.options.clone(),
        };
        let run = self.create_as(req, Origin::Run, id).await;
        let e = &mut rec.entries[i];
        match run {
            Ok(_) => e.status = EntryStatus::Running,
            Err(Error::NodeBusy { workflow, .. }) => {
                e.status = EntryStatus::Skipped;
                e.workflow = None;
                e.reason = Some(format!(
                    "node {node} is busy: workflow {workflow} runs on it"
                ));
            }
            Err(Error::NotFound { kind: "node", .. }) => {
                e.status = EntryStatus::Skipped;
                e.workflow = None;
                e.reason = Some(format!("node {node} does not exist (deleted?)"));
            }
            Err(err @ (Error::Unavailable(_) | Error::Store(_))) => return Err(err),
            Err(err) => {
                e.status = EntryStatus::Failed;
                e.workflow = None;
                e.reason = Some(err.to_string());
            }
        }
        Ok(())
    }
}
/// Waits until the engine reports a workflow's end (what moves a batch on), or events were
/// missed (the receiver lagged), then takes the events queued by then: a burst of ends makes
/// one pass over the batches, and task events make none (a fan-out's hundreds of thousands
/// each made one, a scan of the store).
async fn workflow_ended(events: &mut tokio::sync::broadcast::Receiver<crate::events::Numbered>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        match events.recv().await {
            Ok((_, ev)) if ev.ended().is_none() => continue,
            Ok(_) | Err(RecvError::Lagged(_)) => break,
            // The engine is going away: the tick and the stop remain.
            Err(RecvError::Closed) => std::future::pending().await,
        }
    }
    while matches!(events.try_recv(), Ok(_) | Err(TryRecvError::Lagged(_))) {}
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskState;
    use crate::workflow::Event;

    fn task_event() -> Arc<Event> {
        Arc::new(Event::Task {
            workflow_id: "w".into(),
            graph: "G".into(),
            node: None,
            label: "a".into(),
            index: 0,
            state: TaskState::Succeeded,
            attempts: 1,
            error: None,
        })
    }

    fn workflow_event(status: WorkflowStatus) -> Arc<Event> {
        Arc::new(Event::Workflow {
            workflow_id: "w".into(),
            graph: "G".into(),
            node: None,
            status,
            error: None,
        })
    }

    #[tokio::test]
    async fn the_batch_runner_wakes_for_a_workflow_end_and_not_for_task_events() {
        let (tx, mut rx) = tokio::sync::broadcast::channel(16);
        tx.send((1, task_event())).unwrap();
        tx.send((2, workflow_event(WorkflowStatus::Running)))
            .unwrap();
        let wait = tokio::time::timeout(Duration::from_millis(50), workflow_ended(&mut rx));
        assert!(wait.await.is_err(), "woke without a workflow's end");

        // An end wakes it, and what was queued with it is taken too.
        tx.send((3, workflow_event(WorkflowStatus::Succeeded)))
            .unwrap();
        tx.send((4, task_event())).unwrap();
        workflow_ended(&mut rx).await;
        assert!(rx.try_recv().is_err(), "the queue was left full");

        // Events missed (the receiver lagged) wake it as an end would.
        for n in 0..20 {
            tx.send((n, task_event())).unwrap();
        }
        let wait = tokio::time::timeout(Duration::from_secs(5), workflow_ended(&mut rx));
        assert!(wait.await.is_ok(), "a lag did not wake it");
    }
}
