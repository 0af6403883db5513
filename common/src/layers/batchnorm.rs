//! Batch normalisation over the last (channel) axis.

use rayon::prelude::*;

use super::{OpInfo, OpKind, Slot, SlotMut, expect_grad, expect_input, join};
use crate::kernels::reduce::channel_sums;
use crate::param::{Param, Role};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

/// Elements per parallel task in the elementwise passes.
const TASK_ELEMS: usize = 1 << 15;

/// Batch normalisation of an `[..., C]` tensor per channel (BatchNorm2d on NHWC, BatchNorm1d on
/// `[N, C]`). Training mode normalises with the biased batch variance and updates the running
/// statistics with momentum 0.1 and the unbiased variance, as PyTorch does; evaluation normalises
/// with the running statistics.
pub struct BatchNorm2d {
    gamma: Param,
    beta: Param,
    running_mean: Tensor,
    running_var: Tensor,
    channels: usize,
    momentum: f32,
    eps: f32,
    cache: Option<Cache>,
}

struct Cache {
    xhat: Vec<f32>,
    inv_std: Vec<f32>,
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
            cache: None,
        }
    }

    /// Sets γ to zero (the last BN of a residual branch, so blocks start as identities).
    pub fn zero_gamma(mut self) -> Self {
        self.gamma.value.fill(0.0);
        self
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
        let sums = channel_sums(m, c, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                *a += v;
            }
        });
        let mean: Vec<f32> = sums.iter().map(|s| (s / m as f64) as f32).collect();
        let sq = channel_sums(m, c, |r, acc| {
            for ((a, v), mu) in acc.iter_mut().zip(&data[r * c..(r + 1) * c]).zip(&mean) {
                let d = v - mu;
                *a += d * d;
            }
        });
        let var: Vec<f64> = sq.iter().map(|s| s / m as f64).collect();
        let inv_std: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (v + f64::from(self.eps)).sqrt()) as f32)
            .collect();
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
        let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
        let beta = self.beta.value.as_slice().unwrap_or(&[]);
        let task = (TASK_ELEMS / c).max(1) * c;
        if cache {
            let mut xhat = vec![0.0f32; data.len()];
            xhat.par_chunks_mut(task)
                .zip(data.par_chunks_mut(task))
                .for_each(|(xh, y)| {
                    for (xr, yr) in xh.chunks_mut(c).zip(y.chunks_mut(c)) {
                        for ch in 0..c {
                            let n = (yr[ch] - mean[ch]) * inv_std[ch];
                            xr[ch] = n;
                            yr[ch] = n * gamma[ch] + beta[ch];
                        }
                    }
                });
            self.cache = Some(Cache {
                xhat,
                inv_std,
                shape: shape.clone(),
                frozen: false,
            });
        } else {
            let scale: Vec<f32> = (0..c).map(|ch| inv_std[ch] * gamma[ch]).collect();
            let shift: Vec<f32> = (0..c).map(|ch| beta[ch] - mean[ch] * scale[ch]).collect();
            affine(&mut data, &scale, &shift, task);
        }
        from_vec(&shape, data)
    }
}

impl BatchNorm2d {
    /// Evaluation-mode normalisation that keeps `x̂ = (x − μ_run)/σ_run` for the backward pass.
    fn frozen_forward(&mut self, x: Tensor) -> Result<Tensor> {
        let c = self.channels;
        let shape = x.shape().to_vec();
        let mut data = into_vec(x);
        let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
        let beta = self.beta.value.as_slice().unwrap_or(&[]);
        let rm = self.running_mean.as_slice().unwrap_or(&[]);
        let rv = self.running_var.as_slice().unwrap_or(&[]);
        let inv_std: Vec<f32> = (0..c).map(|ch| 1.0 / (rv[ch] + self.eps).sqrt()).collect();
        let mut xhat = vec![0.0f32; data.len()];
        let task = (TASK_ELEMS / c).max(1) * c;
        xhat.par_chunks_mut(task)
            .zip(data.par_chunks_mut(task))
            .for_each(|(xh, y)| {
                for (xr, yr) in xh.chunks_mut(c).zip(y.chunks_mut(c)) {
                    for ch in 0..c {
                        let n = (yr[ch] - rm[ch]) * inv_std[ch];
                        xr[ch] = n;
                        yr[ch] = n * gamma[ch] + beta[ch];
                    }
                }
            });
        self.cache = Some(Cache {
            xhat,
            inv_std,
            shape: shape.clone(),
            frozen: true,
        });
        from_vec(&shape, data)
    }
}

fn affine(data: &mut [f32], scale: &[f32], shift: &[f32], task: usize) {
    let c = scale.len();
    data.par_chunks_mut(task).for_each(|y| {
        for yr in y.chunks_mut(c) {
            for ((v, s), b) in yr.iter_mut().zip(scale).zip(shift) {
                *v = *v * s + b;
            }
        }
    });
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
                affine(&mut data, &scale, &shift, (TASK_ELEMS / c).max(1) * c);
                from_vec(&shape, data)
            }
        }
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let Cache {
            xhat,
            inv_std,
            shape,
            frozen,
        } = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("batchnorm".into()))?;
        expect_grad("batchnorm", &grad, &shape)?;
        let c = self.channels;
        let mut dy = into_vec(grad);
        let m = dy.len() / c;
        let dbeta = channel_sums(m, c, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&dy[r * c..(r + 1) * c]) {
                *a += v;
            }
        });
        let dgamma = channel_sums(m, c, |r, acc| {
            let row = &dy[r * c..(r + 1) * c];
            let xr = &xhat[r * c..(r + 1) * c];
            for ((a, v), x) in acc.iter_mut().zip(row).zip(xr) {
                *a += v * x;
            }
        });
        for (g, v) in self.gamma.grad.iter_mut().zip(&dgamma) {
            *g = *v as f32;
        }
        for (g, v) in self.beta.grad.iter_mut().zip(&dbeta) {
            *g = *v as f32;
        }
        let gamma = self.gamma.value.as_slice().unwrap_or(&[]);
        let k: Vec<f32> = (0..c).map(|ch| gamma[ch] * inv_std[ch]).collect();
        let task = (TASK_ELEMS / c).max(1) * c;
        if frozen {
            // Constant statistics: dx = γ·inv_std·dy.
            dy.par_chunks_mut(task).for_each(|d| {
                for dr in d.chunks_mut(c) {
                    for (v, kc) in dr.iter_mut().zip(&k) {
                        *v *= kc;
                    }
                }
            });
            return from_vec(&shape, dy);
        }
        // dx = γ·inv_std · (dy − mean(dy) − x̂·mean(dy·x̂))
        let mdb: Vec<f32> = dbeta.iter().map(|v| (v / m as f64) as f32).collect();
        let mdg: Vec<f32> = dgamma.iter().map(|v| (v / m as f64) as f32).collect();
        dy.par_chunks_mut(task)
            .zip(xhat.par_chunks(task))
            .for_each(|(d, xh)| {
                for (dr, xr) in d.chunks_mut(c).zip(xh.chunks(c)) {
                    for ch in 0..c {
                        dr[ch] = k[ch] * (dr[ch] - mdb[ch] - xr[ch] * mdg[ch]);
                    }
                }
            });
        from_vec(&shape, dy)
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
        Ok(input.to_vec())
    }

    fn clear_cache(&mut self) {
        self.cache = None;
    }
}
