//! Static files for booting nodes: `GET` and `HEAD /files/{path}` on the node-facing API
//! serve the configured files directory (ISO images, kernels, installer files).
//!
//! Files are streamed, never read whole, and a single byte range (`bytes=a-b`, `bytes=a-`,
//! `bytes=-n`) is answered with 206, since BMCs and installers fetch large images in
//! pieces. A request path never reaches outside the directory: `..`, absolute paths and
//! symlinks that lead out of it are refused.

use std::io::SeekFrom;
use std::path::{Component, Path, PathBuf};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use tokio_util::io::ReaderStream;

use super::error::ErrorBody;
use super::extract::Path as PathParam;
use super::{ApiError, AppState};

/// How much of a file is read per chunk of the response body.
const CHUNK: usize = 64 * 1024;

/// What a `Range` header asks of a file of a given length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable range: the whole file, 200.
    Full,
    /// Bytes `start..=end`, 206.
    Part { start: u64, end: u64 },
    /// A range that lies wholly outside the file, 416.
    Unsatisfiable,
}

/// Reads a `Range` header for a file of `len` bytes. Only one range of bytes is served;
/// a header this server does not understand (another unit, several ranges, bad syntax) is
/// ignored, as RFC 9110 allows, and the whole file is sent.
pub fn parse_range(header: Option<&str>, len: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let number = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // `bytes=-n`: the last n bytes.
        (true, false) => match number(last) {
            None => Range::Full,
            Some(0) => Range::Unsatisfiable,
            Some(_) if len == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        },
        // `bytes=a-`: from a to the end.
        (false, true) => match number(first) {
            None => Range::Full,
            Some(a) if a >= len => Range::Unsatisfiable,
            Some(a) => Range::Part {
                start: a,
                end: len - 1,
            },
        },
        // `bytes=a-b`.
        (false, false) => match (number(first), number(last)) {
            (Some(a), Some(b)) if a <= b => {
                if a >= len {
                    Range::Unsatisfiable
                } else {
                    Range::Part {
                        start: a,
                        end: b.min(len - 1),
                    }
                }
            }
            _ => Range::Full,
        },
        (true, true) => Range::Full,
    }
}

/// Resolves `rel`, a path from a request, to an existing file inside `root`. `what` names
/// the kind of file in errors ("file", "template").
///
/// Only plain path segments are accepted, so `..` and absolute paths are refused before the
/// file system is asked; the result is then canonicalised and must still lie inside the
/// canonical root, which refuses symlinks leading out of it.
pub async fn resolve(root: &Path, rel: &str, what: &str) -> Result<PathBuf, ApiError> {
    let outside = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{what} path '{rel}' leads outside the {what}s directory"),
        )
    };
    let relative = Path::new(rel);
    if rel.is_empty()
        || rel.contains('\0')
        || rel.contains('\\')
        || !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(outside());
    }
    let not_found = || ApiError::not_found(what, rel);
    let root = tokio::fs::canonicalize(root).await.map_err(|e| {
        ApiError::internal(format_args!(
            "the {what}s directory {} is unusable: {e}",
            root.display()
        ))
    })?;
    let path = tokio::fs::canonicalize(root.join(relative))
        .await
        .map_err(|_| not_found())?;
    if !path.starts_with(&root) {
        return Err(outside());
    }
    let meta = tokio::fs::metadata(&path).await.map_err(|_| not_found())?;
    if !meta.is_file() {
        return Err(not_found());
    }
    Ok(path)
}

/// The `Content-Type` of a served file, from its extension.
fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match ext.as_str() {
        "iso" => "application/x-iso9660-image",
        "txt" | "ks" | "cfg" | "ipxe" | "sh" | "conf" | "preseed" | "seed" => {
            "text/plain; charset=utf-8"
        }
        "json" => "application/json",
        "yaml" | "yml" => "application/yaml",
        _ => "application/octet-stream",
    }
}

/// A file of the files directory, whole or one byte range.
#[utoipa::path(
    get,
    path = "/files/{path}",
    tag = "node-facing",
    params(
        ("path" = String, Path, description = "The file's path inside the files directory (slashes allowed)", example = "rocky9.iso"),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n`", example = "bytes=0-1023"),
    ),
    responses(
        (status = 200, description = "The whole file. Its `Content-Type` follows its extension: \
            `application/x-iso9660-image` (.iso), `text/plain` (.txt, .ks, .cfg, .ipxe, .sh, ...), \
            `application/json`, `application/yaml`, else `application/octet-stream`",
            body = Vec<u8>, content_type = "*/*",
            headers(("Accept-Ranges" = String), ("Content-Length" = u64))),
        (status = 206, description = "The requested range, typed as the whole file", body = Vec<u8>, content_type = "*/*",
            headers(("Content-Range" = String, description = "`bytes a-b/len`"))),
        (status = 403, description = "The path leads outside the files directory", body = ErrorBody),
        (status = 404, description = "No files directory, or no such file", body = ErrorBody),
        (status = 416, description = "The range lies outside the file", body = ErrorBody,
            headers(("Content-Range" = String, description = "`bytes */len`"))),
    )
)]
pub async fn serve_file(
    State(s): State<AppState>,
    method: Method,
    headers: HeaderMap,
    PathParam(rel): PathParam<String>,
) -> Result<Response, ApiError> {
    let Some(root) = s.files_dir.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no files directory is configured (files_dir, --files-dir, METALGRAPH_FILES_DIR)",
        ));
    };
    let path = resolve(root, &rel, "file").await?;
    let io_err =
        |e: std::io::Error| ApiError::internal(format_args!("cannot read {}: {e}", path.display()));
    let mut file = tokio::fs::File::open(&path).await.map_err(io_err)?;
    let len = file.metadata().await.map_err(io_err)?.len();
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        len,
    );
    let (status, start, count) = match range {
        Range::Full => (StatusCode::OK, 0, len),
        Range::Part { start, end } => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Range::Unsatisfiable => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the requested range lies outside file {rel} ({len} bytes)"),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{len}")),
            );
            return Ok(resp);
        }
    };
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        if start > 0 {
            file.seek(SeekFrom::Start(start)).await.map_err(io_err)?;
        }
        Body::from_stream(ReaderStream::with_capacity(file.take(count), CHUNK))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(content_type(&path)));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            header_value(&format!("bytes {start}-{}/{len}", start + count - 1)),
        );
    }
    Ok(resp)
}

/// A file's length and type without its bytes (axum would answer `HEAD` through the `GET`
/// route anyway; this one exists to document it).
#[utoipa::path(
    head,
    path = "/files/{path}",
    tag = "node-facing",
    params(
        ("path" = String, Path, description = "The file's path inside the files directory (slashes allowed)"),
        ("Range" = Option<String>, Header, description = "One byte range"),
    ),
    responses(
        (status = 200, description = "The file exists; `Content-Length` is its size",
            headers(("Accept-Ranges" = String), ("Content-Length" = u64))),
        (status = 206, description = "The requested range exists", headers(("Content-Range" = String))),
        (status = 403, description = "The path leads outside the files directory"),
        (status = 404, description = "No files directory, or no such file"),
        (status = 416, description = "The range lies outside the file"),
    )
)]
pub async fn head_file(
    state: State<AppState>,
    method: Method,
    headers: HeaderMap,
    path: PathParam<String>,
) -> Result<Response, ApiError> {
    serve_file(state, method, headers, path).await
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let cases: &[(Option<&str>, u64, Range)] = &[
            (None, 10, Range::Full),
            (Some("bytes=0-4"), 10, Range::Part { start: 0, end: 4 }),
            (Some("bytes=5-"), 10, Range::Part { start: 5, end: 9 }),
            (Some("bytes=-3"), 10, Range::Part { start: 7, end: 9 }),
            (Some("bytes=-30"), 10, Range::Part { start: 0, end: 9 }),
            (Some("bytes=8-100"), 10, Range::Part { start: 8, end: 9 }),
            (Some("bytes=9-9"), 10, Range::Part { start: 9, end: 9 }),
            (Some("bytes=10-"), 10, Range::Unsatisfiable),
            (Some("bytes=10-20"), 10, Range::Unsatisfiable),
            (Some("bytes=-0"), 10, Range::Unsatisfiable),
            (Some("bytes=0-"), 0, Range::Unsatisfiable),
            (Some("bytes=-1"), 0, Range::Unsatisfiable),
            // Not understood, so ignored: the whole file.
            (Some("bytes=4-2"), 10, Range::Full),
            (Some("bytes=0-1,4-5"), 10, Range::Full),
            (Some("items=0-1"), 10, Range::Full),
            (Some("bytes=a-b"), 10, Range::Full),
            (Some("bytes=-"), 10, Range::Full),
            (Some("bytes=+1-2"), 10, Range::Full),
        ];
        for (header, len, want) in cases {
            assert_eq!(
                parse_range(*header, *len),
                *want,
                "{header:?} of {len} bytes"
            );
        }
    }

    #[tokio::test]
    async fn paths_stay_inside_the_root() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).expect("dirs");
        std::fs::write(root.join("sub/a.txt"), "a").expect("file");
        std::fs::write(dir.path().join("secret"), "s").expect("file");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).expect("link");
        std::os::unix::fs::symlink(root.join("sub/a.txt"), root.join("in")).expect("link");

        for ok in ["sub/a.txt", "in", "sub//a.txt"] {
            let p = resolve(&root, ok, "file").await.expect(ok);
            assert!(p.ends_with("sub/a.txt"), "{ok}: {}", p.display());
        }
        for (bad, status) in [
            ("../secret", StatusCode::FORBIDDEN),
            ("sub/../../secret", StatusCode::FORBIDDEN),
            ("/etc/passwd", StatusCode::FORBIDDEN),
            ("./sub/a.txt", StatusCode::FORBIDDEN),
            ("out", StatusCode::FORBIDDEN),
            ("", StatusCode::FORBIDDEN),
            ("sub", StatusCode::NOT_FOUND),
            ("missing", StatusCode::NOT_FOUND),
        ] {
            let err = resolve(&root, bad, "file").await.expect_err(bad);
            assert_eq!(err.status, status, "{bad}: {}", err.message);
        }
    }
}
