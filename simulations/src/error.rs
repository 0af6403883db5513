//! The error type of the simulations crate.

use std::path::PathBuf;

/// Everything that can go wrong running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// An error of the core engine (shapes, data, configuration of layers).
    #[error(transparent)]
    Core(#[from] fedtiny_common::Error),
    /// An error of the coordinator (run folders, rounds, checkpoints).
    #[error(transparent)]
    Coordinator(#[from] fedtiny_coordinator::CoordinatorError),
    /// An error of a client.
    #[error(transparent)]
    Client(#[from] fedtiny_client::ClientError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A configuration file is malformed.
    #[error("config {path}: {message}")]
    Config {
        /// The file (or `<embedded>` for a built-in default).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A result could not be serialised.
    #[error("serialising {what}: {message}")]
    Serialize {
        /// What was being written.
        what: String,
        /// The cause.
        message: String,
    },
}

impl From<fedtiny_common::data::DataError> for SimError {
    fn from(e: fedtiny_common::data::DataError) -> Self {
        SimError::Core(e.into())
    }
}

impl SimError {
    /// An I/O error on a path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SimError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SimError> = std::result::Result<T, E>;
