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
