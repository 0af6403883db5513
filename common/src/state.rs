//! Named model state: what checkpoints, aggregation and the wire carry.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::param::Role;

/// One named tensor of a model's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateEntry {
    /// What the tensor is.
    pub role: Role,
    /// Whether pruning may mask it.
    pub prunable: bool,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: Vec<f32>,
}

/// Every tensor of a model's state (parameters and buffers), by stable dotted name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StateDict {
    /// The tensors, by name.
    pub entries: BTreeMap<String, StateEntry>,
}

impl StateDict {
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Total number of values across tensors.
    pub fn num_values(&self) -> usize {
        self.entries.values().map(|e| e.values.len()).sum()
    }

    /// The entry of a tensor, if present.
    pub fn get(&self, name: &str) -> Option<&StateEntry> {
        self.entries.get(name)
    }

    /// Largest absolute element-wise difference to another state with the same tensors, or
    /// `None` when the tensor sets or shapes differ.
    pub fn max_abs_diff(&self, other: &StateDict) -> Option<f32> {
        if self.entries.len() != other.entries.len() {
            return None;
        }
        let mut worst = 0.0f32;
        for (name, a) in &self.entries {
            let b = other.entries.get(name)?;
            if a.shape != b.shape {
                return None;
            }
            for (x, y) in a.values.iter().zip(&b.values) {
                worst = worst.max((x - y).abs());
            }
        }
        Some(worst)
    }
}
