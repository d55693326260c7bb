//! Graph files in, plans or errors out: every validation rule names the graph, the task
//! label and the field at fault.

mod common;

use metalgraph_engine::definitions::{TaskLookup, parse, resolve};
use metalgraph_engine::model::Definition;
use metalgraph_engine::{GraphDefinition, Library};
use std::sync::Arc;

fn check(yaml: &str) -> Result<metalgraph_engine::Plan, String> {
    let probe = Arc::new(common::Probe::default());
    let jobs = common::jobs(&probe);
    let lib = common::library(&[]);
    let defs = parse(yaml, "test.yaml").map_err(|p| p.to_string())?;
    let Definition::Graph(g) = defs.into_iter().next().unwrap() else {
        panic!("not a graph")
    };
    resolve(&g, &lib as &dyn TaskLookup, &jobs, None).map_err(|p| p.to_string())
}

#[test]
fn option_layers_that_name_no_task_are_ignored_with_a_warning_as_rackhd_ignores_them() {
    let yaml = "{injectableName: G, options: {b: {x: 1}, defaults: {y: 2}}, tasks: [{label: a, taskName: Task.Noop}]}";
    let plan = check(yaml).expect("accepted");
    assert_eq!(plan.tasks[0].options.get("x"), None);
    let Definition::Graph(g) = parse(yaml, "t.yaml").unwrap().remove(0) else {
        panic!("not a graph")
    };
    let run: metalgraph_engine::model::RunOptions =
        serde_json::from_value(serde_json::json!({"c": {}, "a": {}})).unwrap();
    assert_eq!(
        metalgraph_engine::definitions::ignored_option_keys(&g, Some(&run)),
        [
            "graph G: options name 'b', which is not a task label of this graph; it is ignored",
            "graph G: the run options name 'c', which is not a task label of this graph; it is ignored",
        ]
    );
}

#[test]
fn invalid_graphs_are_named_precisely() {
    let cases: &[(&str, &str)] = &[
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop}, {label: a, taskName: Task.Noop}]}",
            "graph G, task 'a', field 'label': duplicate label 'a'",
        ),
        (
            "{injectableName: G, tasks: [{label: defaults, taskName: Task.Noop}]}",
            "graph G, task 'defaults', field 'label': label 'defaults' is reserved",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, waitOn: {b: succeeded}}]}",
            "graph G, task 'a', field 'waitOn.b': waits on unknown label 'b'",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop}, {label: b, taskName: Task.Noop, waitOn: {a: done}}]}",
            "graph G, task 'b', field 'waitOn.a': unknown state \"done\"",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, waitOn: {a: succeeded}}]}",
            "task waits on itself",
        ),
        (
            r#"{injectableName: G, tasks: [
                {label: a, taskName: Task.Noop, waitOn: {c: succeeded}},
                {label: b, taskName: Task.Noop, waitOn: {a: succeeded}},
                {label: c, taskName: Task.Noop, waitOn: {b: finished}}]}"#,
            "graph G, task 'a', field 'waitOn': waitOn forms a cycle: a -> b -> c -> a",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, taskDefinition: {implementsTask: noop}}]}",
            "graph G, task 'a', field 'taskName': give exactly one of taskName and taskDefinition, not both",
        ),
        (
            "{injectableName: G, tasks: [{label: a}]}",
            "graph G, task 'a', field 'taskName': give exactly one of taskName and taskDefinition",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Nope}]}",
            "graph G, task 'a', field 'taskName': unknown task Task.Nope",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskDefinition: {implementsTask: no.such.job}}]}",
            "field 'implementsTask': task (inline) implements unknown job no.such.job",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: forever}}]}",
            "graph G, task 'a', field 'options.duration': option unparsable duration \"forever\"",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Echo, optionOverrides: {count: three}}]}",
            "graph G, task 'a', field 'options.count': option must be an integer, got a string",
        ),
        (
            "{injectableName: G, options: {defaults: {count: 1.5}}, tasks: [{label: a, taskName: Task.Echo}]}",
            "field 'options.count': option must be an integer, got a number",
        ),
        // A value of the wrong type is described, never echoed: it may be a secret.
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Echo, optionOverrides: {count: hunter2-secret}}]}",
            "field 'options.count': option must be an integer, got a string",
        ),
        // Every duration, timeout, backoff and retry count has an upper bound.
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: \"99999999999999999999\"}}]}",
            "graph G, task 'a', field 'options.duration': option duration \"99999999999999999999\" is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: 18446744073709551615}}]}",
            "field 'options.duration': option duration 18446744073709551615 is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Sleep, optionOverrides: {duration: 31d}}]}",
            "field 'options.duration': option duration \"31d\" is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, timeout: 18446744073709551615}]}",
            "graph G, task 'a', field 'timeout': duration 18446744073709551615 is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, options: {a: {_taskTimeout: 18446744073709551615}}, tasks: [{label: a, taskName: Task.Noop}]}",
            "graph G, task 'a', field 'options._taskTimeout': _taskTimeout must be whole milliseconds of at most 30 days",
        ),
        (
            "{injectableName: G, options: {a: {_taskTimeout: 2592000001}}, tasks: [{label: a, taskName: Task.Noop}]}",
            "graph G, task 'a', field 'options._taskTimeout': duration 2592000001 is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, options: {a: {_taskTimeout: 1.0e300}}, tasks: [{label: a, taskName: Task.Noop}]}",
            "field 'options._taskTimeout': _taskTimeout must be whole milliseconds of at most 30 days",
        ),
        (
            "{injectableName: G, timeout: 100000d, tasks: [{label: a, taskName: Task.Noop}]}",
            "graph G, field 'timeout': duration \"100000d\" is longer than the maximum of 30 days",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, retries: {max: 2, backoff: 1h}}]}",
            "graph G, task 'a', field 'retries.backoff': the backoff must be at most 5m",
        ),
        (
            "{injectableName: G, options: {a: {_taskTimeout: -5}}, tasks: [{label: a, taskName: Task.Noop}]}",
            "field 'options._taskTimeout': _taskTimeout must be whole milliseconds, or -1 for no timeout",
        ),
        (
            "{injectableName: G, options: {a: {_taskTimeout: -2.5}}, tasks: [{label: a, taskName: Task.Noop}]}",
            "field 'options._taskTimeout': _taskTimeout must be whole milliseconds of at most 30 days",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, retries: {max: 5, backoff: 0s}}]}",
            "graph G, task 'a', field 'retries.backoff': the backoff must be at least 100ms",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, retries: {max: 4000000000}}]}",
            "graph G, task 'a', field 'retries.max': at most 100 retries are allowed, got 4000000000",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, retries: {max: 2, backoff: soon}}]}",
            "graph G, task 'a', field 'retries.backoff': unparsable duration \"soon\"",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, timeout: 5 minutes}]}",
            "graph G, task 'a', field 'timeout': unparsable duration \"5 minutes\"",
        ),
        (
            "{injectableName: G, timeout: later, tasks: [{label: a, taskName: Task.Noop}]}",
            "graph G, field 'timeout': unparsable duration \"later\"",
        ),
        (
            "{injectableName: G, options: {a: [1]}, tasks: [{label: a, taskName: Task.Noop}]}",
            "graph G, field 'options.a': must be a mapping",
        ),
        (
            "{injectableName: G, tasks: [{label: a, taskName: Task.Noop, waitOn: {anyOf: {}}}]}",
            "field 'waitOn.anyOf': anyOf is empty",
        ),
        (
            "{injectableName: G, tasks: []}",
            "graph G, field 'tasks': graph has no tasks",
        ),
    ];
    let mut bad = Vec::new();
    for (yaml, want) in cases {
        match check(yaml) {
            Ok(_) => bad.push(format!("{yaml}\n  accepted; expected: {want}")),
            Err(got) if !got.contains(want) => {
                bad.push(format!("{yaml}\n  got:      {got}\n  expected: {want}"))
            }
            Err(_) => {}
        }
    }
    assert!(bad.is_empty(), "\n{}", bad.join("\n"));
}

#[test]
fn unparsable_files_name_the_file() {
    let cases: &[(&str, &str)] = &[
        ("tasks: [unclosed", "test.yaml: not valid YAML or JSON"),
        ("just a string", "test.yaml: a definition must be a mapping"),
        ("{friendlyName: x}", "neither a graph"),
        (
            "{injectableName: G, tasks: {a: 1}}",
            "test.yaml, graph G: invalid type",
        ),
        ("", "test.yaml: holds no definition"),
    ];
    for (yaml, want) in cases {
        let got = parse(yaml, "test.yaml").unwrap_err().to_string();
        assert!(got.contains(want), "{yaml}: got {got}, expected {want}");
    }
}

/// RackHD's Graph.InstallCentOS, as RackHD ships it (JSON), loads unchanged once its tasks
/// exist.
#[test]
fn a_rackhd_graph_loads_unchanged() {
    let rackhd = r#"{
        "friendlyName": "Install CentOS",
        "injectableName": "Graph.InstallCentOS",
        "options": {
            "defaults": {
                "version": null,
                "repo": "{{file.server}}/Centos/{{options.version}}/os/x86_64",
                "rootPassword": "RackHDRocks!",
                "hostname": "localhost",
                "installDisk": null,
                "kvm": false
            },
            "install-os": {"_taskTimeout": 3600000},
            "validate-ssh": {"retries": 10}
        },
        "tasks": [
            {"label": "set-boot-pxe", "taskName": "Task.Obm.Node.PxeBoot", "ignoreFailure": true},
            {"label": "reboot", "taskName": "Task.Obm.Node.Reboot", "waitOn": {"set-boot-pxe": "finished"}},
            {"label": "install-os", "taskName": "Task.Os.Install.CentOS", "waitOn": {"reboot": "succeeded"}},
            {"label": "validate-ssh", "taskName": "Task.Ssh.Validation", "waitOn": {"install-os": "succeeded"}}
        ]
    }"#;
    let tasks = r#"
- {injectableName: Task.Obm.Node.PxeBoot, implementsTask: noop, options: {action: pxe}, properties: {power: {}}}
- {injectableName: Task.Obm.Node.Reboot, implementsTask: noop, options: {action: reboot}}
- {injectableName: Task.Os.Install.CentOS, implementsTask: echo, options: {profile: install-centos.ipxe}}
- {injectableName: Task.Ssh.Validation, implementsTask: noop}
"#;
    let lib = Library::from_texts([("rackhd-tasks.yaml", tasks), ("rackhd.json", rackhd)]).unwrap();
    let g: &GraphDefinition = &lib.graphs["Graph.InstallCentOS"];
    // Fields round-trip.
    let back = serde_json::to_value(g).unwrap();
    let orig: serde_json::Value = serde_json::from_str(rackhd).unwrap();
    assert_eq!(back, orig);
    let probe = Arc::new(common::Probe::default());
    let plan = resolve(g, &lib, &common::jobs(&probe), None).expect("valid");
    let install = &plan.tasks[2];
    assert_eq!(install.timeout_ms, Some(3_600_000));
    assert_eq!(install.options["profile"], "install-centos.ipxe");
    assert_eq!(plan.tasks[1].wait_on.all[0].0, "set-boot-pxe");
    // Required options surface when it is run without them.
    let run = Default::default();
    let err = resolve(g, &lib, &common::jobs(&probe), Some(&run)).unwrap_err();
    assert!(
        err.to_string().contains("option 'version' is required"),
        "{err}"
    );
}

#[test]
fn json_and_yaml_multi_document_files_load() {
    let yaml = "injectableName: A\ntasks: [{label: a, taskName: Task.Noop}]\n---\ninjectableName: Task.X\nimplementsTask: noop\n";
    let defs = parse(yaml, "multi.yaml").unwrap();
    assert_eq!(defs.len(), 2);
    assert!(matches!(defs[1], Definition::Task(_)));
}
