//! The web view (`/ui/`): the pages and modules of `ui/`, embedded in the binary, served on
//! the management listener. The pages are static; everything they show comes from the API
//! (`/api/2.0/...`) and its event stream, read by the browser (docs/ui.md).
//!
//! `/` answers `307 Temporary Redirect` to `/ui/` (temporary, so that the root stays free
//! for something else later without browsers having cached the redirect); `/ui` answers
//! `308 Permanent Redirect` to `/ui/`, its one spelling. Every answer carries a strict
//! `Content-Security-Policy` (scripts, styles and connections from this origin only, no
//! inline script, no framing), `X-Content-Type-Options: nosniff` and an `ETag`; browsers
//! revalidate (`Cache-Control: no-cache`), so a new binary's files are seen at once.

use axum::Router;
use axum::extract::Request;
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

use super::extract::Path;
use super::{ApiError, AppState};

/// The policy of every UI answer. Values from the API are inserted as text, never as HTML;
/// this is the second line: no inline or foreign script could run even if one were.
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self'; \
                   script-src 'self'; style-src 'self'; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $name)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// The pages; [`routes`] says where each is served.
const NODES: Asset = asset!("nodes.html", HTML);
const WORKFLOWS: Asset = asset!("workflows.html", HTML);
const WORKFLOW: Asset = asset!("workflow.html", HTML);

/// What `/ui/assets/{name}` serves.
const ASSETS: &[Asset] = &[
    asset!("common.js", JS),
    asset!("dag.js", JS),
    asset!("nodes.js", JS),
    asset!("workflows.js", JS),
    asset!("workflow.js", JS),
    asset!("style.css", CSS),
    asset!("favicon.svg", SVG),
];

/// The web view's routes, to be merged into the management router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/ui/") }))
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|h: HeaderMap| async move { serve(&NODES, &h) }))
        .route(
            "/ui/workflows",
            get(|h: HeaderMap| async move { serve(&WORKFLOWS, &h) }),
        )
        .route(
            "/ui/workflows/{id}",
            get(|h: HeaderMap| async move { serve(&WORKFLOW, &h) }),
        )
        .route("/ui/assets/{name}", get(asset))
        .layer(middleware::from_fn(secure))
}

async fn asset(Path(name): Path<String>, uri: Uri, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(a) => serve(a, &headers),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no web view file at {}", uri.path()),
        )
        .into_response(),
    }
}

/// An embedded file, or `304 Not Modified` when the browser holds this version.
fn serve(asset: &Asset, headers: &HeaderMap) -> Response {
    let etag = etag(asset.body);
    let cached = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let status = if cached {
        StatusCode::NOT_MODIFIED
    } else {
        StatusCode::OK
    };
    let body = if cached { &[][..] } else { asset.body };
    (
        status,
        [
            (header::CONTENT_TYPE, asset.content_type),
            (header::ETAG, etag.as_str()),
        ],
        body,
    )
        .into_response()
}

/// A strong validator for an embedded file: FNV-1a over its bytes. The files are a few
/// kilobytes, so hashing them per request costs less than keeping the hashes.
fn etag(body: &[u8]) -> String {
    let hash = body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

/// Adds the security and caching headers to every UI answer, redirects included.
async fn secure(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}
