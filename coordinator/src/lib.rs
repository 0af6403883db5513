//! # fedtiny-coordinator
//!
//! Will run federated rounds: a registry of clients joined over mutual TLS, seeded sampling, the
//! round engine with deadlines and quorum, the strategies (FedTiny, dense FedAvg and the pruning
//! baselines), checkpoints and metrics.
//!
//! Not yet implemented: this crate is a placeholder in the workspace until the federated runtime
//! lands. Centralized training and evaluation already run through `fedtiny-common` (see the
//! `fedtiny-sim train` command).
