//! Loading, validating and storing graph and task definitions, and turning a graph plus
//! run options into the [`Plan`] a workflow executes.
//!
//! Two sources of definitions exist: the shipped library (read-only, given at start) and
//! definitions users store through the API (in the store, surviving restarts). A user
//! definition with a library name shadows the library one; the library never overwrites a
//! user's definition.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use metalgraph_store::{Batch, Store};
use petgraph::graphmap::DiGraphMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::blocking;
use crate::history::PageRequest;
use crate::job::{JobRegistry, value_to_duration};
use crate::keys;
use crate::model::{
    Definition, GraphDefinition, GraphTask, MAX_RETRIES, RunOptions, TaskDefinition, WaitOn,
    WaitState, bounded_ms, check_id, parse_duration,
};
use crate::template::{Dialect, rackhd};

/// Labels a graph task may not use: they are keys with a meaning of their own.
pub const RESERVED_LABELS: &[&str] = &["defaults", "anyOf"];

/// One thing wrong with a definition, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl Problem {
    fn new(message: impl Into<String>) -> Self {
        Self {
            file: None,
            graph: None,
            task: None,
            label: None,
            field: None,
            message: message.into(),
        }
    }

    fn graph(mut self, g: &str) -> Self {
        self.graph = Some(g.to_owned());
        self
    }

    fn label(mut self, l: &str) -> Self {
        self.label = Some(l.to_owned());
        self
    }

    fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }

    fn task(mut self, t: &str) -> Self {
        self.task = Some(t.to_owned());
        self
    }

    pub fn in_file(mut self, f: &str) -> Self {
        self.file = Some(f.to_owned());
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(x) = &self.file {
            parts.push(x.clone());
        }
        if let Some(x) = &self.graph {
            parts.push(format!("graph {x}"));
        }
        if let Some(x) = &self.task {
            parts.push(format!("task definition {x}"));
        }
        if let Some(x) = &self.label {
            parts.push(format!("task '{x}'"));
        }
        if let Some(x) = &self.field {
            parts.push(format!("field '{x}'"));
        }
        if parts.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", parts.join(", "), self.message)
        }
    }
}

/// A list of problems, displayed one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Problem>);

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Parses one file's text (YAML, or JSON, which is YAML) into definitions. A file may hold
/// several YAML documents separated by `---`, or a list of definitions. Each definition is
/// a graph when it has `tasks` and a task definition when it has `implementsTask`.
pub fn parse(text: &str, file: &str) -> Result<Vec<Definition>, Problem> {
    let docs = crate::text::parse_yaml_documents(text)
        .map_err(|e| Problem::new(format!("not valid YAML or JSON: {e}")).in_file(file))?;
    let mut out = Vec::new();
    for value in docs {
        match value {
            Value::Null => {}
            Value::Array(items) => {
                for item in items {
                    out.push(parse_value(item, file)?);
                }
            }
            other => out.push(parse_value(other, file)?),
        }
    }
    if out.is_empty() {
        return Err(Problem::new("holds no definition").in_file(file));
    }
    Ok(out)
}

/// Parses one definition from a JSON value.
pub fn parse_value(value: Value, file: &str) -> Result<Definition, Problem> {
    let Some(obj) = value.as_object() else {
        return Err(Problem::new("a definition must be a mapping").in_file(file));
    };
    let name = obj
        .get("injectableName")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    if obj.contains_key("tasks") {
        let g: GraphDefinition = serde_json::from_value(value)
            .map_err(|e| Problem::new(e.to_string()).in_file(file).graph(&name))?;
        Ok(Definition::Graph(g))
    } else if obj.contains_key("implementsTask") {
        let t: TaskDefinition = serde_json::from_value(value)
            .map_err(|e| Problem::new(e.to_string()).in_file(file).task(&name))?;
        Ok(Definition::Task(t))
    } else {
        Err(Problem::new(
            "neither a graph (no 'tasks') nor a task definition (no 'implementsTask')",
        )
        .in_file(file))
    }
}

/// Where a definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Library,
    User,
}

/// The shipped, read-only definitions.
#[derive(Debug, Clone, Default)]
pub struct Library {
    pub graphs: BTreeMap<String, GraphDefinition>,
    pub tasks: BTreeMap<String, TaskDefinition>,
}

impl Library {
    /// Builds the library from `(file name, text)` pairs; any problem is returned, since a
    /// broken shipped library is a bug.
    pub fn from_texts<'a>(
        files: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Problem> {
        let mut lib = Library::default();
        for (file, text) in files {
            for def in parse(text, file)? {
                lib.add(def);
            }
        }
        Ok(lib)
    }

    pub fn add(&mut self, def: Definition) {
        match def {
            Definition::Graph(g) => {
                self.graphs.insert(g.injectable_name.clone(), g);
            }
            Definition::Task(t) => {
                self.tasks.insert(t.injectable_name.clone(), t);
            }
        }
    }
}

/// Finds task definitions by name, for validation and planning.
pub trait TaskLookup {
    fn task(&self, name: &str) -> Option<TaskDefinition>;
}

impl TaskLookup for Library {
    fn task(&self, name: &str) -> Option<TaskDefinition> {
        self.tasks.get(name).cloned()
    }
}

/// A task resolved for execution: everything the scheduler needs, snapshotted into the
/// workflow record so that later changes to definitions never affect a running workflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlannedTask {
    pub label: String,
    pub task_name: String,
    pub job: String,
    /// Merged options, not yet rendered.
    pub options: Map<String, Value>,
    pub wait_on: WaitOn,
    // Defaults are left out of the stored plan (every workflow record holds one; this is a
    // fifth of a ten-task plan's bytes); records that have them read the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_failure: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backoff_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Options whose values are data, never templates: they came from outside the graph
    /// already rendered (the options a `graph.run` hands its child).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
    /// Options the job declares secret: redacted in every view, whatever their name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The template language of the options (see [`Dialect`]).
    #[serde(default, skip_serializing_if = "Dialect::is_jinja")]
    pub dialect: Dialect,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

impl Plan {
    /// Marks every option the run options set as data (see [`PlannedTask::data`]).
    pub fn mark_run_options_as_data(&mut self, run: &RunOptions) {
        for t in Arc::make_mut(&mut self.tasks) {
            let layers = ["defaults", t.label.as_str()];
            let given: Vec<String> = layers
                .iter()
                .filter_map(|layer| run.get(*layer))
                .flat_map(|m| m.keys().cloned())
                .collect();
            for k in &given {
                if t.options.contains_key(k) && !t.data.contains(k) {
                    t.data.push(k.clone());
                }
            }
        }
    }
}

/// A graph resolved for execution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub graph: String,
    /// Shared between the workflows in memory whose plans resolve to the same tasks (see
    /// the scheduler core's `share_plan`); changed only through `Arc::make_mut`. Empty in a
    /// workflow record read from the store until its plan record is read (`plans.rs`).
    #[serde(default)]
    pub tasks: Arc<Vec<PlannedTask>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The id of the plan's record when it is stored apart from its workflow's (see
    /// `plans.rs`); a workflow record then holds the graph and this id alone.
    #[serde(default, skip_serializing)]
    pub id: Option<String>,
}

/// The longest backoff between retries.
pub const MAX_BACKOFF_MS: u64 = 300_000;

/// How deep subgraphs may nest at run time: a `graph.run` in a workflow this many levels
/// below its top-level workflow fails instead of starting another child.
pub const MAX_SUBGRAPH_DEPTH: u32 = 8;

/// The most tasks one graph may have, unless the engine is configured otherwise
/// (`EngineOptions::max_tasks_per_graph`).
pub const DEFAULT_MAX_TASKS_PER_GRAPH: usize = 1000;

/// The most tasks any graph may have, whatever the configuration.
pub const MAX_TASKS_CEILING: usize = 100_000;

/// Refuses a graph with more than `max` tasks.
pub fn check_task_count(graph: &GraphDefinition, max: usize) -> Result<(), Problems> {
    if graph.tasks.len() <= max {
        return Ok(());
    }
    Err(Problems(vec![
        Problem::new(format!(
            "graph has {} tasks; at most {max} are allowed",
            graph.tasks.len()
        ))
        .graph(&graph.injectable_name)
        .field("tasks"),
    ]))
}

/// The shortest backoff between retries.
pub const MIN_BACKOFF_MS: u64 = 100;

/// Validates a graph and resolves it against task definitions and jobs. With `run` given,
/// the run request's options are merged in and required options are enforced.
pub fn resolve(
    graph: &GraphDefinition,
    lookup: &dyn TaskLookup,
    jobs: &JobRegistry,
    run: Option<&RunOptions>,
) -> Result<Plan, Problems> {
    resolve_for(graph, lookup, jobs, run, None)
}

/// [`resolve`] for a run on `node`: RackHD's options that stand for the graph's node are
/// filled with it where they are null — a task's `nodeId`, and `graphOptions.target` of a
/// subgraph — so that RackHD definitions that declare them `null` run unchanged.
pub fn resolve_for(
    graph: &GraphDefinition,
    lookup: &dyn TaskLookup,
    jobs: &JobRegistry,
    run: Option<&RunOptions>,
    node: Option<&str>,
) -> Result<Plan, Problems> {
    let g = graph.injectable_name.as_str();
    let mut problems = Vec::new();
    let p = |m: String| Problem::new(m).graph(g);
    if g.trim().is_empty() {
        problems.push(Problem::new("graph has no injectableName").field("injectableName"));
    } else if let Err(e) = check_id(g) {
        problems.push(Problem::new(format!("the graph's name {e}")).field("injectableName"));
    }
    if graph.tasks.is_empty() {
        problems.push(p("graph has no tasks".into()).field("tasks"));
    }
    check_task_count(graph, MAX_TASKS_CEILING)?;

    // Labels.
    let mut labels = BTreeSet::new();
    for t in &graph.tasks {
        let l = t.label.as_str();
        if l.trim().is_empty() {
            problems.push(p("a task has an empty label".into()).field("label"));
        } else if RESERVED_LABELS.contains(&l) {
            problems.push(
                p(format!("label '{l}' is reserved"))
                    .label(l)
                    .field("label"),
            );
        } else if l.contains('/') {
            problems.push(
                p(format!("label '{l}' may not contain '/'"))
                    .label(l)
                    .field("label"),
            );
        } else if !labels.insert(l) {
            problems.push(p(format!("duplicate label '{l}'")).label(l).field("label"));
        }
    }

    // Graph option layers: `defaults` and one per label, each a mapping. Other keys are
    // ignored, as RackHD ignores them ([`ignored_option_keys`] names them for a warning).
    for (key, v) in &graph.options {
        if (key == "defaults" || labels.contains(key.as_str())) && !v.is_object() {
            problems.push(p("must be a mapping".into()).field(format!("options.{key}")));
        }
    }
    let graph_timeout_ms = match &graph.timeout {
        None => None,
        Some(s) => match parse_duration(s) {
            Ok(d) => Some(d.as_millis() as u64),
            Err(e) => {
                problems.push(p(e).field("timeout"));
                None
            }
        },
    };

    let mut planned = Vec::with_capacity(graph.tasks.len());
    let mut edges = Vec::new();
    for t in &graph.tasks {
        match resolve_task(graph, t, lookup, jobs, run, node, &labels) {
            Ok(pt) => {
                for dep in pt.wait_on.labels() {
                    edges.push((dep.to_owned(), pt.label.clone()));
                }
                planned.push(pt);
            }
            Err(mut ps) => problems.append(&mut ps),
        }
    }

    if problems.is_empty()
        && let Some(cycle) = find_cycle(&planned)
    {
        problems.push(
            p(format!("waitOn forms a cycle: {}", cycle.join(" -> ")))
                .label(&cycle[0])
                .field("waitOn"),
        );
    }

    if let (Some(run), true) = (run, problems.is_empty()) {
        problems.extend(check_required(graph, &planned, run, jobs));
    }

    if problems.is_empty() {
        Ok(Plan {
            graph: g.to_owned(),
            tasks: Arc::new(planned),
            timeout_ms: graph_timeout_ms,
            id: None,
        })
    } else {
        Err(Problems(problems))
    }
}

/// The option layers of `graph` (and of the run options `run`) that name neither
/// `defaults` nor a task label: RackHD ignores them, and so does the engine, but they are
/// most often a misspelt label, so callers warn about them. One message per key.
pub fn ignored_option_keys(graph: &GraphDefinition, run: Option<&RunOptions>) -> Vec<String> {
    let labels: BTreeSet<&str> = graph.tasks.iter().map(|t| t.label.as_str()).collect();
    let unknown = |key: &&String| key.as_str() != "defaults" && !labels.contains(key.as_str());
    let mut out: Vec<String> = graph
        .options
        .keys()
        .filter(unknown)
        .map(|k| {
            format!(
                "graph {}: options name '{k}', which is not a task label of this graph; it is ignored",
                graph.injectable_name
            )
        })
        .collect();
    if let Some(run) = run {
        out.extend(run.keys().filter(unknown).map(|k| {
            format!(
                "graph {}: the run options name '{k}', which is not a task label of this graph; it is ignored",
                graph.injectable_name
            )
        }));
    }
    out
}

fn resolve_task(
    graph: &GraphDefinition,
    t: &GraphTask,
    lookup: &dyn TaskLookup,
    jobs: &JobRegistry,
    run: Option<&RunOptions>,
    node: Option<&str>,
    labels: &BTreeSet<&str>,
) -> Result<PlannedTask, Vec<Problem>> {
    let g = graph.injectable_name.as_str();
    let l = t.label.as_str();
    let p = |m: String| Problem::new(m).graph(g).label(l);
    let mut problems = Vec::new();

    let def = match (&t.task_name, &t.task_definition) {
        (Some(_), Some(_)) => {
            problems.push(
                p("give exactly one of taskName and taskDefinition, not both".into())
                    .field("taskName"),
            );
            None
        }
        (None, None) => {
            problems.push(
                p("give exactly one of taskName and taskDefinition".into()).field("taskName"),
            );
            None
        }
        (Some(name), None) => match lookup.task(name) {
            Some(d) => Some(d),
            None => {
                problems.push(p(format!("unknown task {name}")).field("taskName"));
                None
            }
        },
        (None, Some(inline)) => Some(inline.clone()),
    };

    let wait_on = match &t.wait_on {
        None => WaitOn::default(),
        Some(w) => match parse_wait_on(w, l, labels) {
            Ok(w) => w,
            Err((field, msg)) => {
                problems.push(p(msg).field(field));
                WaitOn::default()
            }
        },
    };

    let (retries, backoff_ms) = match &t.retries {
        None => (0, 0),
        Some(r) => {
            let backoff = match &r.backoff {
                None => 1_000,
                Some(v) => {
                    match value_to_duration(v) {
                        Ok(d) if (d.as_millis() as u64) < MIN_BACKOFF_MS => {
                            problems.push(
                                p(format!(
                                    "the backoff must be at least {MIN_BACKOFF_MS}ms, so that a \
                                 failing task cannot retry in a tight loop"
                                ))
                                .field("retries.backoff"),
                            );
                            0
                        }
                        Ok(d) if d.as_millis() as u64 <= MAX_BACKOFF_MS => d.as_millis() as u64,
                        Ok(_) => {
                            problems.push(
                            p("the backoff must be at most 5m (it doubles per retry up to 5m)".into())
                                .field("retries.backoff"),
                        );
                            0
                        }
                        Err(e) => {
                            problems.push(p(e).field("retries.backoff"));
                            0
                        }
                    }
                }
            };
            if r.max > MAX_RETRIES {
                problems.push(
                    p(format!(
                        "at most {MAX_RETRIES} retries are allowed, got {}",
                        r.max
                    ))
                    .field("retries.max"),
                );
            }
            (r.max.min(MAX_RETRIES), backoff)
        }
    };

    let Some(def) = def else {
        return Err(problems);
    };
    let Some(job) = jobs.get(&def.implements_task) else {
        problems.push(
            p(format!(
                "task {} implements {}",
                if def.injectable_name.is_empty() {
                    "(inline)"
                } else {
                    &def.injectable_name
                },
                unknown_job(&def.implements_task, jobs)
            ))
            .field("implementsTask"),
        );
        return Err(problems);
    };

    let dialect = def
        .template_dialect
        .or(graph.template_dialect)
        .unwrap_or_else(|| Dialect::of_job(&def.implements_task));

    // Option precedence, lowest first.
    let mut options = job.schema().defaults();
    merge(&mut options, &def.options);
    merge(&mut options, &t.option_overrides);
    for layer in ["defaults", l] {
        if let Some(Value::Object(m)) = graph.options.get(layer) {
            merge(&mut options, m);
        }
    }
    for (field, msg) in untranslatable(dialect, &options) {
        problems.push(p(msg).field(field));
    }
    if let Some(run) = run {
        for layer in ["defaults", l] {
            if let Some(m) = run.get(layer) {
                merge(&mut options, m);
            }
        }
    }
    if let Some(node) = node {
        default_to_node(&mut options, node);
    }
    if let Err((field, msg)) = job.schema().check(&options, false) {
        problems.push(p(format!("option {msg}")).field(format!("options.{field}")));
    }

    let timeout_ms = match &t.timeout {
        Some(v) => match value_to_duration(v) {
            Ok(d) => Some(d.as_millis() as u64),
            Err(e) => {
                problems.push(p(e).field("timeout"));
                None
            }
        },
        // RackHD's `_taskTimeout`, in milliseconds; -1 (RackHD's "no timeout") and 0 mean
        // none; anything else must be whole milliseconds within the 30-day bound.
        None => match options.get("_taskTimeout") {
            Some(Value::Number(n)) if matches!(n.as_i64(), Some(-1 | 0)) => None,
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v < 0) => {
                problems.push(
                    p("_taskTimeout must be whole milliseconds, or -1 for no timeout".into())
                        .field("options._taskTimeout"),
                );
                None
            }
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v > 0) => {
                let ms = n.as_u64().unwrap_or_default();
                match bounded_ms(ms, &ms) {
                    Ok(_) => Some(ms),
                    Err(e) => {
                        problems.push(p(e).field("options._taskTimeout"));
                        None
                    }
                }
            }
            Some(Value::Number(_)) => {
                problems.push(
                    p("_taskTimeout must be whole milliseconds of at most 30 days".into())
                        .field("options._taskTimeout"),
                );
                None
            }
            None | Some(Value::Null) => None,
            Some(other) => {
                problems.push(
                    p(format!(
                        "_taskTimeout must be milliseconds, got {}",
                        if other.is_string() {
                            "a string"
                        } else {
                            "a value of another type"
                        }
                    ))
                    .field("options._taskTimeout"),
                );
                None
            }
        },
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(PlannedTask {
        label: l.to_owned(),
        task_name: t
            .task_name
            .clone()
            .unwrap_or_else(|| non_empty_or(&def.injectable_name, "(inline)")),
        job: def.implements_task.clone(),
        options,
        wait_on,
        ignore_failure: t.ignore_failure,
        retries,
        backoff_ms,
        timeout_ms,
        data: Vec::new(),
        secrets: job.schema().secrets(),
        dialect,
    })
}

fn non_empty_or(s: &str, fallback: &str) -> String {
    if s.is_empty() {
        fallback.to_owned()
    } else {
        s.to_owned()
    }
}

/// RackHD templates are translated when they render; those among `options` that cannot be
/// are refused when their definition is stored: `(field, message)` for each.
fn untranslatable(dialect: Dialect, options: &Map<String, Value>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if dialect == Dialect::Rackhd {
        for (k, v) in options {
            for_each_template(v, k, &mut |path, s| {
                if let Err(e) = rackhd::translate(s) {
                    out.push((
                        format!("options.{k}"),
                        format!("option '{path}' (RackHD's template dialect): {e}"),
                    ));
                }
            });
        }
    }
    out
}

/// Calls `f` with every template string inside `v` and its option path.
fn for_each_template(v: &Value, path: &str, f: &mut dyn FnMut(&str, &str)) {
    match v {
        Value::String(s) if crate::template::is_template(s) => f(path, s),
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                for_each_template(x, &format!("{path}[{i}]"), f);
            }
        }
        Value::Object(m) => {
            for (k, x) in m {
                for_each_template(x, &format!("{path}.{k}"), f);
            }
        }
        _ => {}
    }
}

/// Shallow merge: keys of `layer` replace those of `into`.
fn merge(into: &mut Map<String, Value>, layer: &Map<String, Value>) {
    for (k, v) in layer {
        into.insert(k.clone(), v.clone());
    }
}

fn parse_states(v: &Value) -> Result<Vec<WaitState>, String> {
    let one = |s: &Value| -> Result<WaitState, String> {
        s.as_str().and_then(WaitState::parse).ok_or_else(|| {
            format!(
                "unknown state {s} (expected succeeded, failed, timeout, cancelled, skipped or finished)"
            )
        })
    };
    match v {
        Value::Array(items) if !items.is_empty() => items.iter().map(one).collect(),
        Value::Array(_) => Err("an empty list of states can never be met".to_owned()),
        other => Ok(vec![one(other)?]),
    }
}

fn parse_wait_on(
    w: &Map<String, Value>,
    own: &str,
    labels: &BTreeSet<&str>,
) -> Result<WaitOn, (String, String)> {
    let mut out = WaitOn::default();
    let check_label = |label: &str, field: &str| -> Result<(), (String, String)> {
        if label == own {
            Err((
                field.to_owned(),
                format!("task waits on itself ('{label}')"),
            ))
        } else if !labels.contains(label) {
            Err((
                field.to_owned(),
                format!("waits on unknown label '{label}'"),
            ))
        } else {
            Ok(())
        }
    };
    for (key, v) in w {
        if key == "anyOf" {
            let Some(any) = v.as_object() else {
                return Err((
                    "waitOn.anyOf".into(),
                    "anyOf must map labels to states".into(),
                ));
            };
            if any.is_empty() {
                return Err(("waitOn.anyOf".into(), "anyOf is empty".into()));
            }
            for (label, states) in any {
                let field = format!("waitOn.anyOf.{label}");
                check_label(label, &field)?;
                out.any
                    .push((label.clone(), parse_states(states).map_err(|e| (field, e))?));
            }
        } else {
            let field = format!("waitOn.{key}");
            check_label(key, &field)?;
            out.all
                .push((key.clone(), parse_states(v).map_err(|e| (field, e))?));
        }
    }
    Ok(out)
}

/// A cycle among `waitOn` edges, as labels with the first repeated at the end.
fn find_cycle(tasks: &[PlannedTask]) -> Option<Vec<String>> {
    let mut g = DiGraphMap::<usize, ()>::new();
    let index: BTreeMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.label.as_str(), i))
        .collect();
    for (i, t) in tasks.iter().enumerate() {
        g.add_node(i);
        for dep in t.wait_on.labels() {
            if let Some(&d) = index.get(dep) {
                g.add_edge(d, i, ());
            }
        }
    }
    if petgraph::algo::toposort(&g, None).is_ok() {
        return None;
    }
    // Walk inside a strongly connected component with more than one node to name a cycle.
    for scc in petgraph::algo::tarjan_scc(&g) {
        if scc.len() < 2 {
            continue;
        }
        let members: BTreeSet<usize> = scc.iter().copied().collect();
        let start = *members.iter().next()?;
        let mut path = vec![start];
        let mut seen = BTreeSet::from([start]);
        let mut cur = start;
        loop {
            let next = g.neighbors(cur).filter(|n| members.contains(n)).min()?;
            if let Some(pos) = path.iter().position(|&x| x == next) {
                let mut cycle: Vec<String> = path[pos..]
                    .iter()
                    .map(|&i| tasks[i].label.clone())
                    .collect();
                cycle.push(tasks[next].label.clone());
                return Some(cycle);
            }
            seen.insert(next);
            path.push(next);
            cur = next;
        }
    }
    None
}

fn check_required(
    graph: &GraphDefinition,
    planned: &[PlannedTask],
    run: &RunOptions,
    jobs: &JobRegistry,
) -> Vec<Problem> {
    let g = graph.injectable_name.as_str();
    let mut problems = Vec::new();
    // A graph-level default of null must be given in the run request.
    if let Some(Value::Object(defaults)) = graph.options.get("defaults") {
        for (k, v) in defaults {
            let given = run
                .get("defaults")
                .and_then(|m| m.get(k))
                .is_some_and(|v| !v.is_null());
            if v.is_null() && !given {
                problems.push(
                    Problem::new(format!(
                        "option '{k}' is required: give it in options.defaults"
                    ))
                    .graph(g)
                    .field(format!("options.defaults.{k}")),
                );
            }
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    for t in planned {
        let schema = jobs.get(&t.job).map(|j| j.schema());
        for (k, v) in &t.options {
            if v.is_null() && !k.starts_with('_') {
                let declared_optional = schema
                    .and_then(|s| s.options.get(k.as_str()))
                    .is_some_and(|spec| !spec.required);
                if !declared_optional {
                    problems.push(
                        Problem::new(format!(
                            "option '{k}' is required: give it in options.{} or options.defaults",
                            t.label
                        ))
                        .graph(g)
                        .label(&t.label)
                        .field(format!("options.{k}")),
                    );
                }
            }
        }
        if let Some(schema) = schema {
            for (k, spec) in &schema.options {
                if spec.required && !t.options.contains_key(*k) {
                    problems.push(
                        Problem::new(format!("option '{k}' is required ({})", spec.doc))
                            .graph(g)
                            .label(&t.label)
                            .field(format!("options.{k}")),
                    );
                }
            }
        }
    }
    problems
}

/// Validates a task definition against the job registry.
/// RackHD's node defaulting: a task option `nodeId` left `null`, and a subgraph's
/// `graphOptions.target` left `null`, mean the node the graph runs on.
fn default_to_node(options: &mut Map<String, Value>, node: &str) {
    if options.get("nodeId").is_some_and(Value::is_null) {
        options.insert("nodeId".into(), Value::from(node));
    }
    if let Some(Value::Object(go)) = options.get_mut("graphOptions")
        && go.get("target").is_some_and(Value::is_null)
    {
        go.insert("target".into(), Value::from(node));
    }
}

/// What `implementsTask` names when it is no job of this build: an unknown job (listing the
/// known ones), or one of RackHD's base tasks that metalgraph does not run (listing the
/// ones it runs, docs/rackhd.md).
fn unknown_job(name: &str, jobs: &JobRegistry) -> String {
    const BASE: &str = "Task.Base.";
    let (base, own): (Vec<&str>, Vec<&str>) = jobs.names().partition(|n| n.starts_with(BASE));
    if name.starts_with(BASE) {
        format!(
            "RackHD base task {name}, which metalgraph does not support (the RackHD base tasks \
             it runs: {}; see docs/rackhd.md)",
            base.join(", ")
        )
    } else {
        format!("unknown job {name} (known jobs: {})", own.join(", "))
    }
}

pub fn validate_task(def: &TaskDefinition, jobs: &JobRegistry) -> Result<(), Problems> {
    let name = def.injectable_name.as_str();
    let mut problems = Vec::new();
    if name.trim().is_empty() {
        problems
            .push(Problem::new("task definition has no injectableName").field("injectableName"));
    } else if let Err(e) = check_id(name) {
        problems
            .push(Problem::new(format!("the task definition's name {e}")).field("injectableName"));
    }
    match jobs.get(&def.implements_task) {
        None => problems.push(
            Problem::new(format!(
                "implements {}",
                unknown_job(&def.implements_task, jobs)
            ))
            .task(name)
            .field("implementsTask"),
        ),
        Some(job) => {
            let mut opts = job.schema().defaults();
            merge(&mut opts, &def.options);
            if let Err((field, msg)) = job.schema().check(&opts, false) {
                problems.push(
                    Problem::new(format!("option {msg}"))
                        .task(name)
                        .field(format!("options.{field}")),
                );
            }
        }
    }
    let dialect = def
        .template_dialect
        .unwrap_or_else(|| Dialect::of_job(&def.implements_task));
    for (field, msg) in untranslatable(dialect, &def.options) {
        problems.push(Problem::new(msg).task(name).field(field));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Problems(problems))
    }
}

/// Why a definitions operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(Problems),
    #[error("{0}")]
    BadOptions(Problems),
    #[error("{kind} {name} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("{kind} {name} is part of the shipped library and cannot be deleted")]
    LibraryReadOnly { kind: &'static str, name: String },
    #[error(transparent)]
    Store(#[from] metalgraph_store::Error),
    #[error("stored {kind} {name} is unreadable: {message}")]
    Corrupt {
        kind: &'static str,
        name: String,
        message: String,
    },
    #[error("a definitions operation did not complete: {0}")]
    Incomplete(String),
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Incomplete(e.to_string())
    }
}

/// The definitions an engine runs: the library plus users' stored definitions.
#[derive(Clone)]
pub struct Definitions {
    store: Arc<dyn Store>,
    library: Arc<Library>,
    jobs: Arc<JobRegistry>,
    /// The most tasks a graph may have (see [`DEFAULT_MAX_TASKS_PER_GRAPH`]).
    max_tasks: usize,
}

impl std::fmt::Debug for Definitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Definitions")
            .field("library_graphs", &self.library.graphs.len())
            .field("library_tasks", &self.library.tasks.len())
            .finish()
    }
}

struct StoreLookup<'a>(&'a Definitions);

impl TaskLookup for StoreLookup<'_> {
    fn task(&self, name: &str) -> Option<TaskDefinition> {
        self.0
            .get_task_blocking(name)
            .ok()
            .flatten()
            .map(|(t, _)| t)
    }
}

impl Definitions {
    pub fn new(store: Arc<dyn Store>, library: Library, jobs: Arc<JobRegistry>) -> Self {
        Self {
            store,
            library: Arc::new(library),
            jobs,
            max_tasks: DEFAULT_MAX_TASKS_PER_GRAPH,
        }
    }

    /// Sets the most tasks a graph may have.
    pub fn with_max_tasks(mut self, max: usize) -> Self {
        self.max_tasks = max.clamp(1, MAX_TASKS_CEILING);
        self
    }

    pub fn jobs(&self) -> &JobRegistry {
        &self.jobs
    }

    pub fn library(&self) -> &Library {
        &self.library
    }

    fn read<T: serde::de::DeserializeOwned>(
        &self,
        ks: &str,
        kind: &'static str,
        name: &str,
    ) -> Result<Option<T>, Error> {
        match self.store.get(ks, name.as_bytes())? {
            None => Ok(None),
            Some(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| Error::Corrupt {
                    kind,
                    name: name.to_owned(),
                    message: e.to_string(),
                }),
        }
    }

    pub(crate) fn get_graph_blocking(
        &self,
        name: &str,
    ) -> Result<Option<(GraphDefinition, Source)>, Error> {
        if let Some(g) = self.read(keys::GRAPHS, "graph", name)? {
            return Ok(Some((g, Source::User)));
        }
        Ok(self
            .library
            .graphs
            .get(name)
            .map(|g| (g.clone(), Source::Library)))
    }

    pub(crate) fn get_task_blocking(
        &self,
        name: &str,
    ) -> Result<Option<(TaskDefinition, Source)>, Error> {
        if let Some(t) = self.read(keys::TASKDEFS, "task", name)? {
            return Ok(Some((t, Source::User)));
        }
        Ok(self
            .library
            .tasks
            .get(name)
            .map(|t| (t.clone(), Source::Library)))
    }

    /// One page of definitions in name order, the library's and the store's `ks` merged (a
    /// stored one shadows the library's of its name): `skip` passed over, then at most
    /// `limit` (default 100, at most 1000) after `cursor`, the last name of the previous
    /// page. Costs O(skip + limit), however many are stored.
    fn page_of<T: serde::de::DeserializeOwned + Clone>(
        &self,
        library: &BTreeMap<String, T>,
        ks: &str,
        kind: &'static str,
        page: &PageRequest,
    ) -> Result<crate::Page<(T, Source)>, crate::Error> {
        use std::ops::Bound;
        let limit = crate::history::page_size(page.limit, &format!("{kind}s"))?;
        // Each source's first `need` after the cursor hold the merged first `need`.
        let need = page.skip.saturating_add(limit).saturating_add(1);
        let after = page.cursor.as_deref();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut merged: BTreeMap<String, (T, Source)> = library
            .range::<str, _>((lower, Bound::Unbounded))
            .take(need)
            .map(|(k, v)| (k.clone(), (v.clone(), Source::Library)))
            .collect();
        let scan = metalgraph_store::Scan::prefix(b"", need).after(after.map(str::as_bytes));
        for (k, v) in self.store.scan(ks, scan).map_err(Error::from)? {
            let name = String::from_utf8_lossy(&k).into_owned();
            let def = serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                kind,
                name: name.clone(),
                message: e.to_string(),
            })?;
            merged.insert(name, (def, Source::User));
        }
        let more = merged.len() > page.skip + limit;
        let items: Vec<(String, (T, Source))> =
            merged.into_iter().skip(page.skip).take(limit).collect();
        let next = if more {
            items.last().map(|(name, _)| name.clone())
        } else {
            None
        };
        Ok(crate::Page {
            items: items.into_iter().map(|(_, d)| d).collect(),
            next,
        })
    }

    /// Validates a graph against the current task definitions without storing it, including
    /// that it does not run itself through `graph.run`, directly or through other graphs.
    pub(crate) fn validate_graph_blocking(
        &self,
        graph: &GraphDefinition,
    ) -> Result<Plan, Problems> {
        check_task_count(graph, self.max_tasks)?;
        let plan = resolve(graph, &StoreLookup(self), &self.jobs, None)?;
        self.check_subgraph_cycle(graph, &plan)?;
        Ok(plan)
    }

    /// Follows every `graph.run` whose `graphName` is written out (not a template) from
    /// `graph` through the graphs it names; a path back to a graph already on it is a cycle,
    /// reported on the task that starts it. Names given by templates are bounded at run time
    /// by the nesting limit instead.
    fn check_subgraph_cycle(&self, graph: &GraphDefinition, plan: &Plan) -> Result<(), Problems> {
        let start = graph.injectable_name.as_str();
        let mut path = vec![start.to_owned()];
        let mut first_label = None;
        if let Some(cycle) = self.find_cycle(plan, &mut path, &mut first_label, 0) {
            let label = first_label.unwrap_or_default();
            return Err(Problems(vec![
                Problem::new(format!(
                    "graph.run forms a cycle: {cycle}; a graph may not run itself"
                ))
                .graph(start)
                .label(&label)
                .field("options.graphName"),
            ]));
        }
        Ok(())
    }

    fn find_cycle(
        &self,
        plan: &Plan,
        path: &mut Vec<String>,
        first_label: &mut Option<String>,
        depth: u32,
    ) -> Option<String> {
        if depth > MAX_SUBGRAPH_DEPTH {
            return None;
        }
        for t in plan.tasks.iter().filter(|t| t.job == "graph.run") {
            let Some(name) = t.options.get("graphName").and_then(Value::as_str) else {
                continue;
            };
            if crate::template::is_template(name) {
                continue;
            }
            if depth == 0 {
                *first_label = Some(t.label.clone());
            }
            if path.iter().any(|p| p == name) {
                return Some(format!("{} -> {name}", path.join(" -> ")));
            }
            let Ok(Some((g, _))) = self.get_graph_blocking(name) else {
                continue;
            };
            let Ok(child) = resolve(&g, &StoreLookup(self), &self.jobs, None) else {
                continue;
            };
            path.push(name.to_owned());
            if let Some(cycle) = self.find_cycle(&child, path, first_label, depth + 1) {
                return Some(cycle);
            }
            path.pop();
        }
        None
    }

    /// Validates and stores (creates or replaces) a user graph.
    pub(crate) fn put_graph_blocking(&self, graph: GraphDefinition) -> Result<(), Error> {
        self.validate_graph_blocking(&graph)
            .map_err(Error::Invalid)?;
        for warning in ignored_option_keys(&graph, None) {
            tracing::warn!("{warning}");
        }
        let mut b = Batch::new();
        b.put(
            keys::GRAPHS,
            graph.injectable_name.as_bytes(),
            serde_json::to_vec(&graph).unwrap_or_default(),
        );
        self.store.commit(b)?;
        Ok(())
    }

    /// Validates and stores (creates or replaces) a user task definition.
    pub(crate) fn put_task_blocking(&self, def: TaskDefinition) -> Result<(), Error> {
        validate_task(&def, &self.jobs).map_err(Error::Invalid)?;
        let mut b = Batch::new();
        b.put(
            keys::TASKDEFS,
            def.injectable_name.as_bytes(),
            serde_json::to_vec(&def).unwrap_or_default(),
        );
        self.store.commit(b)?;
        Ok(())
    }

    /// Deletes a user graph. Library graphs cannot be deleted; deleting a user graph that
    /// shadows a library one brings the library one back.
    pub(crate) fn delete_graph_blocking(&self, name: &str) -> Result<(), Error> {
        if self.store.get(keys::GRAPHS, name.as_bytes())?.is_none() {
            return Err(if self.library.graphs.contains_key(name) {
                Error::LibraryReadOnly {
                    kind: "graph",
                    name: name.to_owned(),
                }
            } else {
                Error::NotFound {
                    kind: "graph",
                    name: name.to_owned(),
                }
            });
        }
        let mut b = Batch::new();
        b.delete(keys::GRAPHS, name.as_bytes());
        self.store.commit(b)?;
        Ok(())
    }

    /// Deletes a user task definition; library ones cannot be deleted.
    pub(crate) fn delete_task_blocking(&self, name: &str) -> Result<(), Error> {
        if self.store.get(keys::TASKDEFS, name.as_bytes())?.is_none() {
            return Err(if self.library.tasks.contains_key(name) {
                Error::LibraryReadOnly {
                    kind: "task",
                    name: name.to_owned(),
                }
            } else {
                Error::NotFound {
                    kind: "task",
                    name: name.to_owned(),
                }
            });
        }
        let mut b = Batch::new();
        b.delete(keys::TASKDEFS, name.as_bytes());
        self.store.commit(b)?;
        Ok(())
    }

    /// Resolves graph `name` with run options into a plan, enforcing required options.
    /// A graph that is itself invalid gives [`Error::Invalid`]; run options that are wrong or
    /// missing give [`Error::BadOptions`].
    pub(crate) fn plan_blocking(
        &self,
        name: &str,
        run: &RunOptions,
        node: Option<&str>,
    ) -> Result<Plan, Error> {
        let (graph, _) = self
            .get_graph_blocking(name)?
            .ok_or_else(|| Error::NotFound {
                kind: "graph",
                name: name.to_owned(),
            })?;
        let lookup = StoreLookup(self);
        check_task_count(&graph, self.max_tasks).map_err(Error::Invalid)?;
        let plan = resolve(&graph, &lookup, &self.jobs, None).map_err(Error::Invalid)?;
        self.check_subgraph_cycle(&graph, &plan)
            .map_err(Error::Invalid)?;
        resolve_for(&graph, &lookup, &self.jobs, Some(run), node).map_err(Error::BadOptions)
    }
}

/// The asynchronous API: each call does its store work on the blocking pool.
impl Definitions {
    pub async fn get_graph(
        &self,
        name: &str,
    ) -> Result<Option<(GraphDefinition, Source)>, crate::Error> {
        let (d, name) = (self.clone(), name.to_owned());
        blocking(move || d.get_graph_blocking(&name).map_err(crate::Error::from)).await
    }

    pub async fn get_task(
        &self,
        name: &str,
    ) -> Result<Option<(TaskDefinition, Source)>, crate::Error> {
        let (d, name) = (self.clone(), name.to_owned());
        blocking(move || d.get_task_blocking(&name).map_err(crate::Error::from)).await
    }

    /// One page of graphs in name order (see [`PageRequest`]).
    pub async fn graphs_page(
        &self,
        page: PageRequest,
    ) -> Result<crate::Page<(GraphDefinition, Source)>, crate::Error> {
        let d = self.clone();
        blocking(move || d.page_of(&d.library.graphs, keys::GRAPHS, "graph", &page)).await
    }

    /// One page of task definitions in name order (see [`PageRequest`]).
    pub async fn tasks_page(
        &self,
        page: PageRequest,
    ) -> Result<crate::Page<(TaskDefinition, Source)>, crate::Error> {
        let d = self.clone();
        blocking(move || d.page_of(&d.library.tasks, keys::TASKDEFS, "task definition", &page))
            .await
    }

    /// Validates a graph against the current task definitions without storing it.
    pub async fn validate_graph(&self, graph: GraphDefinition) -> Result<Plan, crate::Error> {
        let d = self.clone();
        blocking(move || {
            d.validate_graph_blocking(&graph)
                .map_err(Error::Invalid)
                .map_err(crate::Error::from)
        })
        .await
    }

    /// Validates and stores (creates or replaces) a user graph.
    pub async fn put_graph(&self, graph: GraphDefinition) -> Result<(), crate::Error> {
        let d = self.clone();
        blocking(move || d.put_graph_blocking(graph).map_err(crate::Error::from)).await
    }

    /// Validates and stores (creates or replaces) a user task definition.
    pub async fn put_task(&self, def: TaskDefinition) -> Result<(), crate::Error> {
        let d = self.clone();
        blocking(move || d.put_task_blocking(def).map_err(crate::Error::from)).await
    }

    /// Deletes a user graph; see [`Definitions::delete_graph_blocking`].
    pub async fn delete_graph(&self, name: &str) -> Result<(), crate::Error> {
        let (d, name) = (self.clone(), name.to_owned());
        blocking(move || d.delete_graph_blocking(&name).map_err(crate::Error::from)).await
    }

    /// Deletes a user task definition; library ones cannot be deleted.
    pub async fn delete_task(&self, name: &str) -> Result<(), crate::Error> {
        let (d, name) = (self.clone(), name.to_owned());
        blocking(move || d.delete_task_blocking(&name).map_err(crate::Error::from)).await
    }

    /// Resolves graph `name` with run options into a plan; see [`Definitions::plan_blocking`].
    pub async fn plan(
        &self,
        name: &str,
        run: RunOptions,
        node: Option<String>,
    ) -> Result<Plan, crate::Error> {
        let (d, name) = (self.clone(), name.to_owned());
        blocking(move || {
            d.plan_blocking(&name, &run, node.as_deref())
                .map_err(crate::Error::from)
        })
        .await
    }
}

#[cfg(test)]
impl PlannedTask {
    /// A `noop` task labelled `label`, waiting on nothing, every other field its default.
    pub(crate) fn noop(label: &str) -> PlannedTask {
        PlannedTask {
            label: label.into(),
            task_name: "Task.Noop".into(),
            job: "noop".into(),
            options: Default::default(),
            wait_on: WaitOn::default(),
            ignore_failure: false,
            retries: 0,
            backoff_ms: 0,
            timeout_ms: None,
            data: Vec::new(),
            secrets: Vec::new(),
            dialect: Default::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_task_plan_leaves_defaults_out_and_reads_back_the_same() {
        let mut t = PlannedTask::noop("a");
        let stored = serde_json::to_value(&t).unwrap();
        for key in ["ignoreFailure", "retries", "backoffMs"] {
            assert!(stored.get(key).is_none(), "{key} in {stored}");
        }
        assert_eq!(serde_json::from_value::<PlannedTask>(stored).unwrap(), t);
        // As records written with every field read.
        let mut full = serde_json::to_value(&t).unwrap();
        full["ignoreFailure"] = false.into();
        full["retries"] = 0.into();
        full["backoffMs"] = 0.into();
        assert_eq!(serde_json::from_value::<PlannedTask>(full).unwrap(), t);

        (t.ignore_failure, t.retries, t.backoff_ms) = (true, 3, 500);
        let stored = serde_json::to_value(&t).unwrap();
        assert_eq!(
            (
                &stored["ignoreFailure"],
                &stored["retries"],
                &stored["backoffMs"]
            ),
            (&true.into(), &3.into(), &500.into())
        );
        assert_eq!(serde_json::from_value::<PlannedTask>(stored).unwrap(), t);
    }
}
