//! Rerunning a failed or cancelled workflow from where it stopped: which workflows may be
//! rerun, the rerun's options, and which tasks it takes over as already succeeded.
//!
//! A rerun is an ordinary new workflow: `Engine::rerun` plans it afresh from the same graph
//! and creates it in the same one commit as any run (node lock included), with `rerunOf`
//! naming the old workflow, which is left as it was. The tasks it takes over are created
//! `succeeded` with their old output, attempts and times, so the scheduler needs no rule of
//! its own for them: like any succeeded task, they make their dependants ready and their
//! outputs are in the context. Every other task runs again.

use std::collections::HashMap;

use crate::definitions::Plan;
use crate::error::Error;
use crate::model::{RunOptions, TaskState, WorkflowStatus};
use crate::workflow::{TaskRecord, WorkflowRecord};

/// Refuses a rerun of a workflow that is not failed or cancelled, or that is a subgraph
/// (its parent's rerun starts a new one where it is needed).
pub(crate) fn check(rec: &WorkflowRecord) -> Result<(), Error> {
    let id = &rec.id;
    if let Some(p) = &rec.parent {
        return Err(Error::Conflict(format!(
            "workflow {id} is a subgraph of workflow {}: rerun that one, which starts this \
             graph again if its task failed",
            p.workflow_id
        )));
    }
    match rec.status {
        WorkflowStatus::Failed | WorkflowStatus::Cancelled => Ok(()),
        WorkflowStatus::Succeeded => Err(Error::Conflict(format!(
            "workflow {id} succeeded: only a failed or cancelled workflow can be rerun"
        ))),
        s @ (WorkflowStatus::Pending | WorkflowStatus::Running) => Err(Error::Conflict(format!(
            "workflow {id} is still {s}: only a failed or cancelled workflow can be rerun \
             (cancel it first)"
        ))),
    }
}

/// The rerun's options: the old run's layers with `overrides` merged in key by key, a
/// value given in a layer replacing that layer's value, as run options are layered over a
/// graph's.
pub(crate) fn options(old: &RunOptions, overrides: RunOptions) -> RunOptions {
    let mut out = old.clone();
    for (layer, values) in overrides {
        out.entry(layer).or_default().extend(values);
    }
    out
}

/// Replaces each record in `tasks` (the new workflow's fresh records, in the order of
/// `plan`) that the rerun takes over from the old workflow by a succeeded record with the
/// old one's output, attempts and times (and the new record's id and token).
///
/// A task is taken over when the old workflow has a task of the same label, task name, job
/// and `waitOn` that succeeded, and every task it waits on is taken over too. The second
/// rule makes a task that ran after one that now runs again (a cleanup waiting on
/// `finished`, a handler waiting on `failed`) run again after it; both keep a graph changed
/// since the old run from pairing a success with a different task.
pub(crate) fn take_over(
    old: &WorkflowRecord,
    old_tasks: &[TaskRecord],
    plan: &Plan,
    tasks: &mut [TaskRecord],
) {
    let old_index: HashMap<&str, usize> = old
        .plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.label.as_str(), i))
        .collect();
    let mut from: Vec<Option<usize>> = plan
        .tasks
        .iter()
        .map(|t| {
            let &i = old_index.get(t.label.as_str())?;
            let (was, rec) = (&old.plan.tasks[i], &old_tasks[i]);
            let same = was.task_name == t.task_name && was.job == t.job && was.wait_on == t.wait_on;
            (same && rec.state == TaskState::Succeeded).then_some(i)
        })
        .collect();
    let new_index: HashMap<&str, usize> = plan
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.label.as_str(), i))
        .collect();
    // Drop tasks that wait on one that is not taken over, until none is left to drop.
    loop {
        let dropped: Vec<usize> = (0..plan.tasks.len())
            .filter(|&i| from[i].is_some())
            .filter(|&i| {
                plan.tasks[i]
                    .wait_on
                    .labels()
                    .any(|l| new_index.get(l).is_none_or(|&j| from[j].is_none()))
            })
            .collect();
        if dropped.is_empty() {
            break;
        }
        for i in dropped {
            from[i] = None;
        }
    }
    for (t, from) in tasks.iter_mut().zip(from) {
        if let Some(i) = from {
            let was = &old_tasks[i];
            t.state = TaskState::Succeeded;
            t.attempts = was.attempts;
            t.failures = was.failures;
            t.output = was.output.clone();
            t.started_at = was.started_at;
            t.finished_at = was.finished_at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definitions::PlannedTask;
    use crate::model::{WaitOn, WaitState};
    use serde_json::json;
    use std::sync::Arc;

    fn task(label: &str, waits: &[(&str, WaitState)]) -> PlannedTask {
        PlannedTask {
            wait_on: WaitOn {
                all: waits
                    .iter()
                    .map(|(l, s)| ((*l).to_owned(), vec![*s]))
                    .collect(),
                any: Vec::new(),
            },
            ..PlannedTask::noop(label)
        }
    }

    fn plan(tasks: Vec<PlannedTask>) -> Plan {
        Plan {
            graph: "G".into(),
            tasks: tasks.into(),
            timeout_ms: None,
            id: None,
        }
    }

    fn old(plan: Plan, states: &[TaskState]) -> (WorkflowRecord, Vec<TaskRecord>) {
        let rec: WorkflowRecord = serde_json::from_value(json!({
            "id": "old", "plan": plan, "status": "failed", "createdAt": 1,
        }))
        .unwrap();
        let tasks = states
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut t = TaskRecord::new(format!("old.{i}"), "t".into());
                t.state = *s;
                t.attempts = 1;
                t.started_at = Some(10 + i as u64);
                if *s == TaskState::Succeeded {
                    t.output = Some(Box::new(json!({"i": i})));
                }
                t
            })
            .collect();
        (rec, tasks)
    }

    /// The labels taken over when `new` reruns `old_plan` whose tasks ended in `states`.
    fn taken(old_plan: Plan, states: &[TaskState], new: &Plan) -> Vec<String> {
        let (rec, old_tasks) = old(old_plan, states);
        let mut tasks: Vec<TaskRecord> = (0..new.tasks.len())
            .map(|i| TaskRecord::new(format!("new.{i}"), "n".into()))
            .collect();
        take_over(&rec, &old_tasks, new, &mut tasks);
        new.tasks
            .iter()
            .zip(&tasks)
            .filter(|(_, t)| t.state == TaskState::Succeeded)
            .map(|(p, t)| {
                let i = rec
                    .plan
                    .tasks
                    .iter()
                    .position(|o| o.label == p.label)
                    .unwrap();
                assert_eq!(t.output, old_tasks[i].output, "{}", p.label);
                assert_eq!(t.started_at, old_tasks[i].started_at, "{}", p.label);
                assert!(t.id.starts_with("new."), "the new record's id is kept");
                p.label.clone()
            })
            .collect()
    }

    use TaskState::{Cancelled, Failed, Skipped, Succeeded};
    use WaitState::{Finished, Succeeded as Ok_};

    fn chain() -> Plan {
        plan(vec![
            task("a", &[]),
            task("b", &[("a", Ok_)]),
            task("c", &[("b", Ok_)]),
            task("d", &[("c", Ok_)]),
            task("e", &[("d", Ok_)]),
        ])
    }

    #[test]
    fn succeeded_tasks_before_the_failure_are_taken_over() {
        let states = [Succeeded, Succeeded, Failed, Skipped, Skipped];
        assert_eq!(taken(chain(), &states, &chain()), ["a", "b"]);
    }

    #[test]
    fn a_task_that_waits_on_one_that_runs_again_runs_again() {
        // `cleanup` ran after `work` failed; `work` runs again, so `cleanup` runs after it.
        let p = plan(vec![
            task("setup", &[]),
            task("work", &[("setup", Ok_)]),
            task("cleanup", &[("work", Finished)]),
            task("side", &[]),
        ]);
        let states = [Succeeded, Failed, Succeeded, Cancelled];
        assert_eq!(taken(p.clone(), &states, &p), ["setup"]);
    }

    #[test]
    fn a_changed_graph_keeps_only_what_still_matches() {
        let states = [Succeeded, Succeeded, Failed, Skipped, Skipped];
        // `b` now runs another task: it and what follows it run again.
        let mut changed = chain();
        Arc::make_mut(&mut changed.tasks)[1].task_name = "Task.Other".into();
        assert_eq!(taken(chain(), &states, &changed), ["a"]);
        // `b` now waits on a new task `x`: it runs again.
        let mut changed = chain();
        let tasks = Arc::make_mut(&mut changed.tasks);
        tasks.push(task("x", &[]));
        tasks[1] = task("b", &[("a", Ok_), ("x", Ok_)]);
        assert_eq!(taken(chain(), &states, &changed), ["a"]);
        // `a` is gone: `b` waits on nothing now, which is another wait.
        let mut changed = chain();
        let tasks = Arc::make_mut(&mut changed.tasks);
        tasks.remove(0);
        tasks[0] = task("b", &[]);
        assert_eq!(taken(chain(), &states, &changed), Vec::<String>::new());
    }

    #[test]
    fn only_failed_or_cancelled_top_level_workflows_are_rerun() {
        let (mut rec, _) = old(chain(), &[]);
        for (status, ok) in [
            (WorkflowStatus::Failed, true),
            (WorkflowStatus::Cancelled, true),
            (WorkflowStatus::Succeeded, false),
            (WorkflowStatus::Running, false),
            (WorkflowStatus::Pending, false),
        ] {
            rec.status = status;
            assert_eq!(check(&rec).is_ok(), ok, "{status}");
        }
        rec.status = WorkflowStatus::Failed;
        rec.parent = Some(crate::workflow::ParentRef {
            workflow_id: "p".into(),
            task_id: "p.0".into(),
        });
        let e = check(&rec).unwrap_err().to_string();
        assert!(e.contains("subgraph of workflow p"), "{e}");
    }

    #[test]
    fn overrides_replace_keys_within_their_layer() {
        let old: RunOptions = serde_json::from_value(json!({
            "defaults": {"a": 1, "b": 2}, "x": {"c": 3}
        }))
        .unwrap();
        let over: RunOptions =
            serde_json::from_value(json!({"defaults": {"b": 20}, "y": {"d": 4}})).unwrap();
        assert_eq!(
            serde_json::to_value(options(&old, over)).unwrap(),
            json!({"defaults": {"a": 1, "b": 20}, "x": {"c": 3}, "y": {"d": 4}})
        );
    }
}
