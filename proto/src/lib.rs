//! # fedtiny-proto: the wire protocol
//!
//! - [`pb`]: the generated `fedtiny.v1` protobuf types and gRPC service (compiled at build time
//!   by a pure-Rust protobuf compiler, so no `protoc` is needed). Generated types never leave this
//!   crate and the gRPC adapters.
//! - [`convert`]: validated conversions between wire messages and the core task types.
//! - [`chunk`]: splitting large payloads into chunks and reassembling them under size limits.
//! - [`pki`]: generating a CA, a server certificate and client certificates (PEM).
//! - [`tls`]: mutual-TLS configuration for both ends, and client identity from certificates.

pub mod chunk;
pub mod convert;
pub mod pb;
pub mod pki;
pub mod tls;
