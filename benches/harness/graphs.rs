//! The graphs the benchmarks run, built as JSON (which the engine reads as YAML) so that
//! their size is a parameter.

use serde_json::{Value, json};

/// One workflow of `n` sequential `noop` tasks: `t00001` waits on `t00000`, and so on.
pub const CHAIN: &str = "Bench.Chain";
/// A small DAG of `noop` tasks: `first`, then `width` tasks in parallel, then `last`.
pub const FAN_OUT: &str = "Bench.FanOut";
/// A long first task (a one-hour `Task.Wait`), then a `noop`: a workflow that is still
/// unfinished when the server is killed.
pub const RECOVERY: &str = "Bench.Recovery";
/// One `noop` task, the smallest real run, for the API benchmark.
pub const ONE: &str = "Bench.One";

/// The chain graph with `n` tasks.
pub fn chain(n: usize) -> Value {
    let tasks: Vec<Value> = (0..n)
        .map(|i| {
            let mut t = json!({"label": label(i), "taskName": "Task.Noop"});
            if i > 0 {
                t["waitOn"] = json!({ label(i - 1): "succeeded" });
            }
            t
        })
        .collect();
    json!({
        "injectableName": CHAIN,
        "friendlyName": format!("{n} sequential noop tasks"),
        "tasks": tasks,
    })
}

/// The fan-out graph: `first`, `width` parallel tasks waiting on it, and `last` waiting on
/// all of them; `width + 2` tasks in all.
pub fn fan_out(width: usize) -> Value {
    let mut tasks = vec![json!({"label": "first", "taskName": "Task.Noop"})];
    let mut join = serde_json::Map::new();
    for i in 0..width {
        let l = format!("mid{i}");
        tasks.push(json!({"label": l, "taskName": "Task.Noop", "waitOn": {"first": "succeeded"}}));
        join.insert(l, json!("succeeded"));
    }
    tasks.push(json!({"label": "last", "taskName": "Task.Noop", "waitOn": join}));
    json!({
        "injectableName": FAN_OUT,
        "friendlyName": format!("1 -> {width} -> 1 noop tasks"),
        "tasks": tasks,
    })
}

/// The recovery graph: a one-hour wait, then a `noop`.
pub fn recovery() -> Value {
    json!({
        "injectableName": RECOVERY,
        "friendlyName": "a long wait, then a noop",
        "tasks": [
            {"label": "wait", "taskName": "Task.Wait", "optionOverrides": {"duration": "1h"}},
            {"label": "after", "taskName": "Task.Noop", "waitOn": {"wait": "succeeded"}},
        ],
    })
}

/// The one-task graph.
pub fn one() -> Value {
    json!({
        "injectableName": ONE,
        "friendlyName": "one noop task",
        "tasks": [{"label": "only", "taskName": "Task.Noop"}],
    })
}

fn label(i: usize) -> String {
    format!("t{i:05}")
}

/// The shipped library (what `metalgraph serve` runs with) plus the given bench graphs.
pub fn library(graphs: &[Value]) -> anyhow::Result<metalgraph_engine::Library> {
    let mut lib = metalgraph::library::library()?;
    for g in graphs {
        let def = metalgraph_engine::definitions::parse_value(g.clone(), "bench")
            .map_err(|p| anyhow::anyhow!("a bench graph is invalid: {p}"))?;
        lib.add(def);
    }
    Ok(lib)
}
