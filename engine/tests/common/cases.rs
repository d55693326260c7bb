//! The scheduling rules of DESIGN.md section 2 as data: one graph per rule, with the
//! expected final state of every task and of the workflow. `semantics.rs` runs them through
//! the whole engine, `core.rs` through the scheduler's core alone.

use metalgraph_engine::WorkflowStatus;
use serde_json::json;

pub struct Case {
    pub name: &'static str,
    pub graph: &'static str,
    pub options: serde_json::Value,
    pub status: WorkflowStatus,
    pub states: &'static str,
}

pub fn cases() -> Vec<Case> {
    use WorkflowStatus::*;
    vec![
        Case {
            name: "chain",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Noop, waitOn: {b: succeeded}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=succeeded b=succeeded c=succeeded",
        },
        Case {
            name: "waitOn AND needs every key",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Fail, ignoreFailure: true}
  - {label: c, taskName: Task.Noop, waitOn: {a: succeeded, b: succeeded}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=succeeded b=failed c=skipped",
        },
        Case {
            name: "a list of states means any of them",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail}
  - {label: b, taskName: Task.Noop, waitOn: {a: [failed, timeout]}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=failed b=succeeded",
        },
        Case {
            name: "anyOf needs one key",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail, ignoreFailure: true}
  - {label: b, taskName: Task.Noop}
  - {label: c, taskName: Task.Noop, waitOn: {anyOf: {a: succeeded, b: succeeded}}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=failed b=succeeded c=succeeded",
        },
        Case {
            name: "anyOf that can no longer hold skips",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail, ignoreFailure: true}
  - {label: b, taskName: Task.Fail, ignoreFailure: true}
  - {label: c, taskName: Task.Noop, waitOn: {anyOf: {a: succeeded, b: succeeded}}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=failed b=failed c=skipped",
        },
        Case {
            name: "an unmet wait skips, and skips propagate",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: on-failure, taskName: Task.Noop, waitOn: {a: failed}}
  - {label: after, taskName: Task.Noop, waitOn: {on-failure: succeeded}}
  - {label: always, taskName: Task.Noop, waitOn: {on-failure: finished}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=succeeded on-failure=skipped after=skipped always=succeeded",
        },
        Case {
            name: "ignoreFailure handles a failure",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail, ignoreFailure: true}
  - {label: b, taskName: Task.Noop, waitOn: {a: finished}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=failed b=succeeded",
        },
        Case {
            name: "a waiter on failed handles the failure",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail}
  - {label: cleanup, taskName: Task.Noop, waitOn: {a: failed}}
  - {label: next, taskName: Task.Noop, waitOn: {a: succeeded}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=failed cleanup=succeeded next=skipped",
        },
        Case {
            name: "an unhandled failure fails fast",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Fail}
  - {label: slow, taskName: Task.Hang}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Noop, waitOn: {slow: succeeded}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=failed slow=cancelled b=skipped c=skipped",
        },
        Case {
            name: "a timeout is a failure",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Hang, timeout: 2s}
  - {label: b, taskName: Task.Noop, waitOn: {a: succeeded}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=timeout b=skipped",
        },
        Case {
            name: "RackHD's _taskTimeout is honoured and a waiter on timeout handles it",
            graph: r#"
injectableName: G
options: {a: {_taskTimeout: 1500}}
tasks:
  - {label: a, taskName: Task.Hang}
  - {label: b, taskName: Task.Noop, waitOn: {a: timeout}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=timeout b=succeeded",
        },
        Case {
            name: "retries until success",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Flaky, optionOverrides: {failTimes: 2}, retries: {max: 2, backoff: 1s}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=succeeded",
        },
        Case {
            name: "retries run out",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Flaky, optionOverrides: {failTimes: 3}, retries: {max: 2, backoff: 100ms}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=failed",
        },
        Case {
            name: "outputs feed later tasks' templates",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {value: hello}}
  - {label: b, taskName: Task.Echo, optionOverrides: {got: "{{ context.a.value }}-{{ task.label }}"}, waitOn: {a: succeeded}}
  - {label: check, taskName: Task.Echo, optionOverrides: {count: "{{ context.b.got | length }}"}, waitOn: {b: succeeded}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "a=succeeded b=succeeded check=succeeded",
        },
        Case {
            name: "an undefined template variable fails the task",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {got: "{{ context.nothing.here }}"}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=failed",
        },
        Case {
            name: "a rendered value of the wrong type fails the task",
            graph: r#"
injectableName: G
tasks:
  - {label: a, taskName: Task.Echo, optionOverrides: {count: "{{ 'many' }}"}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=failed",
        },
        Case {
            name: "a subgraph's outcome is the task's",
            graph: r#"
injectableName: G
tasks:
  - {label: ok, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Ok}}
  - {label: bad, taskName: Task.Graph.Run, optionOverrides: {graphName: Sub.Fail}, waitOn: {ok: succeeded}}
  - {label: after, taskName: Task.Noop, waitOn: {bad: failed}}
"#,
            options: json!({}),
            status: Succeeded,
            states: "ok=succeeded bad=failed after=succeeded",
        },
        Case {
            name: "the graph's deadline fails the workflow",
            graph: r#"
injectableName: G
timeout: 3s
tasks:
  - {label: a, taskName: Task.Noop}
  - {label: b, taskName: Task.Hang, waitOn: {a: succeeded}}
  - {label: c, taskName: Task.Noop, waitOn: {b: succeeded}}
"#,
            options: json!({}),
            status: Failed,
            states: "a=succeeded b=cancelled c=skipped",
        },
    ]
}

pub const SUBGRAPHS: &[&str] = &[
    "{injectableName: Sub.Ok, tasks: [{label: x, taskName: Task.Noop}, {label: y, taskName: Task.Sleep, waitOn: {x: succeeded}}]}",
    "{injectableName: Sub.Fail, tasks: [{label: x, taskName: Task.Fail}]}",
];
