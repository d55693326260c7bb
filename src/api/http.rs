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
use axum::routing::{get, post, put};
use metalgraph_engine::definitions::{self, Source};
use metalgraph_engine::job::json_kind;
use metalgraph_engine::model::{Definition, RunOptions};
use metalgraph_engine::nodes::{Node, NodeFilter, Obm};
use metalgraph_engine::template::{self, Renderer};
use metalgraph_engine::{ListFilter, Page, RunRequest, WorkflowStatus, WorkflowView};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tracing::debug;

use super::extract::{Body, Path, Query, decode};
use super::{ApiError, AppState, files};
use crate::hooks::HookSpec;

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// The management API, and the web view (`/ui/`) that reads it.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/health", get(health))
        .route("/events", get(super::events::events))
        .route("/workflows/graphs", get(list_graphs).put(put_graph))
        .route(
            "/workflows/graphs/{name}",
            get(get_graph).delete(delete_graph),
        )
        .route("/workflows/tasks", get(list_tasks).put(put_task))
        .route("/workflows/tasks/{name}", get(get_task).delete(delete_task))
        .route("/workflows", get(list_workflows).post(run_workflow))
        .route("/workflows/{id}", get(get_workflow).delete(delete_workflow))
        .route("/workflows/{id}/action", put(workflow_action))
        .route("/nodes", get(list_nodes).post(create_node))
        .route(
            "/nodes/{id}",
            get(get_node).patch(patch_node).delete(delete_node),
        )
        .route(
            "/nodes/{id}/workflows",
            post(run_on_node).get(list_node_workflows),
        )
        .route("/nodes/{id}/obm", get(get_obm).put(put_obm))
        .route("/nodes/{id}/catalogs", get(list_catalogs))
        .route("/nodes/{id}/catalogs/{source}", get(get_catalog))
        .route("/hooks", get(list_hooks).post(create_hook))
        .route("/hooks/{id}", get(get_hook).delete(delete_hook));
    let router = Router::new()
        .nest("/api/2.0", api)
        .route("/metrics", get(metrics))
        .merge(super::ui::routes());
    finish(router, state)
}

/// A router serving only `GET /metrics`, for a listener of its own (`metrics_listen`).
pub fn metrics_app(state: AppState) -> Router {
    finish(Router::new().route("/metrics", get(metrics)), state)
}

/// `GET /metrics`: the process's metrics, OpenMetrics text.
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
/// the files directory; `/api/2.0/templates/{name}` renders a template for a node.
pub fn node_app(state: AppState) -> Router {
    let api = Router::new()
        // GET too: stock iPXE cannot POST (its `param` command is not built in by default),
        // so a profile script reports with GET.
        .route("/notification", post(notification).get(notification))
        .route("/profiles", get(super::profiles::profiles))
        .route("/templates/{name}", get(template));
    let router = Router::new()
        .nest("/api/2.0", api)
        .route("/files/{*path}", get(files::serve_file));
    finish(router, state)
}

/// The layers both routers share: JSON fallbacks, the body limit and request logging.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    router
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.body_limit))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
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

async fn health(State(s): State<AppState>) -> Result<Json<Value>> {
    let store = s.engine.store_backend();
    match s.engine.health() {
        Ok(()) => Ok(Json(json!({"status": "ok", "store": store}))),
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

async fn list_graphs(State(s): State<AppState>) -> Result<Json<Vec<Value>>> {
    let graphs = s.engine.definitions().list_graphs().await?;
    Ok(Json(
        graphs
            .into_iter()
            .map(|(g, src)| with_source(g, src))
            .collect(),
    ))
}

async fn get_graph(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    match s.engine.definitions().get_graph(&name).await? {
        Some((g, src)) => Ok(Json(with_source(g, src))),
        None => Err(ApiError::not_found("graph", &name)),
    }
}

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

async fn delete_graph(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode> {
    s.engine.definitions().delete_graph(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_tasks(State(s): State<AppState>) -> Result<Json<Vec<Value>>> {
    let tasks = s.engine.definitions().list_tasks().await?;
    Ok(Json(
        tasks
            .into_iter()
            .map(|(t, src)| with_source(t, src))
            .collect(),
    ))
}

async fn get_task(State(s): State<AppState>, Path(name): Path<String>) -> Result<Json<Value>> {
    match s.engine.definitions().get_task(&name).await? {
        Some((t, src)) => Ok(Json(with_source(t, src))),
        None => Err(ApiError::not_found("task", &name)),
    }
}

async fn delete_task(State(s): State<AppState>, Path(name): Path<String>) -> Result<StatusCode> {
    s.engine.definitions().delete_task(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NameQuery {
    name: Option<String>,
}

/// `POST /workflows`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunBody {
    name: Option<String>,
    #[serde(default)]
    options: Value,
    node: Option<String>,
}

/// `POST /nodes/{id}/workflows`: the node comes from the path.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeRunBody {
    name: Option<String>,
    #[serde(default)]
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
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    active: Option<bool>,
    node: Option<String>,
    graph: Option<String>,
    status: Option<WorkflowStatus>,
    #[serde(rename = "createdAfter")]
    created_after: Option<String>,
    #[serde(rename = "createdBefore")]
    created_before: Option<String>,
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    #[serde(rename = "$top")]
    top: Option<usize>,
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
fn page_response<T: serde::Serialize>(uri: &Uri, page: Page<T>) -> Response {
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
        query.push(format!("cursor={}", query_escape(&next)));
        let link = format!("<{}?{}>; rel=\"next\"", uri.path(), query.join("&"));
        if let Ok(v) = axum::http::HeaderValue::from_str(&link) {
            response.headers_mut().insert(axum::http::header::LINK, v);
        }
    }
    response
}

async fn list_workflows(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<ListQuery>,
) -> Result<Response> {
    let page = s.engine.list_page(&q.filter()?).await?;
    Ok(page_response(&uri, page))
}

/// `GET /nodes/{id}/workflows`: RackHD's per-node listing, with the same filters and paging.
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

async fn get_workflow(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<WorkflowView>> {
    match s.engine.get(&id).await? {
        Some(v) => Ok(Json(v)),
        None => Err(ApiError::not_found("workflow", &id)),
    }
}

async fn delete_workflow(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    s.engine.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /workflows/{id}/action`: RackHD's `{"command": "cancel", "options": {}}`.
#[derive(Debug, Deserialize)]
struct ActionBody {
    command: Option<String>,
}

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
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown command '{other}' for workflow {id} (expected cancel)"
        ))),
        None => Err(ApiError::bad_request(
            "field 'command' is required (expected cancel)",
        )),
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// `POST /nodes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeInput {
    /// A caller-chosen id; a UUID is generated when absent.
    id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    identifiers: Vec<String>,
    #[serde(rename = "type")]
    node_type: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    obms: Vec<Obm>,
}

/// `PATCH /nodes/{id}`: every field given replaces the stored one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodePatch {
    name: Option<String>,
    identifiers: Option<Vec<String>>,
    #[serde(rename = "type")]
    node_type: Option<String>,
    tags: Option<Vec<String>>,
    obms: Option<Vec<Obm>>,
}

/// `GET /nodes`: filters and paging, in id order (docs/lists.md).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeListQuery {
    tag: Option<String>,
    #[serde(rename = "type")]
    node_type: Option<String>,
    endpoint: Option<String>,
    #[serde(rename = "$skip")]
    skip: Option<usize>,
    #[serde(rename = "$top")]
    top: Option<usize>,
    cursor: Option<String>,
}

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

async fn get_node(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    match s.engine.nodes().get(&id).await? {
        Some(n) => Ok(Json(n.public())),
        None => Err(ApiError::not_found("node", &id)),
    }
}

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

async fn delete_node(State(s): State<AppState>, Path(id): Path<String>) -> Result<StatusCode> {
    s.engine.nodes().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_hook(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let spec: HookSpec = decode(body, "hook")?;
    Ok((StatusCode::CREATED, Json(s.hooks.create(spec).await?)))
}

async fn list_hooks(State(s): State<AppState>) -> Json<Value> {
    Json(Value::Array(s.hooks.list().await))
}

async fn get_hook(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    Ok(Json(s.hooks.get(&id).await?))
}

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

async fn get_obm(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    match s.engine.nodes().get(&id).await? {
        Some(n) => Ok(Json(public_obms(&n))),
        None => Err(ApiError::not_found("node", &id)),
    }
}

/// `PUT /nodes/{id}/obm`: sets one OBM. It replaces the node's OBM with the same service,
/// or is added after the existing ones.
async fn put_obm(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>> {
    let obm: Obm = decode(body, "OBM")?;
    let node = s.engine.nodes().set_obm(&id, obm).await?;
    Ok(Json(public_obms(&node)))
}

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
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NotificationQuery {
    node_id: Option<String>,
    token: Option<String>,
}

async fn notification(
    State(s): State<AppState>,
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
    let token = q
        .token
        .or_else(|| body_token.and_then(|t| t.as_str().map(str::to_owned)))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "a notification needs a token (query parameter or body field 'token')",
            )
        })?;
    let node = q.node_id.filter(|n| !n.is_empty());
    // Answered only once the task's end is committed: a 200 means the callback survives
    // any crash, and the installer never calls twice.
    let label = s
        .engine
        .notify(node.as_deref(), &token, Value::Object(body))
        .await?;
    Ok(Json(json!({"status": "delivered", "task": label})))
}

/// `GET /templates/{name}?nodeId=`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TemplateQuery {
    node_id: Option<String>,
}

/// Renders template `name` from the templates directory for one node, with strict
/// undefined, over `node` (never a secret), `api` (`base`, `nodeBase`, `files`) and, while
/// a task of the node waits for its callback, `notification` (`url`, `token`,
/// `workflowId`). A template that uses `notification` while nothing waits is a 409 saying
/// so, rather than a callback URL without a token. A printed value with a control
/// character is a 422: it would add a line to what the node runs.
async fn template(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<TemplateQuery>,
) -> Result<Response> {
    let Some(dir) = s.templates_dir.clone() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no templates directory is configured (templates_dir, --templates-dir, METALGRAPH_TEMPLATES_DIR)",
        ));
    };
    let node_id = q.node_id.filter(|n| !n.is_empty()).ok_or_else(|| {
        ApiError::bad_request(format!(
            "query parameter 'nodeId' is required: the node template {name} is rendered for"
        ))
    })?;
    let path = files::resolve(&dir, &name, "template").await?;
    let source = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| ApiError::internal(format_args!("cannot read {}: {e}", path.display())))?;
    let node = s
        .engine
        .nodes()
        .get(&node_id)
        .await?
        .ok_or_else(|| ApiError::not_found("node", &node_id))?;
    let node_base = s.api.node_base.trim_end_matches('/').to_owned();
    let files_base = node_base
        .strip_suffix("/api/2.0")
        .map(|root| format!("{root}/files"))
        .unwrap_or_default();
    let mut vars = json!({
        "node": node.template_view(),
        "api": {"base": s.api.base, "nodeBase": node_base, "files": files_base},
    });
    let waiting = s.engine.waiting_token(&node.id);
    if let Some((workflow_id, token)) = &waiting {
        vars["notification"] = json!({
            "url": format!(
                "{node_base}/notification?nodeId={}&token={}",
                query_escape(&node.id),
                query_escape(token)
            ),
            "token": token,
            "workflowId": workflow_id,
        });
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
                     notification; run a graph with Task.Wait.Notification on the node first ({e})",
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

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved
/// characters).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
