//! Numeric kernels. Every kernel here is checked against a naive reference in its tests.
//!
//! Kernels run on the current rayon pool (see [`crate::parallel`]). Work is split so that each
//! output element is computed by exactly one task in a fixed order: results are bit-identical
//! whatever the number of threads.

pub mod conv_geometry;
pub mod gemm;
pub mod im2col;
pub mod reduce;

pub use conv_geometry::ConvGeometry;
pub use gemm::gemm;
