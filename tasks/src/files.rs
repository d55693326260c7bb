//! Paths inside a directory that requests and options name: the files and templates
//! directories the node-facing API serves and `config-media.build` reads and writes.

use std::path::{Component, Path, PathBuf};

/// Why a relative path does not name a usable file inside a directory.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    /// `..`, an absolute path, a backslash or NUL, or a symlink that leads out.
    #[error("the path leads outside the directory")]
    Outside,
    /// No such file, or not a regular file.
    #[error("no such file")]
    NotFound,
    /// The directory itself cannot be used.
    #[error("the directory {} is unusable: {error}", .dir.display())]
    Root { dir: PathBuf, error: std::io::Error },
}

/// Whether `rel` is made of plain path segments only (no `..`, no root, no backslash or
/// NUL), so that joining it to a directory cannot leave it before the file system is
/// asked.
pub fn plain_relative(rel: &str) -> bool {
    !rel.is_empty()
        && !rel.contains('\0')
        && !rel.contains('\\')
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Resolves `rel` to an existing regular file inside `root`: [`resolve_blocking`] in one
/// trip to the blocking pool.
pub async fn resolve(root: &Path, rel: &str) -> Result<PathBuf, Unresolved> {
    let (owned_root, rel) = (root.to_owned(), rel.to_owned());
    tokio::task::spawn_blocking(move || resolve_blocking(&owned_root, &rel))
        .await
        .unwrap_or_else(|e| {
            Err(Unresolved::Root {
                dir: root.to_owned(),
                error: std::io::Error::other(e),
            })
        })
}

/// Resolves `rel` to an existing regular file inside `root`, blocking: for callers already
/// on the blocking pool, which then also read the file in the same trip.
///
/// Only plain path segments are accepted ([`plain_relative`]); the result is then
/// canonicalised and must still lie inside the canonical root, which refuses symlinks that
/// lead out of it.
pub fn resolve_blocking(root: &Path, rel: &str) -> Result<PathBuf, Unresolved> {
    if !plain_relative(rel) {
        return Err(Unresolved::Outside);
    }
    let root = std::fs::canonicalize(root).map_err(|error| Unresolved::Root {
        dir: root.to_owned(),
        error,
    })?;
    let path = std::fs::canonicalize(root.join(rel)).map_err(|_| Unresolved::NotFound)?;
    if !path.starts_with(&root) {
        return Err(Unresolved::Outside);
    }
    let meta = std::fs::metadata(&path).map_err(|_| Unresolved::NotFound)?;
    if !meta.is_file() {
        return Err(Unresolved::NotFound);
    }
    Ok(path)
}
