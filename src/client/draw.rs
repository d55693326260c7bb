//! `graphs get NAME --format dot|mermaid`: a graph definition drawn as its tasks (nodes)
//! and `waitOn` edges, from the task waited on to the task that waits, labelled with the
//! awaited state. DOT goes through `petgraph::dot`; Mermaid (`flowchart TD`) is written here.
//!
//! Labels come from the definition, which anyone allowed to store graphs wrote, so every
//! label is quoted and escaped for its format: node ids are indices, never labels.

use std::fmt::Write as _;

use petgraph::dot::{Config, Dot};
use petgraph::graph::{DiGraph, EdgeReference, NodeIndex};
use serde_json::Value;

/// How to draw a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Drawing {
    /// Graphviz DOT (`dot -Tsvg`).
    Dot,
    /// A Mermaid flowchart (Markdown on GitHub and GitLab renders it).
    Mermaid,
}

/// One `waitOn` entry of a task: the label waited on and the states that satisfy it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    pub label: String,
    pub states: Vec<String>,
    /// Part of `anyOf` (one such entry suffices) rather than required.
    pub any: bool,
}

impl Wait {
    /// `succeeded`, `failed or timeout`, `succeeded (any of)`.
    pub fn describe(&self) -> String {
        let states = self.states.join(" or ");
        if self.any {
            format!("{states} (any of)")
        } else {
            states
        }
    }
}

// petgraph's `Dot` wants `Display` weights even when, as here, the labels are ours (written
// by the attribute getters with our own escaping).
impl std::fmt::Display for Wait {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The `waitOn` entries of a task as the API shows it: `{label: state | [states]}`, and
/// `anyOf: {label: state | [states]}`.
pub fn waits(task: &Value) -> Vec<Wait> {
    let Some(wait_on) = task.get("waitOn").and_then(Value::as_object) else {
        return Vec::new();
    };
    let states = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                .collect(),
            other => vec![other.to_string()],
        }
    };
    let mut out = Vec::new();
    for (key, v) in wait_on {
        match (key.as_str(), v.as_object()) {
            ("anyOf", Some(any)) => out.extend(any.iter().map(|(label, v)| Wait {
                label: label.clone(),
                states: states(v),
                any: true,
            })),
            _ => out.push(Wait {
                label: key.clone(),
                states: states(v),
                any: false,
            }),
        }
    }
    out
}

/// What a graph task runs: its `taskName`, or `inline <job>` for an inline definition.
pub fn task_of(task: &Value) -> String {
    if let Some(name) = task.get("taskName").and_then(Value::as_str) {
        return name.to_owned();
    }
    match task
        .get("taskDefinition")
        .and_then(|d| d.get("implementsTask"))
        .and_then(Value::as_str)
    {
        Some(job) => format!("inline {job}"),
        None => String::new(),
    }
}

/// A task drawn: its label over what it runs.
struct Vertex {
    label: String,
    runs: String,
}

impl std::fmt::Display for Vertex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// The graph's tasks and edges. A `waitOn` naming a label no task has (a stored graph is
/// validated, so only a hand-made answer could) still gets a box, so nothing is dropped.
fn build(graph: &Value) -> DiGraph<Vertex, Wait> {
    let tasks = graph
        .get("tasks")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut g = DiGraph::new();
    let mut index = std::collections::HashMap::new();
    for t in tasks {
        let label = t
            .get("label")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let i = g.add_node(Vertex {
            label: label.clone(),
            runs: task_of(t),
        });
        index.entry(label).or_insert(i);
    }
    for (t, waiting) in tasks.iter().zip(g.node_indices().collect::<Vec<_>>()) {
        for w in waits(t) {
            let from = *index.entry(w.label.clone()).or_insert_with(|| {
                g.add_node(Vertex {
                    label: w.label.clone(),
                    runs: String::new(),
                })
            });
            g.add_edge(from, waiting, w);
        }
    }
    g
}

/// Draws a graph definition (as the API answers it) in the given format.
pub fn draw(graph: &Value, how: Drawing) -> String {
    let g = build(graph);
    match how {
        Drawing::Dot => {
            let edge = |_: &DiGraph<Vertex, Wait>, e: EdgeReference<'_, Wait>| {
                let w = e.weight();
                let style = if w.any { " style = dashed" } else { "" };
                format!("label = {}{style} ", dot_quote(&w.describe()))
            };
            let node = |_: &DiGraph<Vertex, Wait>, (_, b): (NodeIndex, &Vertex)| {
                let text = if b.runs.is_empty() {
                    b.label.clone()
                } else {
                    format!("{}\n{}", b.label, b.runs)
                };
                format!("label = {} shape = box ", dot_quote(&text))
            };
            let dot = Dot::with_attr_getters(
                &g,
                &[Config::NodeNoLabel, Config::EdgeNoLabel],
                &edge,
                &node,
            );
            dot.to_string()
        }
        Drawing::Mermaid => {
            let mut out = String::from("flowchart TD\n");
            for i in g.node_indices() {
                let b = &g[i];
                let mut text = mermaid_text(&b.label);
                if !b.runs.is_empty() {
                    text.push_str("<br/>");
                    text.push_str(&mermaid_text(&b.runs));
                }
                let _ = writeln!(out, "    t{}[\"{text}\"]", i.index());
            }
            for e in g.edge_indices() {
                let (from, to) = g.edge_endpoints(e).expect("the edge exists");
                let w = &g[e];
                let arrow = if w.any { "-.->" } else { "-->" };
                let _ = writeln!(
                    out,
                    "    t{} {arrow}|\"{}\"| t{}",
                    from.index(),
                    mermaid_text(&w.describe()),
                    to.index()
                );
            }
            out
        }
    }
}

/// A DOT quoted string: `"` and `\` escaped, a line break as DOT's centred `\n`, any other
/// control character a space.
pub fn dot_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Text for inside a Mermaid `"..."` label: the characters Mermaid or the HTML it renders
/// to would read (`"`, `#`, `&`, `<`, `>`, a leading backtick's Markdown mode) as entity
/// codes, which Mermaid turns back into the characters; control characters as spaces.
pub fn mermaid_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("#quot;"),
            '#' => out.push_str("#35;"),
            '&' => out.push_str("#amp;"),
            '<' => out.push_str("#lt;"),
            '>' => out.push_str("#gt;"),
            '`' => out.push_str("#96;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn graph() -> Value {
        json!({"injectableName": "G", "tasks": [
            {"label": "first", "taskName": "Task.Noop"},
            {"label": "second", "taskDefinition": {"implementsTask": "sleep"},
             "waitOn": {"first": "succeeded"}},
            {"label": "cleanup", "taskName": "Task.Noop",
             "waitOn": {"second": ["failed", "timeout"], "anyOf": {"first": "finished"}}},
        ]})
    }

    #[test]
    fn dot_has_boxes_and_labelled_edges() {
        assert_eq!(
            draw(&graph(), Drawing::Dot),
            "digraph {\n    \
             0 [ label = \"first\\nTask.Noop\" shape = box ]\n    \
             1 [ label = \"second\\ninline sleep\" shape = box ]\n    \
             2 [ label = \"cleanup\\nTask.Noop\" shape = box ]\n    \
             0 -> 1 [ label = \"succeeded\" ]\n    \
             1 -> 2 [ label = \"failed or timeout\" ]\n    \
             0 -> 2 [ label = \"finished (any of)\" style = dashed ]\n}\n"
        );
    }

    #[test]
    fn mermaid_has_boxes_and_labelled_edges() {
        assert_eq!(
            draw(&graph(), Drawing::Mermaid),
            "flowchart TD\n    \
             t0[\"first<br/>Task.Noop\"]\n    \
             t1[\"second<br/>inline sleep\"]\n    \
             t2[\"cleanup<br/>Task.Noop\"]\n    \
             t0 -->|\"succeeded\"| t1\n    \
             t1 -->|\"failed or timeout\"| t2\n    \
             t0 -.->|\"finished (any of)\"| t2\n"
        );
    }

    #[test]
    fn hostile_labels_stay_inside_their_quotes() {
        assert_eq!(dot_quote("a\"] x -> y [\\"), "\"a\\\"] x -> y [\\\\\"");
        assert_eq!(dot_quote("two\nlines\r"), "\"two\\nlines \"");
        assert_eq!(
            mermaid_text("a\"]-->b[<img src=x>#quot;&`"),
            "a#quot;]--#gt;b[#lt;img src=x#gt;#35;quot;#amp;#96;"
        );
    }
}
