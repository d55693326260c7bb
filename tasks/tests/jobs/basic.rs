//! `noop`, `sleep`, `fail`, `evaluate.condition`, `graph.run` and the registry.

use std::time::Duration;

use metalgraph_engine::{Job, JobRegistry};
use metalgraph_tasks::{EvaluateConditionJob, FailJob, NoopJob, SleepJob, register_basic};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use metalgraph_engine::job::JobServices;

use super::{TestServices, ctx_for, raw_ctx, run};

#[test]
fn register_basic_registers_every_basic_job() {
    let mut reg = JobRegistry::new();
    register_basic(&mut reg);
    let names: Vec<&str> = reg.names().collect();
    assert_eq!(
        names,
        [
            "evaluate.condition",
            "fail",
            "graph.run",
            "http.request",
            "noop",
            "sleep"
        ]
    );
}

#[test]
fn every_option_is_documented() {
    let mut reg = JobRegistry::new();
    register_basic(&mut reg);
    for name in reg.names() {
        let job = reg.get(name).unwrap();
        for (option, spec) in &job.schema().options {
            assert!(
                !spec.doc.trim().is_empty(),
                "{name}.{option} has no doc line"
            );
        }
    }
}

#[tokio::test]
async fn noop_outputs_an_empty_object() {
    assert_eq!(run(&NoopJob::default(), json!({})).await, Ok(json!({})));
}

#[tokio::test(start_paused = true)]
async fn sleep_sleeps_for_the_given_duration() {
    let cases = [
        (json!("250ms"), 250),
        (json!("2s"), 2_000),
        (json!("1m30s"), 90_000),
        (json!(1500), 1_500),
        (json!("0"), 0),
    ];
    for (duration, want_ms) in cases {
        let started = Instant::now();
        let out = run(&SleepJob::default(), json!({ "duration": duration })).await;
        assert_eq!(
            out,
            Ok(json!({ "slept_ms": want_ms })),
            "duration {duration}"
        );
        assert_eq!(
            started.elapsed(),
            Duration::from_millis(want_ms),
            "duration {duration}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn sleep_persists_its_end_and_a_restart_sleeps_only_what_is_left() {
    let job = SleepJob::default();
    let services = std::sync::Arc::new(TestServices::new());
    let mut ctx = ctx_for(&job, json!({ "duration": "30s" }), CancellationToken::new());
    ctx.services = services.clone();
    let t0 = services.now_ms();
    let started = Instant::now();
    job.run(ctx).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(30));
    // The end was recorded before the sleep began.
    let recorded = services.checkpoints.lock().unwrap().clone();
    assert_eq!(recorded, vec![json!({ "endsAt": t0 + 30_000 })]);

    // The engine restarted the attempt 10 s into the sleep: 20 s are left, not 30.
    let services = std::sync::Arc::new(TestServices::new());
    let mut ctx = ctx_for(&job, json!({ "duration": "30s" }), CancellationToken::new());
    ctx.checkpoint = Some(json!({ "endsAt": services.now_ms() + 20_000 }));
    ctx.services = services.clone();
    let started = Instant::now();
    assert_eq!(job.run(ctx).await, Ok(json!({ "slept_ms": 30_000 })));
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    assert!(
        services.checkpoints.lock().unwrap().is_empty(),
        "a resumed sleep records nothing new"
    );
}

#[tokio::test(start_paused = true)]
async fn sleep_returns_promptly_when_cancelled() {
    let job = SleepJob::default();
    let cancel = CancellationToken::new();
    let ctx = ctx_for(&job, json!({ "duration": "1h" }), cancel.clone());
    let started = Instant::now();
    let running = tokio::spawn(job.run(ctx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    let err = running.await.unwrap().unwrap_err();
    assert!(err.message.contains("cancelled"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn sleep_rejects_missing_or_bad_durations() {
    let job = SleepJob::default();
    let cases = [
        (json!({}), "option 'duration' is required"),
        (json!({ "duration": "soon" }), "option 'duration'"),
        (json!({ "duration": -5 }), "option 'duration'"),
    ];
    for (options, want) in cases {
        let err = job
            .run(raw_ctx(options.clone(), CancellationToken::new()))
            .await
            .unwrap_err();
        assert!(err.message.contains(want), "{options}: {err}");
    }
}

#[tokio::test]
async fn fail_fails_with_its_message() {
    let cases = [
        (json!({}), "failed on purpose"),
        (
            json!({ "message": "disk 3 is missing" }),
            "disk 3 is missing",
        ),
    ];
    for (options, want) in cases {
        let err = run(&FailJob::default(), options).await.unwrap_err();
        assert_eq!(err.message, want);
    }
}

#[tokio::test]
async fn evaluate_condition_decides_on_the_rendered_value() {
    // (rendered `when`, Ok(()) for success or Err(fragment of the error)).
    let cases: [(&str, Result<(), &str>); 9] = [
        ("true", Ok(())),
        ("True", Ok(())),
        ("  true\n", Ok(())),
        ("false", Err("condition 'false' is false")),
        ("False", Err("condition 'False' is false")),
        ("", Err("condition '' is false")),
        ("maybe", Err("got 'maybe'")),
        ("none", Err("got 'none'")),
        ("1", Err("got '1'")),
    ];
    for (when, want) in cases {
        let got = run(&EvaluateConditionJob::default(), json!({ "when": when })).await;
        match (want, got) {
            (Ok(()), Ok(out)) => assert_eq!(out, json!({ "result": true }), "when {when:?}"),
            (Err(fragment), Err(e)) => {
                assert!(e.message.contains(fragment), "when {when:?}: {e}");
            }
            (want, got) => panic!("when {when:?}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[tokio::test]
async fn evaluate_condition_requires_when() {
    let err = EvaluateConditionJob::default()
        .run(raw_ctx(json!({}), CancellationToken::new()))
        .await
        .unwrap_err();
    assert!(err.message.contains("'when' is required"), "{err}");
}

#[tokio::test]
async fn graph_run_asks_the_engine_for_the_subgraph() {
    let job = metalgraph_engine::GraphRunJob::default();
    let out = run(
        &job,
        json!({ "graphName": "Graph.Child", "graphOptions": { "defaults": { "a": 1 } } }),
    )
    .await
    .unwrap();
    assert_eq!(
        out,
        json!({ "graphName": "Graph.Child", "options": { "defaults": { "a": 1 } } })
    );
    assert!(!job.occupies_slot());
}
