//! The `Job` trait: the unit of work a task runs, and the option schema it declares.
//!
//! A job is code (`obm.power`, `http.request`, ...); a task definition names a job and gives
//! it default options; a graph task runs a task definition. The engine owns every state
//! transition: a job only does its work and returns an output or an error.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::model::{bounded_ms, parse_duration};
use crate::nodes::Node;

/// A boxed, sendable future, as returned by [`Job::run`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Options as a JSON object.
pub type Options = Map<String, Value>;

/// What a job is given when it runs.
#[derive(Clone)]
pub struct JobContext {
    /// The task's options after merging and template rendering, checked against the schema.
    pub options: Options,
    /// The node the workflow runs on, with its OBM settings (the password included: jobs
    /// need it to talk to a BMC; they must never log it or put it in an output or error).
    pub node: Option<Node>,
    /// The workflow's instance id.
    pub workflow_id: String,
    /// The task's id (stable across attempts and restarts).
    pub task_id: String,
    /// The task's label in its graph.
    pub label: String,
    /// 1 for the first attempt; raised by every retry and every restart after a crash.
    pub attempt: u32,
    /// How many earlier attempts failed (0 on the first run and on a restart after a crash
    /// that interrupted the first run); a retry after a failure raises it.
    pub retry: u32,
    /// The task's notification token: a node's callback for this task must carry it.
    pub token: String,
    /// What this attempt recorded with [`JobServices::checkpoint`] before the engine was
    /// restarted; `None` on a fresh attempt (and on every retry after a failure).
    pub checkpoint: Option<Value>,
    /// Cancelled when the task must stop: workflow cancel, fail-fast, timeout or shutdown.
    /// A job observes it promptly (select on `cancelled()`), cleans up and returns.
    pub cancel: CancellationToken,
    /// Services the engine offers to jobs (subgraphs, node records, notifications).
    pub services: Arc<dyn JobServices>,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("workflow_id", &self.workflow_id)
            .field("task_id", &self.task_id)
            .field("label", &self.label)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// A string option, or `None` when absent or null.
    pub fn str_opt(&self, key: &str) -> Option<&str> {
        self.options.get(key).and_then(Value::as_str)
    }

    /// A required string option.
    pub fn str_required(&self, key: &str) -> Result<&str, JobError> {
        self.str_opt(key)
            .ok_or_else(|| JobError::new(format!("option '{key}' is required")))
    }

    /// A boolean option, with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> bool {
        self.options
            .get(key)
            .and_then(Value::as_bool)
            .unwrap_or(default)
    }

    /// A duration option (`"250ms"`, `"2s"`, or a number of milliseconds), with a default.
    pub fn duration_or(&self, key: &str, default: Duration) -> Result<Duration, JobError> {
        match self.options.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                value_to_duration(v).map_err(|e| JobError::new(format!("option '{key}': {e}")))
            }
        }
    }
}

/// Converts a JSON value to a duration: a string like `"2s"` or a number of milliseconds.
pub fn value_to_duration(v: &Value) -> Result<Duration, String> {
    match v {
        Value::String(s) => parse_duration(s),
        Value::Number(n) => match n.as_u64() {
            Some(ms) => bounded_ms(ms, &ms),
            None if n.as_f64().is_some_and(|f| f > 0.0) => Err(format!(
                "duration {n} is not a whole number of milliseconds, or is longer than the \
                 maximum of 30 days"
            )),
            None => Err("a duration must be a whole, non-negative number of milliseconds".into()),
        },
        other => Err(format!(
            "expected a duration such as \"2s\", got {}",
            json_kind(other)
        )),
    }
}

/// Why a job failed. The message names what went wrong (the BMC, the operation, the BMC's
/// own words) and never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub message: String,
}

impl JobError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for JobError {}

/// The result of one run of a job: an output (any JSON, stored under the task's label in
/// the workflow context) or an error.
pub type JobResult = Result<Value, JobError>;

/// A unit of work.
///
/// The contract every job keeps:
/// - **Idempotent.** The engine runs a job again after a crash (its attempt count raised)
///   without knowing how far the previous run got. Running it twice must reach the same
///   end state: powering on a node that is already on succeeds, inserting the image that is
///   already inserted succeeds.
/// - **Cancellable.** When `ctx.cancel` fires the job stops promptly, undoes what must be
///   undone, and returns (its result is then ignored).
/// - **Pure outcome.** A job never writes workflow state; it returns its output (JSON) or a
///   [`JobError`], and the engine persists the transition.
/// - **Secret-free.** Outputs and errors never contain a password or token.
pub trait Job: Send + Sync + 'static {
    /// The job's name as task definitions give it in `implementsTask` (`obm.power`).
    fn name(&self) -> &'static str;

    /// The options the job declares. The engine checks declared keys against it when a graph
    /// is stored and again, after rendering, when the task starts.
    fn schema(&self) -> &OptionSchema;

    /// Runs the job once.
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult>;

    /// Whether a running instance counts against the engine's limit of concurrently running
    /// jobs. Jobs that only wait for something else (a subgraph, a node's callback) return
    /// false, so that waiting can never starve the work it waits for.
    fn occupies_slot(&self) -> bool {
        true
    }
}

/// Services the engine lends to jobs, so that jobs need no handle on the engine itself.
pub trait JobServices: Send + Sync + 'static {
    /// Runs graph `graph_name` as a child of the calling task and resolves with its final
    /// status. Idempotent per `(ctx.workflow_id, ctx.task_id)`: after a restart the existing
    /// child is awaited rather than started again. Cancelling `ctx.cancel` cancels the child.
    fn run_subgraph(
        &self,
        ctx: &JobContext,
        graph_name: &str,
        options: Options,
    ) -> BoxFuture<'static, JobResult>;

    /// Waits until the node calls back for this task (see the node-facing notification
    /// endpoint), resolving with the callback's body.
    fn wait_notification(&self, ctx: &JobContext) -> BoxFuture<'static, JobResult>;

    /// Durably records `value` for the current attempt before the job takes a step that
    /// must not be repeated (a BMC reset, a one-shot boot override): resolves once the value
    /// is committed. If the engine restarts the attempt, the job finds it in
    /// `ctx.checkpoint` and can go on from there instead of repeating the step. Fails when
    /// the attempt no longer runs.
    fn checkpoint(
        &self,
        ctx: &JobContext,
        value: Value,
    ) -> BoxFuture<'static, Result<(), JobError>>;

    /// The engine's wall-clock time in epoch milliseconds: what persisted instants (such as
    /// a checkpointed end of a wait) are measured against.
    fn now_ms(&self) -> u64;

    /// The node store, for jobs that create or update nodes (discovery, catalogs).
    fn nodes(&self) -> &crate::nodes::Nodes;

    /// The callback that ends the `wait.notification` task labelled `label` in the calling
    /// task's workflow, for a job that hands it to the node ahead of time (configuration
    /// media carry it, since the installer they configure cannot ask for a template). Fails
    /// when the workflow has no such task.
    fn callback(
        &self,
        ctx: &JobContext,
        label: &str,
    ) -> BoxFuture<'static, Result<Callback, JobError>>;
}

/// What a node needs to end a `wait.notification` task of its workflow (see
/// [`JobServices::callback`]).
#[derive(Clone)]
pub struct Callback {
    pub workflow_id: String,
    pub task_id: String,
    /// The token the node's notification must carry: a secret, which only reaches what is
    /// made for the node itself.
    pub token: String,
    /// The node's capability for the task (`None` for a workflow without a node).
    pub cap: Option<String>,
}

impl std::fmt::Debug for Callback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callback")
            .field("workflow_id", &self.workflow_id)
            .field("task_id", &self.task_id)
            .finish_non_exhaustive()
    }
}

/// The type an option must have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionKind {
    String,
    Bool,
    Integer,
    Number,
    /// A duration: `"250ms"`, `"2s"`, `"30m"`, `"1h"`, or whole milliseconds.
    Duration,
    Object,
    Array,
    /// One of the given strings.
    Enum(&'static [&'static str]),
    /// Anything JSON.
    Any,
}

/// One declared option.
#[derive(Debug, Clone)]
pub struct OptionSpec {
    pub kind: OptionKind,
    /// A required option must be present and non-null when the task runs.
    pub required: bool,
    /// The job's default, the lowest layer of option precedence.
    pub default: Option<Value>,
    /// One line for humans (`metalgraph tasks` and error messages).
    pub doc: &'static str,
    /// The value is a secret: redacted in every view and event, whatever its name.
    pub secret: bool,
}

/// The options a job declares, by name.
#[derive(Debug, Clone, Default)]
pub struct OptionSchema {
    pub options: BTreeMap<&'static str, OptionSpec>,
}

impl OptionSchema {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a required option.
    pub fn required(mut self, name: &'static str, kind: OptionKind, doc: &'static str) -> Self {
        self.options.insert(
            name,
            OptionSpec {
                kind,
                required: true,
                default: None,
                doc,
                secret: false,
            },
        );
        self
    }

    /// Declares an optional option, with an optional default.
    pub fn optional(
        mut self,
        name: &'static str,
        kind: OptionKind,
        default: Option<Value>,
        doc: &'static str,
    ) -> Self {
        self.options.insert(
            name,
            OptionSpec {
                kind,
                required: false,
                default,
                doc,
                secret: false,
            },
        );
        self
    }

    /// Marks a declared option as secret (see [`OptionSpec::secret`]).
    pub fn secret(mut self, name: &'static str) -> Self {
        if let Some(spec) = self.options.get_mut(name) {
            spec.secret = true;
        }
        self
    }

    /// The names of the options declared secret.
    pub fn secrets(&self) -> Vec<String> {
        self.options
            .iter()
            .filter(|(_, s)| s.secret)
            .map(|(k, _)| (*k).to_owned())
            .collect()
    }

    /// The job defaults as an options object.
    pub fn defaults(&self) -> Options {
        self.options
            .iter()
            .filter_map(|(k, s)| s.default.clone().map(|v| ((*k).to_owned(), v)))
            .collect()
    }

    /// Checks the declared keys of `options`.
    ///
    /// With `rendered == false` (when a graph is stored or run) null values and strings that
    /// hold a template (`{{`) are accepted, since they are filled in later; with
    /// `rendered == true` (when the task starts) every declared key must have its type and
    /// required keys must be present. Undeclared keys are never judged. Returns the first
    /// problem as `(field, message)`.
    pub fn check(&self, options: &Options, rendered: bool) -> Result<(), (String, String)> {
        for (name, spec) in &self.options {
            match options.get(*name) {
                None | Some(Value::Null) => {
                    if rendered && spec.required {
                        return Err(((*name).to_owned(), "is required".to_owned()));
                    }
                }
                Some(Value::String(s)) if !rendered && s.contains("{{") => {}
                Some(v) => {
                    if let Err(msg) = check_kind(&spec.kind, v) {
                        return Err(((*name).to_owned(), msg));
                    }
                }
            }
        }
        Ok(())
    }

    /// Converts rendered string values of declared non-string options to their type
    /// (`"true"` for a Bool, `"3"` for an Integer), since templates always render strings.
    pub fn coerce(&self, options: &mut Options) {
        for (name, spec) in &self.options {
            let Some(Value::String(s)) = options.get(*name) else {
                continue;
            };
            let s = s.trim();
            let coerced = match spec.kind {
                OptionKind::Bool => s.parse::<bool>().ok().map(Value::Bool),
                OptionKind::Integer => s.parse::<i64>().ok().map(Value::from),
                OptionKind::Number => s.parse::<f64>().ok().map(Value::from),
                OptionKind::Object | OptionKind::Array => serde_json::from_str(s).ok(),
                _ => None,
            };
            if let Some(v) = coerced {
                options.insert((*name).to_owned(), v);
            }
        }
    }
}

fn check_kind(kind: &OptionKind, v: &Value) -> Result<(), String> {
    let ok = match kind {
        OptionKind::String => v.is_string(),
        OptionKind::Bool => v.is_boolean(),
        OptionKind::Integer => v.is_i64() || v.is_u64(),
        OptionKind::Number => v.is_number(),
        OptionKind::Duration => return value_to_duration(v).map(|_| ()),
        OptionKind::Object => v.is_object(),
        OptionKind::Array => v.is_array(),
        OptionKind::Enum(allowed) => {
            // An enum's allowed values are public, so the offending one may be named when
            // it is a short string; other values are described by their type only.
            return match v.as_str() {
                Some(s) if allowed.contains(&s) => Ok(()),
                Some(s) if s.len() <= 32 && !s.contains(char::is_whitespace) => {
                    Err(format!("must be one of {}, got {s:?}", allowed.join(", ")))
                }
                _ => Err(format!(
                    "must be one of {}, got {}",
                    allowed.join(", "),
                    json_kind(v)
                )),
            };
        }
        OptionKind::Any => true,
    };
    // The offending value is never echoed: it may be a secret given in the wrong type (a
    // numeric password), and errors reach responses, task records and logs.
    if ok {
        Ok(())
    } else {
        Err(format!("must be {}, got {}", kind_name(kind), json_kind(v)))
    }
}

/// A JSON value's type in words, for error messages that must not show the value itself.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn kind_name(kind: &OptionKind) -> &'static str {
    match kind {
        OptionKind::String => "a string",
        OptionKind::Bool => "true or false",
        OptionKind::Integer => "an integer",
        OptionKind::Number => "a number",
        OptionKind::Duration => "a duration",
        OptionKind::Object => "an object",
        OptionKind::Array => "a list",
        OptionKind::Enum(_) => "one of the allowed values",
        OptionKind::Any => "any value",
    }
}

/// The jobs an engine can run, by name.
#[derive(Clone, Default)]
pub struct JobRegistry {
    jobs: BTreeMap<String, Arc<dyn Job>>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.jobs.keys()).finish()
    }
}

impl JobRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a job; a later job with the same name replaces the earlier one.
    pub fn register(&mut self, job: impl Job) -> &mut Self {
        self.jobs.insert(job.name().to_owned(), Arc::new(job));
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Job>> {
        self.jobs.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.jobs.keys().map(String::as_str)
    }
}
