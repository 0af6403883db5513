//! Rectified linear unit.

use rayon::prelude::*;

use super::{OpInfo, OpKind, expect_grad};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

const TASK_ELEMS: usize = 1 << 15;

/// `max(x, 0)`, applied in place; training keeps the output to gate the gradient.
#[derive(Default)]
pub struct Relu {
    cache: Option<Tensor>,
}

impl Relu {
    /// A ReLU.
    pub fn new() -> Self {
        Relu { cache: None }
    }
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
                if *o <= 0.0 {
                    *g = 0.0;
                }
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
            self.cache = Some(out.clone());
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
    }
}
