//! Layers with hand-written backward passes.
//!
//! There is no autograd graph: each [`Layer`] caches what its backward pass needs during a
//! training-mode forward and turns the gradient of its output into the gradient of its input,
//! writing its parameters' gradients on the way. Every layer's backward is checked against f64
//! central finite differences in `tests/gradcheck.rs`.
//!
//! Tensors are named by a visitor ([`Layer::visit`], [`Layer::visit_mut`]) that composes stable
//! dotted paths (`layer2.0.conv1.weight`) as it descends through containers.
//!
//! Buffers are reused from one training step to the next without holding more memory at the
//! step's peak (the end of the forward pass): elementwise layers work in place in the buffer
//! they are handed; what a layer keeps for its backward pass lives in a buffer it gets back
//! after that pass; max-pool writes its (quarter-size) output into the buffer of the previous
//! step's output gradient. A buffer is only resized when the batch shape changes. Convolutions
//! allocate their output and input gradient each step: holding their output gradients through
//! the backward pass for the next forward raised the measured peak (see [`Conv2d`]), and the
//! input's own buffer is released in the forward pass because keeping it until the backward
//! pass would raise the peak too.
//!
//! A BatchNorm directly followed by a ReLU runs as one layer ([`BatchNorm2d::with_relu`]),
//! with the same named tensors and results as the two layers.

mod batchnorm;
mod compressed;
mod conv;
mod dropout;
mod flatten;
mod linear;
mod pool;
mod relu;
mod residual;
mod sequential;

pub use batchnorm::BatchNorm2d;
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use flatten::Flatten;
pub use linear::Linear;
pub use pool::{GlobalAvgPool, MaxPool2d};
pub use relu::Relu;
pub use residual::Residual;
pub use sequential::Sequential;

use crate::Result;
use crate::param::{Param, Role};
use crate::tensor::{Mode, Tensor};

/// A read-only view of one named tensor of a layer.
pub enum Slot<'a> {
    /// A trainable parameter.
    Param(&'a Param),
    /// A buffer that is state but not trained by gradient (BatchNorm running statistics).
    Buffer(Role, &'a Tensor),
}

/// A mutable view of one named tensor of a layer.
pub enum SlotMut<'a> {
    /// A trainable parameter.
    Param(&'a mut Param),
    /// A buffer that is state but not trained by gradient (BatchNorm running statistics).
    Buffer(Role, &'a mut Tensor),
}

/// What kind of computation an operation is, for cost accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// 2-D convolution.
    Conv,
    /// Fully connected layer.
    Linear,
    /// Batch normalisation.
    BatchNorm,
    /// Rectified linear unit.
    Relu,
    /// Max pooling.
    MaxPool,
    /// Global average pooling.
    AvgPool,
    /// Residual addition.
    Add,
    /// Reshape to features.
    Flatten,
    /// Dropout.
    Dropout,
}

/// One operation of a model as traced for one sample: its shape and cost.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpInfo {
    /// Dotted path of the layer.
    pub name: String,
    /// Kind of operation.
    pub kind: OpKind,
    /// Dense multiply-adds of the forward pass for one sample (0 for elementwise operations).
    pub macs: u64,
    /// The weight whose density scales `macs` (conv and linear).
    pub weight: Option<String>,
    /// Elements of the input, per sample.
    pub input_elems: usize,
    /// Elements of the output, per sample.
    pub output_elems: usize,
    /// Elements the training forward keeps for backward, per sample.
    pub cached_elems: usize,
}

/// A differentiable building block of a model.
pub trait Layer: Send + Sync {
    /// Computes the output. In [`Mode::Train`] the layer keeps what its backward needs.
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor>;

    /// Given the gradient of the loss with respect to the last training forward's output, writes
    /// parameter gradients and returns the gradient with respect to its input. A layer built
    /// without input gradient (the stem) returns an empty tensor.
    fn backward(&mut self, grad: Tensor) -> Result<Tensor>;

    /// Visits every named tensor, read-only.
    fn visit(&self, _prefix: &str, _f: &mut dyn FnMut(&str, Slot<'_>)) {}

    /// Visits every named tensor, mutably.
    fn visit_mut(&mut self, _prefix: &str, _f: &mut dyn FnMut(&str, SlotMut<'_>)) {}

    /// Traces the layer for one sample of shape `input` (without the batch axis), appending its
    /// operations to `ops`; returns the output shape.
    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>>;

    /// Drops cached activations (after a step, to release memory between rounds).
    fn clear_cache(&mut self) {}
}

/// Joins a prefix and a name with a dot (no dot for an empty prefix).
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Checks the rank and the last axis of an input.
fn expect_input(layer: &str, x: &Tensor, rank: usize, last: usize) -> Result<()> {
    if x.ndim() != rank || x.shape().last() != Some(&last) {
        return Err(crate::Error::shape(
            layer,
            format!("rank {rank} with last axis {last}"),
            x.shape(),
        ));
    }
    Ok(())
}

/// Checks that a gradient has the shape of the output it belongs to.
fn expect_grad(layer: &str, grad: &Tensor, shape: &[usize]) -> Result<()> {
    if grad.shape() != shape {
        return Err(crate::Error::shape(
            format!("{layer} backward"),
            shape,
            grad.shape(),
        ));
    }
    Ok(())
}
