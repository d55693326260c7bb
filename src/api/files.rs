//! Static files for booting nodes: `GET` and `HEAD /files/{path}` on the node-facing API
//! serve the configured files directory (ISO images, kernels, installer files), and
//! `/boot/{path}` the boot files directory (`[boot] tftp_root`, the iPXE binaries TFTP
//! serves) to UEFI HTTP Boot firmware while network boot is on.
//!
//! Files are streamed, never read whole, and a single byte range (`bytes=a-b`, `bytes=a-`,
//! `bytes=-n`) is answered with 206, since BMCs and installers fetch large images in
//! pieces. A request path never reaches outside the directory: `..`, absolute paths and
//! symlinks that lead out of it are refused.
//!
//! A body is read [`CHUNK`] bytes at a time straight into the buffer that becomes the
//! body's chunk, on the runtime's thread when the page cache holds the bytes and on the
//! blocking pool when they must come from the disk, and chunk buffers are reused once
//! hyper has written them. (Through `tokio::fs::File` and `ReaderStream` a body cost a
//! trip to the blocking pool and two copies per 64 KiB: 1.7× nginx's time for 20
//! downloads of a 64 MiB image; see BENCHMARKS.md.) Downloads at once are bounded by
//! `[limits] max_file_transfers` (both directories together); beyond it a `GET` is answered
//! `503` with `Retry-After`.

use std::future::Future as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::error::ErrorBody;
use super::extract::{Path as PathParam, Peer};
use super::{ApiError, AppState};

/// How much of a file is read per chunk of the response body. Small enough that a chunk
/// copied from the page cache is still in the CPU's cache when the socket write copies it
/// again: with 256 KiB chunks, 20 concurrent downloads were 10-15 % slower when the CPUs
/// were contended, and no faster when they were not.
const CHUNK: usize = 64 * 1024;

/// The default of `[limits] max_file_transfers`.
pub const DEFAULT_MAX_FILE_TRANSFERS: usize = 256;

/// What `Retry-After` says when every transfer slot is taken, in seconds.
const RETRY_AFTER_SECS: &str = "5";

/// The bound on concurrent `/files/` downloads (`[limits] max_file_transfers`): a `GET`
/// takes a slot before its body is read and holds it until the body is sent or the client
/// goes away. `HEAD` and refusals take none. Cheap to clone: clones share the slots.
#[derive(Debug, Clone)]
pub struct FileTransfers {
    slots: Arc<Semaphore>,
    max: usize,
    /// Chunk buffers that bodies have finished with.
    buffers: Arc<Buffers>,
}

impl FileTransfers {
    /// At most `max` downloads at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        FileTransfers {
            slots: Arc::new(Semaphore::new(max)),
            max,
            buffers: Arc::default(),
        }
    }

    /// A slot, or `None` when all are taken.
    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }
}

impl Default for FileTransfers {
    fn default() -> Self {
        FileTransfers::new(DEFAULT_MAX_FILE_TRANSFERS)
    }
}

/// How many chunk buffers [`Buffers`] keeps for reuse (4 MiB).
const KEPT_BUFFERS: usize = 64;

/// Chunk buffers for reuse. A chunk's buffer comes back here when hyper drops the chunk
/// after writing it, so a steady download allocates nothing: a fresh buffer is
/// memory the allocator maps and the kernel zeroes page by page, and unmaps again when it
/// is freed, which cost more than reading the file did.
#[derive(Debug, Default)]
struct Buffers {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// A buffer of `len` bytes (of no particular content).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        let mut buf = reused.unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() != CHUNK {
            return;
        }
        let mut free = self
            .free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if free.len() < KEPT_BUFFERS {
            free.push(buf);
        }
    }
}

/// A chunk of a body, whose buffer goes back to [`Buffers`] when it is dropped.
struct Chunk {
    buf: Vec<u8>,
    buffers: Arc<Buffers>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        self.buffers.give_back(std::mem::take(&mut self.buf));
    }
}

/// The answer when every transfer slot is taken.
fn too_many_transfers(max: usize) -> Response {
    let mut resp = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_file_transfers",
        format!(
            "{max} file downloads are in progress, as many as this server allows at once \
             (limits.max_file_transfers); try again shortly"
        ),
    )
    .into_response();
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    resp
}

/// Bytes `start..end` of a file as a response body, in [`CHUNK`]s. A chunk the page cache
/// holds is read on the runtime's thread (`preadv2` with `RWF_NOWAIT`, which copies what is
/// cached and never waits for the disk); one it does not is read on the blocking pool. It
/// holds a transfer slot until it is dropped (sent, failed, or the client went away).
struct FileBody {
    file: Arc<std::fs::File>,
    /// Where the next read starts.
    next: u64,
    /// Where the range ends (exclusive).
    end: u64,
    /// A read on the blocking pool in progress, if any.
    reading: Option<JoinHandle<std::io::Result<Bytes>>>,
    buffers: Arc<Buffers>,
    _slot: OwnedSemaphorePermit,
}

impl FileBody {
    fn new(
        file: std::fs::File,
        start: u64,
        end: u64,
        transfers: &FileTransfers,
        slot: OwnedSemaphorePermit,
    ) -> Self {
        FileBody {
            file: Arc::new(file),
            next: start,
            end,
            reading: None,
            buffers: transfers.buffers.clone(),
            _slot: slot,
        }
    }

    /// The next chunk if the page cache holds (the start of) it, `None` if reading it would
    /// wait for the disk, or if this kernel or file system cannot say (the blocking read
    /// then reports real errors).
    fn read_cached(&mut self) -> Option<Bytes> {
        let len = (self.end - self.next).min(CHUNK as u64) as usize;
        let mut buf = self.buffers.take(len);
        let read = rustix::io::preadv2(
            &*self.file,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            self.next,
            rustix::io::ReadWriteFlags::NOWAIT,
        );
        match read {
            Ok(n) if n > 0 => {
                buf.truncate(n);
                self.next += n as u64;
                Some(Bytes::from_owner(Chunk {
                    buf,
                    buffers: self.buffers.clone(),
                }))
            }
            _ => {
                self.buffers.give_back(buf);
                None
            }
        }
    }

    /// Reads the next chunk on the blocking pool.
    fn read_blocking(&mut self) -> JoinHandle<std::io::Result<Bytes>> {
        let len = (self.end - self.next).min(CHUNK as u64) as usize;
        let (file, offset, buffers) = (self.file.clone(), self.next, self.buffers.clone());
        self.next += len as u64;
        tokio::task::spawn_blocking(move || {
            let mut buf = buffers.take(len);
            file.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from_owner(Chunk { buf, buffers }))
        })
    }
}

impl tokio_stream::Stream for FileBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.reading.is_none() {
            if this.next >= this.end {
                return Poll::Ready(None);
            }
            if let Some(chunk) = this.read_cached() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            this.reading = Some(this.read_blocking());
        }
        let Some(reading) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        let result = ready!(Pin::new(reading).poll(cx));
        this.reading = None;
        let chunk = result.map_err(std::io::Error::other).and_then(|r| r);
        if let Err(e) = &chunk {
            // The body cannot reach its Content-Length; hyper closes the connection.
            tracing::warn!(error = %e, "a file download stopped: the file could not be read");
            this.next = this.end;
        }
        Poll::Ready(Some(chunk))
    }
}

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

/// Resolves `rel`, a path from a request, to an existing file inside `root`
/// ([`metalgraph_tasks::files::resolve`]: `..`, absolute paths and symlinks that lead out
/// are refused). `what` names the kind of file in errors ("file", "template").
pub async fn resolve(root: &Path, rel: &str, what: &str) -> Result<PathBuf, ApiError> {
    metalgraph_tasks::files::resolve(root, rel)
        .await
        .map_err(|e| unresolved(e, rel, what))
}

/// The API error of a path that [`resolve`] refused.
fn unresolved(e: metalgraph_tasks::files::Unresolved, rel: &str, what: &str) -> ApiError {
    use metalgraph_tasks::files::Unresolved;
    match e {
        Unresolved::Outside => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{what} path '{rel}' leads outside the {what}s directory"),
        ),
        Unresolved::NotFound => ApiError::not_found(what, rel),
        Unresolved::Root { dir, error } => ApiError::internal(format_args!(
            "the {what}s directory {} is unusable: {error}",
            dir.display()
        )),
    }
}

/// The text of template `name` (a profile or an install script): the templates directory's
/// file of that name, else the one shipped with metalgraph (`templates/`), else a 404.
///
/// The file is read on every call, so an edit shows on the next request; its path checks
/// and its read are one trip to the blocking pool (they were four: a profile request is
/// rendered per machine, and each trip is a pair of thread wake-ups queued behind a rack's
/// boot-file transfers; BENCHMARKS.md, "Rack power-on"). No cache: a small file's read is
/// not what costs, and an mtime check would still need the trip and could miss an edit
/// within one tick of the file system's clock.
pub async fn template_source(dir: Option<&Path>, name: &str) -> Result<String, ApiError> {
    use metalgraph_tasks::files::Unresolved;
    if let Some(dir) = dir {
        let (dir, rel) = (dir.to_owned(), name.to_owned());
        let found = tokio::task::spawn_blocking(move || {
            let path = metalgraph_tasks::files::resolve_blocking(&dir, &rel)?;
            Ok(std::fs::read_to_string(&path).map_err(|e| (path, e)))
        })
        .await
        .map_err(|e| ApiError::internal(format_args!("reading template {name}: {e}")))?;
        match found {
            Ok(Ok(text)) => return Ok(text),
            Ok(Err((path, e))) => {
                return Err(ApiError::internal(format_args!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
            Err(Unresolved::NotFound) => {}
            Err(e) => return Err(unresolved(e, name, "template")),
        }
    }
    crate::boot::builtin_template(name)
        .map(str::to_owned)
        .ok_or_else(|| ApiError::not_found("template", name))
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
        (status = 503, description = "As many downloads as `limits.max_file_transfers` allows are in progress", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before trying again"))),
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
    send_file(&s, root, &rel, "file", &method, &headers).await
}

/// File `rel` of `root`, whole or the one byte range `headers` ask for, streamed under a
/// transfer slot (`HEAD`: its length and type only). `what` names the kind of file in
/// errors ("file", "boot file").
async fn send_file(
    s: &AppState,
    root: &Path,
    rel: &str,
    what: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let path = resolve(root, rel, what).await?;
    let io_err =
        |e: std::io::Error| ApiError::internal(format_args!("cannot read {}: {e}", path.display()));
    let opened = path.clone();
    let (file, len) = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&opened)?;
        let len = file.metadata()?.len();
        Ok((file, len))
    })
    .await
    .map_err(|e| ApiError::internal(format_args!("cannot open {}: {e}", path.display())))?
    .map_err(io_err)?;
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
                format!("the requested range lies outside {what} {rel} ({len} bytes)"),
            )
            .into_response();
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                header_value(&format!("bytes */{len}")),
            );
            return Ok(resp);
        }
    };
    let body = if *method == Method::HEAD {
        Body::empty()
    } else {
        let Some(slot) = s.file_transfers.try_take() else {
            tracing::warn!(
                file = %rel,
                what,
                max = s.file_transfers.max,
                "a file download was refused: every transfer slot is taken (limits.max_file_transfers)"
            );
            return Ok(too_many_transfers(s.file_transfers.max));
        };
        Body::from_stream(FileBody::new(
            file,
            start,
            start + count,
            &s.file_transfers,
            slot,
        ))
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

/// A file of the boot files directory (`[boot] tftp_root`: the iPXE binaries TFTP serves),
/// whole or one byte range: what DHCP hands UEFI HTTP Boot firmware
/// (`http://BOOT:8090/boot/snponly.efi`). Served while network boot is on.
#[utoipa::path(
    get,
    path = "/boot/{path}",
    tag = "node-facing",
    params(
        ("path" = String, Path, description = "The file's path inside the boot files directory", example = "snponly.efi"),
        ("Range" = Option<String>, Header, description = "One byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n`", example = "bytes=0-1023"),
    ),
    responses(
        (status = 200, description = "The whole file, typed by its extension as under `/files/` \
            (an iPXE binary is `application/octet-stream`)",
            body = Vec<u8>, content_type = "*/*",
            headers(("Accept-Ranges" = String), ("Content-Length" = u64))),
        (status = 206, description = "The requested range", body = Vec<u8>, content_type = "*/*",
            headers(("Content-Range" = String, description = "`bytes a-b/len`"))),
        (status = 403, description = "The path leads outside the boot files directory", body = ErrorBody),
        (status = 404, description = "Network boot is off, or no such file", body = ErrorBody),
        (status = 416, description = "The range lies outside the file", body = ErrorBody,
            headers(("Content-Range" = String, description = "`bytes */len`"))),
        (status = 503, description = "As many downloads as `limits.max_file_transfers` allows are in progress", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait before trying again"))),
    )
)]
pub async fn serve_boot_file(
    State(s): State<AppState>,
    Peer(peer): Peer,
    method: Method,
    headers: HeaderMap,
    PathParam(rel): PathParam<String>,
) -> Result<Response, ApiError> {
    let Some(root) = s.boot_dir.as_deref() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "network boot is off, so no boot files are served (boot.dhcp, boot.tftp_listen)",
        ));
    };
    let sent = send_file(&s, root, &rel, "boot file", &method, &headers).await;
    // Like TFTP's transfers, each boot file served is logged: it is how a boot is followed.
    match &sent {
        Ok(resp) => tracing::info!(
            file = %rel,
            %method,
            status = resp.status().as_u16(),
            bytes = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(0),
            peer = ?peer,
            "boot file served over HTTP"
        ),
        Err(e) => tracing::info!(
            file = %rel,
            %method,
            status = e.status.as_u16(),
            peer = ?peer,
            error = %e.message,
            "boot file refused"
        ),
    }
    sent
}

/// A boot file's length and type without its bytes (UEFI HTTP Boot asks this before the
/// download).
#[utoipa::path(
    head,
    path = "/boot/{path}",
    tag = "node-facing",
    params(
        ("path" = String, Path, description = "The file's path inside the boot files directory"),
        ("Range" = Option<String>, Header, description = "One byte range"),
    ),
    responses(
        (status = 200, description = "The file exists; `Content-Length` is its size",
            headers(("Accept-Ranges" = String), ("Content-Length" = u64))),
        (status = 206, description = "The requested range exists", headers(("Content-Range" = String))),
        (status = 403, description = "The path leads outside the boot files directory"),
        (status = 404, description = "Network boot is off, or no such file"),
        (status = 416, description = "The range lies outside the file"),
    )
)]
pub async fn head_boot_file(
    state: State<AppState>,
    peer: Peer,
    method: Method,
    headers: HeaderMap,
    path: PathParam<String>,
) -> Result<Response, ApiError> {
    serve_boot_file(state, peer, method, headers, path).await
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

    /// Both ways of reading a chunk (from the page cache on the runtime's thread, and on
    /// the blocking pool) give the range's bytes, chunk after chunk, and buffers come back.
    #[tokio::test]
    async fn bodies_read_their_range_from_cache_or_the_blocking_pool() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("image.iso");
        let data: Vec<u8> = (0..(2 * CHUNK + 5000) as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(&path, &data).expect("a file");
        let transfers = FileTransfers::new(2);
        for blocking in [false, true] {
            let (start, end) = (1000u64, data.len() as u64 - 10);
            let slot = transfers.try_take().expect("a slot");
            let mut body = FileBody::new(
                std::fs::File::open(&path).expect("opens"),
                start,
                end,
                &transfers,
                slot,
            );
            let mut got = Vec::new();
            while body.next < body.end {
                let cached = if blocking { None } else { body.read_cached() };
                let chunk = match cached {
                    Some(chunk) => chunk,
                    None => body.read_blocking().await.expect("joins").expect("reads"),
                };
                assert!(chunk.len() <= CHUNK);
                got.extend_from_slice(&chunk);
            }
            assert!(
                got == data[start as usize..end as usize],
                "blocking: {blocking}"
            );
            assert_eq!(
                transfers.slots.available_permits(),
                1,
                "the body holds its slot"
            );
            drop(body);
            assert_eq!(
                transfers.slots.available_permits(),
                2,
                "and frees it when dropped"
            );
        }
        let kept = transfers.buffers.free.lock().expect("the pool").len();
        assert!(kept > 0, "full chunks' buffers are kept for reuse");
    }

    #[tokio::test]
    async fn templates_are_read_on_every_call_from_the_directory_then_the_shipped_ones() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let root = dir.path().join("templates");
        std::fs::create_dir_all(&root).expect("dir");
        std::fs::write(dir.path().join("secret"), "s").expect("file");
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out.ipxe")).expect("link");
        let shipped = "install-debian.ipxe";
        let builtin = crate::boot::builtin_template(shipped).expect("a shipped template");
        for d in [None, Some(root.as_path())] {
            let text = template_source(d, shipped).await.expect("the shipped one");
            assert_eq!(text, builtin, "not in the directory: {d:?}");
        }
        for edit in ["#!ipxe\necho one\n", "#!ipxe\necho two\n"] {
            std::fs::write(root.join(shipped), edit).expect("file");
            let text = template_source(Some(&root), shipped)
                .await
                .expect("the file");
            assert_eq!(text, edit, "the directory's file wins, as it is now");
        }
        for (bad, status) in [
            ("out.ipxe", StatusCode::FORBIDDEN),
            ("../secret", StatusCode::FORBIDDEN),
            ("missing.ipxe", StatusCode::NOT_FOUND),
        ] {
            let err = template_source(Some(&root), bad).await.expect_err(bad);
            assert_eq!(err.status, status, "{bad}: {}", err.message);
        }
        // An unusable directory is the server's fault, not a reason to serve the shipped one.
        let err = template_source(Some(&dir.path().join("gone")), shipped)
            .await
            .expect_err("no directory");
        assert_eq!(
            err.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{}",
            err.message
        );
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
