//! Cost accounting: training FLOPs and client memory, dense and at the mask's density.
//!
//! FLOPs follow the RigL convention FedTiny uses: a forward pass costs `f = 2·Σ macs` with each
//! conv/linear layer's multiply-adds scaled by its weight's density (BatchNorm, bias, activations
//! and pooling are counted as free, as in RigL); a sparse training step costs `3·f_S` (forward,
//! input gradient, weight gradient), and a step that also needs the dense weight gradient costs
//! `2·f_S + f_D`.
//!
//! The memory model counts what a client must hold to train one batch: parameters (values, plus
//! 32-bit indices or a bitmap, whichever is smaller, for masked tensors), gradients and optimizer
//! state of the same layout, and the activations the forward pass keeps for backward.

use serde::Serialize;

use crate::Result;
use crate::layers::{OpInfo, OpKind};
use crate::models::Model;
use crate::param::Param;

/// Per-layer multiply-adds of one forward pass for one sample.
#[derive(Clone, Debug, Serialize)]
pub struct LayerFlops {
    /// Layer path.
    pub name: String,
    /// Conv or linear.
    pub kind: OpKind,
    /// Dense multiply-adds.
    pub dense_macs: u64,
    /// Density of the layer's weight.
    pub density: f64,
    /// Multiply-adds at that density.
    pub sparse_macs: f64,
}

/// FLOPs per sample of a model at its current masks.
#[derive(Clone, Debug, Serialize)]
pub struct FlopReport {
    /// Conv and linear layers.
    pub layers: Vec<LayerFlops>,
    /// Dense forward FLOPs per sample (`f_D`).
    pub forward_dense: f64,
    /// Forward FLOPs per sample at the current masks (`f_S`).
    pub forward_sparse: f64,
}

impl FlopReport {
    /// Training FLOPs per sample of a dense step (`3·f_D`).
    pub fn train_dense(&self) -> f64 {
        3.0 * self.forward_dense
    }

    /// Training FLOPs per sample of a sparse step (`3·f_S`).
    pub fn train_sparse(&self) -> f64 {
        3.0 * self.forward_sparse
    }

    /// Training FLOPs per sample of a sparse step that also computes the dense weight gradient
    /// (`2·f_S + f_D`).
    pub fn train_sparse_with_dense_grad(&self) -> f64 {
        2.0 * self.forward_sparse + self.forward_dense
    }
}

/// FLOPs per sample at the model's current masks.
pub fn flops(model: &Model) -> Result<FlopReport> {
    let ops = model.trace()?;
    let mut density = std::collections::HashMap::new();
    model.visit(&mut |name, slot| {
        if let crate::layers::Slot::Param(p) = slot {
            density.insert(name.to_string(), p.active() as f64 / p.len().max(1) as f64);
        }
    });
    let mut layers = Vec::new();
    for op in ops.iter().filter(|o| o.macs > 0) {
        let d = op
            .weight
            .as_ref()
            .and_then(|w| density.get(w))
            .copied()
            .unwrap_or(1.0);
        layers.push(LayerFlops {
            name: op.name.clone(),
            kind: op.kind,
            dense_macs: op.macs,
            density: d,
            sparse_macs: op.macs as f64 * d,
        });
    }
    let forward_dense = 2.0 * layers.iter().map(|l| l.dense_macs as f64).sum::<f64>();
    let forward_sparse = 2.0 * layers.iter().map(|l| l.sparse_macs).sum::<f64>();
    Ok(FlopReport {
        layers,
        forward_dense,
        forward_sparse,
    })
}

/// How a client stores a masked tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// Every value, pruned or not (how masked-dense training holds a model).
    Dense,
    /// Only the active values of masked tensors, plus indices or a bitmap.
    Sparse,
}

/// Modelled client memory for training one batch, in bytes.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    /// Storage assumed.
    pub storage: Storage,
    /// Batch size assumed.
    pub batch_size: usize,
    /// Parameter values (+ index or bitmap overhead).
    pub params: u64,
    /// Gradients.
    pub grads: u64,
    /// Optimizer state.
    pub optimizer: u64,
    /// Activations kept for backward, plus the largest transient output.
    pub activations: u64,
}

impl MemoryReport {
    /// Model state: parameters, gradients and optimizer state.
    pub fn model_state(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    /// Everything.
    pub fn total(&self) -> u64 {
        self.model_state() + self.activations
    }
}

/// Bytes of one tensor's values under a storage policy: dense `4n`; sparse `4a` plus the smaller
/// of `4a` (indices) and `n/8` (bitmap).
pub fn tensor_bytes(p: &Param, storage: Storage) -> u64 {
    let n = p.len() as u64;
    match (storage, p.mask()) {
        (Storage::Sparse, Some(m)) => {
            let a = m.active() as u64;
            4 * a + (4 * a).min(n.div_ceil(8))
        }
        _ => 4 * n,
    }
}

/// The memory model of a client training `model` at its current masks.
/// `optimizer_values` is the optimizer state per trainable value (see
/// [`crate::optim::OptimizerConfig::state_per_value`]).
pub fn memory(
    model: &Model,
    batch_size: usize,
    optimizer_values: usize,
    storage: Storage,
) -> Result<MemoryReport> {
    let (mut params, mut values) = (0u64, 0u64);
    let mut buffers = 0u64;
    model.visit(&mut |_, slot| match slot {
        crate::layers::Slot::Param(p) => {
            params += tensor_bytes(p, storage);
            values += match (storage, p.mask()) {
                (Storage::Sparse, Some(m)) => m.active() as u64,
                _ => p.len() as u64,
            };
        }
        crate::layers::Slot::Buffer(_, t) => buffers += 4 * t.len() as u64,
    });
    let ops: Vec<OpInfo> = model.trace()?;
    let cached: u64 = ops.iter().map(|o| o.cached_elems as u64).sum();
    let transient: u64 = ops.iter().map(|o| o.output_elems as u64).max().unwrap_or(0);
    Ok(MemoryReport {
        storage,
        batch_size,
        params: params + buffers,
        grads: 4 * values,
        optimizer: 4 * values * optimizer_values as u64,
        activations: 4 * batch_size as u64 * (cached + transient),
    })
}

/// The peak resident set size of this process so far (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
