//! Flattening of every axis but the batch axis.

use super::{OpInfo, OpKind, expect_grad};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

/// `[n, ...] → [n, prod(...)]`; free in channels-last order.
#[derive(Default)]
pub struct Flatten {
    cache: Option<Vec<usize>>,
}

impl Flatten {
    /// A flatten layer.
    pub fn new() -> Self {
        Flatten { cache: None }
    }
}

impl super::Layer for Flatten {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        if x.ndim() < 2 {
            return Err(Error::shape("flatten", "rank >= 2", x.shape()));
        }
        let shape = x.shape().to_vec();
        let n = shape[0];
        let f = shape[1..].iter().product::<usize>();
        if mode.caches() {
            self.cache = Some(shape);
        }
        from_vec(&[n, f], into_vec(x))
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let shape = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("flatten".into()))?;
        expect_grad(
            "flatten",
            &grad,
            &[shape[0], shape[1..].iter().product::<usize>()],
        )?;
        from_vec(&shape, into_vec(grad))
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let n = input.iter().product();
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::Flatten,
            macs: 0,
            weight: None,
            input_elems: n,
            output_elems: n,
            cached_elems: 0,
        });
        Ok(vec![n])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
    }
}
