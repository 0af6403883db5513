//! Fully connected layer.

use rand::RngExt;

use super::conv::{view2, view2_mut, weight_slice};
use super::{OpInfo, OpKind, Slot, SlotMut, expect_grad, expect_input, join};
use crate::kernels::{gemm, reduce};
use crate::param::{Param, Role};
use crate::rng::Rng;
use crate::tensor::{Mode, Tensor, contiguous, from_vec};
use crate::{Error, Result};

/// `y = x·W + b` with `W` stored `[in, out]`. Weights and bias start uniform in
/// `±1/√in` (PyTorch's default for linear layers).
pub struct Linear {
    weight: Param,
    bias: Param,
    fan_in: usize,
    fan_out: usize,
    cache: Option<Tensor>,
}

impl Linear {
    /// A linear layer `fan_in → fan_out`.
    pub fn new(fan_in: usize, fan_out: usize, rng: &mut Rng) -> Result<Self> {
        if fan_in == 0 || fan_out == 0 {
            return Err(Error::InvalidConfig(format!(
                "linear {fan_in}->{fan_out}: sizes must be positive"
            )));
        }
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w: Vec<f32> = (0..fan_in * fan_out)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let b: Vec<f32> = (0..fan_out)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Ok(Linear {
            weight: Param::new(from_vec(&[fan_in, fan_out], w)?, Role::Weight),
            bias: Param::new(from_vec(&[fan_out], b)?, Role::Bias),
            fan_in,
            fan_out,
            cache: None,
        })
    }

    /// Marks the weight as prunable.
    pub fn prunable(mut self) -> Self {
        self.weight.prunable = true;
        self
    }
}

impl super::Layer for Linear {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        expect_input("linear", &x, 2, self.fan_in)?;
        let x = contiguous(x);
        let n = x.shape()[0];
        let mut out = vec![0.0f32; n * self.fan_out];
        let b = self.bias.value.as_slice().unwrap_or(&[]);
        for row in out.chunks_mut(self.fan_out) {
            row.copy_from_slice(b);
        }
        {
            let a = view2(x.as_slice().unwrap_or(&[]), n, self.fan_in)?;
            let w = view2(weight_slice(&self.weight)?, self.fan_in, self.fan_out)?;
            gemm(a, w, 1.0, view2_mut(&mut out, n, self.fan_out)?);
        }
        if mode.caches() {
            self.cache = Some(x);
        }
        from_vec(&[n, self.fan_out], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let x = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("linear".into()))?;
        let n = x.shape()[0];
        expect_grad("linear", &grad, &[n, self.fan_out])?;
        let grad = contiguous(grad);
        let dy = grad.as_slice().unwrap_or(&[]);
        let (fi, fo) = (self.fan_in, self.fan_out);
        {
            let xv = view2(x.as_slice().unwrap_or(&[]), n, fi)?;
            let dyv = view2(dy, n, fo)?;
            let dw = view2_mut(
                self.weight
                    .grad
                    .as_slice_mut()
                    .ok_or_else(|| Error::StateMismatch("linear grad layout".into()))?,
                fi,
                fo,
            )?;
            gemm(xv.t(), dyv, 0.0, dw);
        }
        let sums = reduce::channel_sums(n, fo, |r, acc| {
            for (a, v) in acc.iter_mut().zip(&dy[r * fo..(r + 1) * fo]) {
                *a += v;
            }
        });
        for (g, s) in self.bias.grad.iter_mut().zip(sums) {
            *g = s as f32;
        }
        let mut dx = vec![0.0f32; n * fi];
        {
            let dyv = view2(dy, n, fo)?;
            let w = view2(weight_slice(&self.weight)?, fi, fo)?;
            gemm(dyv, w.t(), 0.0, view2_mut(&mut dx, n, fi)?);
        }
        from_vec(&[n, fi], dx)
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        f(&join(prefix, "weight"), Slot::Param(&self.weight));
        f(&join(prefix, "bias"), Slot::Param(&self.bias));
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        f(&join(prefix, "weight"), SlotMut::Param(&mut self.weight));
        f(&join(prefix, "bias"), SlotMut::Param(&mut self.bias));
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        if input != [self.fan_in] {
            return Err(Error::shape(prefix, [self.fan_in], input));
        }
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Linear,
            macs: (self.fan_in * self.fan_out) as u64,
            weight: Some(join(prefix, "weight")),
            input_elems: self.fan_in,
            output_elems: self.fan_out,
            cached_elems: self.fan_in,
        });
        Ok(vec![self.fan_out])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
    }
}
