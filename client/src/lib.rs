//! # fedtiny-client
//!
//! Will hold the edge client: an mTLS session with the coordinator and the transport-free
//! `ClientApp` (train, evaluate, BatchNorm calibration) that the simulations also run.
//!
//! Not yet implemented: this crate is a placeholder in the workspace until the federated runtime
//! lands. Local training itself lives in `fedtiny_common::train`.
