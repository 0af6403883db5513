//! # fedtiny-common: the pure core
//!
//! Everything numeric and deterministic in fedtiny lives here, with no async runtime and no I/O
//! beyond reading data files. The coordinator, the edge client and the simulations all train and
//! evaluate through this crate, so a model trained in a simulation is bit-for-bit the model an edge
//! client would train on the same data.
//!
//! # Layout
//! - [`tensor`]: the activation type ([`Tensor`], NHWC for images) and the forward [`Mode`].
//! - [`kernels`]: GEMM, im2col/col2im and friends; each has a naive reference in its tests.
//! - [`layers`]: the [`layers::Layer`] trait and every layer with a hand-written backward.
//! - [`param`]: a trainable tensor with its gradient, role and optional [`mask::Mask`].
//! - [`mask`]: per-tensor bit masks and named mask sets; density accounting.
//! - [`state`]: named state ([`state::StateDict`]) with stable dotted names and roles.
//! - [`models`]: `cnn`, `vgg11`, `resnet18` built from a [`models::ModelSpec`].
//! - [`loss`]: softmax cross-entropy.
//! - [`optim`]: SGD (momentum, Nesterov, weight decay) and Adam (AMSGrad, weight decay), masked.
//! - [`data`]: IDX and CIFAR-10 readers, normalisation, augmentation, partitioners, download.
//! - [`task`]: the work a coordinator hands a client and the results, transport-free.
//! - [`aggregate`]: sample-weighted federated averaging of states.
//! - [`codec`]: tensor and mask encodings for the wire (dense, bitmap, indices, mask order).
//! - [`pruning`]: layer budgets, top-k, random and magnitude masks.
//! - [`fedtiny`]: FedTiny's candidate masks, schedule, streaming top-K and prune-and-grow.
//! - [`train`]: the local training and evaluation loops every component shares.
//! - [`cost`]: FLOPs per layer (dense and at the mask's density) and the client memory model.
//! - [`parallel`]: the thread pool that kernels use.
//! - [`rng`]: the seeded random-number generator and how seeds are derived.
//!
//! Images are stored channels-last (NHWC): a convolution is then one GEMM of the im2col matrix
//! (rows = output pixels) with the weight matrix `[kh·kw·cin, cout]`, and its output is already in
//! NHWC order. Conv and linear weights are stored as `[fan_in, fan_out]` matrices for the same
//! reason; a mask has the shape of its weight.

pub mod aggregate;
pub mod codec;
pub mod cost;
pub mod data;
pub mod error;
pub mod fedtiny;
pub mod heap;
pub mod kernels;
pub mod layers;
pub mod loss;
pub mod mask;
pub mod models;
pub mod optim;
pub mod parallel;
pub mod param;
pub mod pruning;
pub mod rng;
pub mod state;
pub mod synflow;
pub mod task;
pub mod tensor;
pub mod train;

pub use error::{Error, Result};
pub use tensor::{Mode, Tensor};
