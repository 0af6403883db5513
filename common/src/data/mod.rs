//! Data: reading datasets from disk, normalising and augmenting batches, splitting data across
//! federated clients, and downloading the files.
//!
//! # Layout
//! - [`error`]: [`DataError`], the one error type; every file-related variant names the file.
//! - [`idx`]: IDX (MNIST-format) reader and writer, gzipped or plain.
//! - [`dataset`]: [`Dataset`], labelled `u8` images in memory (N×H×W×C), and [`Splits`].
//! - [`transform`]: [`Normalization`] and [`Augment`], the settings of the batch path.
//! - [`batch`]: [`Dataset::fill_batch`], the per-step path from bytes to a normalised `f32` NHWC
//!   batch.
//! - [`fashion_mnist`], [`cifar10`]: loaders for the two datasets' standard files.
//! - [`kind`]: [`DatasetKind`], the datasets by name with their shapes and normalisation.
//! - [`partition`]: [`Partitioner`] (IID, Dirichlet label skew, shards).
//! - [`split`]: the server set and the clients' partitions of a federated run.
//! - [`download`](mod@download): fetching files over HTTP with MD5 verification.
//!
//! # Decisions
//! - Images stay bytes until a batch is filled; channels-last throughout, matching the tensors.
//! - Nothing here panics on bad input: malformed files, bad arguments and failed downloads are
//!   [`DataError`]s. (Only [`Dataset::image`] and [`Dataset::label`] index like slices.)
//! - All randomness (augmentation, partitions) comes from a caller-supplied
//!   [`Rng`](crate::rng::Rng), so a seed replays everything.
//! - Tests and the committed sample (`data/fashion-mnist-sample`, 4,000 + 1,000 real
//!   Fashion-MNIST images) never need the network or the full dataset.

pub mod batch;
pub mod cifar10;
pub mod dataset;
pub mod download;
pub mod error;
pub mod fashion_mnist;
pub mod idx;
pub mod kind;
pub mod partition;
pub mod split;
pub mod transform;

pub use dataset::{Dataset, Splits};
pub use download::{FASHION_MNIST_BASE_URL, FASHION_MNIST_FILES, RemoteFile, download};
pub use error::DataError;
pub use kind::DatasetKind;
pub use partition::Partitioner;
pub use transform::{Augment, Normalization};
