//! The `metalgraph` binary's library: configuration, the HTTP APIs, the server wiring, and
//! the command-line client. The binary (`main.rs`) only parses flags and calls in here, so
//! that tests can drive every piece directly.

pub mod api;
pub mod audit;
pub mod auth;
pub mod boot;
pub mod client;
pub mod config;
pub mod config_media;
pub mod datadir;
pub mod hooks;
pub mod library;
pub mod metrics;
pub mod rekey;
pub mod server;
pub mod tls;
pub mod validate;

/// jemalloc is the allocator of everything built on this crate: the binary, the benchmark
/// harness that runs the engine in-process, this crate's tests (not the engine's or the
/// store's own). glibc's malloc gives each of the engine's many threads (tokio's workers
/// and blocking pool) an arena of its own, up to eight per core; memory freed in one arena
/// is not reused by the others, and in the fan-out benchmark that held 20-40 % of the
/// process's memory and cost sled's commit path a fifth of its cycles (BENCHMARKS.md,
/// "Fan-out, chain and a million workflows").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
