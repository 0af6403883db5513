//! The error type of the data module.
//!
//! Decisions:
//! - Every variant that concerns a file carries its [`PathBuf`] (or, for downloads, the URL) and
//!   says it in its message, so a user who sees only the message knows which file to look at.
//! - For data that never came from a file (a [`Dataset`](super::Dataset) built in memory), the
//!   `path` of [`DataError::LabelOutOfRange`] holds the dataset's name instead.
//! - [`DataError::CountMismatch`] names both files of the image/label pair.
//! - Argument errors ([`DataError::InvalidArgument`], [`DataError::Partition`]) carry a sentence.

use std::path::PathBuf;

/// Everything that can go wrong while reading, checking, transforming, partitioning or
/// downloading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be opened, read, written, renamed or removed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file starts with the gzip magic bytes but its stream is corrupt or cut short.
    #[error("corrupt gzip stream in {}: {message}", path.display())]
    Gzip {
        /// The file concerned.
        path: PathBuf,
        /// What the decoder reported.
        message: String,
    },
    /// An IDX file does not start with the magic number of the expected kind.
    #[error("{} is not the expected IDX file: magic number 0x{found:08x}, expected 0x{expected:08x}", path.display())]
    BadMagic {
        /// The file concerned.
        path: PathBuf,
        /// The magic number that was expected.
        expected: u32,
        /// The magic number that was found.
        found: u32,
    },
    /// A file (after decompression) is shorter than its header or format says.
    #[error("{} is truncated: expected {expected} bytes, found {actual}", path.display())]
    Truncated {
        /// The file concerned.
        path: PathBuf,
        /// How many bytes were expected (after decompression).
        expected: u64,
        /// How many bytes there were.
        actual: u64,
    },
    /// A file's dimensions disagree with its length, with the expected shape, or with the
    /// paired file.
    #[error("bad dimensions in {}: {message}", path.display())]
    Dimensions {
        /// The file concerned.
        path: PathBuf,
        /// What disagrees with what.
        message: String,
    },
    /// A label is not below the number of classes.
    #[error("label {label} at index {index} in {} is out of range (the data have {classes} classes)", path.display())]
    LabelOutOfRange {
        /// The file concerned (or the dataset's name for data built in memory).
        path: PathBuf,
        /// The position of the label.
        index: usize,
        /// The offending label.
        label: u8,
        /// The number of classes.
        classes: usize,
    },
    /// An image file and its label file hold different numbers of samples.
    #[error(
        "{} holds {images} images but {} holds {labels} labels",
        images_path.display(),
        labels_path.display()
    )]
    CountMismatch {
        /// The image file.
        images_path: PathBuf,
        /// The number of images it holds.
        images: usize,
        /// The label file.
        labels_path: PathBuf,
        /// The number of labels it holds.
        labels: usize,
    },
    /// A required file does not exist.
    #[error("missing data file {}: {hint}", path.display())]
    MissingFile {
        /// The file that was looked for.
        path: PathBuf,
        /// What to do about it.
        hint: String,
    },
    /// A file's MD5 checksum is not the published one.
    #[error("checksum mismatch for {}: expected MD5 {expected}, got {actual}", path.display())]
    Checksum {
        /// The file concerned.
        path: PathBuf,
        /// The published checksum (lower-case hex).
        expected: String,
        /// The checksum of the bytes received (lower-case hex).
        actual: String,
    },
    /// A download failed (connection, HTTP status, or the body stream broke off).
    #[error("download of {url} failed: {message}")]
    Download {
        /// The URL requested.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A partition of the data across clients is impossible or failed.
    #[error("cannot partition the data: {0}")]
    Partition(String),
    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl DataError {
    /// Builds a [`DataError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    /// Builds a [`DataError::Dimensions`].
    pub fn dimensions(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        DataError::Dimensions {
            path: path.into(),
            message: message.into(),
        }
    }
}
