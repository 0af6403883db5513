//! A named chain of layers.

use super::{Layer, OpInfo, Slot, SlotMut, join};
use crate::Result;
use crate::tensor::{Mode, Tensor};

/// Layers applied in order; each child is named, and its tensors are named under that name.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<(String, Box<dyn Layer>)>,
}

impl Sequential {
    /// An empty chain.
    pub fn new() -> Self {
        Sequential { layers: Vec::new() }
    }

    /// Appends a named layer.
    pub fn push(&mut self, name: impl Into<String>, layer: impl Layer + 'static) {
        self.layers.push((name.into(), Box::new(layer)));
    }

    /// Appends a named layer, builder style.
    pub fn with(mut self, name: impl Into<String>, layer: impl Layer + 'static) -> Self {
        self.push(name, layer);
        self
    }

    /// Number of direct children.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// True when the chain has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Layer for Sequential {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let mut x = x;
        for (_, l) in &mut self.layers {
            x = l.forward(x, mode)?;
        }
        Ok(x)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let mut g = grad;
        for (_, l) in self.layers.iter_mut().rev() {
            g = l.backward(g)?;
        }
        Ok(g)
    }

    fn visit(&self, prefix: &str, f: &mut dyn FnMut(&str, Slot<'_>)) {
        for (name, l) in &self.layers {
            l.visit(&join(prefix, name), f);
        }
    }

    fn visit_mut(&mut self, prefix: &str, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        for (name, l) in &mut self.layers {
            l.visit_mut(&join(prefix, name), f);
        }
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let mut shape = input.to_vec();
        for (name, l) in &self.layers {
            shape = l.trace(&join(prefix, name), &shape, ops)?;
        }
        Ok(shape)
    }

    fn clear_cache(&mut self) {
        for (_, l) in &mut self.layers {
            l.clear_cache();
        }
    }
}
