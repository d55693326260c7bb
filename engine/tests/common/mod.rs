//! Test jobs, a test library and helpers shared by the engine's integration tests.
#![allow(dead_code)]

pub mod cases;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalgraph_engine::clock::{Clock, SystemClock, TokioClock};
use metalgraph_engine::job::{BoxFuture, JobContext, OptionSpec};
use metalgraph_engine::{
    Engine, EngineOptions, GraphRunJob, Job, JobError, JobRegistry, JobResult, Library, OptionKind,
    OptionSchema, RunRequest, WorkflowStatus, WorkflowView,
};
use metalgraph_store::Store;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Counters the test jobs report to.
#[derive(Default)]
pub struct Probe {
    /// Jobs running right now, and the most seen at once.
    pub running: AtomicUsize,
    pub peak: AtomicUsize,
    /// Jobs that saw their cancellation token fire and cleaned up.
    pub cleaned_up: AtomicUsize,
    /// (workflow id, label) of every job run that returned success.
    pub succeeded: Mutex<Vec<(String, String)>>,
}

struct TestJob {
    name: &'static str,
    schema: OptionSchema,
    probe: Arc<Probe>,
}

fn spec(kind: OptionKind, default: Option<Value>) -> OptionSpec {
    OptionSpec {
        kind,
        required: false,
        default,
        doc: "test option",
        secret: false,
    }
}

impl Job for TestJob {
    fn name(&self) -> &'static str {
        self.name
    }

    fn schema(&self) -> &OptionSchema {
        &self.schema
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, JobResult> {
        let name = self.name;
        let probe = self.probe.clone();
        Box::pin(async move {
            let now = probe.running.fetch_add(1, Ordering::SeqCst) + 1;
            probe.peak.fetch_max(now, Ordering::SeqCst);
            let res = run_test_job(name, &ctx, &probe).await;
            probe.running.fetch_sub(1, Ordering::SeqCst);
            if res.is_ok() {
                probe
                    .succeeded
                    .lock()
                    .unwrap()
                    .push((ctx.workflow_id.clone(), ctx.label.clone()));
            }
            res
        })
    }
}

async fn run_test_job(name: &str, ctx: &JobContext, probe: &Probe) -> JobResult {
    match name {
        "noop" => Ok(json!({})),
        "echo" => Ok(Value::Object(ctx.options.clone())),
        "fail" => Err(JobError::new(
            ctx.str_opt("message").unwrap_or("failed on purpose"),
        )),
        "sleep" => {
            let d = ctx.duration_or("duration", Duration::from_secs(1))?;
            tokio::select! {
                _ = tokio::time::sleep(d) => Ok(json!({"sleptMs": d.as_millis() as u64})),
                _ = ctx.cancel.cancelled() => {
                    probe.cleaned_up.fetch_add(1, Ordering::SeqCst);
                    Err(JobError::new("cancelled"))
                }
            }
        }
        "hang" => {
            ctx.cancel.cancelled().await;
            probe.cleaned_up.fetch_add(1, Ordering::SeqCst);
            Err(JobError::new("cancelled"))
        }
        // Fails while fewer than `failTimes` earlier attempts have failed.
        "flaky" => {
            let n = ctx
                .options
                .get("failTimes")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            if u64::from(ctx.retry) < n {
                Err(JobError::new(format!("flaky failure {}", ctx.retry + 1)))
            } else {
                Ok(json!({"attempt": ctx.attempt, "retry": ctx.retry}))
            }
        }
        "panic" => panic!("boom: {}", ctx.label),
        "wait" => ctx.services.wait_notification(ctx).await,
        "login" => Ok(json!({})),
        other => Err(JobError::new(format!("no test job {other}"))),
    }
}

pub fn jobs(probe: &Arc<Probe>) -> JobRegistry {
    let mut reg = JobRegistry::new();
    let mk = |name: &'static str, schema: OptionSchema| TestJob {
        name,
        schema,
        probe: probe.clone(),
    };
    let mut echo = OptionSchema::new();
    echo.options
        .insert("level", spec(OptionKind::String, Some(json!("job"))));
    echo.options
        .insert("count", spec(OptionKind::Integer, None));
    reg.register(mk("noop", OptionSchema::new()));
    reg.register(mk("echo", echo));
    reg.register(mk(
        "fail",
        OptionSchema::new().optional("message", OptionKind::String, None, "why"),
    ));
    reg.register(mk(
        "sleep",
        OptionSchema::new().required("duration", OptionKind::Duration, "how long"),
    ));
    reg.register(mk("hang", OptionSchema::new()));
    reg.register(mk("panic", OptionSchema::new()));
    reg.register(mk("wait", OptionSchema::new()));
    reg.register(mk(
        "login",
        OptionSchema::new()
            .optional(
                "pin",
                OptionKind::String,
                None,
                "a secret with a harmless name",
            )
            .secret("pin"),
    ));
    reg.register(mk(
        "flaky",
        OptionSchema::new().optional("failTimes", OptionKind::Integer, Some(json!(1)), "n"),
    ));
    reg.register(GraphRunJob::default());
    reg
}

pub const TASKS: &str = r#"
- {injectableName: Task.Noop, implementsTask: noop}
- {injectableName: Task.Echo, implementsTask: echo, options: {level: taskdef}}
- {injectableName: Task.Fail, implementsTask: fail}
- {injectableName: Task.Sleep, implementsTask: sleep, options: {duration: 1s}}
- {injectableName: Task.Hang, implementsTask: hang}
- {injectableName: Task.Panic, implementsTask: panic}
- {injectableName: Task.WaitNode, implementsTask: wait}
- {injectableName: Task.Login, implementsTask: login}
- {injectableName: Task.Flaky, implementsTask: flaky}
- {injectableName: Task.Graph.Run, implementsTask: graph.run}
"#;

/// A library of the test task definitions plus the given graphs (YAML documents).
pub fn library(graphs: &[&str]) -> Library {
    let mut files = vec![("tasks.yaml", TASKS)];
    for g in graphs {
        files.push(("graph.yaml", g));
    }
    Library::from_texts(files).expect("test library parses")
}

pub struct Harness {
    pub engine: Engine,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<Result<(), metalgraph_engine::Error>>,
    pub probe: Arc<Probe>,
}

pub fn start(
    store: Arc<dyn Store>,
    graphs: &[&str],
    tweak: impl FnOnce(&mut EngineOptions),
) -> Harness {
    start_with_probe(store, graphs, Arc::new(Probe::default()), tweak)
}

pub fn start_with_probe(
    store: Arc<dyn Store>,
    graphs: &[&str],
    probe: Arc<Probe>,
    tweak: impl FnOnce(&mut EngineOptions),
) -> Harness {
    let mut opts = EngineOptions::new(store, jobs(&probe), library(graphs));
    opts.cancel_grace = Duration::from_millis(200);
    // Tests that pause tokio's time need the engine to read the same time: the system
    // clock keeps moving while tokio's stands still, so a timer set from it could fire
    // early by however long the test's machine took between two readings.
    opts.clock = TokioClock::new(SystemClock.now_ms());
    tweak(&mut opts);
    let shutdown = CancellationToken::new();
    let (engine, handle) = Engine::start(opts, shutdown.clone());
    Harness {
        engine,
        shutdown,
        handle,
        probe,
    }
}

impl Harness {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }

    pub async fn run(&self, graph: &str, options: Value, node: Option<&str>) -> WorkflowView {
        let options = serde_json::from_value(options).expect("options are a map of maps");
        self.engine
            .run(RunRequest {
                graph: graph.to_owned(),
                node: node.map(str::to_owned),
                options,
            })
            .await
            .unwrap_or_else(|e| panic!("run {graph}: {e}"))
    }

    /// Waits (in virtual or real time) until workflow `id` is terminal.
    pub async fn wait(&self, id: &str) -> WorkflowView {
        wait_for(&self.engine, id, Duration::from_secs(3600)).await
    }
}

/// Registers a node named after its id.
pub async fn node(h: &Harness, id: &str) {
    h.engine
        .nodes()
        .create(serde_json::from_value(serde_json::json!({"id": id, "name": id})).unwrap())
        .await
        .unwrap();
}

pub async fn wait_for(engine: &Engine, id: &str, limit: Duration) -> WorkflowView {
    let mut events = engine.subscribe();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = engine.get(id).await.unwrap().expect("workflow exists");
        if v.status.is_terminal() {
            return v;
        }
        tokio::select! {
            _ = events.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = tokio::time::sleep_until(deadline) => panic!("workflow {id} did not finish: {v:#?}"),
        }
    }
}

/// The final state of every task as `label=state` pairs, in plan order.
pub fn states(v: &WorkflowView) -> String {
    v.tasks
        .iter()
        .map(|t| format!("{}={}", t.label, t.state))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn status(v: &WorkflowView) -> WorkflowStatus {
    v.status
}

/// A store that watches how it is used: which threads call it, how often each key is read,
/// and, once told to, fails every commit (a full disk, a lost database).
pub struct SpyStore {
    pub inner: Arc<dyn Store>,
    pub threads: Mutex<std::collections::HashSet<std::thread::ThreadId>>,
    pub reads: Mutex<std::collections::HashMap<(String, Vec<u8>), usize>>,
    pub fail_commits: std::sync::atomic::AtomicBool,
}

impl SpyStore {
    pub fn new(inner: Arc<dyn Store>) -> Arc<SpyStore> {
        Arc::new(SpyStore {
            inner,
            threads: Default::default(),
            reads: Default::default(),
            fail_commits: Default::default(),
        })
    }

    fn seen(&self) {
        self.threads
            .lock()
            .unwrap()
            .insert(std::thread::current().id());
    }

    /// How often `keyspace/key` was read with `get`.
    pub fn reads_of(&self, keyspace: &str, key: &str) -> usize {
        let k = (keyspace.to_owned(), key.as_bytes().to_vec());
        self.reads.lock().unwrap().get(&k).copied().unwrap_or(0)
    }
}

impl Store for SpyStore {
    fn get(
        &self,
        ks: &str,
        key: &[u8],
    ) -> metalgraph_store::Result<Option<metalgraph_store::Bytes>> {
        self.seen();
        *self
            .reads
            .lock()
            .unwrap()
            .entry((ks.to_owned(), key.to_vec()))
            .or_default() += 1;
        self.inner.get(ks, key)
    }

    fn scan_prefix(
        &self,
        ks: &str,
        prefix: &[u8],
    ) -> metalgraph_store::Result<Vec<(metalgraph_store::Bytes, metalgraph_store::Bytes)>> {
        self.seen();
        self.inner.scan_prefix(ks, prefix)
    }

    fn scan(
        &self,
        ks: &str,
        scan: metalgraph_store::Scan<'_>,
    ) -> metalgraph_store::Result<Vec<(metalgraph_store::Bytes, metalgraph_store::Bytes)>> {
        self.seen();
        self.inner.scan(ks, scan)
    }

    fn commit(&self, batch: metalgraph_store::Batch) -> metalgraph_store::Result<()> {
        self.seen();
        if self.fail_commits.load(Ordering::SeqCst) {
            return Err(metalgraph_store::Error::Io(
                "no space left on device".into(),
            ));
        }
        self.inner.commit(batch)
    }

    fn backend(&self) -> &'static str {
        "spy"
    }
}
