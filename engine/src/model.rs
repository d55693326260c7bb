//! Graph and task definitions with RackHD 2.0 field names, and the states of tasks and
//! workflows.
//!
//! These types are what users write (YAML or JSON) and what the API returns. Parsing is
//! lenient about extra RackHD fields we do not use (they are kept, so a definition round
//! trips), and strict about the fields we do.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A graph definition (`Graph.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct GraphDefinition {
    pub injectable_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub friendly_name: Option<String>,
    /// `defaults` (every task) and `<label>` (one task) option layers.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub options: Map<String, Value>,
    /// Required: a definition without `tasks` is no graph.
    #[serde(default, deserialize_with = "crate::text::objects")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub tasks: Vec<GraphTask>,
    /// A deadline for the whole workflow (`2h`), an extension beyond RackHD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// The template language of the graph's options, for tasks whose definitions do not
    /// name one (see [`crate::template::Dialect`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_dialect: Option<crate::template::Dialect>,
    /// Fields we do not interpret (RackHD's `_id`, `tags`, ...), kept for round trips.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One task inside a graph.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct GraphTask {
    pub label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_name: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::text::optional_object"
    )]
    pub task_definition: Option<TaskDefinition>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub option_overrides: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_on: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_failure: bool,
    /// Engine retries (`{max: 3, backoff: 2s}`), an extension beyond RackHD.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::text::optional_object"
    )]
    pub retries: Option<Retries>,
    /// A per-attempt timeout (`30m`), an extension beyond RackHD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A task's retry policy: up to `max` further attempts after a failure or timeout, waiting
/// `backoff` before the first retry and twice as long before each next one (capped at five
/// minutes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Retries {
    pub max: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Value>,
}

/// A task definition (`Task.*`): a job and its default options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct TaskDefinition {
    #[serde(default)]
    pub injectable_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub friendly_name: Option<String>,
    /// The job this task runs (`obm.power`). RackHD's `Task.Base.*` names are not jobs.
    pub implements_task: String,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub options: Map<String, Value>,
    /// The template language of the options: `rackhd` or `jinja`; when absent, RackHD's
    /// for a definition implementing one of RackHD's base tasks, the engine's otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_dialect: Option<crate::template::Dialect>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The state of one task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Timeout,
    Cancelled,
    Skipped,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, TaskState::Pending | TaskState::Running)
    }

    /// Failed or timed out: the states that fail a workflow unless handled.
    pub fn is_failure(self) -> bool {
        matches!(self, TaskState::Failed | TaskState::Timeout)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Timeout => "timeout",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkflowStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WorkflowStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            WorkflowStatus::Succeeded | WorkflowStatus::Failed | WorkflowStatus::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowStatus::Pending => "pending",
            WorkflowStatus::Running => "running",
            WorkflowStatus::Succeeded => "succeeded",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for WorkflowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state a `waitOn` entry may name: a task state, or `finished` (any terminal state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitState {
    Succeeded,
    Failed,
    Timeout,
    Cancelled,
    Skipped,
    Finished,
}

impl WaitState {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitState::Succeeded => "succeeded",
            WaitState::Failed => "failed",
            WaitState::Timeout => "timeout",
            WaitState::Cancelled => "cancelled",
            WaitState::Skipped => "skipped",
            WaitState::Finished => "finished",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => WaitState::Succeeded,
            "failed" => WaitState::Failed,
            "timeout" => WaitState::Timeout,
            "cancelled" => WaitState::Cancelled,
            "skipped" => WaitState::Skipped,
            "finished" => WaitState::Finished,
            _ => return None,
        })
    }

    /// Whether a task that ended in `state` satisfies this wait.
    pub fn matches(self, state: TaskState) -> bool {
        match self {
            WaitState::Finished => state.is_terminal(),
            WaitState::Succeeded => state == TaskState::Succeeded,
            WaitState::Failed => state == TaskState::Failed,
            WaitState::Timeout => state == TaskState::Timeout,
            WaitState::Cancelled => state == TaskState::Cancelled,
            WaitState::Skipped => state == TaskState::Skipped,
        }
    }
}

/// A parsed `waitOn`: every entry of `all` must hold, and, when `any` is non-empty, at
/// least one of its entries too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitOn {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<(String, Vec<WaitState>)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<(String, Vec<WaitState>)>,
}

impl WaitOn {
    /// Every label this wait names.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.all
            .iter()
            .chain(self.any.iter())
            .map(|(l, _)| l.as_str())
    }

    /// The wait as a graph writes it: `{label: state}`, a list where an entry accepts
    /// several states, and the `any` entries under `anyOf`. Parsing this gives the same
    /// wait back.
    pub fn to_graph_form(&self) -> Map<String, Value> {
        fn entries(list: &[(String, Vec<WaitState>)]) -> Map<String, Value> {
            list.iter()
                .map(|(label, states)| {
                    let v = match states.as_slice() {
                        [one] => Value::from(one.as_str()),
                        many => many.iter().map(|s| Value::from(s.as_str())).collect(),
                    };
                    (label.clone(), v)
                })
                .collect()
        }
        let mut out = entries(&self.all);
        if !self.any.is_empty() {
            out.insert("anyOf".to_owned(), Value::Object(entries(&self.any)));
        }
        out
    }

    /// Whether some entry naming `label` accepts `state` (so a failure of `label` in that
    /// state is handled by the task that waits).
    pub fn accepts(&self, label: &str, state: TaskState) -> bool {
        self.all
            .iter()
            .chain(self.any.iter())
            .any(|(l, states)| l == label && states.iter().any(|w| w.matches(state)))
    }

    /// Decides readiness given the current states of the tasks named.
    pub fn decide(&self, state_of: impl Fn(&str) -> TaskState) -> Readiness {
        let mut waiting = false;
        for (label, states) in &self.all {
            let st = state_of(label);
            if !st.is_terminal() {
                waiting = true;
            } else if !states.iter().any(|w| w.matches(st)) {
                return Readiness::Never;
            }
        }
        if !self.any.is_empty() {
            let mut any_open = false;
            let mut any_met = false;
            for (label, states) in &self.any {
                let st = state_of(label);
                if !st.is_terminal() {
                    any_open = true;
                } else if states.iter().any(|w| w.matches(st)) {
                    any_met = true;
                }
            }
            if !any_met {
                return if any_open {
                    Readiness::Waiting
                } else {
                    Readiness::Never
                };
            }
        }
        if waiting {
            Readiness::Waiting
        } else {
            Readiness::Ready
        }
    }
}

/// Whether a pending task may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Waiting,
    /// The wait can no longer be satisfied: the task ends `skipped`.
    Never,
}

/// The longest id (node id, graph or task definition name).
pub const MAX_ID_LEN: usize = 128;

/// Checks an id against the one grammar every id keeps — node ids and the injectable names
/// of graphs and task definitions: 1 to 128 characters from `A-Z a-z 0-9 . _ - : @`, not
/// starting with a dot. Ids never hold `/`, so store keys built from them (`{node}/{source}`)
/// cannot collide, nor a path separator, a control character or whitespace.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_ID_LEN} are allowed",
            id.len()
        ));
    }
    if id.starts_with('.') {
        return Err("must not start with a dot".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(format!(
            "holds {c:?}; ids use only letters, digits and . _ - : @"
        ));
    }
    Ok(())
}

/// The longest duration accepted anywhere — a task or graph timeout, a sleep, any duration
/// option: 30 days. Longer values are refused when a graph is stored and when it is run,
/// naming the field, so that no deadline arithmetic can overflow.
pub const MAX_DURATION_MS: u64 = 30 * 24 * 3_600_000;

/// The most retries a task may ask for (`retries.max`).
pub const MAX_RETRIES: u32 = 100;

/// Checks a duration in milliseconds against [`MAX_DURATION_MS`].
pub fn bounded_ms(ms: u64, shown: &dyn std::fmt::Display) -> Result<Duration, String> {
    if ms > MAX_DURATION_MS {
        return Err(format!(
            "duration {shown} is longer than the maximum of 30 days"
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// Parses a duration: `"250ms"`, `"2s"`, `"1.5s"`, `"30m"`, `"1h"`, `"1d"`, combinations such
/// as `"1h30m"`, or a bare number of milliseconds.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u64>() {
            Ok(ms) => bounded_ms(ms, &format_args!("{input:?}")),
            Err(_) => Err(format!(
                "duration {input:?} is longer than the maximum of 30 days"
            )),
        };
    }
    let bad = || format!("unparsable duration {input:?} (expected e.g. 250ms, 2s, 30m, 1h)");
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        if num_end == 0 {
            return Err(bad());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let factor_ms = match &rest[..unit_end] {
            "ms" => 1.0,
            "s" => 1_000.0,
            "m" => 60_000.0,
            "h" => 3_600_000.0,
            "d" => 86_400_000.0,
            _ => return Err(bad()),
        };
        total += n * factor_ms;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > MAX_DURATION_MS as f64 {
        return Err(format!(
            "duration {input:?} is longer than the maximum of 30 days"
        ));
    }
    Ok(Duration::from_millis(total.round() as u64))
}

/// A definition read from a file: a graph or a task definition.
#[derive(Debug, Clone, PartialEq)]
pub enum Definition {
    Graph(GraphDefinition),
    Task(TaskDefinition),
}

/// Options given when a graph is run: `defaults` and per-label layers.
pub type RunOptions = BTreeMap<String, Map<String, Value>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("250ms", Some(250)),
            ("2s", Some(2_000)),
            ("1.5s", Some(1_500)),
            ("30m", Some(1_800_000)),
            ("1h30m", Some(5_400_000)),
            ("1200", Some(1_200)),
            ("", None),
            ("s", None),
            ("2 parsecs", None),
            ("-1s", None),
            ("1e400s", None),
        ];
        for (input, want) in cases {
            let got = parse_duration(input).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn waits_read_back_as_graphs_write_them() {
        let w = WaitOn {
            all: vec![
                ("a".into(), vec![WaitState::Succeeded]),
                ("b".into(), vec![WaitState::Failed, WaitState::Timeout]),
            ],
            any: vec![("c".into(), vec![WaitState::Finished])],
        };
        assert_eq!(
            Value::Object(w.to_graph_form()),
            serde_json::json!({"a": "succeeded", "b": ["failed", "timeout"], "anyOf": {"c": "finished"}})
        );
        assert!(WaitOn::default().to_graph_form().is_empty());
    }

    #[test]
    fn wait_on_decisions() {
        use TaskState::*;
        let w = WaitOn {
            all: vec![("a".into(), vec![WaitState::Succeeded])],
            any: vec![
                ("b".into(), vec![WaitState::Failed]),
                ("c".into(), vec![WaitState::Finished]),
            ],
        };
        let st = |a, b, c| {
            move |l: &str| match l {
                "a" => a,
                "b" => b,
                _ => c,
            }
        };
        assert_eq!(w.decide(st(Pending, Pending, Pending)), Readiness::Waiting);
        assert_eq!(
            w.decide(st(Succeeded, Pending, Pending)),
            Readiness::Waiting
        );
        assert_eq!(
            w.decide(st(Succeeded, Succeeded, Pending)),
            Readiness::Waiting
        );
        assert_eq!(w.decide(st(Succeeded, Failed, Pending)), Readiness::Ready);
        assert_eq!(
            w.decide(st(Succeeded, Succeeded, Skipped)),
            Readiness::Ready
        );
        assert_eq!(w.decide(st(Failed, Failed, Skipped)), Readiness::Never);
        assert!(w.accepts("b", Failed));
        assert!(!w.accepts("b", Timeout));
        assert!(w.accepts("c", Timeout));
    }
}
