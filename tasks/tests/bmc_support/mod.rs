//! Fixtures shared by the BMC tests: a job context over an in-memory node store, and the
//! real peers (sushy-tools' `sushy-emulator`, OpenIPMI's `ipmi_sim`) started per test on
//! free ports in fresh temporary directories, and killed when dropped. The peers live in the
//! `metalgraph-testkit` crate, shared with the binary's end-to-end tests.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::sync::{Arc, Mutex};

use metalgraph_engine::job::{BoxFuture, Callback, JobContext, JobServices, Options};
use metalgraph_engine::nodes::{Node, Nodes, Obm, ObmConfig, Secret};
use metalgraph_engine::{Job, JobError, JobResult};
use metalgraph_store::MemStore;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)] // Each test binary uses a different part of this module.
pub use metalgraph_testkit::{
    IPMI_PASSWORD, IpmiSim, Proc, Sushy, SushyOptions, free_tcp_port, free_udp_port, peers_dir,
    raw_client, system_mac, system_uuid, venv_python,
};

/// Engine services for provisioning jobs: nodes in memory, and notifications answered at
/// once with a fixed body.
pub struct TestServices {
    pub nodes: Nodes,
    pub store: Arc<MemStore>,
    pub notification: Mutex<Option<Value>>,
    /// Every checkpoint a job recorded, in order.
    pub checkpoints: Mutex<Vec<Value>>,
}

impl JobServices for TestServices {
    fn run_subgraph(&self, _: &JobContext, _: &str, _: Options) -> BoxFuture<'static, JobResult> {
        Box::pin(async { Err(JobError::new("no subgraphs in BMC tests")) })
    }

    fn wait_notification(&self, _ctx: &JobContext) -> BoxFuture<'static, JobResult> {
        let body = self.notification.lock().unwrap().clone();
        Box::pin(async move {
            match body {
                Some(b) => Ok(b),
                // No callback configured: wait like a node that never calls.
                None => std::future::pending().await,
            }
        })
    }

    fn checkpoint(&self, _: &JobContext, value: Value) -> BoxFuture<'static, Result<(), JobError>> {
        self.checkpoints.lock().unwrap().push(value);
        Box::pin(async { Ok(()) })
    }

    fn now_ms(&self) -> u64 {
        metalgraph_engine::clock::Clock::now_ms(&metalgraph_engine::clock::SystemClock)
    }

    fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// The callback of task `label`, with a token and capability derived from the label.
    fn callback(
        &self,
        ctx: &JobContext,
        label: &str,
    ) -> BoxFuture<'static, Result<Callback, JobError>> {
        let callback = Callback {
            workflow_id: ctx.workflow_id.clone(),
            task_id: format!("{}.{label}", ctx.workflow_id),
            token: format!("token-of-{label}"),
            cap: Some(format!("cap-of-{label}")),
        };
        Box::pin(async move { Ok(callback) })
    }
}

/// A test world: a node store and the services jobs see.
pub struct World {
    pub services: Arc<TestServices>,
}

impl Default for World {
    fn default() -> Self {
        let store = Arc::new(MemStore::new());
        Self {
            services: Arc::new(TestServices {
                nodes: Nodes::new(store.clone()),
                store,
                notification: Mutex::new(None),
                checkpoints: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl World {
    pub fn nodes(&self) -> &Nodes {
        &self.services.nodes
    }

    /// Stores a node with one OBM and returns it. The record is written straight into the
    /// memory store, so that fixtures stay synchronous; jobs read it through `Nodes`.
    pub fn node(&self, name: &str, obm: Obm) -> Node {
        let node = Node {
            id: metalgraph_engine::new_id(),
            name: name.to_owned(),
            identifiers: Vec::new(),
            node_type: "compute".to_owned(),
            tags: Vec::new(),
            obms: vec![obm],
            created_at: String::new(),
            updated_at: String::new(),
        };
        let mut batch = metalgraph_store::Batch::new();
        batch.put(
            metalgraph_engine::keys::NODES,
            node.id.as_bytes(),
            serde_json::to_vec(&node).expect("a node encodes"),
        );
        metalgraph_store::Store::commit(self.services.store.as_ref(), batch).expect("create node");
        node
    }

    /// A context as the engine builds it: job defaults merged under `options`, coerced and
    /// checked against the schema.
    pub fn ctx(&self, job: &dyn Job, options: Value, node: Option<&Node>) -> JobContext {
        let schema = job.schema();
        let mut merged = schema.defaults();
        let Value::Object(given) = options else {
            panic!("options must be an object, got {options}");
        };
        merged.extend(given);
        schema.coerce(&mut merged);
        if let Err((field, msg)) = schema.check(&merged, true) {
            panic!("{}: option {field} {msg}", job.name());
        }
        JobContext {
            options: merged,
            node: node.cloned(),
            workflow_id: "wf-1".to_owned(),
            task_id: "task-1".to_owned(),
            label: "under-test".to_owned(),
            attempt: 1,
            retry: 0,
            token: "token-1".to_owned(),
            checkpoint: None,
            cancel: CancellationToken::new(),
            services: self.services.clone(),
        }
    }

    /// Runs `job` once on `node`.
    pub async fn run(&self, job: &dyn Job, options: Value, node: Option<&Node>) -> JobResult {
        job.run(self.ctx(job, options, node)).await
    }
}

/// An OBM record.
pub fn obm(service: &str, host: &str, user: &str, password: &str, system_id: Option<&str>) -> Obm {
    Obm {
        service: service.to_owned(),
        config: ObmConfig {
            host: host.to_owned(),
            user: Some(user.to_owned()),
            password: Some(Secret(password.to_owned())),
            system_id: system_id.map(str::to_owned),
            ..ObmConfig::default()
        },
    }
}

/// A JSON object for options.
pub fn opts(v: Value) -> Value {
    assert!(v.is_object());
    v
}

pub fn no_opts() -> Value {
    json!({})
}
