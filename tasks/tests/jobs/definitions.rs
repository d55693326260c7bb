//! The shipped task definitions in `graphs/tasks/`: each parses, is named after its file,
//! names a registered job and passes that job's schema.

use std::path::PathBuf;

use metalgraph_engine::JobRegistry;
use metalgraph_engine::definitions::{parse, validate_task};
use metalgraph_engine::model::Definition;
use metalgraph_tasks::register_basic;

fn tasks_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../graphs/tasks")
}

#[test]
fn shipped_basic_task_definitions_are_valid() {
    let mut jobs = JobRegistry::new();
    register_basic(&mut jobs);
    // (injectable name, job) for every definition this crate ships.
    let expected = [
        ("Task.Noop", "noop"),
        ("Task.Wait", "sleep"),
        ("Task.Fail", "fail"),
        ("Task.Evaluate.Condition", "evaluate.condition"),
        ("Task.Http.Request", "http.request"),
        ("Task.Graph.Run", "graph.run"),
    ];
    for (name, job) in expected {
        let file = format!("{name}.yaml");
        let path = tasks_dir().join(&file);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let defs = parse(&text, &file).unwrap_or_else(|p| panic!("{file}: {p:?}"));
        let [Definition::Task(def)] = defs.as_slice() else {
            panic!("{file} must hold exactly one task definition");
        };
        assert_eq!(def.injectable_name, name, "{file}");
        assert_eq!(def.implements_task, job, "{file}");
        assert!(def.friendly_name.is_some(), "{file} has no friendlyName");
        if let Err(problems) = validate_task(def, &jobs) {
            panic!("{file}: {problems:?}");
        }
    }
}
