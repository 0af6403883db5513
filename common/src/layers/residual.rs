//! A residual block: `relu(branch(x) + shortcut(x))`.

use super::relu::{add_assign, add_relu_keep, copy_into, gate_keep};
use super::{Layer, OpInfo, OpKind, Sequential, Slot, SlotMut, expect_grad, join};
use crate::tensor::{Mode, Tensor, from_vec, into_vec};
use crate::{Error, Result};

/// `relu(branch(x) + shortcut(x))`, the shortcut being the identity when absent. The branch's
/// layers are named directly under the block's name (`layer1.0.conv1`), the shortcut's under
/// `shortcut` (`layer2.0.shortcut.conv`).
///
/// The output kept for the backward pass lives in a buffer that circulates within the block
/// from one step to the next: after the backward gate it holds the copy of the gradient that
/// the shortcut takes, and in the forward pass the identity shortcut's copy of the input (a
/// projection shortcut's output buffer takes its place), so a step makes no copies in fresh
/// buffers except a projection shortcut's input.
pub struct Residual {
    branch: Sequential,
    shortcut: Option<Sequential>,
    cache: Option<Tensor>,
    /// The identity shortcut's gradient buffer after the backward pass, for the next forward's
    /// copy of the input.
    spare: Vec<f32>,
}

impl Residual {
    /// A block from its branch and optional projection shortcut.
    pub fn new(branch: Sequential, shortcut: Option<Sequential>) -> Self {
        Residual {
            branch,
            shortcut,
            cache: None,
            spare: Vec::new(),
        }
    }
}

impl Layer for Residual {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let s = match &mut self.shortcut {
            Some(sc) => sc.forward(x.clone(), mode)?,
            None => copy_into(&x, std::mem::take(&mut self.spare))?,
        };
        let b = self.branch.forward(x, mode)?;
        if b.shape() != s.shape() {
            return Err(Error::shape("residual add", s.shape(), b.shape()));
        }
        let shape = b.shape().to_vec();
        let mut v = into_vec(b);
        // The shortcut's output is spent: its buffer keeps the copy of the output.
        let mut buf = into_vec(s);
        add_relu_keep(&mut v, &mut buf);
        let out = from_vec(&shape, v)?;
        if mode.caches() {
            self.cache = Some(from_vec(&shape, buf)?);
        } else if self.shortcut.is_none() {
            self.spare = buf;
        }
        Ok(out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let out = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("residual".into()))?;
        expect_grad("residual", &grad, out.shape())?;
        let shape = out.shape().to_vec();
        let mut g = into_vec(grad);
        // The kept output is spent: its buffer takes the shortcut's copy of the gradient.
        let mut kept = into_vec(out);
        gate_keep(&mut g, &mut kept);
        let g = from_vec(&shape, g)?;
        let gs = from_vec(&shape, kept)?;
        let gs = match &mut self.shortcut {
            Some(sc) => sc.backward(gs)?,
            None => gs,
        };
        let gb = self.branch.backward(g)?;
        if gb.shape() != gs.shape() {
            return Err(Error::shape("residual backward", gs.shape(), gb.shape()));
        }
        let shape = gb.shape().to_vec();
        let mut v = into_vec(gb);
        let gs = into_vec(gs);
        add_assign(&mut v, &gs);
        if self.shortcut.is_none() {
            self.spare = gs;
        }
        from_vec(&shape, v)
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.branch.visit(prefix, f);
        if let Some(sc) = &self.shortcut {
            sc.visit(&join(prefix, "shortcut"), f);
        }
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        self.branch.visit_mut(prefix, f);
        if let Some(sc) = &mut self.shortcut {
            sc.visit_mut(&join(prefix, "shortcut"), f);
        }
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let out = self.branch.trace(prefix, input, ops)?;
        let s = match &self.shortcut {
            Some(sc) => sc.trace(&join(prefix, "shortcut"), input, ops)?,
            None => input.to_vec(),
        };
        if s != out {
            return Err(Error::shape(prefix, s, out));
        }
        let n = out.iter().product();
        ops.push(OpInfo {
            name: join(prefix, "add"),
            kind: OpKind::Add,
            macs: 0,
            weight: None,
            input_elems: 2 * n,
            output_elems: n,
            cached_elems: n,
        });
        Ok(out)
    }

    fn clear_cache(&mut self) {
        self.cache = None;
        self.spare = Vec::new();
        self.branch.clear_cache();
        if let Some(sc) = &mut self.shortcut {
            sc.clear_cache();
        }
    }
}
