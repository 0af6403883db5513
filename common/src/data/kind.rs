//! The datasets fedtiny reads, by name, with their shapes and normalisation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{DataError, Normalization, Splits, cifar10, fashion_mnist};

/// A dataset fedtiny knows how to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// Fashion-MNIST in gzipped (or plain) IDX files.
    FashionMnist,
    /// CIFAR-10 in its binary format.
    Cifar10,
}

impl DatasetKind {
    /// Input shape `[h, w, c]` and class count.
    pub fn shape(self) -> ([usize; 3], usize) {
        match self {
            DatasetKind::FashionMnist => ([28, 28, 1], 10),
            DatasetKind::Cifar10 => ([32, 32, 3], 10),
        }
    }

    /// The standard per-channel normalisation.
    pub fn normalization(self) -> Normalization {
        match self {
            DatasetKind::FashionMnist => Normalization::fashion_mnist(),
            DatasetKind::Cifar10 => Normalization::cifar10(),
        }
    }

    /// Loads both splits from `dir`.
    pub fn load(self, dir: &Path) -> Result<Splits, DataError> {
        match self {
            DatasetKind::FashionMnist => fashion_mnist::load(dir),
            DatasetKind::Cifar10 => cifar10::load(dir),
        }
    }
}
