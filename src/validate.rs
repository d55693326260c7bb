//! `metalgraph validate FILE...`: checks definition files offline, exactly as the API would
//! when they are stored, against the shipped library plus the files given (a graph may use
//! a task defined in another of the files).

use metalgraph_engine::definitions;
use metalgraph_engine::model::Definition;
use metalgraph_engine::{JobRegistry, Library, Problem};

/// One file's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub file: String,
    /// Empty when the file is valid.
    pub problems: Vec<Problem>,
    /// What is accepted but probably not meant (option layers that name no task label).
    pub warnings: Vec<String>,
}

/// Validates `(file name, text)` pairs. Task definitions given in the files shadow library
/// ones of the same name, as stored definitions do on a server.
pub fn validate(files: &[(String, String)], library: &Library, jobs: &JobRegistry) -> Vec<Report> {
    let parsed: Vec<(&str, Result<Vec<Definition>, Problem>)> = files
        .iter()
        .map(|(name, text)| (name.as_str(), definitions::parse(text, name)))
        .collect();

    let mut lookup = library.clone();
    for (_, defs) in &parsed {
        for def in defs.iter().flatten() {
            if let Definition::Task(t) = def {
                lookup.add(Definition::Task(t.clone()));
            }
        }
    }
    parsed
        .into_iter()
        .map(|(file, defs)| {
            let problems = match &defs {
                Err(p) => vec![p.clone()],
                Ok(defs) => defs
                    .iter()
                    .flat_map(|def| {
                        let result = match def {
                            Definition::Task(t) => definitions::validate_task(t, jobs).map(|_| ()),
                            Definition::Graph(g) => definitions::check_task_count(
                                g,
                                definitions::DEFAULT_MAX_TASKS_PER_GRAPH,
                            )
                            .and_then(|()| definitions::resolve(g, &lookup, jobs, None))
                            .map(|_| ()),
                        };
                        result.err().map(|ps| ps.0).unwrap_or_default()
                    })
                    .map(|p| if p.file.is_none() { p.in_file(file) } else { p })
                    .collect(),
            };
            let warnings = match defs {
                Ok(defs) => defs
                    .iter()
                    .flat_map(|def| match def {
                        Definition::Graph(g) => definitions::ignored_option_keys(g, None),
                        Definition::Task(_) => Vec::new(),
                    })
                    .collect(),
                Err(_) => Vec::new(),
            };
            Report {
                file: file.to_owned(),
                problems,
                warnings,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)]) -> Vec<(String, Vec<String>)> {
        let files: Vec<(String, String)> = files
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect();
        let library = crate::library::library().expect("the library loads");
        validate(&files, &library, &crate::server::jobs())
            .into_iter()
            .map(|r| (r.file, r.problems.iter().map(ToString::to_string).collect()))
            .collect()
    }

    #[test]
    fn graphs_may_use_tasks_from_other_files() {
        let task =
            "injectableName: Task.Test.Nap\nimplementsTask: sleep\noptions: {duration: 10ms}\n";
        let graph =
            "injectableName: Graph.Test.Nap\ntasks:\n  - label: nap\n    taskName: Task.Test.Nap\n";
        let got = check(&[("nap-task.yaml", task), ("nap-graph.yaml", graph)]);
        assert_eq!(
            got,
            vec![
                ("nap-task.yaml".to_owned(), vec![]),
                ("nap-graph.yaml".to_owned(), vec![])
            ]
        );
    }

    #[test]
    fn an_option_layer_naming_no_task_is_a_warning_not_a_problem() {
        let graph = "injectableName: Graph.Test.Layer\noptions: {napp: {duration: 1s}}\ntasks:\n  - label: nap\n    taskName: Task.Noop\n";
        let files = vec![("g.yaml".to_owned(), graph.to_owned())];
        let library = crate::library::library().expect("the library loads");
        let reports = validate(&files, &library, &crate::server::jobs());
        assert!(reports[0].problems.is_empty(), "{:?}", reports[0].problems);
        assert_eq!(
            reports[0].warnings,
            [
                "graph Graph.Test.Layer: options name 'napp', which is not a task label of this graph; it is ignored"
            ]
        );
    }

    #[test]
    fn problems_name_file_graph_label_and_field() {
        let graph = "injectableName: Graph.Test.Bad\ntasks:\n  - label: a\n    taskName: Task.Nope\n  - label: b\n    taskName: Task.Nope\n    waitOn: {zzz: succeeded}\n";
        let got = check(&[("bad.yaml", graph), ("broken.yaml", "tasks: [")]);
        assert_eq!(got[0].1.len(), 3, "{got:?}");
        assert!(
            got[0]
                .1
                .iter()
                .all(|p| p.starts_with("bad.yaml, graph Graph.Test.Bad, task '")),
            "{got:?}"
        );
        assert!(
            got[0].1.iter().any(|p| p.contains("field 'waitOn.zzz'")),
            "{got:?}"
        );
        assert_eq!(got[1].1.len(), 1);
        assert!(got[1].1[0].starts_with("broken.yaml"), "{got:?}");
    }
}
