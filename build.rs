//! Compiles `proto/metalgraph.proto` with protox (no `protoc` needed) into tonic code and
//! an encoded descriptor set for server reflection, and embeds into the binary:
//! - the shipped graph library (`graphs/`): every `*.yaml`, `*.yml` and `*.json` file below
//!   `graphs/` becomes one `(relative path, text)` entry of `LIBRARY_FILES` in
//!   `$OUT_DIR/library.rs`, which `src/library.rs` includes;
//! - the shipped node-facing templates: every file directly in `templates/` (profiles and
//!   install scripts; its subdirectories belong to configuration media) becomes one
//!   `(file name, text)` entry of `SHIPPED_TEMPLATES` in `$OUT_DIR/templates.rs`, which
//!   `src/boot.rs` includes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    compile_proto();
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let graphs = root.join("graphs");
    // Cargo watches a directory recursively when told about it, so new, changed and
    // removed files all trigger a rebuild.
    println!("cargo:rerun-if-changed=graphs");

    let mut files = Vec::new();
    if graphs.is_dir() {
        collect(&graphs, &mut files);
    }
    // A stable order keeps the generated file, and so the build, reproducible.
    files.sort();

    let mut out =
        String::from("/// The shipped library: `(path relative to the repository, text)`.\n");
    out.push_str("pub static LIBRARY_FILES: &[(&str, &str)] = &[\n");
    for path in &files {
        let rel = path
            .strip_prefix(&root)
            .expect("library files lie below the manifest directory")
            .to_string_lossy()
            .replace('\\', "/");
        let abs = path.to_string_lossy();
        writeln!(out, "    ({rel:?}, include_str!({abs:?})),")
            .expect("writing to a String cannot fail");
    }
    out.push_str("];\n");

    write_generated("library.rs", &out);
    embed_templates(&root.join("templates"));
}

/// Writes `$OUT_DIR/templates.rs`: the files directly in `dir`, by name, in name order.
fn embed_templates(dir: &Path) {
    println!("cargo:rerun-if-changed=templates");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("a readable entry of templates/").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = String::from("/// The shipped node-facing templates: `(file name, text)`.\n");
    out.push_str("pub static SHIPPED_TEMPLATES: &[(&str, &str)] = &[\n");
    for path in &files {
        let name = path
            .file_name()
            .expect("a file has a name")
            .to_string_lossy();
        let abs = path.to_string_lossy();
        writeln!(out, "    ({name:?}, include_str!({abs:?})),")
            .expect("writing to a String cannot fail");
    }
    out.push_str("];\n");
    write_generated("templates.rs", &out);
}

/// Writes generated Rust code to `$OUT_DIR/name`.
fn write_generated(name: &str, code: &str) {
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(name);
    std::fs::write(&dest, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}

/// Collects library files below `dir`, recursively.
fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry
            .unwrap_or_else(|e| panic!("cannot read an entry of {}: {e}", dir.display()))
            .path();
        if path.is_dir() {
            collect(&path, files);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(path);
        }
    }
}

/// Generates the gRPC code and `$OUT_DIR/metalgraph.bin`, the encoded descriptor set.
fn compile_proto() {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["metalgraph.proto"], ["proto"])
        .unwrap_or_else(|e| panic!("proto/metalgraph.proto does not compile: {e}"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bin = out.join("metalgraph.bin");
    std::fs::write(&bin, prost::Message::encode_to_vec(&fds))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", bin.display()));
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed or too deeply nested messages are the sender's error (src/api/codec.rs).
        .codec_path("crate::api::codec::Codec")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating gRPC code failed: {e}"));
}
