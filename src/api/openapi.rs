//! The OpenAPI 3.1 documents of both HTTP APIs, served by `GET /api/2.0/openapi.json`
//! (the management API) and `GET /api/2.0/openapi.json?api=node` (the node-facing API),
//! both on the management listener (docs/api.md).
//!
//! Nothing here is written by hand that the code already says: the paths, parameters,
//! bodies and responses come from each handler's `#[utoipa::path]` through the same route
//! lists the routers are built from (`http::management_routes`, `http::node_routes`), and
//! the schemas from the types' `ToSchema`. What this module adds is what every operation
//! shares because it comes from shared code rather than from the handler: the responses of
//! the extractors (`extract::Body`, `Query`, `Path`), of store failures and of the
//! connection limit, the YAML form of every body, and the document's frame (info, servers,
//! tags, the webhook deliveries).

use std::sync::LazyLock;

use axum::Json;
use axum::extract::State;
use metalgraph_engine::Event;
use serde::Deserialize;
use utoipa::openapi::path::{HttpMethod, Operation, PathItem};
use utoipa::openapi::request_body::RequestBody;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Type};
use utoipa::openapi::server::{Server, ServerBuilder, ServerVariableBuilder};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{
    Components, ContentBuilder, HeaderBuilder, InfoBuilder, LicenseBuilder, OpenApi, Ref, RefOr,
};
use utoipa::{IntoParams, PartialSchema, ToSchema};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use super::AppState;
use super::error::ErrorBody;
use super::extract::Query;

/// Which document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// The management API (this listener).
    #[default]
    Management,
    /// The node-facing API (the node listener, `node_listen`).
    Node,
}

/// `GET /openapi.json?api=`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DocQuery {
    /// `management` (the default) or `node`.
    #[param(inline)]
    pub api: Option<Which>,
}

/// An OpenAPI 3.1 document: the management API's, or with `?api=node` the node-facing
/// API's, whose `servers` is the node-facing listener.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "system",
    params(DocQuery),
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
pub async fn openapi_json(State(s): State<AppState>, Query(q): Query<DocQuery>) -> Json<OpenApi> {
    let which = q.api.unwrap_or_default();
    let mut doc = document(which);
    if which == Which::Node {
        doc.servers = Some(vec![node_server(&s.api.node_base)]);
    }
    Json(doc)
}

/// The document of one API, as the routers are built. The node-facing document's
/// `servers` is left out: it depends on the configuration ([`openapi_json`] fills it in).
pub fn document(which: Which) -> OpenApi {
    static MANAGEMENT: LazyLock<OpenApi> = LazyLock::new(|| {
        complete(
            super::http::management_routes().into_openapi(),
            Which::Management,
        )
    });
    static NODE: LazyLock<OpenApi> =
        LazyLock::new(|| complete(super::http::node_routes().into_openapi(), Which::Node));
    match which {
        Which::Management => MANAGEMENT.clone(),
        Which::Node => NODE.clone(),
    }
}

/// Registers `routes` (one path's handlers, from `routes!`) at `axum_path`, an axum path
/// with a catch-all segment (`/files/{*path}`), which OpenAPI cannot write: the document
/// keeps the handlers' own path (`/files/{path}`).
pub fn route_catch_all(
    router: OpenApiRouter<AppState>,
    axum_path: &str,
    (schemas, paths, method_router): UtoipaMethodRouter<AppState>,
) -> OpenApiRouter<AppState> {
    let mut router = router.route(axum_path, method_router);
    let doc = router.get_openapi_mut();
    for (path, item) in paths.paths {
        match doc.paths.paths.get_mut(&path) {
            Some(it) => it.merge_operations(item),
            None => {
                doc.paths.paths.insert(path, item);
            }
        }
    }
    doc.components
        .get_or_insert_with(Components::new)
        .schemas
        .extend(schemas);
    router
}

/// The media types a body is accepted in besides JSON (`extract::Body`).
const YAML: &str = "application/yaml";

/// Responses every operation of a kind shares, in `components.responses`.
const BAD_REQUEST: &str = "BadRequest";
const PAYLOAD_TOO_LARGE: &str = "PayloadTooLarge";
const UNSUPPORTED_MEDIA_TYPE: &str = "UnsupportedMediaType";
const INTERNAL: &str = "Internal";
const UNAVAILABLE: &str = "Unavailable";
const UNAUTHORIZED: &str = "Unauthorized";
const FORBIDDEN: &str = "Forbidden";

/// The security scheme of the management API: a bearer token (docs/security.md).
const BEARER: &str = "bearer";

/// Adds to a document generated from the routes what the handlers share.
fn complete(mut doc: OpenApi, which: Which) -> OpenApi {
    let (title, description) = match which {
        Which::Management => (
            "metalgraph management API",
            "Graphs, task definitions, workflows, nodes, webhooks, events, tokens, the audit \
             log, health and metrics (RackHD 2.0 paths). Every call but health needs \
             `Authorization: Bearer <token>`. Request bodies are JSON or YAML; every error \
             reads `{\"error\": {\"code\", \"message\", \"details\"}}`.",
        ),
        Which::Node => (
            "metalgraph node-facing API",
            "What booting machines and their installers call, on the node-facing listener \
             (`node_listen`): completion callbacks, iPXE profiles, rendered templates and \
             static boot files.",
        ),
    };
    doc.info = InfoBuilder::new()
        .title(title)
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(description))
        .license(Some(LicenseBuilder::new().name("Apache-2.0").build()))
        .build();
    let components = doc.components.get_or_insert_with(Components::new);
    for (name, schema) in [
        ("ErrorBody", ErrorBody::schema()),
        ("Event", Event::schema()),
    ] {
        components.schemas.insert(name.to_owned(), schema);
    }
    let mut nested = Vec::new();
    ErrorBody::schemas(&mut nested);
    Event::schemas(&mut nested);
    components.schemas.extend(nested);
    for (name, description) in [
        (
            BAD_REQUEST,
            "A malformed body, query or path parameter; the message names it",
        ),
        (
            PAYLOAD_TOO_LARGE,
            "The body is larger than the server's limit (`body_limit_bytes`)",
        ),
        (
            UNSUPPORTED_MEDIA_TYPE,
            "The body is neither JSON nor YAML (send `Content-Type: application/json` or \
             `application/yaml`)",
        ),
        (INTERNAL, "The store failed; the server log has the details"),
        (
            UNAVAILABLE,
            "The listener is at its connection limit (`Retry-After: 1`), or the engine has \
             stopped",
        ),
        (
            UNAUTHORIZED,
            "No token, or one that is not valid (unknown, revoked); the answer carries \
             `WWW-Authenticate: Bearer`",
        ),
        (
            FORBIDDEN,
            "The token's role is too weak; the message names the role needed",
        ),
    ] {
        let mut response = error_response(description);
        if name == UNAVAILABLE {
            response.headers.insert(
                "Retry-After".to_owned(),
                HeaderBuilder::new()
                    .schema(Some(i64::schema()))
                    .description(Some("Seconds to wait"))
                    .build()
                    .into(),
            );
        }
        components
            .responses
            .insert(name.to_owned(), RefOr::T(response));
    }

    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, op) in operations(item) {
            shared_responses(op);
            if which == Which::Management {
                secured(path, method, op);
            }
        }
    }
    if which == Which::Management {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.description = Some(
            "A token from `POST /api/2.0/tokens`, or the first admin token `serve` writes to \
             `<data-dir>/admin.token`"
                .to_owned(),
        );
        components
            .security_schemes
            .insert(BEARER.to_owned(), RefOr::T(SecurityScheme::Http(scheme)));
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            BEARER,
            Vec::<String>::new(),
        )]);
    }

    let tags: &[(&str, &str)] = match which {
        Which::Management => &[
            (
                "graphs",
                "Graph definitions: the shipped library and stored ones",
            ),
            ("tasks", "Task definitions"),
            ("workflows", "Running graphs, and the workflows they became"),
            ("nodes", "Managed servers, their OBMs (BMCs) and catalogs"),
            ("hooks", "Webhooks: events POSTed to receivers"),
            ("events", "Committed changes as Server-Sent Events"),
            ("security", "Bearer tokens and the audit log (admin)"),
            ("system", "Health, metrics and these documents"),
        ],
        Which::Node => &[(
            "node-facing",
            "Booting machines and installers, on the node-facing listener",
        )],
    };
    doc.tags = Some(
        tags.iter()
            .map(|(name, description)| {
                TagBuilder::new()
                    .name(*name)
                    .description(Some(*description))
                    .build()
            })
            .collect(),
    );
    if which == Which::Management {
        doc.servers = Some(vec![
            ServerBuilder::new()
                .url("/")
                .description(Some("The server this document came from"))
                .build(),
        ]);
        doc.webhooks = Some(webhooks());
    }
    doc
}

/// Every operation of a path item, with its method.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (HttpMethod, &mut Operation)> {
    [
        (HttpMethod::Get, item.get.as_mut()),
        (HttpMethod::Put, item.put.as_mut()),
        (HttpMethod::Post, item.post.as_mut()),
        (HttpMethod::Delete, item.delete.as_mut()),
        (HttpMethod::Options, item.options.as_mut()),
        (HttpMethod::Head, item.head.as_mut()),
        (HttpMethod::Patch, item.patch.as_mut()),
        (HttpMethod::Trace, item.trace.as_mut()),
    ]
    .into_iter()
    .filter_map(|(m, op)| op.map(|op| (m, op)))
}

/// Says what an operation of the management API needs, from the one rule the server
/// enforces (`auth::http_role`): nothing (health), or a token of a role, with the 401 and,
/// above `viewer`, the 403 that come with it.
fn secured(path: &str, method: HttpMethod, op: &mut Operation) {
    let method = match method {
        HttpMethod::Get => axum::http::Method::GET,
        HttpMethod::Put => axum::http::Method::PUT,
        HttpMethod::Post => axum::http::Method::POST,
        HttpMethod::Delete => axum::http::Method::DELETE,
        HttpMethod::Options => axum::http::Method::OPTIONS,
        HttpMethod::Head => axum::http::Method::HEAD,
        HttpMethod::Patch => axum::http::Method::PATCH,
        HttpMethod::Trace => axum::http::Method::TRACE,
    };
    let Some(role) = crate::auth::http_role(&method, path) else {
        op.security = Some(vec![
            utoipa::openapi::security::SecurityRequirement::default(),
        ]);
        return;
    };
    let mut add = |status: &str, name: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    };
    add("401", UNAUTHORIZED);
    if role > crate::auth::Role::Viewer {
        add("403", FORBIDDEN);
    }
    let needs = format!("Needs a token of role `{}` or higher.", role.as_str());
    op.description = Some(match op.description.take() {
        Some(d) if !d.is_empty() => format!("{d}\n\n{needs}"),
        _ => needs,
    });
}

/// Adds the responses an operation has through shared code, unless the handler's own
/// annotation already says more about that status.
fn shared_responses(op: &mut Operation) {
    let mut add = |status: &str, name: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
    };
    // Every body goes through `extract::Body`: JSON or YAML, a size limit, a parse.
    let has_body = op.request_body.is_some();
    if let Some(RefOr::T(body)) = op.request_body.as_mut() {
        with_yaml(body);
    }
    if has_body {
        add("400", BAD_REQUEST);
        add("413", PAYLOAD_TOO_LARGE);
        add("415", UNSUPPORTED_MEDIA_TYPE);
    }
    // Query and path parameters go through `extract::Query` and `extract::Path`.
    if op.parameters.as_ref().is_some_and(|p| !p.is_empty()) {
        add("400", BAD_REQUEST);
    }
    add("500", INTERNAL);
    add("503", UNAVAILABLE);
}

/// Lists `application/yaml` beside `application/json`, with the same schema.
fn with_yaml(body: &mut RequestBody) {
    if let Some(json) = body.content.get("application/json").cloned() {
        body.content.entry(YAML.to_owned()).or_insert(json);
    }
}

/// A response whose body is the common error body.
fn error_response(description: &str) -> Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
}

/// The webhook deliveries (`POST /api/2.0/hooks` registers a receiver): what a receiver
/// is sent.
fn webhooks() -> utoipa::openapi::path::Paths {
    let body = AllOfBuilder::new()
        .item(Ref::from_schema_name("Event"))
        .item(
            ObjectBuilder::new()
                .property(
                    "id",
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .description(Some("The event's id, `{log}-{number}`, as in SSE")),
                )
                .required("id"),
        )
        .build();
    let body = utoipa::openapi::schema::Schema::AllOf(body);
    let mut op = Operation::new();
    op.summary = Some("One event, delivered to a hook's url".to_owned());
    op.description = Some(
        "Deliveries are made in log order, one at a time per hook, at least once; a status \
         other than 2xx (or none within the timeout) is retried with backoff. Headers: \
         `X-Metalgraph-Event` (`workflow` or `task`), `X-Metalgraph-Delivery` (the event id; \
         equal on a repeated delivery), `X-Metalgraph-Hook` (the hook's id) and, when the \
         hook has a secret, `X-Metalgraph-Signature: sha256=<hex HMAC-SHA256 of the body>`."
            .to_owned(),
    );
    op.operation_id = Some("deliver_event".to_owned());
    op.tags = Some(vec!["hooks".to_owned()]);
    let mut request = RequestBody::new();
    request.content.insert(
        "application/json".to_owned(),
        ContentBuilder::new().schema(Some(body)).build().into(),
    );
    request.required = Some(utoipa::openapi::Required::True);
    op.request_body = Some(RefOr::T(request));
    let ok = ResponseBuilder::new()
        .description("Any 2xx: delivered")
        .build();
    op.responses
        .responses
        .insert("2XX".to_owned(), RefOr::T(ok));
    let mut item = PathItem::default();
    item.post = Some(op);
    let mut paths = utoipa::openapi::path::Paths::new();
    paths.paths.insert("event".to_owned(), item);
    paths
}

/// The node-facing document's server: the node listener's URL (`node_api_base_url`, or
/// the listener's address), or a variable when the listener is off.
fn node_server(node_base: &str) -> Server {
    let origin = node_base
        .trim_end_matches('/')
        .strip_suffix("/api/2.0")
        .unwrap_or(node_base);
    if origin.is_empty() {
        ServerBuilder::new()
            .url("http://{nodeListen}")
            .description(Some(
                "The node-facing listener, which is off on this server (node_listen)",
            ))
            .parameter(
                "nodeListen",
                ServerVariableBuilder::new().default_value("127.0.0.1:8090"),
            )
            .build()
    } else {
        ServerBuilder::new()
            .url(origin)
            .description(Some("The node-facing listener"))
            .build()
    }
}
