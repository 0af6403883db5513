//! The error type of the coordinator crate.

use std::path::PathBuf;

/// Everything that can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The engine refused a model, state or mask.
    #[error(transparent)]
    Core(#[from] fedtiny_common::Error),
    /// A configuration file or value is invalid.
    #[error("config {origin}: {message}")]
    Config {
        /// The file or source of the value.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A checkpoint is unreadable: truncated, corrupt, or from another run.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Too few clients answered a round.
    #[error("round {round}: {got} results, quorum is {quorum}")]
    NoQuorum {
        /// The round.
        round: u64,
        /// Results received.
        got: usize,
        /// Results needed.
        quorum: usize,
    },
    /// A background task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(String),
    /// Serving failed (bind, TLS).
    #[error("server: {0}")]
    Server(String),
}

impl CoordinatorError {
    /// An I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoordinatorError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
