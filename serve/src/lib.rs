//! graft-serve as a library: the OpenAI-compatible server (settings, model and adapter
//! start-up, the batching engine, the HTTP app) and the `generate` / `score` / `bench`
//! commands. The binary is a thin `main` over [`cli::main`]; tests build the app with
//! [`server::start`] and drive [`http::router`] without a socket.

pub mod adapter_files;
pub mod cli;
pub mod config;
pub mod engine;
pub mod gateway;
pub mod http;
pub mod metrics;
pub mod prefix_cache;
pub mod registry;
pub mod scoring;
pub mod server;
pub mod source;
pub mod watch;
pub mod wire;
