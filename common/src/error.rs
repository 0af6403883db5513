//! The error type of the core crate.

use crate::data::DataError;

/// Everything that can go wrong in the core crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor had a shape that the operation cannot take.
    #[error("shape mismatch in {context}: expected {expected}, got {actual}")]
    Shape {
        /// Where the mismatch was found (layer or tensor name).
        context: String,
        /// What was expected, in words or as a shape.
        expected: String,
        /// What was found.
        actual: String,
    },
    /// A named tensor was asked for but does not exist.
    #[error("unknown tensor `{0}`")]
    UnknownTensor(String),
    /// A state or mask set does not cover the tensors the model has.
    #[error("state mismatch: {0}")]
    StateMismatch(String),
    /// A configuration value is out of its valid range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// `backward` was called without a preceding training-mode `forward`.
    #[error("backward called on `{0}` without a cached forward pass")]
    NoForwardCache(String),
    /// A value that must be finite was NaN or infinite.
    #[error("non-finite value in {0}")]
    NonFinite(String),
    /// Loading, parsing or partitioning data failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Encoding or decoding a tensor or mask for the wire failed.
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    /// A thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds a [`Error::Shape`] from anything printable.
    pub fn shape(
        context: impl Into<String>,
        expected: impl std::fmt::Debug,
        actual: impl std::fmt::Debug,
    ) -> Self {
        Error::Shape {
            context: context.into(),
            expected: format!("{expected:?}"),
            actual: format!("{actual:?}"),
        }
    }
}
