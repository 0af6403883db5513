//! Numeric kernels. Every kernel here is checked against a naive reference in its tests.
//!
//! Dense: [`gemm()`], [`im2col`], [`reduce`], [`channelwise`] (BatchNorm's passes). Sparse: [`sparse`], the products of conv and linear
//! layers with masked weights, whose cost falls with density (and the policy that picks them).
//!
//! Kernels run on the current rayon pool (see [`crate::parallel`]). Work is split so that each
//! output element is computed by exactly one task in a fixed order: results are bit-identical
//! whatever the number of threads.

pub mod channelwise;
pub mod conv_geometry;
pub mod gemm;
pub mod im2col;
pub mod reduce;
pub mod sparse;

pub use conv_geometry::ConvGeometry;
pub use gemm::gemm;
