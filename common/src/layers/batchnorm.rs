//! Batch normalisation over the last (channel) axis, optionally fused with the ReLU after it.

use super::{OpInfo, OpKind, Slot, SlotMut, expect_grad, expect_input, join};
use crate::kernels::channelwise::{self, Tiling};
use crate::param::{Param, Role};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

/// Batch normalisation of an `[..., C]` tensor per channel (BatchNorm2d on NHWC, BatchNorm1d on
/// `[N, C]`). Training mode normalises with the biased batch variance and updates the running
/// statistics with momentum 0.1 and the unbiased variance, as PyTorch does; evaluation normalises
/// with the running statistics.
///
/// With [`BatchNorm2d::with_relu`] the layer also applies the ReLU that follows it, in the same
/// pass: the output is `max(γ·x̂ + β, 0)`, bit-identical to the two layers in sequence, and the
/// backward pass zeroes the gradient where that output is not positive (recomputed from the kept
/// `x̂`), so no copy of the output is kept for the ReLU.
///
/// The output is written into the input's buffer, and the buffers kept for the backward pass
/// (`x̂`, the saved statistics) are reused from one training step to the next.
pub struct BatchNorm2d {
    gamma: Param,
    beta: Param,
    running_mean: Tensor,
    running_var: Tensor,
    channels: usize,
    momentum: f32,
    eps: f32,
    /// The name of the fused ReLU (for [`super::Layer::trace`]), if one is fused.
    relu: Option<String>,
    cache: Option<Cache>,
    /// The last cache's buffers after the backward pass, for the next training forward.
    spare: Cache,
}

#[derive(Default)]
struct Cache {
    xhat: Vec<f32>,
    inv_std: Vec<f32>,
    /// γ and β of the forward pass (only with a fused ReLU, whose gate they recompute).
    gamma: Vec<f32>,
    beta: Vec<f32>,
    shape: Vec<usize>,
    /// Normalised with the running statistics ([`Mode::Frozen`]): the statistics are constants,
    /// so the backward pass is that of a per-channel affine map.
    frozen: bool,
}

impl BatchNorm2d {
    /// γ = 1, β = 0, running mean 0, running variance 1.
    pub fn new(channels: usize) -> Self {
        let ones = Tensor::ones(ndarray::IxDyn(&[channels]));
        let zeros = Tensor::zeros(ndarray::IxDyn(&[channels]));
        BatchNorm2d {
            gamma: Param::new(ones.clone(), Role::BnScale),
            beta: Param::new(zeros.clone(), Role::BnShift),
            running_mean: zeros,
            running_var: ones,
            channels,
            momentum: 0.1,
            eps: 1e-5,
            relu: None,
            cache: None,
            spare: Cache::default(),
        }
    }

    /// Sets γ to zero (the last BN of a residual branch, so blocks start as identities).
    pub fn zero_gamma(mut self) -> Self {
        self.gamma.value.fill(0.0);
        self
    }

    /// Fuses the ReLU that follows this layer into it (in every mode). `relu_name` is that
    /// ReLU's name beside this layer in their container: [`super::Layer::trace`] still reports
    /// the two operations under their names, so operation lists and cost accounting do not
    /// change. The ReLU holds no state, so the model's named tensors do not change either.
    pub fn with_relu(mut self, relu_name: impl Into<String>) -> Self {
        self.relu = Some(relu_name.into());
        self
    }

    /// Whether a ReLU is fused into this layer.
    pub fn has_relu(&self) -> bool {
        self.relu.is_some()
    }

    fn batch_forward(&mut self, x: Tensor, cache: bool) -> Result<Tensor> {
        let c = self.channels;
        let shape = x.shape().to_vec();
        let mut data = into_vec(x);
        let m = data.len() / c;
        if m < 2 {
            return Err(Error::shape(
                "batchnorm (training)",
                "at least 2 values per channel",
                shape,
            ));
        }
        let tiling = Tiling::new(c);
        let (mean, sq) = channelwise::mean_and_centred_squares(&tiling, &data);
        let var: Vec<f64> = sq.iter().map(|s| s / m as f64).collect();
        let eps = f64::from(self.eps);
        let inv_std = var.iter().map(|v| (1.0 / (v + eps).sqrt()) as f32);
        let mom = self.momentum;
        let unbias = m as f64 / (m as f64 - 1.0);
        for (i, (rm, rv)) in self
            .running_mean
            .iter_mut()
            .zip(self.running_var.iter_mut())
            .enumerate()
        {
            *rm = (1.0 - mom) * *rm + mom * mean[i];
            *rv = (1.0 - mom) * *rv + mom * (var[i] * unbias) as f32;
        }
        if cache {
            let mut kept = std::mem::take(&mut self.spare);
            kept.inv_std.clear();
            kept.inv_std.extend(inv_std);
            self.normalise_cached(&mut data, &mean, kept, shape.clone(), false);
        } else {
            let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
            let beta = self.beta.value.as_slice().unwrap_or(&[]);
            let scale: Vec<f32> = inv_std.zip(gamma).map(|(s, g)| s * g).collect();
            let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
            channelwise::affine(&tiling, &mut data, &scale, &shift, self.relu.is_some());
        }
        from_vec(&shape, data)
    }

    /// Evaluation-mode normalisation that keeps `x̂ = (x − μ_run)/σ_run` for the backward pass.
    fn frozen_forward(&mut self, x: Tensor) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let mut data = into_vec(x);
        let rv = self.running_var.as_slice().unwrap_or(&[]);
        let mut kept = std::mem::take(&mut self.spare);
        kept.inv_std.clear();
        kept.inv_std
            .extend(rv.iter().map(|v| 1.0 / (v + self.eps).sqrt()));
        let mean = self.running_mean.as_slice().unwrap_or(&[]).to_vec();
        self.normalise_cached(&mut data, &mean, kept, shape.clone(), true);
        from_vec(&shape, data)
    }

    /// The pass shared by the training and frozen forwards: `x̂ = (y − μ)·inv_std` into the
    /// kept buffer and `y = x̂·γ + β` (clamped at 0 with a fused ReLU) in place; the statistics
    /// are `mean` and `kept.inv_std`. Stores `kept` as the cache for the backward pass.
    fn normalise_cached(
        &mut self,
        data: &mut [f32],
        mean: &[f32],
        mut kept: Cache,
        shape: Vec<usize>,
        frozen: bool,
    ) {
        let c = self.channels;
        let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
        let beta = self.beta.value.as_slice().unwrap_or(&[]);
        let relu = self.relu.is_some();
        kept.gamma.clear();
        kept.beta.clear();
        if relu {
            kept.gamma.extend_from_slice(gamma);
            kept.beta.extend_from_slice(beta);
        }
        // Every value is overwritten below: a reused buffer only grows.
        kept.xhat.resize(data.len(), 0.0);
        channelwise::normalise(
            &Tiling::new(c),
            data,
            &mut kept.xhat,
            mean,
            &kept.inv_std,
            gamma,
            beta,
            relu,
        );
        kept.shape = shape;
        kept.frozen = frozen;
        self.cache = Some(kept);
    }
}

impl super::Layer for BatchNorm2d {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let rank = x.ndim().max(2);
        expect_input("batchnorm", &x, rank, self.channels)?;
        match mode {
            Mode::Train => self.batch_forward(x, true),
            Mode::Calibrate => self.batch_forward(x, false),
            Mode::Frozen => self.frozen_forward(x),
            Mode::Eval => {
                let c = self.channels;
                let shape = x.shape().to_vec();
                let mut data = into_vec(x);
                let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
                let beta = self.beta.value.as_slice().unwrap_or(&[]);
                let rm = self.running_mean.as_slice().unwrap_or(&[]);
                let rv = self.running_var.as_slice().unwrap_or(&[]);
                let scale: Vec<f32> = (0..c)
                    .map(|ch| gamma[ch] / (rv[ch] + self.eps).sqrt())
                    .collect();
                let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - rm[ch] * scale[ch]).collect();
                let tiling = Tiling::new(c);
                channelwise::affine(&tiling, &mut data, &scale, &shift, self.relu.is_some());
                from_vec(&shape, data)
            }
        }
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let cache = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("batchnorm".into()))?;
        if let Err(e) = expect_grad("batchnorm", &grad, &cache.shape) {
            self.spare = cache;
            return Err(e);
        }
        let c = self.channels;
        let mut dy = into_vec(grad);
        let m = dy.len() / c;
        let relu = self.relu.is_some();
        let tiling = Tiling::new(c);
        // One pass: the fused ReLU's gate (zero where γ·x̂ + β, the output before clamping, is
        // not positive) and the per-channel sums Σdy (β) and Σdy·x̂ (γ).
        let (dbeta, dgamma) = channelwise::gate_and_sums(
            &tiling,
            &mut dy,
            &cache.xhat,
            &cache.gamma,
            &cache.beta,
            relu,
        );
        for (g, v) in self.gamma.grad.iter_mut().zip(&dgamma) {
            *g = *v as f32;
        }
        for (g, v) in self.beta.grad.iter_mut().zip(&dbeta) {
            *g = *v as f32;
        }
        let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
        let k: Vec<f32> = (0..c).map(|ch| gamma[ch] * cache.inv_std[ch]).collect();
        if cache.frozen {
            // Constant statistics: dx = γ·inv_std·dy.
            channelwise::scale(&tiling, &mut dy, &k);
        } else {
            // dx = γ·inv_std · (dy − mean(dy) − x̂·mean(dy·x̂))
            let mdb: Vec<f32> = dbeta.iter().map(|v| (v / m as f64) as f32).collect();
            let mdg: Vec<f32> = dgamma.iter().map(|v| (v / m as f64) as f32).collect();
            channelwise::input_gradient(&tiling, &mut dy, &cache.xhat, &k, &mdb, &mdg);
        }
        let out = from_vec(&cache.shape, dy);
        self.spare = cache;
        out
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Param(&self.gamma));
        f(&join(prefix, "bias"), Slot::Param(&self.beta));
        f(
            &join(prefix, "running_mean"),
            Slot::Buffer(Role::RunningMean, &self.running_mean),
        );
        f(
            &join(prefix, "running_var"),
            Slot::Buffer(Role::RunningVar, &self.running_var),
        );
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        f(&join(prefix, "weight"), SlotMut::Param(&mut self.gamma));
        f(&join(prefix, "bias"), SlotMut::Param(&mut self.beta));
        f(
            &join(prefix, "running_mean"),
            SlotMut::Buffer(Role::RunningMean, &mut self.running_mean),
        );
        f(
            &join(prefix, "running_var"),
            SlotMut::Buffer(Role::RunningVar, &mut self.running_var),
        );
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        if input.last() != Some(&self.channels) {
            return Err(Error::shape(prefix, self.channels, input));
        }
        let n: usize = input.iter().product();
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::BatchNorm,
            macs: 0,
            weight: None,
            input_elems: n,
            output_elems: n,
            cached_elems: n,
        });
        if let Some(relu) = &self.relu {
            // Traced as the ReLU layer it replaces, beside this layer in the same container; it
            // caches nothing (the backward recomputes the gate from this layer's cache).
            let parent = prefix.rsplit_once('.').map_or("", |(p, _)| p);
            ops.push(OpInfo {
                name: join(parent, relu),
                kind: OpKind::Relu,
                macs: 0,
                weight: None,
                input_elems: n,
                output_elems: n,
                cached_elems: 0,
            });
        }
        Ok(input.to_vec())
    }

    fn clear_cache(&mut self) {
        self.cache = None;
        self.spare = Cache::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;

    #[test]
    fn training_steps_reuse_the_kept_buffers() {
        for relu in [false, true] {
            let mut bn = BatchNorm2d::new(3);
            if relu {
                bn = bn.with_relu("relu");
            }
            let x = |s: f32| {
                let v = (0..24).map(|i| (i as f32 * s).sin()).collect();
                from_vec(&[2, 2, 2, 3], v).unwrap()
            };
            let kept = |bn: &BatchNorm2d| {
                let c = bn.cache.as_ref().unwrap();
                (c.xhat.as_ptr(), c.inv_std.as_ptr(), c.gamma.capacity())
            };
            let y = bn.forward(x(0.7), Mode::Train).unwrap();
            let first = kept(&bn);
            assert_eq!(first.2 > 0, relu, "γ is kept only for the fused ReLU");
            bn.backward(y).unwrap();
            assert!(bn.cache.is_none());
            let y = bn.forward(x(1.3), Mode::Train).unwrap();
            assert_eq!(kept(&bn), first, "relu {relu}");
            bn.backward(y).unwrap();
            let y = bn.forward(x(0.4), Mode::Frozen).unwrap();
            assert_eq!(kept(&bn), first, "relu {relu}: frozen");
            bn.backward(y).unwrap();
            bn.clear_cache();
            assert_eq!(
                bn.spare.xhat.capacity(),
                0,
                "clear_cache releases the buffers"
            );
        }
    }
}
