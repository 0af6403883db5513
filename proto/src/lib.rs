//! # fedtiny-proto: the wire protocol
//!
//! Will hold the `fedtiny.v1` protobuf service (client-initiated join, long-poll, submit,
//! heartbeat, leave), compiled at build time without `protoc`, and the validated conversions
//! between wire messages and the core types of `fedtiny-common`. Generated types never leave this
//! crate and the gRPC adapters.
//!
//! Not yet implemented: the federated runtime is the next piece of work; the training engine in
//! `fedtiny-common` is what exists today.
