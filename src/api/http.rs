//! The management router (`app`) and the node-facing router (`node_app`): RackHD's 2.0
//! paths, request bodies and status words (DESIGN.md section 6).
//!
//! Handlers translate between HTTP and the engine and nothing else: the engine's API is
//! async and does its own store work off the runtime, and its rules (node names, OBM
//! passwords, ...) live in the engine, so HTTP and gRPC enforce the same ones. Request bodies
//! are never logged: they may hold OBM passwords.

use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, OriginalUri, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use metalgraph_engine::definitions::{self, Source};
use metalgraph_engine::job::json_kind;
use metalgraph_engine::model::{Definition, GraphDefinition, RunOptions, TaskDefinition};
use metalgraph_engine::nodes::{Node, NodeFilter, Obm};
use metalgraph_engine::ownership::Ownership;
use metalgraph_engine::template::{self, Renderer};
use metalgraph_engine::text;
use metalgraph_engine::{ListFilter, Page, RunRequest, WorkflowStatus, WorkflowView};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tracing::debug;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::extract::{Body, Path, Peer, Query, decode};
use super::{ApiError, AppState, files, security};
use crate::hooks::HookSpec;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// The management API's routes, each from a handler's `#[utoipa::path]`: the router and
/// the OpenAPI document (`openapi::management`) are built from this one list, so every
/// route is documented. Paths are relative to `/api/2.0` except `/metrics`.
pub(crate) fn management_routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(super::openapi::openapi_json))
        .routes(routes!(super::events::events))
        .routes(routes!(list_graphs, put_graph))
        .routes(routes!(get_graph, delete_graph))
        .routes(routes!(list_tasks, put_task))
        .routes(routes!(get_task, delete_task))
        .routes(routes!(list_workflows, run_workflow))
        .routes(routes!(get_workflow, delete_workflow))
        .routes(routes!(workflow_action))
        .routes(routes!(list_nodes, create_node))
        .routes(routes!(get_node, patch_node, delete_node))
        .routes(routes!(run_on_node, list_node_workflows))
        .routes(routes!(get_obm, put_obm))
        .routes(routes!(list_catalogs))
        .routes(routes!(get_catalog))
        .routes(routes!(list_hooks, create_hook))
        .routes(routes!(get_hook, delete_hook))
        .routes(routes!(security::list_tokens, security::create_token))
        .routes(routes!(security::revoke_token))
        .routes(routes!(security::list_audit))
        .merge(super::fleet::routes());
    OpenApiRouter::new()
        .nest("/api/2.0", api)
        .routes(routes!(metrics))
}

/// The node-facing API's routes, from one list like [`management_routes`].
pub(crate) fn node_routes() -> OpenApiRouter<AppState> {
    let api = OpenApiRouter::new()
        // GET too: stock iPXE cannot POST (its `param` command is not built in by default),
        // so a profile script reports with GET.
        .routes(routes!(notification_post, notification_get))
        .routes(routes!(super::profiles::profiles))
        .routes(routes!(template));
    let router = OpenApiRouter::new().nest("/api/2.0", api);
    // `/files/{*path}` is axum's catch-all, which OpenAPI writes `/files/{path}`.
    let router = super::openapi::route_catch_all(
        router,
        "/files/{*path}",
        routes!(files::serve_file, files::head_file),
    );
    // The iPXE binaries UEFI HTTP Boot firmware is sent to (`boot::boot_files_url`).
    super::openapi::route_catch_all(
        router,
        "/boot/{*path}",
        routes!(files::serve_boot_file, files::head_boot_file),
    )
}

/// The management API, and the web view (`/ui/`) that reads it. The web view's pages and
/// modules are not API and are left out of the document.
pub fn app(state: AppState) -> Router {
    let api: Router<AppState> = management_routes().into();
    let guarded = api
        .merge(super::ui::routes())
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security::guard,
        ));
    finish(guarded, state)
}

/// A router serving only `GET /metrics`, for a listener of its own (`metrics_listen`).
pub fn metrics_app(state: AppState) -> Router {
    finish(Router::new().route("/metrics", get(metrics)), state)
}

/// The process's metrics, OpenMetrics text (docs/metrics.md).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "system",
    responses((
        status = 200,
        description = "Every metric of the process",
        body = String,
        content_type = "application/openmetrics-text"
    ))
)]
async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        crate::metrics::render(),
    )
        .into_response()
}

/// The node-facing API: what booting nodes and their installers call. `/files/...` serves
/// the files directory, `/boot/...` the boot files directory; `/api/2.0/templates/{name}`
/// renders a template for a node.
pub fn node_app(state: AppState) -> Router {
    finish(node_routes().into(), state)
}

/// The layers both routers share: JSON fallbacks, the body limit and request logging; and
/// RackHD's `/api/current/...` as another name of `/api/2.0/...`, rewritten before
/// routing, so that every rule (roles, the audit log) sees one path.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    let routed = router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state);
    Router::new().fallback_service(
        tower::ServiceBuilder::new()
            .map_request(current_is_2_0)
            .service(routed),
    )
}

/// `/api/current/...` (RackHD's name for the latest API) as `/api/2.0/...`.
fn current_is_2_0(mut req: Request) -> Request {
    const CURRENT: &str = "/api/current";
    let path = req.uri().path();
    let Some(rest) = path.strip_prefix(CURRENT) else {
        return req;
    };
    if !(rest.is_empty() || rest.starts_with('/')) {
        return req;
    }
    let mut target = format!("/api/2.0{rest}");
    if let Some(q) = req.uri().query() {
        target.push('?');
        target.push_str(q);
    }
    if let Ok(uri) = target.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
    req
}

/// Logs each request's method, path (never the query, which may hold a token), status and
/// duration; never its body.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    debug!(
        %method,
        %path,
        status = response.status().as_u16(),
        elapsed_ms = start.elapsed().as_millis() as u64,
        "request"
    );
    response
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

// ---------------------------------------------------------------------------------------
// Health

/// `GET /health`'s answer.
#[derive(Debug, Serialize, ToSchema)]
struct Health {
    /// Always `ok`: a failing engine answers 503 instead.
    #[schema(example = "ok")]
    status: &'static str,
    /// The store backend (`sled`, `file`, `postgres`, `mem`).
    #[schema(example = "sled")]
    store: &'static str,
    /// With replicas on PostgreSQL: this replica and its share of the work.
    #[serde(skip_serializing_if = "Option::is_none")]
    replica: Option<ReplicaHealth>,
}

/// A replica's part in `GET /health` (docs/scale-out.md).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
struct ReplicaHealth {
    /// The replica's id (its data directory's `replica-id`).
    #[schema(example = "3f2a9c41d07b5e68")]
    id: String,
    /// How many of the 64 workflow partitions it drives now.
    #[schema(example = 22)]
    partitions: usize,
    /// Whether it holds the sequencer, and so runs batches, retention and webhooks.
    leads: bool,
}

/// Whether the engine schedules and its store works.
///
/// Answered even when the listener is at its connection limit.
#[utoipa::path(
    get,
    path = "/health",
    tag = "system",
    responses(
        (status = 200, description = "The engine schedules", body = Health),
        (status = 503, description = "The store failed under the engine; the message names the failure", body = ErrorBody),
    )
)]
async fn health(State(s): State<AppState>) -> Result<Json<Health>> {
    let store = s.engine.store_backend();
    match s.engine.health() {
        Ok(()) => Ok(Json(Health {
            status: "ok",
            store,
            replica: match s.engine.ownership() {
                Ownership::Sole => None,
                Ownership::Leased(leases) => Some(ReplicaHealth {
                    id: leases.me().to_owned(),
                    partitions: leases
                        .partitions()
                        .iter()
                        .filter(|p| **p < metalgraph_engine::ownership::PARTITIONS)
                        .count(),
                    leads: s.engine.leads(),
                }),
            },
        })),
        Err(why) => Err(ApiError::unavailable(format!("{why} (store {store})"))),
    }
}

// ---------------------------------------------------------------------------------------
// Graph and task definitions

/// A definition as the API shows it: its own fields plus `source`.
fn with_source(def: impl serde::Serialize, source: Source) -> Value {
    let mut v = serde_json::to_value(def).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "source".to_owned(),
            serde_json::to_value(source).unwrap_or(Value::Null),
        );
    }
    v
}

/// Parses a body into one definition; a body that is no definition is a 422 naming why.
fn parse_definition(body: Value, expected: &str) -> Result<Definition> {
    if body.is_null() {
        return Err(ApiError::bad_request(format!(
            "the request body is empty; send a {expected}"
        )));
    }
    // Unlike files, the API takes one definition per request, so `source` (which list and
    // get add) is dropped here: a definition fetched from the API can be stored unchanged.
    let mut body = body;
    if let Some(obj) = body.as_object_mut() {
        obj.remove("source");
    }
    definitions::parse_value(body, "request body").map_err(ApiError::invalid_one)
}

/// A page of a list kept in key order (definitions, endpoints).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PageQuery {
    /// Entries to pass over first (RackHD's paging); deep pages should follow the cursor.
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    /// The page size.
    #[serde(rename = "$top")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    top: Option<usize>,
    /// Where the previous page ended: from the `Link` header.
    cursor: Option<String>,
}

impl PageQuery {
    pub(super) fn page(self) -> metalgraph_engine::history::PageRequest {
        metalgraph_engine::history::PageRequest {
            skip: self.skip.unwrap_or(0),
            limit: self.top,
            cursor: self.cursor.filter(|c| !c.is_empty()),
        }
    }
}

/// A page of definitions as the API lists them: each with its `source`.
fn sourced_page<T: serde::Serialize>(uri: &Uri, page: Page<(T, Source)>) -> Response {
    let items = page
        .items
        .into_iter()
        .map(|(d, src)| with_source(d, src))
        .collect::<Vec<_>>();
    page_response(
        uri,
        Page {
            items,
            next: page.next,
        },
    )
}

/// Graphs in name order, one page: the shipped library and the stored ones (a stored
/// graph shadows a library graph of the same name). Each carries `source`: `library` or
/// `user`.
#[utoipa::path(
    get,
    path = "/workflows/graphs",
    tag = "graphs",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of graphs", body = Vec<GraphDefinition>,
            headers(("Link" = String, description = "`<...>; rel=\"next\"`: the next page, when this one is full"))),
        (status = 400, description = "$top outside 1 to 1000", body = ErrorBody),
    )
)]
async fn list_graphs(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<PageQuery>,
) -> Result<Response> {
    let page = s.engine.definitions().graphs_page(q.page()).await?;
    Ok(sourced_page(&uri, page))
}

/// One graph, with `source`.
#[utoipa::path(
    get,
    path = "/workflows/graphs/{name}",
    tag = "graphs",
    params(("name" = String, Path, description = "The graph's injectableName", example = "Graph.Noop")),
    responses(
        (status = 200, description = "The graph", body = GraphDefinition),
        (status = 404, description = "No graph has this name", body = ErrorBody),
    )
)]
async fn get_graph(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    match s.engine.definitions().get_graph(&name).await? {
        Some((g, src)) => Ok(Json(with_source(g, src))),
        None => Err(ApiError::not_found("graph", &name)),
    }
}

/// Stores a graph (creating or replacing it by `injectableName`), after validating it.
///
/// A field `source` in the body is ignored, so that a graph fetched from the API can be
/// stored unchanged.
#[utoipa::path(
    put,
    path = "/workflows/graphs",
    tag = "graphs",
    request_body(content = GraphDefinition, description = "A graph definition"),
    responses(
        (status = 200, description = "A stored graph of this name was replaced", body = GraphDefinition),
        (status = 201, description = "The graph was created", body = GraphDefinition, links(
            ("get" = (operation_id = "get_graph", parameters(("name" = "$response.body#/injectableName")))),
            ("delete" = (operation_id = "delete_graph", parameters(("name" = "$response.body#/injectableName")))),
        )),
        (status = 400, description = "The body is empty, not a graph (a task definition), or malformed", body = ErrorBody),
        (status = 422, description = "The graph is invalid; `details` has one entry per problem, naming graph, task label and field", body = ErrorBody),
    )
)]
async fn put_graph(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let graph = match parse_definition(body, "graph definition")? {
        Definition::Graph(g) => g,
        Definition::Task(t) => {
            return Err(ApiError::bad_request(format!(
                "{} is a task definition (it has implementsTask); PUT it to /api/2.0/workflows/tasks",
                t.injectable_name
            )));
        }
    };
    let defs = s.engine.definitions();
    let existed = matches!(
        defs.get_graph(&graph.injectable_name).await?,
        Some((_, Source::User))
    );
    defs.put_graph(graph.clone()).await?;
    Ok((
        created_or_ok(existed),
        Json(with_source(graph, Source::User)),
    ))
}

/// 200 when a definition was replaced, 201 when it was created.
fn created_or_ok(existed: bool) -> StatusCode {
    if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

/// Deletes a stored graph.
#[utoipa::path(
    delete,
    path = "/workflows/graphs/{name}",
    tag = "graphs",
    params(("name" = String, Path, description = "The graph's injectableName", example = "Graph.Noop")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No stored graph has this name", body = ErrorBody),
        (status = 409, description = "The graph is part of the shipped library", body = ErrorBody),
    )
)]
async fn delete_graph(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode> {
    s.engine.definitions().delete_graph(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Task definitions in name order, one page: the shipped library and the stored ones,
/// each with `source`.
#[utoipa::path(
    get,
    path = "/workflows/tasks",
    tag = "tasks",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of task definitions", body = Vec<TaskDefinition>,
            headers(("Link" = String, description = "`<...>; rel=\"next\"`: the next page, when this one is full"))),
        (status = 400, description = "$top outside 1 to 1000", body = ErrorBody),
    )
)]
async fn list_tasks(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<PageQuery>,
) -> Result<Response> {
    let page = s.engine.definitions().tasks_page(q.page()).await?;
    Ok(sourced_page(&uri, page))
}

/// One task definition, with `source`.
#[utoipa::path(
    get,
    path = "/workflows/tasks/{name}",
    tag = "tasks",
    params(("name" = String, Path, description = "The task definition's injectableName", example = "Task.Noop")),
    responses(
        (status = 200, description = "The task definition", body = TaskDefinition),
        (status = 404, description = "No task definition has this name", body = ErrorBody),
    )
)]
async fn get_task(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    match s.engine.definitions().get_task(&name).await? {
        Some((t, src)) => Ok(Json(with_source(t, src))),
        None => Err(ApiError::not_found("task", &name)),
    }
}

/// Deletes a stored task definition.
#[utoipa::path(
    delete,
    path = "/workflows/tasks/{name}",
    tag = "tasks",
    params(("name" = String, Path, description = "The task definition's injectableName", example = "Task.Noop")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No stored task definition has this name", body = ErrorBody),
        (status = 409, description = "The task definition is part of the shipped library", body = ErrorBody),
    )
)]
async fn delete_task(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode> {
    s.engine.definitions().delete_task(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Stores a task definition (creating or replacing it by `injectableName`).
#[utoipa::path(
    put,
    path = "/workflows/tasks",
    tag = "tasks",
    request_body(content = TaskDefinition, description = "A task definition"),
    responses(
        (status = 200, description = "A stored definition of this name was replaced", body = TaskDefinition),
        (status = 201, description = "The definition was created", body = TaskDefinition, links(
            ("get" = (operation_id = "get_task", parameters(("name" = "$response.body#/injectableName")))),
            ("delete" = (operation_id = "delete_task", parameters(("name" = "$response.body#/injectableName")))),
        )),
        (status = 400, description = "The body is empty, not a task definition (a graph), or malformed", body = ErrorBody),
        (status = 422, description = "The definition is invalid; `details` names each problem", body = ErrorBody),
    )
)]
async fn put_task(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let task = match parse_definition(body, "task definition")? {
        Definition::Task(t) => t,
        Definition::Graph(g) => {
            return Err(ApiError::bad_request(format!(
                "{} is a graph (it has tasks); PUT it to /api/2.0/workflows/graphs",
                g.injectable_name
            )));
        }
    };
    let defs = s.engine.definitions();
    let existed = matches!(
        defs.get_task(&task.injectable_name).await?,
        Some((_, Source::User))
    );
    defs.put_task(task.clone()).await?;
    Ok((
        created_or_ok(existed),
        Json(with_source(task, Source::User)),
    ))
}

// ---------------------------------------------------------------------------------------
// Workflows

/// `?name=` on run requests, as RackHD accepts it.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NameQuery {
    /// The graph to run, when the body does not name it.
    name: Option<String>,
}

/// A run request, `POST /workflows`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct RunBody {
    /// The graph to run (its injectableName); else the query's `name`.
    #[schema(example = "Graph.Noop")]
    name: Option<String>,
    /// Option layers over the graph's: `defaults` (every task) and `<label>` (one task),
    /// each an object of options.
    #[serde(default)]
    #[schema(value_type = Option<HashMap<String, Object>>)]
    options: Value,
    /// The node to run on (its id); none runs without a node.
    node: Option<String>,
}

/// A run request on a node, `POST /nodes/{id}/workflows`: the node comes from the path.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NodeRunBody {
    /// The graph to run (its injectableName); else the query's `name`.
    #[schema(example = "Graph.Noop")]
    name: Option<String>,
    /// Option layers over the graph's: `defaults` and `<label>`, each an object of options.
    #[serde(default)]
    #[schema(value_type = Option<HashMap<String, Object>>)]
    options: Value,
}

/// Checks run options: `{defaults: {...}, <label>: {...}}`, each layer an object.
fn run_options(v: Value) -> Result<RunOptions> {
    let obj = match v {
        Value::Null => return Ok(RunOptions::new()),
        Value::Object(o) => o,
        other => {
            return Err(ApiError::bad_request(format!(
                "field 'options' must be an object {{defaults: {{...}}, <label>: {{...}}}}, got {}",
                json_kind(&other)
            )));
        }
    };
    let mut out = RunOptions::new();
    for (k, v) in obj {
        match v {
            Value::Object(m) => {
                out.insert(k, m);
            }
            Value::Null => {}
            other => {
                return Err(ApiError::bad_request(format!(
                    "field 'options.{k}' must be an object of options, got {}",
                    json_kind(&other)
                )));
            }
        }
    }
    Ok(out)
}

fn graph_name(body: Option<String>, query: Option<String>) -> Result<String> {
    body.or(query)
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("field 'name' is required: the graph to run"))
}

/// Runs a graph: creates a workflow, on a node when one is named.
#[utoipa::path(
    post,
    path = "/workflows",
    tag = "workflows",
    params(NameQuery),
    request_body(content = Option<RunBody>, description = "What to run; may be empty when `?name=` names the graph"),
    responses(
        (status = 201, description = "The workflow was created and scheduled", body = WorkflowView,
            links(
            ("get" = (operation_id = "get_workflow", parameters(("id" = "$response.body#/instanceId")))),
            ("cancel" = (operation_id = "workflow_action", parameters(("id" = "$response.body#/instanceId")))),
            ("delete" = (operation_id = "delete_workflow", parameters(("id" = "$response.body#/instanceId")))),
        )),
        (status = 400, description = "No graph named, options that are not objects, or options the graph's tasks refuse", body = ErrorBody),
        (status = 404, description = "The graph or the node does not exist", body = ErrorBody),
        (status = 409, description = "The node already runs a workflow", body = ErrorBody),
        (status = 422, description = "The graph is invalid with these options", body = ErrorBody),
    )
)]
async fn run_workflow(
    State(s): State<AppState>,
    Query(q): Query<NameQuery>,
    Body(body): Body,
) -> Result<(StatusCode, Json<WorkflowView>)> {
    let body: RunBody = decode(body, "run request")?;
    let req = RunRequest {
        graph: graph_name(body.name, q.name)?,
        node: body.node.filter(|n| !n.is_empty()),
        options: run_options(body.options)?,
    };
    let view = s.engine.run(req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Runs a graph on a node (RackHD's per-node run).
#[utoipa::path(
    post,
    path = "/nodes/{id}/workflows",
    tag = "workflows",
    params(("id" = String, Path, description = "The node's id"), NameQuery),
    request_body(content = Option<NodeRunBody>, description = "What to run; may be empty when `?name=` names the graph"),
    responses(
        (status = 201, description = "The workflow was created and scheduled", body = WorkflowView,
            links(
            ("get" = (operation_id = "get_workflow", parameters(("id" = "$response.body#/instanceId")))),
            ("cancel" = (operation_id = "workflow_action", parameters(("id" = "$response.body#/instanceId")))),
            ("delete" = (operation_id = "delete_workflow", parameters(("id" = "$response.body#/instanceId")))),
        )),
        (status = 400, description = "No graph named, options that are not objects, or options the graph's tasks refuse", body = ErrorBody),
        (status = 404, description = "The graph or the node does not exist", body = ErrorBody),
        (status = 409, description = "The node already runs a workflow", body = ErrorBody),
        (status = 422, description = "The graph is invalid with these options", body = ErrorBody),
    )
)]
async fn run_on_node(
    State(s): State<AppState>,
    Path(node): Path<String>,
    Query(q): Query<NameQuery>,
    Body(body): Body,
) -> Result<(StatusCode, Json<WorkflowView>)> {
    let body: NodeRunBody = decode(body, "run request")?;
    let req = RunRequest {
        graph: graph_name(body.name, q.name)?,
        node: Some(node),
        options: run_options(body.options)?,
    };
    let view = s.engine.run(req).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// `GET /workflows` and `GET /nodes/{id}/workflows`: filters and paging, newest first
/// (docs/lists.md). A full page carries `Link: <...>; rel="next"` with the cursor of the next.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// `true`: only unfinished workflows; `false`: only finished ones.
    active: Option<bool>,
    /// Only workflows of this node (its id).
    node: Option<String>,
    /// Only workflows of this graph (its injectableName).
    graph: Option<String>,
    /// Only workflows in this status.
    #[param(inline)]
    status: Option<WorkflowStatus>,
    /// Only workflows created at or after this RFC 3339 time (`2026-12-01T00:00:00Z`).
    #[serde(rename = "createdAfter")]
    created_after: Option<String>,
    /// Only workflows created before this RFC 3339 time.
    #[serde(rename = "createdBefore")]
    created_before: Option<String>,
    /// Matching workflows to pass over first (RackHD's paging); deep pages should follow the
    /// cursor.
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    /// The page size.
    #[serde(rename = "$top")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    top: Option<usize>,
    /// Where the previous page ended: from the `Link` header.
    cursor: Option<String>,
}

impl ListQuery {
    fn filter(self) -> Result<ListFilter> {
        let time = |field: &str, v: Option<String>| -> Result<Option<u64>> {
            v.map(|t| {
                metalgraph_engine::clock::parse_rfc3339(&t).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{field} {t:?} is not an RFC 3339 time like 2026-12-01T00:00:00Z"
                    ))
                })
            })
            .transpose()
        };
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
        Ok(ListFilter {
            active: self.active,
            node: nonempty(self.node),
            graph: nonempty(self.graph),
            status: self.status,
            created_after: time("createdAfter", self.created_after)?,
            created_before: time("createdBefore", self.created_before)?,
            skip: self.skip.unwrap_or(0),
            limit: self.top,
            cursor: nonempty(self.cursor),
        })
    }
}

/// A page as RackHD lists it (a JSON array), with the next page's link when there is one:
/// the same path and query, `$skip` dropped, `cursor` set.
pub(super) fn page_response<T: serde::Serialize>(uri: &Uri, page: Page<T>) -> Response {
    let mut response = Json(page.items).into_response();
    if let Some(next) = page.next {
        let mut query: Vec<String> = uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .filter(|p| {
                let key = p.split('=').next().unwrap_or("");
                !matches!(key, "cursor" | "$skip" | "%24skip")
            })
            .map(str::to_owned)
            .collect();
        query.push(format!("cursor={}", crate::boot::query_escape(&next)));
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"));
        if let Ok(v) = axum::http::HeaderValue::from_str(&link) {
            response.headers_mut().insert(axum::http::header::LINK, v);
        }
    }
    response
}

/// Workflows, newest first, one page, filtered (docs/lists.md).
#[utoipa::path(
    get,
    path = "/workflows",
    tag = "workflows",
    params(ListQuery),
    responses(
        (status = 200, description = "One page of workflows", body = Vec<WorkflowView>,
            headers(("Link" = String, description = "`<...>; rel=\"next\"`: the next page, when this one is full"))),
        (status = 400, description = "A bad filter (a time that is not RFC 3339, ...) or page ($top outside 1 to 1000, a cursor from elsewhere)", body = ErrorBody),
    )
)]
async fn list_workflows(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<ListQuery>,
) -> Result<Response> {
    let page = s.engine.list_page(&q.filter()?).await?;
    Ok(page_response(&uri, page))
}

/// A node's workflows (RackHD's per-node listing), newest first, with the same filters and
/// paging.
#[utoipa::path(
    get,
    path = "/nodes/{id}/workflows",
    tag = "workflows",
    params(("id" = String, Path, description = "The node's id"), ListQuery),
    responses(
        (status = 200, description = "One page of the node's workflows", body = Vec<WorkflowView>,
            headers(("Link" = String, description = "`<...>; rel=\"next\"`: the next page, when this one is full"))),
        (status = 400, description = "A bad filter or page, or a `node` other than the path's", body = ErrorBody),
        (status = 404, description = "No node has this id", body = ErrorBody),
    )
)]
async fn list_node_workflows(
    State(s): State<AppState>,
    Path(node): Path<String>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<ListQuery>,
) -> Result<Response> {
    if s.engine.nodes().get(&node).await?.is_none() {
        return Err(ApiError::not_found("node", &node));
    }
    if q.node.as_ref().is_some_and(|n| *n != node) {
        return Err(ApiError::bad_request(format!(
            "query parameter node={} contradicts the path's node {node}",
            q.node.unwrap_or_default()
        )));
    }
    let filter = ListFilter {
        node: Some(node),
        ..q.filter()?
    };
    let page = s.engine.list_page(&filter).await?;
    Ok(page_response(&uri, page))
}

/// One workflow, with its tasks.
#[utoipa::path(
    get,
    path = "/workflows/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "The workflow's instanceId")),
    responses(
        (status = 200, description = "The workflow", body = WorkflowView),
        (status = 404, description = "No workflow has this id", body = ErrorBody),
    )
)]
async fn get_workflow(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkflowView>> {
    match s.engine.get(&id).await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::not_found("workflow", &id)),
    }
}

/// Deletes a finished workflow and its tasks.
#[utoipa::path(
    delete,
    path = "/workflows/{id}",
    tag = "workflows",
    params(("id" = String, Path, description = "The workflow's instanceId")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No workflow has this id", body = ErrorBody),
        (status = 409, description = "The workflow is unfinished, or is the subgraph of an unfinished task", body = ErrorBody),
    )
)]
async fn delete_workflow(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    s.engine.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /workflows/{id}/action`: RackHD's `{"command": "cancel", "options": {}}`, or
/// `{"command": "rerun", "options": {...}}`. Other fields are ignored.
#[derive(Debug, Deserialize, ToSchema)]
struct ActionBody {
    /// What to do: `cancel` or `rerun`.
    #[schema(example = "rerun")]
    command: Option<String>,
    /// For `rerun`: option layers (`defaults`, `<label>`) merged over the old run's, a key
    /// given replacing that layer's value. Ignored by `cancel`, as RackHD's `options` are.
    #[serde(default)]
    #[schema(value_type = Option<HashMap<String, Object>>)]
    options: Value,
}

/// Acts on a workflow: `{"command": "cancel"}` cancels it and its running tasks;
/// `{"command": "rerun"}` reruns a failed or cancelled one from where it stopped, as a new
/// workflow whose `rerunOf` names this one: tasks that succeeded keep their state and
/// output, the others run again.
#[utoipa::path(
    put,
    path = "/workflows/{id}/action",
    tag = "workflows",
    params(("id" = String, Path, description = "The workflow's instanceId")),
    request_body(content = ActionBody, description = "The command, and for `rerun` its option overrides"),
    responses(
        (status = 201, description = "`rerun`: the new workflow was created and scheduled", body = WorkflowView,
            links(
            ("get" = (operation_id = "get_workflow", parameters(("id" = "$response.body#/instanceId")))),
            ("cancel" = (operation_id = "workflow_action", parameters(("id" = "$response.body#/instanceId")))),
            ("delete" = (operation_id = "delete_workflow", parameters(("id" = "$response.body#/instanceId")))),
        )),
        (status = 202, description = "`cancel`: the workflow has been cancelled", body = WorkflowView),
        (status = 400, description = "No command, an unknown one, or `rerun` options that are not objects or that the graph's tasks refuse", body = ErrorBody),
        (status = 404, description = "No workflow has this id; for `rerun`, its graph or node no longer exists", body = ErrorBody),
        (status = 409, description = "`cancel`: the workflow has already finished. `rerun`: the workflow is not failed or cancelled, is a subgraph, or its node already runs a workflow", body = ErrorBody),
        (status = 422, description = "`rerun`: the graph is invalid with these options", body = ErrorBody),
    )
)]
async fn workflow_action(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<(StatusCode, Json<WorkflowView>)> {
    let action: ActionBody = decode(body, "workflow action")?;
    match action.command.as_deref() {
        Some("cancel") => {
            let view = s.engine.cancel(&id).await?;
            Ok((StatusCode::ACCEPTED, Json(view)))
        }
        Some("rerun") => {
            let view = s.engine.rerun(&id, run_options(action.options)?).await?;
            Ok((StatusCode::CREATED, Json(view)))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown command '{other}' for workflow {id} (expected cancel or rerun)"
        ))),
        None => Err(ApiError::bad_request(
            "field 'command' is required (expected cancel or rerun)",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// A new node, `POST /nodes`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NodeInput {
    /// A caller-chosen id; a UUID is generated when absent.
    id: Option<String>,
    /// Every node needs a name.
    #[schema(value_type = String, required = true, example = "rack1-u08")]
    name: Option<String>,
    /// MAC addresses (normalised to lower case with colons) and other identifiers.
    #[serde(default)]
    identifiers: Vec<String>,
    /// `compute` when absent.
    #[serde(rename = "type")]
    node_type: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// How its BMC is reached; drivers use the first.
    #[serde(default, deserialize_with = "text::objects")]
    obms: Vec<Obm>,
}

/// `PATCH /nodes/{id}`: every field given replaces the stored one.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct NodePatch {
    name: Option<String>,
    identifiers: Option<Vec<String>>,
    #[serde(rename = "type")]
    node_type: Option<String>,
    tags: Option<Vec<String>>,
    /// Replaces the OBMs; a password left out is kept only for the same BMC (host and port).
    #[serde(default, deserialize_with = "text::optional_objects")]
    obms: Option<Vec<Obm>>,
}

/// `GET /nodes`: filters and paging, in id order (docs/lists.md).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct NodeListQuery {
    /// Only nodes with this tag.
    tag: Option<String>,
    /// Only nodes of this type (`compute`, ...).
    #[serde(rename = "type")]
    node_type: Option<String>,
    /// Only nodes whose OBM has this host, as stored: a name, an address or a base URL.
    endpoint: Option<String>,
    /// Matching nodes to pass over first (RackHD's paging); deep pages should follow the
    /// cursor.
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    /// The page size.
    #[serde(rename = "$top")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    top: Option<usize>,
    /// Where the previous page ended: from the `Link` header.
    cursor: Option<String>,
}

/// Nodes in id order, one page, filtered. OBM passwords are never shown: each OBM's config
/// has `passwordSet`.
#[utoipa::path(
    get,
    path = "/nodes",
    tag = "nodes",
    params(NodeListQuery),
    responses(
        (status = 200, description = "One page of nodes", body = Vec<Node>,
            headers(("Link" = String, description = "`<...>; rel=\"next\"`: the next page, when this one is full"))),
        (status = 400, description = "A bad filter or page", body = ErrorBody),
    )
)]
async fn list_nodes(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<NodeListQuery>,
) -> Result<Response> {
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let filter = NodeFilter {
        tag: nonempty(q.tag),
        node_type: nonempty(q.node_type),
        endpoint: nonempty(q.endpoint),
        skip: q.skip.unwrap_or(0),
        limit: q.top,
        cursor: nonempty(q.cursor),
    };
    let page = s.engine.nodes().list_page(&filter).await?;
    let page = Page {
        items: page.items.iter().map(Node::public).collect::<Vec<_>>(),
        next: page.next,
    };
    Ok(page_response(&uri, page))
}

/// Registers a node.
#[utoipa::path(
    post,
    path = "/nodes",
    tag = "nodes",
    request_body(content = NodeInput, description = "The node"),
    responses(
        (status = 201, description = "The node, as stored", body = Node, links(
            ("get" = (operation_id = "get_node", parameters(("id" = "$response.body#/id")))),
            ("patch" = (operation_id = "patch_node", parameters(("id" = "$response.body#/id")))),
            ("delete" = (operation_id = "delete_node", parameters(("id" = "$response.body#/id")))),
            ("run" = (operation_id = "run_on_node", parameters(("id" = "$response.body#/id")))),
        )),
        (status = 400, description = "A field breaks a node rule (no name, a control character, an OBM without service, a URL as systemId, ...)", body = ErrorBody),
        (status = 409, description = "The id, or one of the identifiers, belongs to another node", body = ErrorBody),
    )
)]
async fn create_node(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let input: NodeInput = decode(body, "node")?;
    let node = Node {
        id: input.id.unwrap_or_default(),
        name: input.name.unwrap_or_default(),
        identifiers: input.identifiers,
        node_type: input.node_type.unwrap_or_else(|| "compute".to_owned()),
        tags: input.tags,
        obms: input.obms,
        created_at: String::new(),
        updated_at: String::new(),
    };
    let node = s.engine.nodes().create(node).await?;
    Ok((StatusCode::CREATED, Json(node.public())))
}

/// One node.
#[utoipa::path(
    get,
    path = "/nodes/{id}",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node", body = Node),
        (status = 404, description = "No node has this id", body = ErrorBody),
    )
)]
async fn get_node(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    match s.engine.nodes().get(&id).await? {
        Some(n) => Ok(Json(n.public())),
        None => Err(ApiError::not_found("node", &id)),
    }
}

/// Changes a node: every field given replaces the stored one.
#[utoipa::path(
    patch,
    path = "/nodes/{id}",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    request_body(content = Option<NodePatch>, description = "The fields to replace; none changes nothing"),
    responses(
        (status = 200, description = "The node, as stored", body = Node),
        (status = 400, description = "A field breaks a node rule", body = ErrorBody),
        (status = 404, description = "No node has this id", body = ErrorBody),
        (status = 409, description = "An identifier belongs to another node, or the node changed meanwhile", body = ErrorBody),
    )
)]
async fn patch_node(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>> {
    let patch: NodePatch = decode(body, "node patch")?;
    let node = s
        .engine
        .nodes()
        .update(&id, |n| {
            if let Some(name) = patch.name {
                n.name = name;
            }
            if let Some(identifiers) = patch.identifiers {
                n.identifiers = identifiers;
            }
            if let Some(t) = patch.node_type {
                n.node_type = t;
            }
            if let Some(tags) = patch.tags {
                n.tags = tags;
            }
            if let Some(obms) = patch.obms {
                n.replace_obms(obms)?;
            }
            Ok(())
        })
        .await?;
    Ok(Json(node.public()))
}

/// Deletes a node that runs no workflow.
#[utoipa::path(
    delete,
    path = "/nodes/{id}",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No node has this id", body = ErrorBody),
        (status = 409, description = "The node runs a workflow", body = ErrorBody),
    )
)]
async fn delete_node(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    s.engine.nodes().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Registers a webhook: every matching event committed from now on is `POST`ed to `url`,
/// in order, at least once (docs/events.md).
#[utoipa::path(
    post,
    path = "/hooks",
    tag = "hooks",
    request_body(content = HookSpec, description = "Where to deliver, which events, and the signing secret"),
    responses(
        (status = 201, description = "The hook and its delivery status", body = Object, links(
            ("get" = (operation_id = "get_hook", parameters(("id" = "$response.body#/id")))),
            ("delete" = (operation_id = "delete_hook", parameters(("id" = "$response.body#/id")))),
        )),
        (status = 400, description = "Not an http(s) URL with a host, or a secret of the wrong length", body = ErrorBody),
        (status = 409, description = "The server keeps as many hooks as it may", body = ErrorBody),
    )
)]
async fn create_hook(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let spec: HookSpec = decode(body, "hook")?;
    Ok((StatusCode::CREATED, Json(s.hooks.create(spec).await?)))
}

/// Every hook with its delivery status (never its secret).
#[utoipa::path(
    get,
    path = "/hooks",
    tag = "hooks",
    responses((status = 200, description = "The hooks", body = Vec<Object>))
)]
async fn list_hooks(State(s): State<AppState>) -> Result<Json<Value>> {
    Ok(Json(Value::Array(s.hooks.list().await?)))
}

/// One hook with its delivery status.
#[utoipa::path(
    get,
    path = "/hooks/{id}",
    tag = "hooks",
    params(("id" = String, Path, description = "The hook's id")),
    responses(
        (status = 200, description = "The hook", body = Object),
        (status = 404, description = "No hook has this id", body = ErrorBody),
    )
)]
async fn get_hook(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(s.hooks.get(&id).await?))
}

/// Deletes a hook; its deliveries stop.
#[utoipa::path(
    delete,
    path = "/hooks/{id}",
    tag = "hooks",
    params(("id" = String, Path, description = "The hook's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No hook has this id", body = ErrorBody),
    )
)]
async fn delete_hook(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    s.hooks.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A node's OBMs as the outside world may see them (passwords redacted).
fn public_obms(node: &Node) -> Value {
    node.public()
        .get("obms")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()))
}

/// A node's OBMs (passwords never shown: `passwordSet` instead).
#[utoipa::path(
    get,
    path = "/nodes/{id}/obm",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The node's OBMs", body = Vec<Obm>),
        (status = 404, description = "No node has this id", body = ErrorBody),
    )
)]
async fn get_obm(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    match s.engine.nodes().get(&id).await? {
        Some(n) => Ok(Json(public_obms(&n))),
        None => Err(ApiError::not_found("node", &id)),
    }
}

/// Sets one OBM: it replaces the node's OBM with the same service, or is added after the
/// existing ones.
#[utoipa::path(
    put,
    path = "/nodes/{id}/obm",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    request_body(content = Obm, description = "The OBM; a password left out is kept only for the same BMC"),
    responses(
        (status = 200, description = "The node's OBMs", body = Vec<Obm>),
        (status = 400, description = "The OBM breaks a node rule (no service, a URL as systemId, a password needed)", body = ErrorBody),
        (status = 404, description = "No node has this id", body = ErrorBody),
        (status = 409, description = "The node changed meanwhile", body = ErrorBody),
    )
)]
async fn put_obm(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>> {
    let obm: Obm = decode(body, "OBM")?;
    let node = s.engine.nodes().set_obm(&id, obm).await?;
    Ok(Json(public_obms(&node)))
}

/// A node's catalogs (inventory), one per source.
#[utoipa::path(
    get,
    path = "/nodes/{id}/catalogs",
    tag = "nodes",
    params(("id" = String, Path, description = "The node's id")),
    responses(
        (status = 200, description = "The catalogs, each `{source, data, ...}`", body = Vec<Object>),
        (status = 404, description = "No node has this id", body = ErrorBody),
    )
)]
async fn list_catalogs(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Value>>> {
    let nodes = s.engine.nodes();
    if nodes.get(&id).await?.is_none() {
        return Err(ApiError::not_found("node", &id));
    }
    Ok(Json(nodes.catalogs(&id).await?))
}

/// A node's catalog from one source (`redfish`, `pxe`, ...).
#[utoipa::path(
    get,
    path = "/nodes/{id}/catalogs/{source}",
    tag = "nodes",
    params(
        ("id" = String, Path, description = "The node's id"),
        ("source" = String, Path, description = "The catalog's source", example = "redfish"),
    ),
    responses(
        (status = 200, description = "The catalog", body = Object),
        (status = 404, description = "No node has this id, or it has no catalog from this source", body = ErrorBody),
    )
)]
async fn get_catalog(
    State(s): State<AppState>,
    Path((id, source)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let nodes = s.engine.nodes();
    if nodes.get(&id).await?.is_none() {
        return Err(ApiError::not_found("node", &id));
    }
    nodes
        .catalogs(&id)
        .await?
        .into_iter()
        .find(|c| c.get("source").and_then(Value::as_str) == Some(source.as_str()))
        .map(Json)
        .ok_or_else(|| ApiError::not_found(&format!("catalog of node {id} from source"), &source))
}

// ---------------------------------------------------------------------------------------
// Node-facing

/// `POST /notification?nodeId=&token=`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
struct NotificationQuery {
    /// The node calling back.
    node_id: Option<String>,
    /// The waiting task's token (else the body's `token`). Without one (RackHD's
    /// installers send none), the callback is taken only from a request that proves it is
    /// the node: its capability in `cap`, its full-mode DHCP lease, or `node_tokens = open`.
    token: Option<String>,
    /// The node's capability, for a callback without a token.
    cap: Option<String>,
}

/// An installer's completion callback: the task waiting for it (`wait.notification`)
/// succeeds with the body (less `token`) as its output.
///
/// Answered only once the task's end is committed, so a 200 survives any crash. A wrong
/// token and a node on which nothing waits get the same 404, so that nobody can probe which
/// nodes wait.
#[utoipa::path(
    post,
    path = "/notification",
    tag = "node-facing",
    params(NotificationQuery),
    request_body(content = Option<Object>, description = "What the installer reports; may hold the token as `token`"),
    responses(
        (status = 200, description = "Delivered: `{status: delivered, task: <label>}`", body = Object),
        (status = 400, description = "No token, or a body that is not an object", body = ErrorBody),
        (status = 404, description = "No task of the node waits for a notification with this token (nothing waits, or the token is wrong: one answer)", body = ErrorBody),
    )
)]
async fn notification_post(
    state: State<AppState>,
    peer: Peer,
    query: Query<NotificationQuery>,
    body: Body,
) -> Result<Json<Value>> {
    notification(state, peer, query, body).await
}

/// The notification as `GET`, for iPXE scripts (stock iPXE cannot POST); the token comes in
/// the query.
#[utoipa::path(
    get,
    path = "/notification",
    tag = "node-facing",
    params(NotificationQuery),
    responses(
        (status = 200, description = "Delivered: `{status: delivered, task: <label>}`", body = Object),
        (status = 400, description = "No token", body = ErrorBody),
        (status = 404, description = "No task of the node waits for a notification with this token (nothing waits, or the token is wrong: one answer)", body = ErrorBody),
    )
)]
async fn notification_get(
    state: State<AppState>,
    peer: Peer,
    query: Query<NotificationQuery>,
    body: Body,
) -> Result<Json<Value>> {
    notification(state, peer, query, body).await
}

async fn notification(
    State(s): State<AppState>,
    Peer(peer): Peer,
    Query(q): Query<NotificationQuery>,
    Body(body): Body,
) -> Result<Json<Value>> {
    let mut body = match body {
        Value::Null => Map::new(),
        Value::Object(m) => m,
        other => {
            return Err(ApiError::bad_request(format!(
                "a notification body must be an object, got {}",
                json_kind(&other)
            )));
        }
    };
    // The token authenticates the callback; it is taken out so that it never lands in the
    // task's output, which workflows show.
    let body_token = body.remove("token");
    let node = q.node_id.filter(|n| !n.is_empty());
    let token = q
        .token
        .or_else(|| body_token.and_then(|t| t.as_str().map(str::to_owned)))
        .filter(|t| !t.is_empty());
    let token = match (token, &node) {
        (Some(t), _) => t,
        (None, Some(id)) => proven_token(&s, id, q.cap.as_deref(), peer).await?,
        (None, None) => {
            return Err(ApiError::bad_request(
                "a notification needs a token (query parameter or body field 'token') or, \
                 from the node itself, its nodeId",
            ));
        }
    };
    // Answered only once the task's end is committed: a 200 means the callback survives
    // any crash, and the installer never calls twice.
    let label = s
        .engine
        .notify(node.as_deref(), &token, Value::Object(body))
        .await?;
    Ok(Json(json!({"status": "delivered", "task": label})))
}

/// The token of the task waiting for node `id`'s callback, for a callback that brings
/// none (as RackHD's installers do), when the request proves it is the node
/// (`boot::access`). Otherwise the answer a wrong token gets: nothing reveals whether a
/// task waits.
async fn proven_token(
    s: &AppState,
    id: &str,
    cap: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> Result<String> {
    let nothing = || ApiError::from(metalgraph_engine::not_waiting(Some(id)));
    let node = s.engine.nodes().get(id).await?.ok_or_else(nothing)?;
    let (w, proof) = proven_waiter(s, &node, cap, peer)
        .await
        .ok_or_else(nothing)?;
    debug!(node = %id, proof = ?proof, "a callback without a token, taken from the node");
    Ok(w.token)
}

/// The task waiting for `node`'s callback, when one waits and the request proves it comes
/// from the node (`boot::access`): its capability `cap`, or its address `peer`.
async fn proven_waiter(
    s: &AppState,
    node: &Node,
    cap: Option<&str>,
    peer: Option<std::net::IpAddr>,
) -> Option<(metalgraph_engine::WaitingTask, crate::boot::Proof)> {
    let w = s.engine.waiting_task(&node.id).await?;
    let proof = s.node_access.proof(node, &w.cap, cap, peer).await?;
    Some((w, proof))
}

/// `GET /templates/{name}?nodeId=`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
struct TemplateQuery {
    /// Required: the node the template is rendered for.
    node_id: Option<String>,
    /// The node's boot capability, as the URL the node was given carries it
    /// (`notification.cap` or `task.cap` in the template that named this URL).
    cap: Option<String>,
}

/// Renders template `name` (from the templates directory, else the ones shipped with
/// metalgraph) for one node, with strict undefined, over `node` (never a secret), `api`
/// (`base`, `nodeBase`, `files`) and, while a task of the node waits for its callback and
/// the request proves it is the node, `notification` (`url`, `token`, `workflowId`, `cap`),
/// `task` (`id`, `label`, `workflowId`, `nodeId`, `token`, `cap`) and `options` (the waiting
/// task's options, rendered as when it started: an OS install's version, repository...).
///
/// The proof is the node's capability for the waiting task in `cap=`, or (full DHCP) a
/// request from the address leased to one of the node's MACs (`boot::access`). Any other
/// request is answered exactly as if nothing waited: a template that uses `notification`
/// is then a 409, rather than a callback URL without a token, and the same 409 whether a
/// task waits or not. A printed value with a control character is a 422: it would add a
/// line to what the node runs.
#[utoipa::path(
    get,
    path = "/templates/{name}",
    tag = "node-facing",
    params(("name" = String, Path, description = "The template's file name in the templates directory, or a shipped template's", example = "kickstart-callback.ks"), TemplateQuery),
    responses(
        (status = 200, description = "The rendered template", body = String, content_type = "text/plain"),
        (status = 400, description = "No `nodeId`", body = ErrorBody),
        (status = 403, description = "The name leads outside the templates directory", body = ErrorBody),
        (status = 404, description = "No template (in the templates directory or shipped) or node of this name", body = ErrorBody),
        (status = 409, description = "The template uses `notification`, but no task of the node waits for one that this request may see (nothing waits, or the request does not prove it is the node: one answer)", body = ErrorBody),
        (status = 422, description = "The template does not render for this node", body = ErrorBody),
    )
)]
async fn template(
    State(s): State<AppState>,
    Peer(peer): Peer,
    Path(name): Path<String>,
    Query(q): Query<TemplateQuery>,
) -> Result<Response> {
    let node_id = q.node_id.filter(|n| !n.is_empty()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "query parameter 'nodeId' is required: the node template {name} is rendered for"
        ))
    })?;
    let source = files::template_source(s.templates_dir.as_deref(), &name).await?;
    let node = s
        .engine
        .nodes()
        .get(&node_id)
        .await?
        .ok_or_else(|| ApiError::not_found("node", &node_id))?;
    let node_base = s.api.node_base.trim_end_matches('/').to_owned();
    let mut vars = json!({
        "node": node.template_view(),
        "api": s.api.node_vars(),
    });
    // The waiting task's token is shown only to the node itself; to anyone else the node
    // looks like one on which nothing waits.
    let waiting = proven_waiter(&s, &node, q.cap.as_deref(), peer).await;
    if waiting.is_none() && s.engine.waiting_task(&node.id).await.is_some() {
        debug!(node = %node.id, template = %name, "template rendered without the callback: the request does not prove it is the node");
    }
    if let Some((w, proof)) = &waiting {
        vars["notification"] = crate::boot::waiting_vars(
            &node_base,
            &node.id,
            &w.workflow_id,
            &w.token,
            w.cap.as_str(),
        );
        // The waiting task's options (an OS install's version, repository, host name...),
        // rendered as when it started.
        let tasks = s.engine.current_tasks(&node.id).await?;
        if let Some(t) = tasks.iter().find(|t| t.task_id == w.task_id) {
            let task = crate::boot::task_vars(&node.id, t, true);
            let options = crate::boot::task_options(
                &s.api,
                Value::Object(t.context.clone()),
                vars["node"].clone(),
                t,
                task.clone(),
            )
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "template_error",
                    format!(
                        "template {name} cannot be rendered for node {}: the options of its task {}: {e}",
                        node.id, t.label
                    ),
                )
            })?;
            vars["task"] = task;
            vars["options"] = Value::Object(options);
        }
        debug!(node = %node.id, template = %name, proof = ?proof, "template rendered with the callback");
    }
    // No printed value may add or end a line: the node's name, tags and OBM host are the
    // node's or its BMC's, not the operator's.
    let renderer = Renderer::checked(template::no_control_characters);
    let rendered = renderer.render_str(&source, &vars).map_err(|e| {
        if waiting.is_none() && source.contains("notification") {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "template {name} uses 'notification', but no task of node {} waits for a \
                     notification that this request may see: run a graph with \
                     Task.Wait.Notification on the node, and fetch the template from the node \
                     with the cap= its URLs carry (or, with full DHCP, from its leased address) \
                     ({e})",
                    node.id
                ),
            )
        } else {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "template_error",
                format!(
                    "template {name} cannot be rendered for node {}: {e}",
                    node.id
                ),
            )
        }
    })?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        rendered,
    )
        .into_response())
}
