//! # fedtiny-client: the edge client
//!
//! - [`app`]: [`app::ClientApp`], the client's compute, free of any transport: it trains and
//!   evaluates the tasks it is given on its own data. The edge binary and the in-process
//!   simulation run exactly this code.
//! - [`session`]: the mutual-TLS gRPC session with a coordinator: join, long-poll for tasks,
//!   fetch and upload chunked payloads, heartbeats while training, reconnect with backoff.
//! - [`error`]: the crate's error type.

mod adjust;
pub mod app;
pub mod error;
pub mod session;

pub use app::{ClientApp, LocalData};
pub use error::ClientError;
