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
//! state of the same layout, and the activations the forward pass keeps for backward
//! ([`TrainFootprint`]); [`predict_train_peak`] evaluates it for a training task, which is what
//! clients' memory budgets are checked against.

use serde::Serialize;

use crate::Result;
use crate::layers::{OpInfo, OpKind};
use crate::mask::MaskSet;
use crate::models::{Model, ModelSpec};
use crate::optim::OptimizerConfig;
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

/// How fedtiny's clients hold a model while they train: masked-dense (every value, gradient and
/// optimizer moment, pruned or not). Memory budgets are checked under this storage, by the
/// coordinator before it sends a task and by the client before it trains.
pub const CLIENT_STORAGE: Storage = Storage::Dense;

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
    /// Activations kept for backward, plus the largest transient buffers (see
    /// [`TrainFootprint`]).
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

/// What training a model holds in memory, split into the part that does not depend on the
/// batch size (the model state) and the part that grows with it (per sample), so that the peak
/// of a training task can be evaluated at any batch size ([`TrainFootprint::peak_bytes`]).
///
/// The model state is the parameters (values, plus indices or a bitmap for masked tensors under
/// [`Storage::Sparse`]) and buffers, one gradient per trainable value and the optimizer's
/// moments. Per sample: the activations every operation of the training forward keeps for its
/// backward (for a convolution, its im2col matrix), plus the largest transient pair of one
/// operation (the gradient flowing into it and the gradient it produces, or its input and output
/// in the forward pass). The process itself (code, runtime, the client's dataset, the encoded
/// task and result) is not part of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TrainFootprint {
    /// Storage assumed.
    pub storage: Storage,
    /// Parameter values (+ index or bitmap overhead) and buffers, in bytes.
    pub params: u64,
    /// Gradients, in bytes.
    pub grads: u64,
    /// Optimizer state, in bytes.
    pub optimizer: u64,
    /// Activations kept for backward, in bytes per sample.
    pub cached_per_sample: u64,
    /// The largest transient buffers outside the caches, in bytes per sample.
    pub transient_per_sample: u64,
}

impl TrainFootprint {
    /// The footprint of training `model` at its current masks. `optimizer_values` is the
    /// optimizer state per trainable value (see
    /// [`crate::optim::OptimizerConfig::state_per_value`]).
    pub fn of_model(model: &Model, optimizer_values: usize, storage: Storage) -> Result<Self> {
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
        let transient: u64 = ops
            .iter()
            .map(|o| (o.input_elems + o.output_elems) as u64)
            .max()
            .unwrap_or(0);
        Ok(TrainFootprint {
            storage,
            params: params + buffers,
            grads: 4 * values,
            optimizer: 4 * values * optimizer_values as u64,
            cached_per_sample: 4 * cached,
            transient_per_sample: 4 * transient,
        })
    }

    /// The footprint of training the model of `spec` under `masks` (its tensors unmasked when
    /// `masks` is `None`) with `optimizer`. Builds the model once to trace it.
    pub fn of_spec(
        spec: &ModelSpec,
        masks: Option<&MaskSet>,
        optimizer: &OptimizerConfig,
        storage: Storage,
    ) -> Result<Self> {
        let mut model = Model::new(spec, 0)?;
        if let Some(m) = masks {
            model.set_masks(m)?;
        }
        Self::of_model(&model, optimizer.state_per_value(), storage)
    }

    /// Model state: parameters, gradients and optimizer state, in bytes.
    pub fn model_state(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    /// Activations (kept and transient) of one batch, in bytes.
    pub fn activations(&self, batch_size: usize) -> u64 {
        (batch_size as u64).saturating_mul(self.cached_per_sample + self.transient_per_sample)
    }

    /// The predicted peak of training one batch of `batch_size` samples, in bytes.
    pub fn peak_bytes(&self, batch_size: usize) -> u64 {
        self.model_state()
            .saturating_add(self.activations(batch_size))
    }

    /// The largest batch size whose predicted peak fits in `budget` bytes (`None` when even the
    /// model state does not fit; 0 when it fits but not one sample).
    pub fn max_batch_within(&self, budget: u64) -> Option<usize> {
        let room = budget.checked_sub(self.model_state())?;
        let per = self.cached_per_sample + self.transient_per_sample;
        Some(
            room.checked_div(per)
                .map_or(usize::MAX, |b| usize::try_from(b).unwrap_or(usize::MAX)),
        )
    }

    /// The footprint as a [`MemoryReport`] at `batch_size`.
    pub fn report(&self, batch_size: usize) -> MemoryReport {
        MemoryReport {
            storage: self.storage,
            batch_size,
            params: self.params,
            grads: self.grads,
            optimizer: self.optimizer,
            activations: self.activations(batch_size),
        }
    }
}

/// The predicted peak memory, in bytes, of a training task: the model of `spec` under `masks`,
/// trained with `optimizer` on batches of `batch_size` samples, its tensors held as `storage`
/// says (see [`TrainFootprint`] for what is counted).
pub fn predict_train_peak(
    spec: &ModelSpec,
    masks: Option<&MaskSet>,
    batch_size: usize,
    optimizer: &OptimizerConfig,
    storage: Storage,
) -> Result<u64> {
    Ok(TrainFootprint::of_spec(spec, masks, optimizer, storage)?.peak_bytes(batch_size))
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
    Ok(TrainFootprint::of_model(model, optimizer_values, storage)?.report(batch_size))
}

/// Bytes in binary units for messages, e.g. `12.5 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// The peak resident set size of this process so far (`VmHWM`), where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets this process's peak resident set size (`VmHWM`) to its current resident size, so that
/// a later [`peak_rss_bytes`] covers only what ran after the reset (Linux: `/proc/self/clear_refs`).
/// Returns whether the OS accepted the reset; elsewhere the peak stays cumulative.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// Model-state bytes a live model and its optimizer actually hold (measured from their storage,
/// not modelled): see [`held_model_state`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeldModelState {
    /// Parameter values (with their masks and, in lean storage, sparse indices and the
    /// column-ordered copy the kernels read) and buffers (BatchNorm running statistics).
    pub params: u64,
    /// Gradients (active values only in lean storage).
    pub grads: u64,
    /// Optimizer state ([`crate::optim::Optimizer::state_bytes`]).
    pub optimizer: u64,
}

impl HeldModelState {
    /// Parameters, gradients and optimizer state.
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }
}

/// The model-state bytes `model` and `optimizer` hold right now (see
/// [`crate::param::Param::held_bytes`]); a mask shared by a lean parameter and the optimizer is
/// counted once. Activations and kernel workspaces are not model state and are not counted.
pub fn held_model_state(model: &Model, optimizer: &dyn crate::optim::Optimizer) -> HeldModelState {
    let mut held = HeldModelState {
        optimizer: optimizer.state_bytes() as u64,
        ..HeldModelState::default()
    };
    model.visit(&mut |_, slot| match slot {
        crate::layers::Slot::Param(p) => {
            let b = p.held_bytes();
            held.params += b.values as u64;
            held.grads += b.grad as u64;
        }
        crate::layers::Slot::Buffer(_, t) => held.params += 4 * t.len() as u64,
    });
    held
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;
    use crate::mask::Mask;
    use crate::models::Arch;

    /// The `cnn` at width 1/32 on 4×4×1 inputs with 2 classes: conv 1→1, conv 1→2, linear
    /// 2→4, linear 4→2, small enough to count by hand.
    fn tiny() -> ModelSpec {
        ModelSpec::new(Arch::Cnn, [4, 4, 1], 2, 1.0 / 32.0).unwrap()
    }

    fn adam() -> OptimizerConfig {
        OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        }
    }

    /// Masks keeping the elements `i` with `i % every == 0` of every prunable tensor.
    fn every_nth(spec: &ModelSpec, every: usize) -> MaskSet {
        let m = Model::new(spec, 0).unwrap();
        let sd = m.state_dict();
        let mut set = MaskSet::default();
        for name in m.prunable_names() {
            let n = sd.get(&name).unwrap().values.len();
            set.masks
                .insert(name, Mask::from_fn(n, |i| i.is_multiple_of(every)));
        }
        set
    }

    /// Masks keeping the first `round(density · n)` elements of every prunable tensor.
    fn at_density(model: &Model, density: f64) -> MaskSet {
        let sd = model.state_dict();
        let mut set = MaskSet::default();
        for name in model.prunable_names() {
            let n = sd.get(&name).unwrap().values.len();
            let k = (density * n as f64).round() as usize;
            set.masks.insert(name, Mask::from_fn(n, |i| i < k));
        }
        set
    }

    #[test]
    fn footprint_of_a_tiny_cnn_matches_a_hand_count() {
        // Trainable values: conv1 3·3·1·1 = 9, bn1 γ β 2, conv2 3·3·1·2 = 18, bn2 γ β 4,
        // fc1 2·4 + 4 = 12, fc2 4·2 + 2 = 10: 55. Buffers (running mean and variance): 2 + 4.
        // Cached per sample: conv1 im2col 4·4·9 = 144, bn1 16, relu1 0 (fused into bn1, it
        // keeps no copy), pool1 2·2·1 = 4, conv2 im2col 2·2·9 = 36, bn2 8, relu2 0 (fused),
        // pool2 2, flatten 0, fc1 input 2, relu3 4, fc2 input 4: 220. Largest transient: input +
        // output of conv1, bn1 or relu1, 16 + 16.
        let f = TrainFootprint::of_spec(&tiny(), None, &adam(), Storage::Dense).unwrap();
        assert_eq!(
            f,
            TrainFootprint {
                storage: Storage::Dense,
                params: 4 * (55 + 6),
                grads: 4 * 55,
                optimizer: 2 * 4 * 55,
                cached_per_sample: 4 * 220,
                transient_per_sample: 4 * 32,
            }
        );
        assert_eq!(f.model_state(), 244 + 220 + 440);
        assert_eq!(f.peak_bytes(8), 904 + 8 * (880 + 128));
        assert_eq!(
            predict_train_peak(&tiny(), None, 8, &adam(), Storage::Dense).unwrap(),
            8_968
        );
        // SGD with momentum keeps one value per trainable value, without momentum none.
        let sgd = |momentum| OptimizerConfig::Sgd {
            lr: 0.1,
            momentum,
            weight_decay: 0.0,
            nesterov: false,
        };
        let f = TrainFootprint::of_spec(&tiny(), None, &sgd(0.9), Storage::Dense).unwrap();
        assert_eq!(f.optimizer, 4 * 55);
        let f = TrainFootprint::of_spec(&tiny(), None, &sgd(0.0), Storage::Dense).unwrap();
        assert_eq!(f.optimizer, 0);
    }

    #[test]
    fn sparse_storage_counts_active_values_and_the_smaller_index_overhead() {
        let spec = tiny();
        let masks = every_nth(&spec, 2);
        // Masked: conv2 9 of 18 active, fc1 4 of 8, fc2 4 of 8; a bitmap (⌈n/8⌉ bytes) is
        // smaller than 4-byte indices for each: 4·9 + 3, 4·4 + 1, 4·4 + 1. Unmasked: conv1 9,
        // bn γ β 6, fc1 bias 4, fc2 bias 2 values; buffers 6.
        let f = TrainFootprint::of_spec(&spec, Some(&masks), &adam(), Storage::Sparse).unwrap();
        assert_eq!(f.params, 39 + 17 + 17 + 4 * (9 + 6 + 4 + 2) + 4 * 6);
        let values = 9 + 4 + 4 + 9 + 6 + 4 + 2;
        assert_eq!(f.grads, 4 * values);
        assert_eq!(f.optimizer, 2 * 4 * values);
        // Activations do not depend on the storage or the masks.
        let dense = TrainFootprint::of_spec(&spec, Some(&masks), &adam(), Storage::Dense).unwrap();
        assert_eq!(dense.cached_per_sample, f.cached_per_sample);
        assert_eq!(dense.transient_per_sample, f.transient_per_sample);
        // Masked-dense training holds every value whatever the masks.
        assert_eq!(
            dense,
            TrainFootprint::of_spec(&spec, None, &adam(), Storage::Dense).unwrap()
        );
        // With one active value, its 4-byte index beats the bitmap once a tensor has more than
        // 32 elements.
        let big = ModelSpec::new(Arch::Cnn, [8, 8, 1], 10, 0.25).unwrap();
        let one = every_nth(&big, 1 << 30);
        let m = {
            let mut m = Model::new(&big, 0).unwrap();
            m.set_masks(&one).unwrap();
            m
        };
        m.visit(&mut |name, slot| {
            if let crate::layers::Slot::Param(p) = slot
                && let Some(mask) = p.mask()
            {
                assert_eq!(mask.active(), 1, "{name}");
                let n = p.len() as u64;
                assert_eq!(
                    tensor_bytes(p, Storage::Sparse),
                    4 + 4u64.min(n.div_ceil(8))
                );
            }
        });
    }

    #[test]
    fn memory_report_agrees_with_the_footprint_and_max_batch_inverts_the_peak() {
        let model = Model::new(&tiny(), 0).unwrap();
        let f = TrainFootprint::of_model(&model, 2, Storage::Dense).unwrap();
        let r = memory(&model, 16, 2, Storage::Dense).unwrap();
        assert_eq!(r.total(), f.peak_bytes(16));
        assert_eq!(r.model_state(), f.model_state());
        assert_eq!(f.max_batch_within(f.model_state() - 1), None);
        assert_eq!(f.max_batch_within(f.model_state()), Some(0));
        for b in [1, 2, 7, 32, 1000] {
            assert_eq!(f.max_batch_within(f.peak_bytes(b)), Some(b));
            assert_eq!(f.max_batch_within(f.peak_bytes(b) - 1), Some(b - 1));
        }
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A larger batch or a denser mask never predicts less memory.
        #[test]
        fn peak_grows_with_batch_size_and_density(
            b1 in 1usize..512,
            extra in 0usize..512,
            d1 in 0.0f64..=1.0,
            dd in 0.0f64..=1.0,
        ) {
            let spec = ModelSpec::new(Arch::Cnn, [8, 8, 1], 10, 0.25).unwrap();
            let model = Model::new(&spec, 0).unwrap();
            let d2 = (d1 + dd).min(1.0);
            let (m1, m2) = (at_density(&model, d1), at_density(&model, d2));
            for storage in [Storage::Dense, Storage::Sparse] {
                let f1 = TrainFootprint::of_spec(&spec, Some(&m1), &adam(), storage).unwrap();
                let f2 = TrainFootprint::of_spec(&spec, Some(&m2), &adam(), storage).unwrap();
                prop_assert!(f1.peak_bytes(b1) <= f1.peak_bytes(b1 + extra));
                prop_assert!(f1.peak_bytes(b1) <= f2.peak_bytes(b1));
                prop_assert!(f1.model_state() <= f2.model_state());
                if extra > 0 {
                    prop_assert!(f1.peak_bytes(b1) < f1.peak_bytes(b1 + extra));
                }
            }
        }
    }
}
