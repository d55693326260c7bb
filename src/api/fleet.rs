//! Fleet operations on the management API: registered endpoints (the Redfish services and
//! IPMI BMCs metalgraph talks to), the systems behind them, and bulk runs (docs/fleet.md).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{OriginalUri, State};
use axum::http::StatusCode;
use axum::response::Response;
use metalgraph_engine::batches::{BatchRecord, NewBatch};
use metalgraph_engine::endpoints::{Endpoint, EndpointPatch, NewEndpoint};
use metalgraph_engine::{Page, RunRequest};
use metalgraph_tasks::bmc::systems::{self, System};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::task::JoinSet;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::ErrorBody;
use super::extract::{Body, Path, Query, decode};
use super::http::{PageQuery, page_response};
use super::{ApiError, AppState};

type Result<T, E = ApiError> = std::result::Result<T, E>;

/// The graph `POST /endpoints/{id}/discover` runs.
pub const DISCOVERY_GRAPH: &str = "Graph.Endpoint.Discovery";

/// How many endpoints `GET /systems` reads at once.
const ENDPOINTS_AT_ONCE: usize = 8;

/// The fleet routes, relative to `/api/2.0`.
pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_endpoints, create_endpoint))
        .routes(routes!(get_endpoint, patch_endpoint, delete_endpoint))
        .routes(routes!(endpoint_systems))
        .routes(routes!(discover_endpoint))
        .routes(routes!(list_systems))
        .routes(routes!(list_batches, create_batch))
        .routes(routes!(get_batch))
        .routes(routes!(batch_action))
}

/// An endpoint as shown: without its password, with what uses it.
async fn view(s: &AppState, ep: &Endpoint) -> Result<Value> {
    let usage = s.engine.endpoint_usage(&ep.id).await?;
    let mut v = ep.public();
    if let Value::Object(m) = &mut v {
        m.insert("nodes".into(), json!(usage.nodes));
        m.insert("activeWorkflows".into(), json!(usage.active_workflows));
    }
    Ok(v)
}

/// The registered endpoints in id order, each with its usage: systems seen, nodes, active
/// workflows, last contact and last error.
#[utoipa::path(
    get,
    path = "/endpoints",
    tag = "fleet",
    params(PageQuery),
    responses(
        (status = 200, description = "One page of endpoints; a `Link` header names the next", body = [Object]),
        (status = 400, description = "A page size out of range", body = ErrorBody),
    )
)]
async fn list_endpoints(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<PageQuery>,
) -> Result<Response> {
    let page = s.engine.endpoints().page(&q.page()).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for ep in &page.items {
        items.push(view(&s, ep).await?);
    }
    Ok(page_response(
        &uri,
        Page {
            items,
            next: page.next,
        },
    ))
}

/// Registers a Redfish service or an IPMI BMC. The password is write-only.
#[utoipa::path(
    post,
    path = "/endpoints",
    tag = "fleet",
    request_body(content = NewEndpoint, description = "The endpoint"),
    responses(
        (status = 201, description = "The endpoint, as stored (no password)", body = Object, links(
            ("get" = (operation_id = "get_endpoint", parameters(("id" = "$response.body#/id")))),
            ("patch" = (operation_id = "patch_endpoint", parameters(("id" = "$response.body#/id")))),
            ("delete" = (operation_id = "delete_endpoint", parameters(("id" = "$response.body#/id")))),
            ("systems" = (operation_id = "endpoint_systems", parameters(("id" = "$response.body#/id")))),
            ("discover" = (operation_id = "discover_endpoint", parameters(("id" = "$response.body#/id")))),
        )),
        (status = 400, description = "A field is missing or wrong (a URL that is not http(s), an unknown service, ...)", body = ErrorBody),
        (status = 409, description = "Another endpoint has the name", body = ErrorBody),
    )
)]
async fn create_endpoint(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let new: NewEndpoint = decode(body, "endpoint")?;
    let ep = s.engine.endpoints().create(new).await?;
    Ok((StatusCode::CREATED, Json(view(&s, &ep).await?)))
}

/// One endpoint with its usage.
#[utoipa::path(
    get,
    path = "/endpoints/{id}",
    tag = "fleet",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The endpoint", body = Object),
        (status = 404, description = "No endpoint has this id", body = ErrorBody),
    )
)]
async fn get_endpoint(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    let ep = s.engine.endpoints().require(&id).await?;
    Ok(Json(view(&s, &ep).await?))
}

/// Changes an endpoint: the fields given replace the stored ones, and every node that
/// refers to it uses them from its next BMC call on (a password is rotated here once).
#[utoipa::path(
    patch,
    path = "/endpoints/{id}",
    tag = "fleet",
    params(("id" = String, Path, description = "The endpoint's id")),
    request_body(content = EndpointPatch, description = "The fields to replace"),
    responses(
        (status = 200, description = "The endpoint, as stored", body = Object),
        (status = 400, description = "A field is wrong, or the URL changes without a new password", body = ErrorBody),
        (status = 404, description = "No endpoint has this id", body = ErrorBody),
        (status = 409, description = "Another endpoint has the name", body = ErrorBody),
    )
)]
async fn patch_endpoint(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>> {
    let patch: EndpointPatch = if body.is_null() {
        EndpointPatch::default()
    } else {
        decode(body, "endpoint patch")?
    };
    let ep = s.engine.endpoints().update(&id, patch).await?;
    Ok(Json(view(&s, &ep).await?))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeleteEndpointQuery {
    /// `delete` also deletes the endpoint's nodes (none may run a workflow); without it
    /// the nodes stay, without the OBM that referred to the endpoint.
    nodes: Option<String>,
}

/// Deletes an endpoint. Refused while any of its nodes runs a workflow.
#[utoipa::path(
    delete,
    path = "/endpoints/{id}",
    tag = "fleet",
    params(("id" = String, Path, description = "The endpoint's id"), DeleteEndpointQuery),
    responses(
        (status = 200, description = "Deleted; which nodes were deleted and which lost the endpoint's OBM", body = Object),
        (status = 400, description = "`nodes` is not `delete`", body = ErrorBody),
        (status = 404, description = "No endpoint has this id", body = ErrorBody),
        (status = 409, description = "Some of its nodes run workflows (named)", body = ErrorBody),
    )
)]
async fn delete_endpoint(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<DeleteEndpointQuery>,
) -> Result<Json<Value>> {
    let delete_nodes = match q.nodes.as_deref() {
        None => false,
        Some("delete") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "nodes={other}: the only value is `delete` (also delete the endpoint's idle nodes)"
            )));
        }
    };
    let gone = s.engine.delete_endpoint(&id, delete_nodes).await?;
    Ok(Json(json!({
        "id": id,
        "nodesDeleted": gone.deleted,
        "nodesDetached": gone.detached,
    })))
}

/// The systems behind one endpoint, and the node each is.
async fn systems_of(s: &AppState, ep: &Endpoint) -> Result<Vec<Value>, String> {
    let found = systems::list(&s.drivers, ep).await;
    let outcome = found.as_ref().map(Vec::len).map_err(Clone::clone);
    s.engine.endpoints().record_contact(&ep.id, outcome).await;
    let found = found?;
    let nodes = s
        .engine
        .nodes()
        .by_endpoint(&ep.id)
        .await
        .map_err(|e| e.to_string())?;
    Ok(found
        .into_iter()
        .map(|sys| {
            let node = nodes.iter().find(|n| {
                n.obms.iter().any(|o| {
                    o.config.endpoint.as_deref() == Some(&ep.id)
                        && (o.config.system_id.as_deref().unwrap_or("") == sys.system_id
                            || o.config.system_id.as_deref() == Some(sys.path.as_str()))
                })
            });
            entry(&sys, ep, node.map(|n| n.id.as_str()))
        })
        .collect())
}

fn entry(sys: &System, ep: &Endpoint, node: Option<&str>) -> Value {
    let mut v = serde_json::to_value(sys).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert(
            "endpoint".into(),
            json!({ "id": ep.id, "name": ep.name, "service": ep.service }),
        );
        m.insert("node".into(), json!(node));
    }
    v
}

/// The endpoint's systems, read live from the service, each with the node it is (if any).
#[utoipa::path(
    get,
    path = "/endpoints/{id}/systems",
    tag = "fleet",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 200, description = "The systems", body = [Object]),
        (status = 404, description = "No endpoint has this id", body = ErrorBody),
        (status = 502, description = "The service could not be read (the message says why)", body = ErrorBody),
    )
)]
async fn endpoint_systems(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<Value>>> {
    let ep = s.engine.endpoints().require(&id).await?;
    systems_of(&s, &ep)
        .await
        .map(Json)
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "bad_gateway", e))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SystemQuery {
    /// Only the systems of this endpoint (id or name).
    endpoint: Option<String>,
    /// Only systems in this power state (`On`, `Off`, ...; any case).
    #[serde(rename = "powerState")]
    power_state: Option<String>,
    /// Only systems of this manufacturer (any case).
    manufacturer: Option<String>,
    /// Only systems of this model (any case).
    model: Option<String>,
}

/// The systems behind every endpoint, read live, filtered. An endpoint that cannot be read
/// is listed under `errors` and the others are still answered.
#[utoipa::path(
    get,
    path = "/systems",
    tag = "fleet",
    params(SystemQuery),
    responses(
        (status = 200, description = "`{systems: [...], errors: [{endpoint, error}]}`", body = Object),
        (status = 404, description = "`endpoint` names no endpoint", body = ErrorBody),
    )
)]
async fn list_systems(
    State(s): State<AppState>,
    Query(q): Query<SystemQuery>,
) -> Result<Json<Value>> {
    let mut endpoints = s.engine.endpoints().list().await?;
    if let Some(want) = &q.endpoint {
        endpoints.retain(|e| e.id == *want || e.name == *want);
        if endpoints.is_empty() {
            return Err(ApiError::not_found("endpoint", want));
        }
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(ENDPOINTS_AT_ONCE));
    let mut reads = JoinSet::new();
    for (i, ep) in endpoints.into_iter().enumerate() {
        let (s, limit) = (s.clone(), limit.clone());
        reads.spawn(async move {
            let _permit = limit.acquire_owned().await;
            let found = systems_of(&s, &ep).await;
            (i, ep, found)
        });
    }
    let mut results = BTreeMap::new();
    while let Some(done) = reads.join_next().await {
        let (i, ep, found) = done.map_err(ApiError::internal)?;
        results.insert(i, (ep, found));
    }
    let same = |want: &Option<String>, have: Option<&str>| {
        want.as_ref()
            .is_none_or(|w| have.is_some_and(|h| h.eq_ignore_ascii_case(w)))
    };
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    for (ep, outcome) in results.into_values() {
        match outcome {
            Ok(list) => found.extend(list.into_iter().filter(|v| {
                let field = |k: &str| v.get(k).and_then(Value::as_str);
                same(&q.power_state, field("powerState"))
                    && same(&q.manufacturer, field("manufacturer"))
                    && same(&q.model, field("model"))
            })),
            Err(error) => errors.push(json!({
                "endpoint": { "id": ep.id, "name": ep.name },
                "error": error,
            })),
        }
    }
    Ok(Json(json!({ "systems": found, "errors": errors })))
}

/// Runs discovery on the endpoint (a workflow of `Graph.Endpoint.Discovery`): a node is
/// created or updated for each system, its OBM referring to the endpoint.
#[utoipa::path(
    post,
    path = "/endpoints/{id}/discover",
    tag = "fleet",
    params(("id" = String, Path, description = "The endpoint's id")),
    responses(
        (status = 201, description = "The discovery workflow", body = metalgraph_engine::WorkflowView, links(
            ("workflow" = (operation_id = "get_workflow", parameters(("id" = "$response.body#/instanceId")))),
        )),
        (status = 404, description = "No endpoint has this id", body = ErrorBody),
    )
)]
async fn discover_endpoint(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<Value>)> {
    let ep = s.engine.endpoints().require(&id).await?;
    let mut defaults = Map::new();
    defaults.insert("endpoint".into(), Value::from(ep.id));
    let view = s
        .engine
        .run(RunRequest {
            graph: DISCOVERY_GRAPH.to_owned(),
            node: None,
            options: [("defaults".to_owned(), defaults)].into(),
        })
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::to_value(view).map_err(ApiError::internal)?),
    ))
}

/// A batch as shown: its record with the count of entries in each status.
fn batch_view(rec: &BatchRecord, with_entries: bool) -> Value {
    let mut v = serde_json::to_value(rec).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("total".into(), json!(rec.entries.len()));
        m.insert("counts".into(), json!(rec.counts()));
        if !with_entries {
            m.remove("entries");
        }
    }
    v
}

/// Runs a graph on many nodes: at most `maxConcurrent` workflows at once, durably (a
/// batch survives a restart and carries on). Busy or deleted nodes are skipped with a
/// reason; after `stopAfterFailures` failures no new workflow starts.
#[utoipa::path(
    post,
    path = "/batches",
    tag = "fleet",
    request_body(content = NewBatch, description = "The graph, its options, the nodes (ids or tags) and the limits"),
    responses(
        (status = 201, description = "The batch", body = BatchRecord, links(
            ("get" = (operation_id = "get_batch", parameters(("id" = "$response.body#/id")))),
            ("action" = (operation_id = "batch_action", parameters(("id" = "$response.body#/id")))),
        )),
        (status = 400, description = "No nodes, both or neither of nodes and tags, a limit out of range, or options the graph refuses", body = ErrorBody),
        (status = 404, description = "No graph has this name", body = ErrorBody),
    )
)]
async fn create_batch(
    State(s): State<AppState>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let new: NewBatch = decode(body, "batch")?;
    let rec = s.engine.create_batch(new).await?;
    Ok((StatusCode::CREATED, Json(batch_view(&rec, true))))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct BatchQuery {
    /// The page size.
    #[serde(rename = "$top")]
    #[param(minimum = 1, maximum = 1000, default = 100)]
    top: Option<usize>,
    /// Where the previous page ended: from the `Link` header.
    cursor: Option<String>,
}

/// Batches, newest first, with their counts (entries left out), one page at a time.
#[utoipa::path(
    get,
    path = "/batches",
    tag = "fleet",
    params(BatchQuery),
    responses(
        (status = 200, description = "One page of batches; a `Link` header names the next", body = [Object]),
        (status = 400, description = "A page size out of range", body = ErrorBody),
    )
)]
async fn list_batches(
    State(s): State<AppState>,
    OriginalUri(uri): OriginalUri,
    Query(q): Query<BatchQuery>,
) -> Result<Response> {
    let page = s.engine.batches().page(q.top, q.cursor).await?;
    let page = Page {
        items: page
            .items
            .iter()
            .map(|b| batch_view(b, false))
            .collect::<Vec<_>>(),
        next: page.next,
    };
    Ok(page_response(&uri, page))
}

/// One batch: counts by status and, per node, its status, workflow and reason.
#[utoipa::path(
    get,
    path = "/batches/{id}",
    tag = "fleet",
    params(("id" = String, Path, description = "The batch's id")),
    responses(
        (status = 200, description = "The batch", body = BatchRecord),
        (status = 404, description = "No batch has this id", body = ErrorBody),
    )
)]
async fn get_batch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>> {
    match s.engine.batches().get(&id).await? {
        Some(rec) => Ok(Json(batch_view(&rec, true))),
        None => Err(ApiError::not_found("batch", &id)),
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchAction {
    /// `cancel`: nodes not started are not, running workflows are cancelled.
    command: String,
}

/// Acts on a batch: `{"command": "cancel"}` stops starting workflows and cancels the
/// running ones.
#[utoipa::path(
    put,
    path = "/batches/{id}/action",
    tag = "fleet",
    params(("id" = String, Path, description = "The batch's id")),
    request_body(content = BatchAction, description = "The command"),
    responses(
        (status = 202, description = "Cancelling: the batch, which finishes once its workflows have ended", body = BatchRecord),
        (status = 400, description = "An unknown command", body = ErrorBody),
        (status = 404, description = "No batch has this id", body = ErrorBody),
        (status = 409, description = "The batch has finished", body = ErrorBody),
    )
)]
async fn batch_action(
    State(s): State<AppState>,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<(StatusCode, Json<Value>)> {
    let action: BatchAction = decode(body, "batch action")?;
    if action.command != "cancel" {
        return Err(ApiError::bad_request(format!(
            "unknown command {:?}; a batch knows `cancel`",
            action.command
        )));
    }
    let rec = s.engine.batches().cancel(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(batch_view(&rec, true))))
}
