//! # fedtiny-simulations: fedtiny on one machine
//!
//! Experiments that run on a single machine, built on the same engine as the coordinator and the
//! edge client:
//! - [`centralized`]: train a model on a whole dataset (the accuracy reference for federated runs);
//! - [`bench`]: training-throughput benchmark of the models (samples per second, medians);
//! - [`config`]: the TOML configuration of a run, validated, with embedded defaults;
//! - [`datasets`]: finding, downloading and loading the data a config names;
//! - [`run_dir`]: the run folder (resolved config, metrics, summary) every run writes.
//!
//! The binary `fedtiny-sim` exposes these as subcommands.

pub mod bench;
pub mod centralized;
pub mod config;
pub mod datasets;
pub mod error;
pub mod run_dir;

pub use error::{Result, SimError};
