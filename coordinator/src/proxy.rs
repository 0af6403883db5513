//! The coordinator's handle on one client, whatever the transport.
//!
//! The gRPC implementation queues the task in the client's mailbox and waits for the client's
//! long-poll to take it and its result to arrive; the in-process implementation (in the
//! simulations) calls the client's code directly. Deadlines are not the proxy's business: the
//! round engine enforces them once, around every proxy call.

use std::future::Future;
use std::pin::Pin;

use fedtiny_common::task::{ClientId, Task, TaskResult};
use serde::{Deserialize, Serialize};

/// Bytes a task and its result occupied on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Coordinator → client.
    pub bytes_down: u64,
    /// Client → coordinator.
    pub bytes_up: u64,
}

/// A completed task.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The client's result, decoded and validated.
    pub result: TaskResult,
    /// Its wire cost.
    pub traffic: Traffic,
}

/// Why a client did not deliver a result. Failure is data: it reaches the strategy as a value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    /// The round's deadline passed first.
    #[error("deadline passed")]
    Timeout,
    /// The client left or its connection dropped.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// The client reported that it could not run the task.
    #[error("client error: {0}")]
    ClientError(String),
    /// The client's result was malformed or inconsistent and was refused.
    #[error("invalid result: {0}")]
    Invalid(String),
}

/// A boxed future of a proxy call.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, Failure>> + Send>>;

/// The coordinator's handle on one client.
pub trait ClientProxy: Send + Sync {
    /// The client's identity.
    fn id(&self) -> &ClientId;
    /// Runs a task on the client. `masks` are the coordinator's current masks, which the
    /// result is decoded against.
    fn execute(
        &self,
        task: Task,
        masks: std::sync::Arc<fedtiny_common::mask::MaskSet>,
    ) -> ReplyFuture;
}

/// The clients the coordinator can currently reach.
pub trait ClientPool: Send + Sync {
    /// Clients available for a new task, in any order.
    fn available(&self) -> Vec<std::sync::Arc<dyn ClientProxy>>;
    /// Tells clients the run is over (the gRPC pool answers their next poll with "run over").
    fn finish(&self) {}
}
