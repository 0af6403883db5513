//! Server-side evaluation of the global model on a held-out test set.

use std::sync::Arc;

use fedtiny_common::data::{Dataset, Normalization};
use fedtiny_common::train::{self, BatchOptions, PassStats};

use crate::error::Result;
use crate::global::GlobalModel;

/// Evaluates global models on a test set the coordinator holds.
#[derive(Clone)]
pub struct Evaluator {
    test: Arc<Dataset>,
    indices: Vec<usize>,
    options: BatchOptions,
}

impl Evaluator {
    /// An evaluator on the first `limit` samples of `test` (all when `None`).
    pub fn new(
        test: Arc<Dataset>,
        limit: Option<usize>,
        normalization: Normalization,
        batch_size: usize,
    ) -> Self {
        let n = limit.map_or(test.len(), |l| l.min(test.len()));
        Evaluator {
            test,
            indices: (0..n).collect(),
            options: BatchOptions {
                batch_size,
                normalization,
                augment: None,
            },
        }
    }

    /// Loss and accuracy of a global model.
    pub fn evaluate(&self, global: &GlobalModel) -> Result<PassStats> {
        let mut model = global.to_model()?;
        Ok(train::evaluate(
            &mut model,
            &self.test,
            &self.indices,
            &self.options,
        )?)
    }
}
