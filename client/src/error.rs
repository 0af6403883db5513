//! The error type of the client crate.

/// Everything that can go wrong on a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The engine refused the task's model, masks or data.
    #[error(transparent)]
    Core(#[from] fedtiny_common::Error),
    /// A task names a mask version this client does not hold and carries no masks.
    #[error(
        "task uses mask version {wanted} but this client holds {held:?} and the task has no masks"
    )]
    MissingMasks {
        /// The version the task needs.
        wanted: u64,
        /// The version held, if any.
        held: Option<u64>,
    },
    /// A candidate evaluation without a model reached a client that kept no `w0` from a
    /// calibration task (e.g. it restarted between the two round trips).
    #[error("candidate evaluation refers to the w0 of a calibration task this client did not run")]
    MissingW0,
    /// A training task's predicted peak memory exceeds this client's budget: the task is refused
    /// before training (see [`fedtiny_common::cost::TrainFootprint`]).
    #[error(
        "memory budget exceeded: the task needs an estimated {} ({predicted} B) at batch size {batch_size}, above this client's budget of {} ({budget} B)",
        fedtiny_common::cost::human_bytes(*.predicted),
        fedtiny_common::cost::human_bytes(*.budget)
    )]
    OverBudget {
        /// Predicted peak of the task, bytes.
        predicted: u64,
        /// The client's memory budget, bytes.
        budget: u64,
        /// The task's batch size.
        batch_size: usize,
    },
    /// The client has no local test data to evaluate on.
    #[error("this client has no local test data")]
    NoTestData,
    /// A wire message could not be encoded or decoded.
    #[error("wire: {0}")]
    Wire(String),
    /// The transport failed (connection, TLS, timeouts).
    #[error("transport: {0}")]
    Transport(String),
    /// The coordinator refused a call; the status says why.
    #[error("coordinator refused {call}: {status}")]
    Refused {
        /// The call.
        call: &'static str,
        /// The gRPC status.
        status: String,
    },
    /// The TLS setup failed (certificates, keys).
    #[error("tls: {0}")]
    Tls(String),
}
