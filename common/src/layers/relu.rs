//! Rectified linear unit.

use rayon::prelude::*;

use super::{OpInfo, OpKind, expect_grad};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

const TASK_ELEMS: usize = 1 << 15;

/// `max(x, 0)`, applied in place; training keeps the output to gate the gradient (in a buffer
/// reused from one step to the next).
#[derive(Default)]
pub struct Relu {
    cache: Option<Tensor>,
    /// The cache's buffer after the backward pass, for the next training forward.
    spare: Vec<f32>,
}

impl Relu {
    /// A ReLU.
    pub fn new() -> Self {
        Relu::default()
    }
}

/// A copy of `t` (standard layout) in `buf`'s allocation, copied in parallel. `buf`'s values
/// are all overwritten: only a part beyond its current length is zeroed first.
pub(super) fn copy_into(t: &Tensor, mut buf: Vec<f32>) -> Result<Tensor> {
    match t.as_slice() {
        Some(s) => {
            buf.resize(s.len(), 0.0);
            buf.par_chunks_mut(TASK_ELEMS)
                .zip(s.par_chunks(TASK_ELEMS))
                .for_each(|(d, s)| d.copy_from_slice(s));
        }
        None => {
            buf.clear();
            buf.extend(t.iter().copied());
        }
    }
    from_vec(t.shape(), buf)
}

/// In-place ReLU of a slice, in parallel.
pub(super) fn relu_in_place(v: &mut [f32]) {
    v.par_chunks_mut(TASK_ELEMS).for_each(|c| {
        for x in c {
            *x = x.max(0.0);
        }
    });
}

/// Zeroes `grad` wherever `out` is not positive.
pub(super) fn relu_gate(grad: &mut [f32], out: &[f32]) {
    grad.par_chunks_mut(TASK_ELEMS)
        .zip(out.par_chunks(TASK_ELEMS))
        .for_each(|(g, o)| {
            for (g, o) in g.iter_mut().zip(o) {
                // A select, not a conditional store, so that the loop vectorises.
                *g = if *o <= 0.0 { 0.0 } else { *g };
            }
        });
}

/// `v = s = max(v + s, 0)`: a residual block's sum and ReLU, with the output copied into `s`
/// (kept for the backward pass) in the same pass.
pub(super) fn add_relu_keep(v: &mut [f32], s: &mut [f32]) {
    v.par_chunks_mut(TASK_ELEMS)
        .zip(s.par_chunks_mut(TASK_ELEMS))
        .for_each(|(v, s)| {
            for (a, b) in v.iter_mut().zip(s.iter_mut()) {
                let t = (*a + *b).max(0.0);
                *a = t;
                *b = t;
            }
        });
}

/// `grad = out = (grad where out > 0, else 0)`: [`relu_gate`] that also leaves a copy of the
/// gated gradient in `out`'s buffer.
pub(super) fn gate_keep(grad: &mut [f32], out: &mut [f32]) {
    grad.par_chunks_mut(TASK_ELEMS)
        .zip(out.par_chunks_mut(TASK_ELEMS))
        .for_each(|(g, o)| {
            for (g, o) in g.iter_mut().zip(o.iter_mut()) {
                let t = if *o <= 0.0 { 0.0 } else { *g };
                *g = t;
                *o = t;
            }
        });
}

/// `v += s`, in parallel.
pub(super) fn add_assign(v: &mut [f32], s: &[f32]) {
    v.par_chunks_mut(TASK_ELEMS)
        .zip(s.par_chunks(TASK_ELEMS))
        .for_each(|(v, s)| {
            for (a, b) in v.iter_mut().zip(s) {
                *a += b;
            }
        });
}

impl super::Layer for Relu {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let shape = x.shape().to_vec();
        let mut v = into_vec(x);
        relu_in_place(&mut v);
        let out = from_vec(&shape, v)?;
        if mode.caches() {
            self.cache = Some(copy_into(&out, std::mem::take(&mut self.spare))?);
        }
        Ok(out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let out = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("relu".into()))?;
        expect_grad("relu", &grad, out.shape())?;
        let shape = out.shape().to_vec();
        let mut g = into_vec(grad);
        relu_gate(&mut g, out.as_slice().unwrap_or(&[]));
        self.spare = into_vec(out);
        from_vec(&shape, g)
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let n = input.iter().product();
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Relu,
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
        self.spare = Vec::new();
    }
}
