//! The gRPC API (`proto/metalgraph.proto`, package `metalgraph.v1`): the management
//! operations with typed messages, plus `Watch`, a stream of committed state changes.
//! Server reflection and the standard health service are served beside it.
//!
//! Engine errors become gRPC statuses in one place, [`status`], with the same messages the
//! HTTP API gives.

use std::pin::Pin;

use metalgraph_engine::definitions::{self, Source};
use metalgraph_engine::model::{
    Definition, GraphDefinition, GraphTask, RunOptions, TaskDefinition,
};
use metalgraph_engine::nodes::{self as engine_nodes, NodeFilter, Secret};
use metalgraph_engine::template::Dialect;
use metalgraph_engine::workflow::{TaskRecord, WorkflowRecord};
use metalgraph_engine::{
    Engine, Error, Event, ListFilter, RunRequest, TaskState, WorkflowStatus, WorkflowView,
};
use prost_types::value::Kind;
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The generated messages and services.
pub mod pb {
    tonic::include_proto!("metalgraph.v1");

    /// The encoded descriptors of `proto/metalgraph.proto`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/metalgraph.bin"));
}

use pb::definitions_server::{Definitions as DefinitionsRpc, DefinitionsServer};
use pb::nodes_server::{Nodes as NodesRpc, NodesServer};
use pb::workflows_server::{Workflows as WorkflowsRpc, WorkflowsServer};

/// Builds the gRPC router on `server` (tonic configured with the `[limits]`): our three
/// services, reflection and health. A request message larger than `body_limit` bytes is
/// refused, as the HTTP API refuses such a body.
pub fn router(
    engine: Engine,
    mut server: tonic::transport::Server,
    body_limit: usize,
    state: &super::AppState,
) -> anyhow::Result<tonic::transport::server::Router> {
    use super::security::Guarded;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    let api = GrpcApi {
        engine: engine.clone(),
    };
    // Every metalgraph service is serving while the engine schedules, and NOT_SERVING (the
    // whole server, "", included) from the moment it stops.
    tokio::spawn(async move {
        health_reporter
            .set_serving::<DefinitionsServer<GrpcApi>>()
            .await;
        health_reporter
            .set_serving::<WorkflowsServer<GrpcApi>>()
            .await;
        health_reporter.set_serving::<NodesServer<GrpcApi>>().await;
        engine.stopped().await;
        health_reporter
            .set_not_serving::<DefinitionsServer<GrpcApi>>()
            .await;
        health_reporter
            .set_not_serving::<WorkflowsServer<GrpcApi>>()
            .await;
        health_reporter
            .set_not_serving::<NodesServer<GrpcApi>>()
            .await;
        health_reporter
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    });
    Ok(server
        .add_service(health)
        .add_service(Guarded::new(reflection, state))
        .add_service(Guarded::new(reflection_alpha, state))
        .add_service(Guarded::new(
            DefinitionsServer::new(api.clone()).max_decoding_message_size(body_limit),
            state,
        ))
        .add_service(Guarded::new(
            WorkflowsServer::new(api.clone()).max_decoding_message_size(body_limit),
            state,
        ))
        .add_service(Guarded::new(
            NodesServer::new(api).max_decoding_message_size(body_limit),
            state,
        )))
}

/// A definitions page from a request's `page_size` (0: the default) and `page_token`.
fn definition_page(size: u32, token: String) -> metalgraph_engine::history::PageRequest {
    metalgraph_engine::history::PageRequest {
        skip: 0,
        limit: (size > 0).then_some(size as usize),
        cursor: Some(token).filter(|t| !t.is_empty()),
    }
}

/// Maps an engine error to a gRPC status, with the HTTP API's message.
pub fn status(e: Error) -> Status {
    match e {
        Error::NotFound { .. } => Status::not_found(e.to_string()),
        Error::Invalid(_) | Error::BadRequest(_) | Error::BadOptions(_) => {
            Status::invalid_argument(e.to_string())
        }
        Error::NodeBusy { .. } | Error::AlreadyExists(_) => Status::already_exists(e.to_string()),
        Error::Conflict(_) => Status::failed_precondition(e.to_string()),
        Error::Unavailable(_) => Status::unavailable(e.to_string()),
        Error::Store(ref detail) => {
            tracing::error!(error = %detail, "store error in a gRPC call");
            Status::internal("internal store error; see the server log")
        }
    }
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

#[derive(Clone)]
struct GrpcApi {
    engine: Engine,
}

// ---- JSON <-> protobuf Struct ----

pub fn to_pb_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_pb_value).collect(),
        }),
        Value::Object(m) => Kind::StructValue(to_pb_struct(m)),
    };
    prost_types::Value { kind: Some(kind) }
}

pub fn to_pb_struct(m: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m.iter().map(|(k, v)| (k.clone(), to_pb_value(v))).collect(),
    }
}

pub fn from_pb_value(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        // Whole numbers come back as integers, so `count: 3` stays an integer option.
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(*n as i64)
            } else {
                serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_pb_value).collect()),
        Some(Kind::StructValue(s)) => Value::Object(from_pb_struct(s)),
    }
}

pub fn from_pb_struct(s: &prost_types::Struct) -> Map<String, Value> {
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), from_pb_value(v)))
        .collect()
}

fn opt_struct(s: &Option<prost_types::Struct>) -> Map<String, Value> {
    s.as_ref().map(from_pb_struct).unwrap_or_default()
}

fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn rfc3339_to_timestamp(s: &str) -> Option<prost_types::Timestamp> {
    s.parse::<prost_types::Timestamp>().ok()
}

// ---- definitions ----

fn source(s: Source) -> i32 {
    match s {
        Source::Library => pb::Source::Library as i32,
        Source::User => pb::Source::User as i32,
    }
}

fn task_def_to_pb(t: &TaskDefinition, src: Option<Source>) -> pb::TaskDefinition {
    pb::TaskDefinition {
        injectable_name: t.injectable_name.clone(),
        friendly_name: t.friendly_name.clone().unwrap_or_default(),
        implements_task: t.implements_task.clone(),
        options: Some(to_pb_struct(&t.options)),
        source: src.map_or(0, source),
        template_dialect: dialect_to_pb(t.template_dialect),
    }
}

fn dialect_to_pb(d: Option<Dialect>) -> String {
    match d {
        None => String::new(),
        Some(Dialect::Jinja) => "jinja".into(),
        Some(Dialect::Rackhd) => "rackhd".into(),
    }
}

fn dialect_from_pb(s: &str) -> Result<Option<Dialect>, Status> {
    match s {
        "" => Ok(None),
        "jinja" => Ok(Some(Dialect::Jinja)),
        "rackhd" => Ok(Some(Dialect::Rackhd)),
        other => Err(bad(format!(
            "template_dialect must be rackhd or jinja (or empty), got {other:?}"
        ))),
    }
}

fn task_def_from_pb(t: &pb::TaskDefinition) -> Result<TaskDefinition, Status> {
    Ok(TaskDefinition {
        injectable_name: t.injectable_name.clone(),
        friendly_name: Some(t.friendly_name.clone()).filter(|s| !s.is_empty()),
        implements_task: t.implements_task.clone(),
        options: opt_struct(&t.options),
        template_dialect: dialect_from_pb(&t.template_dialect)?,
        extra: Map::new(),
    })
}

fn wait_entries(v: &Map<String, Value>) -> (Vec<pb::WaitOn>, Vec<pb::WaitOn>) {
    let entry = |label: &str, states: &Value| pb::WaitOn {
        label: label.to_owned(),
        states: match states {
            Value::Array(a) => a
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect(),
            Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        },
    };
    let mut all = Vec::new();
    let mut any = Vec::new();
    for (k, states) in v {
        if k == "anyOf" {
            if let Some(m) = states.as_object() {
                any.extend(m.iter().map(|(l, s)| entry(l, s)));
            }
        } else {
            all.push(entry(k, states));
        }
    }
    (all, any)
}

fn graph_to_pb(g: &GraphDefinition, src: Source) -> pb::Graph {
    pb::Graph {
        injectable_name: g.injectable_name.clone(),
        friendly_name: g.friendly_name.clone().unwrap_or_default(),
        options: Some(to_pb_struct(&g.options)),
        timeout: g.timeout.clone().unwrap_or_default(),
        source: source(src),
        template_dialect: dialect_to_pb(g.template_dialect),
        tasks: g
            .tasks
            .iter()
            .map(|t| {
                let (wait_on, wait_on_any_of) =
                    t.wait_on.as_ref().map(wait_entries).unwrap_or_default();
                pb::GraphTask {
                    label: t.label.clone(),
                    task_name: t.task_name.clone().unwrap_or_default(),
                    task_definition: t.task_definition.as_ref().map(|d| task_def_to_pb(d, None)),
                    option_overrides: Some(to_pb_struct(&t.option_overrides)),
                    wait_on,
                    wait_on_any_of,
                    ignore_failure: t.ignore_failure,
                    retries_max: t.retries.as_ref().map_or(0, |r| r.max),
                    retries_backoff: t
                        .retries
                        .as_ref()
                        .and_then(|r| r.backoff.as_ref())
                        .map(|b| match b {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .unwrap_or_default(),
                    timeout: t
                        .timeout
                        .as_ref()
                        .map(|b| match b {
                            Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .unwrap_or_default(),
                }
            })
            .collect(),
    }
}

fn states_value(states: &[String]) -> Value {
    match states {
        [one] => Value::String(one.clone()),
        many => Value::Array(many.iter().cloned().map(Value::String).collect()),
    }
}

fn graph_from_pb(g: &pb::Graph) -> Result<GraphDefinition, Status> {
    Ok(GraphDefinition {
        injectable_name: g.injectable_name.clone(),
        friendly_name: Some(g.friendly_name.clone()).filter(|s| !s.is_empty()),
        options: opt_struct(&g.options),
        timeout: Some(g.timeout.clone()).filter(|s| !s.is_empty()),
        template_dialect: dialect_from_pb(&g.template_dialect)?,
        extra: Map::new(),
        tasks: g
            .tasks
            .iter()
            .map(|t| {
                let mut wait = Map::new();
                for w in &t.wait_on {
                    wait.insert(w.label.clone(), states_value(&w.states));
                }
                if !t.wait_on_any_of.is_empty() {
                    let any: Map<String, Value> = t
                        .wait_on_any_of
                        .iter()
                        .map(|w| (w.label.clone(), states_value(&w.states)))
                        .collect();
                    wait.insert("anyOf".into(), Value::Object(any));
                }
                Ok(GraphTask {
                    label: t.label.clone(),
                    task_name: Some(t.task_name.clone()).filter(|s| !s.is_empty()),
                    task_definition: t
                        .task_definition
                        .as_ref()
                        .map(task_def_from_pb)
                        .transpose()?,
                    option_overrides: opt_struct(&t.option_overrides),
                    wait_on: (!wait.is_empty()).then_some(wait),
                    ignore_failure: t.ignore_failure,
                    retries: (t.retries_max > 0 || !t.retries_backoff.is_empty()).then(|| {
                        metalgraph_engine::model::Retries {
                            max: t.retries_max,
                            backoff: Some(Value::String(t.retries_backoff.clone()))
                                .filter(|_| !t.retries_backoff.is_empty()),
                        }
                    }),
                    timeout: Some(Value::String(t.timeout.clone()))
                        .filter(|_| !t.timeout.is_empty()),
                    extra: Map::new(),
                })
            })
            .collect::<Result<_, Status>>()?,
    })
}

/// Parses a definition given as text, on the blocking pool (parsing is CPU work a hostile
/// text can make long; the parser refuses deep nesting and duplicate keys).
async fn parse_one(text: String) -> Result<Definition, Status> {
    let parsed = tokio::task::spawn_blocking(move || definitions::parse(&text, "request"))
        .await
        .map_err(|e| Status::internal(format!("parsing did not complete: {e}")))?;
    let mut defs = parsed.map_err(|p| bad(p.to_string()))?;
    if defs.len() != 1 {
        return Err(bad(format!(
            "the text holds {} definitions; give exactly one",
            defs.len()
        )));
    }
    Ok(defs.remove(0))
}

#[tonic::async_trait]
impl DefinitionsRpc for GrpcApi {
    async fn list_graphs(
        &self,
        req: Request<pb::ListGraphsRequest>,
    ) -> Result<Response<pb::ListGraphsResponse>, Status> {
        let req = req.into_inner();
        let page = self
            .engine
            .definitions()
            .graphs_page(definition_page(req.page_size, req.page_token))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListGraphsResponse {
            graphs: page.items.iter().map(|(g, s)| graph_to_pb(g, *s)).collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_graph(
        &self,
        req: Request<pb::GetGraphRequest>,
    ) -> Result<Response<pb::Graph>, Status> {
        let name = req.into_inner().name;
        match self
            .engine
            .definitions()
            .get_graph(&name)
            .await
            .map_err(status)?
        {
            Some((g, s)) => Ok(Response::new(graph_to_pb(&g, s))),
            None => Err(status(Error::NotFound {
                kind: "graph",
                id: name,
            })),
        }
    }

    async fn put_graph(
        &self,
        req: Request<pb::PutGraphRequest>,
    ) -> Result<Response<pb::Graph>, Status> {
        let graph = match req.into_inner().definition {
            Some(pb::put_graph_request::Definition::Graph(g)) => graph_from_pb(&g)?,
            Some(pb::put_graph_request::Definition::Text(t)) => match parse_one(t).await? {
                Definition::Graph(g) => g,
                Definition::Task(_) => {
                    return Err(bad("the text is a task definition, not a graph"));
                }
            },
            None => return Err(bad("give a graph or its text")),
        };
        self.engine
            .definitions()
            .put_graph(graph.clone())
            .await
            .map_err(status)?;
        Ok(Response::new(graph_to_pb(&graph, Source::User)))
    }

    async fn delete_graph(
        &self,
        req: Request<pb::DeleteGraphRequest>,
    ) -> Result<Response<pb::DeleteGraphResponse>, Status> {
        self.engine
            .definitions()
            .delete_graph(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteGraphResponse {}))
    }

    async fn list_tasks(
        &self,
        req: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let req = req.into_inner();
        let page = self
            .engine
            .definitions()
            .tasks_page(definition_page(req.page_size, req.page_token))
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: page
                .items
                .iter()
                .map(|(t, s)| task_def_to_pb(t, Some(*s)))
                .collect(),
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn get_task(
        &self,
        req: Request<pb::GetTaskRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let name = req.into_inner().name;
        match self
            .engine
            .definitions()
            .get_task(&name)
            .await
            .map_err(status)?
        {
            Some((t, s)) => Ok(Response::new(task_def_to_pb(&t, Some(s)))),
            None => Err(status(Error::NotFound {
                kind: "task",
                id: name,
            })),
        }
    }

    async fn put_task(
        &self,
        req: Request<pb::PutTaskRequest>,
    ) -> Result<Response<pb::TaskDefinition>, Status> {
        let task = match req.into_inner().definition {
            Some(pb::put_task_request::Definition::Task(t)) => task_def_from_pb(&t)?,
            Some(pb::put_task_request::Definition::Text(t)) => match parse_one(t).await? {
                Definition::Task(t) => t,
                Definition::Graph(_) => {
                    return Err(bad("the text is a graph, not a task definition"));
                }
            },
            None => return Err(bad("give a task definition or its text")),
        };
        self.engine
            .definitions()
            .put_task(task.clone())
            .await
            .map_err(status)?;
        Ok(Response::new(task_def_to_pb(&task, Some(Source::User))))
    }

    async fn delete_task(
        &self,
        req: Request<pb::DeleteTaskRequest>,
    ) -> Result<Response<pb::DeleteTaskResponse>, Status> {
        self.engine
            .definitions()
            .delete_task(&req.into_inner().name)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteTaskResponse {}))
    }
}

// ---- workflows ----

fn task_state(s: TaskState) -> i32 {
    (match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Timeout => pb::TaskState::Timeout,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Skipped => pb::TaskState::Skipped,
    }) as i32
}

fn workflow_status(s: WorkflowStatus) -> i32 {
    (match s {
        WorkflowStatus::Pending => pb::WorkflowStatus::Pending,
        WorkflowStatus::Running => pb::WorkflowStatus::Running,
        WorkflowStatus::Succeeded => pb::WorkflowStatus::Succeeded,
        WorkflowStatus::Failed => pb::WorkflowStatus::Failed,
        WorkflowStatus::Cancelled => pb::WorkflowStatus::Cancelled,
    }) as i32
}

fn run_options_struct(o: &RunOptions) -> prost_types::Struct {
    prost_types::Struct {
        fields: o
            .iter()
            .map(|(k, m)| (k.clone(), to_pb_value(&Value::Object(m.clone()))))
            .collect(),
    }
}

/// Run options from their `Struct`: each field a layer (`defaults`, a label) holding a
/// mapping of options.
fn run_options(s: &Option<prost_types::Struct>) -> Result<RunOptions, Status> {
    let mut options = RunOptions::new();
    for (layer, v) in opt_struct(s) {
        match v {
            Value::Object(m) => {
                options.insert(layer, m);
            }
            other => {
                return Err(bad(format!(
                    "options.{layer} must be a mapping of option names to values, got {other}"
                )));
            }
        }
    }
    Ok(options)
}

fn workflow_to_pb(rec: &WorkflowRecord, tasks: &[TaskRecord]) -> pb::Workflow {
    // Options and context as the REST view shows them: secrets redacted.
    let view = WorkflowView::build(rec, tasks);
    pb::Workflow {
        instance_id: rec.id.clone(),
        name: rec.plan.graph.clone(),
        node: rec.node.clone().unwrap_or_default(),
        status: workflow_status(rec.status),
        options: Some(run_options_struct(&view.options)),
        context: Some(to_pb_struct(&view.context)),
        created_at: Some(timestamp(rec.created_at)),
        finished_at: rec.finished_at.map(timestamp),
        error: view.error.clone().unwrap_or_default(),
        parent_workflow_id: rec
            .parent
            .as_ref()
            .map(|p| p.workflow_id.clone())
            .unwrap_or_default(),
        rerun_of: rec.rerun_of.clone().unwrap_or_default(),
        tasks: rec
            .plan
            .tasks
            .iter()
            .zip(tasks)
            .zip(&view.tasks)
            .map(|((p, t), shown)| pb::Task {
                id: t.id.clone(),
                label: p.label.clone(),
                task_name: p.task_name.clone(),
                job: p.job.clone(),
                state: task_state(t.state),
                attempts: t.attempts,
                error: shown.error.clone().unwrap_or_default(),
                started_at: t.started_at.map(timestamp),
                finished_at: t.finished_at.map(timestamp),
            })
            .collect(),
    }
}

impl GrpcApi {
    async fn workflow(&self, id: &str) -> Result<pb::Workflow, Status> {
        match self.engine.load(id).await.map_err(status)? {
            Some((rec, tasks)) => Ok(workflow_to_pb(&rec, &tasks)),
            None => Err(status(Error::NotFound {
                kind: "workflow",
                id: id.to_owned(),
            })),
        }
    }

    /// The events describing a workflow's current state: one for it, one per task.
    async fn snapshot(&self, id: &str) -> Result<Option<(Vec<pb::WatchEvent>, bool)>, Status> {
        let Some((rec, tasks)) = self.engine.load(id).await.map_err(status)? else {
            return Ok(None);
        };
        let mut out = vec![pb::WatchEvent {
            snapshot: true,
            event: Some(pb::watch_event::Event::Workflow(pb::WorkflowChanged {
                workflow_id: rec.id.clone(),
                graph: rec.plan.graph.clone(),
                node: rec.node.clone().unwrap_or_default(),
                status: workflow_status(rec.status),
                error: rec.error.clone().unwrap_or_default(),
            })),
        }];
        for (i, (p, t)) in rec.plan.tasks.iter().zip(&tasks).enumerate() {
            out.push(pb::WatchEvent {
                snapshot: true,
                event: Some(pb::watch_event::Event::Task(pb::TaskChanged {
                    workflow_id: rec.id.clone(),
                    label: p.label.clone(),
                    index: i as u32,
                    state: task_state(t.state),
                    attempts: t.attempts,
                    error: t.error.clone().unwrap_or_default(),
                })),
            });
        }
        Ok(Some((out, rec.status.is_terminal())))
    }
}

/// Every unfinished workflow's id, page by page.
async fn active_ids(engine: &Engine) -> Result<Vec<String>, Error> {
    let mut ids = Vec::new();
    let mut cursor = None;
    loop {
        let page = engine
            .list_page(&ListFilter {
                active: Some(true),
                limit: Some(metalgraph_engine::history::MAX_PAGE),
                cursor,
                ..Default::default()
            })
            .await?;
        ids.extend(page.items.into_iter().map(|v| v.instance_id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(ids),
        }
    }
}

fn event_to_pb(ev: &Event) -> pb::WatchEvent {
    let event = match ev {
        Event::Workflow {
            workflow_id,
            graph,
            node,
            status,
            error,
        } => pb::watch_event::Event::Workflow(pb::WorkflowChanged {
            workflow_id: workflow_id.clone(),
            graph: graph.clone(),
            node: node.clone().unwrap_or_default(),
            status: workflow_status(*status),
            error: error.clone().unwrap_or_default(),
        }),
        Event::Task {
            workflow_id,
            label,
            index,
            state,
            attempts,
            error,
            ..
        } => pb::watch_event::Event::Task(pb::TaskChanged {
            workflow_id: workflow_id.clone(),
            label: label.clone(),
            index: *index as u32,
            state: task_state(*state),
            attempts: *attempts,
            error: error.clone().unwrap_or_default(),
        }),
    };
    pb::WatchEvent {
        snapshot: false,
        event: Some(event),
    }
}

type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkflowsRpc for GrpcApi {
    async fn run_graph(
        &self,
        req: Request<pb::RunGraphRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let req = req.into_inner();
        let view = self
            .engine
            .run(RunRequest {
                graph: req.name,
                node: Some(req.node).filter(|n| !n.is_empty()),
                options: run_options(&req.options)?,
            })
            .await
            .map_err(status)?;
        Ok(Response::new(self.workflow(&view.instance_id).await?))
    }

    async fn get_workflow(
        &self,
        req: Request<pb::GetWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        Ok(Response::new(self.workflow(&req.into_inner().id).await?))
    }

    async fn list_workflows(
        &self,
        req: Request<pb::ListWorkflowsRequest>,
    ) -> Result<Response<pb::ListWorkflowsResponse>, Status> {
        let req = req.into_inner();
        let wanted = match pb::WorkflowStatus::try_from(req.status) {
            Ok(pb::WorkflowStatus::Unspecified) => None,
            Ok(pb::WorkflowStatus::Pending) => Some(WorkflowStatus::Pending),
            Ok(pb::WorkflowStatus::Running) => Some(WorkflowStatus::Running),
            Ok(pb::WorkflowStatus::Succeeded) => Some(WorkflowStatus::Succeeded),
            Ok(pb::WorkflowStatus::Failed) => Some(WorkflowStatus::Failed),
            Ok(pb::WorkflowStatus::Cancelled) => Some(WorkflowStatus::Cancelled),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "status {} is not a WorkflowStatus",
                    req.status
                )));
            }
        };
        let nonempty = |s: String| Some(s).filter(|s| !s.is_empty());
        let page = self
            .engine
            .list_records(&ListFilter {
                active: req.active,
                node: nonempty(req.node),
                graph: nonempty(req.graph),
                status: wanted,
                limit: (req.page_size > 0).then_some(req.page_size as usize),
                cursor: nonempty(req.page_token),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        let workflows = page
            .items
            .iter()
            .map(|(rec, tasks)| workflow_to_pb(rec, tasks))
            .collect();
        Ok(Response::new(pb::ListWorkflowsResponse {
            workflows,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn cancel_workflow(
        &self,
        req: Request<pb::CancelWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let id = req.into_inner().id;
        self.engine.cancel(&id).await.map_err(status)?;
        Ok(Response::new(self.workflow(&id).await?))
    }

    async fn rerun_workflow(
        &self,
        req: Request<pb::RerunWorkflowRequest>,
    ) -> Result<Response<pb::Workflow>, Status> {
        let req = req.into_inner();
        let view = self
            .engine
            .rerun(&req.id, run_options(&req.options)?)
            .await
            .map_err(status)?;
        Ok(Response::new(self.workflow(&view.instance_id).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let id = req.into_inner().workflow_id;
        // Subscribe before reading the snapshot, so that no change falls between the two.
        let mut events = self.engine.subscribe();
        let (tx, rx) = mpsc::channel::<Result<pb::WatchEvent, Status>>(256);
        let initial: Vec<String> = if id.is_empty() {
            active_ids(&self.engine).await.map_err(status)?
        } else {
            vec![id.clone()]
        };
        let mut first = Vec::new();
        let mut finished = false;
        for wf in &initial {
            match self.snapshot(wf).await? {
                Some((evs, done)) => {
                    first.extend(evs);
                    finished |= !id.is_empty() && done;
                }
                None if !id.is_empty() => {
                    return Err(status(Error::NotFound {
                        kind: "workflow",
                        id: id.clone(),
                    }));
                }
                None => {}
            }
        }
        let api = self.clone();
        tokio::spawn(async move {
            for ev in first {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if finished {
                return;
            }
            loop {
                let ev = match events.recv().await {
                    Ok((_, ev)) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        // Too slow a reader: resend current state so it ends up correct.
                        tracing::warn!(missed = n, "a gRPC watcher lagged; resending state");
                        let ids = if id.is_empty() {
                            active_ids(&api.engine).await.unwrap_or_default()
                        } else {
                            vec![id.clone()]
                        };
                        for wf in ids {
                            if let Ok(Some((evs, done))) = api.snapshot(&wf).await {
                                for e in evs {
                                    if tx.send(Ok(e)).await.is_err() {
                                        return;
                                    }
                                }
                                if done && !id.is_empty() {
                                    return;
                                }
                            }
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(Status::unavailable("the engine stopped")))
                            .await;
                        return;
                    }
                };
                if !id.is_empty() && ev.workflow_id() != id {
                    continue;
                }
                let end = !id.is_empty() && ev.ended().is_some();
                if tx.send(Ok(event_to_pb(&ev))).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

// ---- nodes ----

fn obm_to_pb(o: &engine_nodes::Obm) -> pb::Obm {
    let c = &o.config;
    pb::Obm {
        service: o.service.clone(),
        config: Some(pb::ObmConfig {
            host: c.host.clone(),
            port: c.port.map_or(0, u32::from),
            user: c.user.clone().unwrap_or_default(),
            // Write-only: never returned.
            password: String::new(),
            password_set: c.password.as_ref().is_some_and(|p| !p.expose().is_empty()),
            system_id: c.system_id.clone().unwrap_or_default(),
            verify_ssl: c.verify_ssl,
            ca_cert: c.ca_cert.clone(),
            endpoint: c.endpoint.clone(),
            extra: Some(to_pb_struct(&c.extra)),
        }),
    }
}

fn obm_from_pb(o: &pb::Obm) -> Result<engine_nodes::Obm, Status> {
    if o.service.is_empty() {
        return Err(bad(
            "obm.service is required (redfish-obm-service, ipmi-obm-service or sim-obm-service)",
        ));
    }
    let c = o.config.clone().unwrap_or_default();
    Ok(engine_nodes::Obm {
        service: o.service.clone(),
        config: engine_nodes::ObmConfig {
            host: c.host,
            port: match c.port {
                0 => None,
                p => Some(
                    u16::try_from(p)
                        .map_err(|_| bad(format!("obm.config.port {p} is out of range")))?,
                ),
            },
            user: Some(c.user).filter(|s| !s.is_empty()),
            password: Some(Secret(c.password)).filter(|s| !s.expose().is_empty()),
            system_id: Some(c.system_id).filter(|s| !s.is_empty()),
            verify_ssl: c.verify_ssl,
            ca_cert: c.ca_cert.filter(|s| !s.is_empty()),
            endpoint: c.endpoint.filter(|s| !s.is_empty()),
            extra: opt_struct(&c.extra),
        },
    })
}

fn node_to_pb(n: &engine_nodes::Node, active: Option<String>) -> pb::Node {
    pb::Node {
        id: n.id.clone(),
        name: n.name.clone(),
        identifiers: n.identifiers.clone(),
        r#type: n.node_type.clone(),
        tags: n.tags.clone(),
        obms: n.obms.iter().map(obm_to_pb).collect(),
        created_at: rfc3339_to_timestamp(&n.created_at),
        updated_at: rfc3339_to_timestamp(&n.updated_at),
        active_workflow: active.unwrap_or_default(),
    }
}

impl GrpcApi {
    async fn node(&self, id: &str) -> Result<pb::Node, Status> {
        let nodes = self.engine.nodes();
        match nodes.get(id).await.map_err(status)? {
            Some(n) => Ok(node_to_pb(
                &n,
                nodes.active_workflow(id).await.ok().flatten(),
            )),
            None => Err(status(Error::NotFound {
                kind: "node",
                id: id.to_owned(),
            })),
        }
    }
}

#[tonic::async_trait]
impl NodesRpc for GrpcApi {
    async fn create_node(
        &self,
        req: Request<pb::CreateNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let n = req
            .into_inner()
            .node
            .ok_or_else(|| bad("node is required"))?;
        let node = engine_nodes::Node {
            id: n.id,
            name: n.name,
            identifiers: n.identifiers,
            node_type: Some(n.r#type)
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "compute".into()),
            tags: n.tags,
            obms: n.obms.iter().map(obm_from_pb).collect::<Result<_, _>>()?,
            created_at: String::new(),
            updated_at: String::new(),
        };
        let created = self.engine.nodes().create(node).await.map_err(status)?;
        Ok(Response::new(node_to_pb(&created, None)))
    }

    async fn get_node(
        &self,
        req: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        Ok(Response::new(self.node(&req.into_inner().id).await?))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let req = req.into_inner();
        let nonempty = |s: String| Some(s).filter(|s| !s.is_empty());
        let nodes = self.engine.nodes();
        let page = nodes
            .list_page(&NodeFilter {
                tag: nonempty(req.tag),
                node_type: nonempty(req.r#type),
                endpoint: nonempty(req.endpoint),
                limit: (req.page_size > 0).then_some(req.page_size as usize),
                cursor: nonempty(req.page_token),
                ..Default::default()
            })
            .await
            .map_err(status)?;
        let mut out = Vec::with_capacity(page.items.len());
        for n in &page.items {
            out.push(node_to_pb(
                n,
                nodes.active_workflow(&n.id).await.ok().flatten(),
            ));
        }
        Ok(Response::new(pb::ListNodesResponse {
            nodes: out,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn update_obm(
        &self,
        req: Request<pb::UpdateObmRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let req = req.into_inner();
        let obm = obm_from_pb(&req.obm.ok_or_else(|| bad("obm is required"))?)?;
        self.engine
            .nodes()
            .set_obm(&req.id, obm)
            .await
            .map_err(status)?;
        Ok(Response::new(self.node(&req.id).await?))
    }

    async fn delete_node(
        &self,
        req: Request<pb::DeleteNodeRequest>,
    ) -> Result<Response<pb::DeleteNodeResponse>, Status> {
        self.engine
            .nodes()
            .delete(&req.into_inner().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::DeleteNodeResponse {}))
    }
}
