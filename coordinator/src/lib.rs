//! # fedtiny-coordinator
//!
//! The coordinator of a federated run. A pure, synchronous policy core inside an async shell:
//!
//! - [`config`]: the run ([`config::FederatedConfig`]) and the server ([`config::ServeConfig`]),
//!   TOML with unknown keys refused.
//! - [`global`]: the global model (architecture, state, versioned masks).
//! - [`strategy`]: [`strategy::Strategy`] (configure and aggregate rounds, no I/O) and its
//!   implementations: FedTiny, sparse FedAvg on a fixed mask (dense, random, magnitude, SNIP),
//!   iterative magnitude pruning.
//! - [`proxy`]: the coordinator's handle on a client ([`proxy::ClientProxy`]) and the set of
//!   reachable clients ([`proxy::ClientPool`]); failures are values ([`proxy::Failure`]).
//! - [`engine`]: [`engine::RoundEngine`], the one place rounds are driven: sampling, deadlines,
//!   validation, aggregation, evaluation, metrics, checkpoints.
//! - [`budget`]: clients' memory budgets: predicted task peaks, lowered batch sizes, clients
//!   left out of sampling or not sent a task that would not fit.
//! - [`stage0`]: the server's labelled set, dense pre-training, SNIP masks.
//! - [`evaluate`]: server-side evaluation on a held-out test set.
//! - [`checkpoint`]: atomic, verified checkpoints and model files (bincode 2, this module only).
//! - [`metrics`]: per-round metrics and the run summary.
//! - [`run_dir`]: the run folder (resolved config, metrics, summary).
//! - [`hub`]: the registry of connected clients and their mailboxes; the gRPC client pool.
//! - [`service`]: the `fedtiny.v1` gRPC service over mutual TLS (thin handlers over the hub).
//! - [`server`]: serving a run: TLS, listener, round engine, graceful shutdown.
//! - [`error`]: the crate's error type.

pub mod budget;
pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod global;
pub mod hub;
pub mod metrics;
pub mod proxy;
pub mod run_dir;
pub mod server;
pub mod service;
pub mod stage0;
pub mod strategy;

pub use error::{CoordinatorError, Result};
