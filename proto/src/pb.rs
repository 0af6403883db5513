//! The generated `fedtiny.v1` protobuf messages and the `Federation` gRPC service
//! ([`federation_client::FederationClient`], [`federation_server::FederationServer`]).
//!
//! The code is generated at build time from `proto/fedtiny/v1/fedtiny.proto` (see `build.rs`);
//! the proto file documents every message. Use [`crate::convert`] to turn payloads into the core
//! task types: it validates everything the generated decoder accepts.

#![allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]

include!(concat!(env!("OUT_DIR"), "/fedtiny.v1.rs"));
