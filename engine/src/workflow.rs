//! The persisted records of a workflow and its tasks, and the view the outside world gets.
//!
//! A workflow is one record (its plan, status and stop reason) plus one record per task
//! (state, attempts, deadline, output), so that a transition rewrites only what changed.
//! A task that has not started has no record yet: all it has is its callback token, which
//! is derived from a key in its workflow's record ([`TaskRecord::created`]), so the token
//! is the same on every read, from the workflow's creation on.

use metalgraph_store::{Batch, Store};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::clock::rfc3339;
use crate::definitions::Plan;
use crate::error::Error;
use crate::keys;
use crate::model::{RunOptions, TaskState, WorkflowStatus};

/// Why a workflow stops before every task has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopReason {
    /// A user (or a parent workflow) cancelled it.
    Cancel,
    /// A task failed and nothing handled the failure (fail-fast).
    Failure,
    /// The workflow's deadline passed.
    Deadline,
}

/// The subgraph relation: which task of which workflow started this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub workflow_id: String,
    pub task_id: String,
}

/// A workflow as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkflowRecord {
    pub id: String,
    /// Stored as a reference to its plan record when it has one (`plans.rs`).
    #[serde(serialize_with = "crate::plans::serialize_in_record")]
    pub plan: Plan,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub status: WorkflowStatus,
    /// The run request's options, as given.
    #[serde(default)]
    pub options: RunOptions,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// The workflow's own deadline (epoch ms), if its graph has a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<StopReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// How many parents it has: 0 for a top-level workflow.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub depth: u32,
    /// Why the workflow failed or was cancelled, in a sentence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failed or cancelled workflow this one reruns (see `rerun.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// The partition whose owner drives it (see `ownership.rs`): its node's, a subgraph
    /// its parent's, else its id's. Absent in records written before partitions existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    /// The key its tasks' callback tokens are derived from ([`TaskRecord::created`]).
    /// Secret, as the tokens are (workflow records are sealed). Absent in records written
    /// before, whose every task has a record holding its token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_key: Option<String>,
}

impl WorkflowRecord {
    /// The partition whose owner drives this workflow.
    pub fn partition(&self) -> u32 {
        self.partition.unwrap_or_else(|| {
            crate::ownership::partition_of(self.node.as_deref().unwrap_or(&self.id))
        })
    }
}

/// The callback tokens of a workflow's tasks, derived from its task key: task `i`'s is
/// HMAC-SHA256 of `i` (in decimal) under the key, cut to 128 bits, as 32 hex digits.
pub struct TaskTokens(ring::hmac::Key);

impl TaskTokens {
    pub fn new(task_key: &str) -> Self {
        TaskTokens(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            task_key.as_bytes(),
        ))
    }

    /// Task `index`'s token.
    pub fn token(&self, index: usize) -> String {
        let tag = ring::hmac::sign(&self.0, index.to_string().as_bytes());
        crate::seal::to_hex(&tag.as_ref()[..16])
    }
}

/// A task as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRecord {
    /// `<workflow id>.<index>` ([`TaskRecord::id_of`]). Not stored: the record's key gives
    /// it (a tenth of a finished noop task's bytes); records that hold it read the same.
    #[serde(default, skip_serializing)]
    pub id: String,
    pub state: TaskState,
    /// How many times the job was started (retries and restarts after a crash included).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    /// How many attempts ended in failure or timeout (the retry budget counts these).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Boxed, as is `checkpoint`: a `Value` (an ordered map) is several times the size of
    /// a pointer, and most tasks in memory have neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Box<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// The current attempt's deadline (epoch ms), kept across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    /// When a failed task may be retried (epoch ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// The token a node's notification for this task must carry.
    #[serde(default)]
    pub token: String,
    /// What the current attempt's job recorded before a step that must not be repeated
    /// (see `JobServices::checkpoint`); kept across restarts, cleared for a retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Box<Value>>,
}

impl TaskRecord {
    /// The id of task `index` of workflow `wf`.
    pub fn id_of(wf: &str, index: usize) -> String {
        format!("{wf}.{index}")
    }

    /// Task `index` of workflow `wf` as its workflow's creation makes it: pending, with
    /// its token derived from the workflow's `task_key` ([`TaskTokens`]). This is also what
    /// reading gives a task that has no record.
    pub fn created(wf: &str, tokens: &TaskTokens, index: usize) -> Self {
        Self::new(Self::id_of(wf, index), tokens.token(index))
    }

    /// Whether this is a task as its workflow's creation made it, whatever its token: then
    /// it needs no record while the workflow has a task key.
    fn is_as_created(&self) -> bool {
        *self
            == TaskRecord {
                id: self.id.clone(),
                token: self.token.clone(),
                ..TaskRecord::new(String::new(), String::new())
            }
    }

    pub fn new(id: String, token: String) -> Self {
        Self {
            id,
            state: TaskState::Pending,
            attempts: 0,
            failures: 0,
            error: None,
            output: None,
            started_at: None,
            finished_at: None,
            deadline: None,
            retry_at: None,
            token,
            checkpoint: None,
        }
    }
}

/// A workflow as the API shows it (RackHD's field names where RackHD has them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowView {
    pub instance_id: String,
    pub name: String,
    #[serde(default)]
    pub node: Option<String>,
    pub status: WorkflowStatus,
    /// The run request's option layers (`defaults`, `<label>`), secrets redacted.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = HashMap<String, Object>))]
    pub options: RunOptions,
    /// Each succeeded task's output under its label.
    #[serde(default)]
    pub context: Map<String, Value>,
    pub created_at: String,
    #[serde(default)]
    pub finished_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// The failed or cancelled workflow this one reruns: its succeeded tasks were taken
    /// over, the others run again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    pub tasks: Vec<TaskView>,
}

/// A task as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TaskView {
    pub id: String,
    pub label: String,
    pub task_name: String,
    pub job: String,
    /// What the task waits for, as its graph wrote it (`{label: state}`, lists of states,
    /// `anyOf`); empty for a task that starts at once.
    #[serde(default)]
    pub wait_on: Map<String, Value>,
    pub state: TaskState,
    pub attempts: u32,
    #[serde(default)]
    pub error: Option<String>,
    /// When the current (or last) attempt started.
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub finished_at: Option<String>,
}

/// The context templates see: each succeeded task's output under its label.
pub fn context_of(plan: &Plan, tasks: &[TaskRecord]) -> Map<String, Value> {
    plan.tasks
        .iter()
        .zip(tasks)
        .filter_map(|(p, t)| t.output.clone().map(|o| (p.label.clone(), *o)))
        .collect()
}

/// What a redacted secret reads as in views.
pub const REDACTED: &str = "<redacted>";

/// Whether an option or output key names a secret: `password`, `bmcPassword`,
/// `clientSecret`, `token`, ... (case-insensitive suffixes).
pub fn is_secret_key(key: &str) -> bool {
    let key: String = key
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const ENDINGS: &[&str] = &[
        "password",
        "passwd",
        "passphrase",
        "secret",
        "token",
        "credential",
        "credentials",
        "apikey",
        "authorization",
        "cookie",
        "privatekey",
    ];
    ENDINGS.iter().any(|s| key.ends_with(s)) || matches!(key.as_str(), "pass" | "pwd" | "auth")
}

/// A string with the user-info of every URL in it (`scheme://user:pass@host`) replaced by
/// [`REDACTED`], or `None` when it holds none.
pub fn redact_userinfo(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
                changed = true;
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// A message as the outside world may see it: URL user-info redacted.
pub fn scrub(message: &str) -> String {
    redact_userinfo(message).unwrap_or_else(|| message.to_owned())
}

/// Replaces, at any depth, every value under a secret key by [`REDACTED`]. The stored
/// record keeps the real values for the jobs; only what the outside world sees is redacted.
pub fn redact_secrets(map: &mut Map<String, Value>) {
    for (k, v) in map.iter_mut() {
        if is_secret_key(k) && !v.is_null() {
            *v = Value::from(REDACTED);
        } else {
            redact_value(v);
        }
    }
}

fn redact_value(v: &mut Value) {
    match v {
        Value::Object(m) => redact_secrets(m),
        Value::Array(items) => items.iter_mut().for_each(redact_value),
        Value::String(s) => {
            if let Some(r) = redact_userinfo(s) {
                *s = r;
            }
        }
        _ => {}
    }
}

impl WorkflowView {
    /// The view of a workflow. Run options and context values under secret keys (see
    /// [`is_secret_key`]) are redacted: a discovery password given as a run option must not
    /// come back from the API.
    pub fn build(rec: &WorkflowRecord, tasks: &[TaskRecord]) -> Self {
        let mut options = rec.options.clone();
        // Options a job declares secret, in the run layer that sets them for its task.
        for (layer, values) in options.iter_mut() {
            for t in rec.plan.tasks.iter() {
                if layer != "defaults" && *layer != t.label {
                    continue;
                }
                for key in &t.secrets {
                    if let Some(v) = values.get_mut(key)
                        && !v.is_null()
                    {
                        *v = Value::from(REDACTED);
                    }
                }
            }
        }
        options.values_mut().for_each(redact_secrets);
        let mut context = context_of(&rec.plan, tasks);
        redact_secrets(&mut context);
        WorkflowView {
            instance_id: rec.id.clone(),
            name: rec.plan.graph.clone(),
            node: rec.node.clone(),
            status: rec.status,
            options,
            context,
            created_at: rfc3339(rec.created_at),
            finished_at: rec.finished_at.map(rfc3339),
            error: rec.error.as_deref().map(scrub),
            parent: rec.parent.clone(),
            rerun_of: rec.rerun_of.clone(),
            tasks: rec
                .plan
                .tasks
                .iter()
                .zip(tasks)
                .map(|(p, t)| TaskView {
                    id: t.id.clone(),
                    label: p.label.clone(),
                    task_name: p.task_name.clone(),
                    job: p.job.clone(),
                    wait_on: p.wait_on.to_graph_form(),
                    state: t.state,
                    attempts: t.attempts,
                    error: t.error.as_deref().map(scrub),
                    started_at: t.started_at.map(rfc3339),
                    finished_at: t.finished_at.map(rfc3339),
                })
                .collect(),
        }
    }
}

/// A change the engine made, committed with it (see `events.rs`) and published after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Event {
    #[serde(rename_all = "camelCase")]
    Workflow {
        workflow_id: String,
        graph: String,
        node: Option<String>,
        status: WorkflowStatus,
        error: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Task {
        workflow_id: String,
        /// The workflow's graph and node, so that a task's event can be filtered alone.
        graph: String,
        node: Option<String>,
        label: String,
        index: usize,
        state: TaskState,
        attempts: u32,
        error: Option<String>,
    },
}

impl Event {
    /// `workflow` or `task`: the SSE event type and webhooks' `X-Metalgraph-Event`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Workflow { .. } => "workflow",
            Event::Task { .. } => "task",
        }
    }

    pub fn workflow_id(&self) -> &str {
        match self {
            Event::Workflow { workflow_id, .. } | Event::Task { workflow_id, .. } => workflow_id,
        }
    }

    /// The workflow's final status, when this event reports its end.
    pub fn ended(&self) -> Option<WorkflowStatus> {
        match self {
            Event::Workflow { status, .. } if status.is_terminal() => Some(*status),
            _ => None,
        }
    }
}

/// Reads a workflow's records as last committed (blocking: call it off the async runtime).
pub(crate) fn load_records(
    store: &dyn Store,
    id: &str,
) -> Result<Option<(WorkflowRecord, Vec<TaskRecord>)>, Error> {
    let Some(raw) = store.get(keys::WORKFLOWS, id.as_bytes())? else {
        return Ok(None);
    };
    let mut rec: WorkflowRecord = serde_json::from_slice(&raw)
        .map_err(|e| Error::Store(format!("workflow {id} is unreadable: {e}")))?;
    crate::plans::resolve(store, id, &mut rec.plan)?;
    let planned = rec.plan.tasks.len();
    let prefix = keys::task_prefix(id);
    let mut tasks: Vec<Option<TaskRecord>> = vec![None; planned];
    for (k, v) in store.scan_prefix(keys::TASKS, &prefix)? {
        let key = || String::from_utf8_lossy(&k).into_owned();
        let index = std::str::from_utf8(&k[prefix.len()..])
            .ok()
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < planned)
            .ok_or_else(|| {
                Error::Store(format!(
                    "workflow {id} has task record {} that is none of its {planned} planned tasks'",
                    key()
                ))
            })?;
        let mut t = serde_json::from_slice::<TaskRecord>(&v)
            .map_err(|e| Error::Store(format!("task {} is unreadable: {e}", key())))?;
        t.id = TaskRecord::id_of(id, index);
        tasks[index] = Some(t);
    }
    // A task with no record has not started (see `write_created_task`); before task keys,
    // every task had one.
    let mut derive = rec.task_key.as_deref().map(|key| {
        let mut tokens = None;
        move |i| TaskRecord::created(id, tokens.get_or_insert_with(|| TaskTokens::new(key)), i)
    });
    let tasks = tasks
        .into_iter()
        .enumerate()
        .map(|(i, t)| match (t, &mut derive) {
            (Some(t), _) => Ok(t),
            (None, Some(derive)) => Ok(derive(i)),
            (None, None) => Err(Error::Store(format!(
                "workflow {id} has no record of task {i}"
            ))),
        })
        .collect::<Result<_, _>>()?;
    Ok(Some((rec, tasks)))
}

/// Adds a workflow record to a batch.
pub fn write_workflow(batch: &mut Batch, rec: &WorkflowRecord) {
    batch.put(
        keys::WORKFLOWS,
        rec.id.as_bytes(),
        serde_json::to_vec(rec).unwrap_or_default(),
    );
}

/// Adds task `idx` of a workflow being created to a batch, unless it is as
/// [`TaskRecord::created`] makes it, which is what reading gives it without a record. So a
/// workflow's creation writes no task record unless a rerun took tasks over (a quarter of
/// the fan-out benchmark's store ops); a task's record is written when it first changes.
/// The task's token must be the one its workflow's task key derives, as at creation.
pub fn write_created_task(batch: &mut Batch, rec: &WorkflowRecord, idx: usize, t: &TaskRecord) {
    if rec.task_key.is_none() || !t.is_as_created() {
        write_task(batch, &rec.id, idx, t);
    }
}

/// Adds task `idx` of workflow `wf` to a batch.
pub fn write_task(batch: &mut Batch, wf: &str, idx: usize, t: &TaskRecord) {
    batch.put(
        keys::TASKS,
        keys::task_key(wf, idx),
        serde_json::to_vec(t).unwrap_or_default(),
    );
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_stored_task_record_leaves_out_its_id_and_zero_counts_and_reads_back_whole() {
        let store = metalgraph_store::MemStore::new();
        let rec: WorkflowRecord = serde_json::from_value(json!({
            "id": "w", "status": "running", "createdAt": 1,
            "plan": {"graph": "G", "tasks": [
                {"label": "a", "taskName": "Task.Noop", "job": "noop", "options": {}, "waitOn": {}},
                {"label": "b", "taskName": "Task.Noop", "job": "noop", "options": {}, "waitOn": {}},
            ]},
        }))
        .unwrap();
        let mut tasks = vec![
            TaskRecord::new(TaskRecord::id_of("w", 0), "t0".into()),
            TaskRecord::new(TaskRecord::id_of("w", 1), "t1".into()),
        ];
        tasks[1].attempts = 2;
        let mut batch = Batch::new();
        write_workflow(&mut batch, &rec);
        for (i, t) in tasks.iter().enumerate() {
            write_task(&mut batch, "w", i, t);
        }
        store.commit(batch).unwrap();
        let stored = store
            .get(keys::TASKS, &keys::task_key("w", 0))
            .unwrap()
            .unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&stored).unwrap(),
            json!({"state": "pending", "token": "t0"})
        );
        assert_eq!(
            load_records(&store, "w").unwrap().unwrap(),
            (rec.clone(), tasks.clone())
        );

        // A record written with its id reads the same; one under another task's key is
        // refused, naming it.
        let mut batch = Batch::new();
        batch.put(
            keys::TASKS,
            keys::task_key("w", 0),
            serde_json::to_vec(&json!({"id": "w.0", "state": "pending", "token": "t0"})).unwrap(),
        );
        store.commit(batch).unwrap();
        assert_eq!(load_records(&store, "w").unwrap().unwrap().1, tasks);
        let mut batch = Batch::new();
        batch.put(keys::TASKS, keys::task_key("w", 2), stored);
        store.commit(batch).unwrap();
        let err = load_records(&store, "w").unwrap_err().to_string();
        assert!(
            err.contains("w/00002 that is none of its 2 planned tasks'"),
            "{err}"
        );
        // One missing is named too when its workflow has no task key (written before task
        // keys, when every task had a record from its workflow's creation).
        let mut batch = Batch::new();
        batch.delete(keys::TASKS, keys::task_key("w", 2));
        batch.delete(keys::TASKS, keys::task_key("w", 1));
        store.commit(batch).unwrap();
        let err = load_records(&store, "w").unwrap_err().to_string();
        assert!(err.contains("no record of task 1"), "{err}");
    }

    #[test]
    fn a_task_that_has_not_started_has_no_record_and_reads_with_the_token_it_was_created_with() {
        let store = metalgraph_store::MemStore::new();
        let mut rec: WorkflowRecord = serde_json::from_value(json!({
            "id": "w", "status": "running", "createdAt": 1, "taskKey": "k1",
            "plan": {"graph": "G", "tasks": [
                {"label": "a", "taskName": "Task.Noop", "job": "noop", "options": {}, "waitOn": {}},
                {"label": "b", "taskName": "Task.Noop", "job": "noop", "options": {}, "waitOn": {}},
            ]},
        }))
        .unwrap();
        let tokens = TaskTokens::new("k1");
        let mut tasks: Vec<TaskRecord> = (0..2)
            .map(|i| TaskRecord::created("w", &tokens, i))
            .collect();
        // 128 bits as hex, one per task, one per key: nothing else to tell them apart.
        assert_eq!(tasks[0].token.len(), 32);
        assert_ne!(tasks[0].token, tasks[1].token);
        assert_ne!(tasks[0].token, TaskTokens::new("k2").token(0));
        assert_eq!(
            tasks[1].token,
            TaskTokens::new("k1").token(1),
            "derived, not drawn"
        );
        assert!(tasks[1].is_as_created());

        // Task 0 was taken over by a rerun: only it has a record.
        tasks[0].state = TaskState::Succeeded;
        let mut batch = Batch::new();
        write_workflow(&mut batch, &rec);
        for (i, t) in tasks.iter().enumerate() {
            write_created_task(&mut batch, &rec, i, t);
        }
        assert_eq!(
            batch.ops.len(),
            2,
            "the workflow and task 0: {:?}",
            batch.ops
        );
        store.commit(batch).unwrap();
        for _ in 0..2 {
            assert_eq!(
                load_records(&store, "w").unwrap().unwrap(),
                (rec.clone(), tasks.clone())
            );
        }
        assert!(
            store
                .get(keys::TASKS, &keys::task_key("w", 1))
                .unwrap()
                .is_none(),
            "pending task 1 has no record"
        );

        // Without a task key every task is written.
        rec.task_key = None;
        let mut batch = Batch::new();
        for (i, t) in tasks.iter().enumerate() {
            write_created_task(&mut batch, &rec, i, t);
        }
        assert_eq!(batch.ops.len(), 2);
    }

    #[test]
    fn secrets_are_redacted_by_name_and_in_urls() {
        let mut m = json!({
            "passwd": "a", "pwd": "b", "login": {"pass": "c", "user": "u"}, "credentials": {"any": "g"}, "auth": "d",
            "headers": {"Authorization": "Bearer e", "X-Api-Key": "f", "Accept": "json"},
            "url": "https://root:hunter2@bmc.example:8443/redfish/v1?x=1",
            "note": "see http://a:b@h1/ and https://h2/p",
            "bypass": "kept", "label": "kept",
        });
        redact_secrets(m.as_object_mut().unwrap());
        let shown = m.to_string();
        for secret in [
            "\"a\"", "\"b\"", "\"c\"", "\"d\"", "Bearer e", "\"f\"", "hunter2", "a:b@",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(m["login"]["user"], "u");
        assert_eq!(m["credentials"], REDACTED);
        assert_eq!(m["headers"]["Accept"], "json");
        assert_eq!(
            m["url"],
            "https://<redacted>@bmc.example:8443/redfish/v1?x=1"
        );
        assert_eq!(m["note"], "see http://<redacted>@h1/ and https://h2/p");
        assert_eq!(m["bypass"], "kept");
        assert_eq!(
            scrub("GET http://u:p@x/ failed"),
            "GET http://<redacted>@x/ failed"
        );
    }
}
