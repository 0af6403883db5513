//! # fedtiny-simulations: fedtiny on one machine
//!
//! Experiments that run on a single machine, built on the same engine as the coordinator and the
//! edge client:
//! - [`centralized`]: train a model on a whole dataset (the accuracy reference for federated runs);
//! - [`bench`]: training-throughput benchmark of the models (samples per second, medians);
//! - [`federated`]: federated simulations, in process or as real processes over gRPC;
//! - [`experiment`]: methods × densities × seeds → results table and accuracy plots;
//! - [`plot`]: SVG line charts;
//! - [`config`]: the TOML configuration of a run, validated, with embedded defaults;
//! - [`datasets`]: finding, downloading and loading the data a config names;
//! - run folders come from `fedtiny_coordinator::run_dir`.
//!
//! The binary `fedtiny-sim` exposes these as subcommands.

pub mod bench;
pub mod centralized;
pub mod config;
pub mod datasets;
pub mod error;
pub mod experiment;
pub mod federated;
pub mod plot;

pub use error::{Result, SimError};
pub use fedtiny_coordinator::run_dir;
