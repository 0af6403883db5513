//! Sparse execution of conv and linear layers: costs that fall with density.
//!
//! A masked weight `W[K, N]` is compressed into a [`SparseWeight`] (CSR and CSC over the active
//! entries; the pattern is rebuilt only when the mask changes). Its mask-ordered values are
//! either the parameter's own storage (lean storage, see [`crate::param`]) or re-gathered from
//! the dense values every step. The three products a training step needs touch only active
//! entries:
//!
//! - forward `Y[M, N] (+)= X[M, K]·W`,
//! - input gradient `dX[M, K] = dY[M, N]·Wᵀ`,
//! - weight gradient `dW[k, n] = Σ_m X[m, k]·dY[m, n]` at active `(k, n)`, zero elsewhere (or
//!   one value per active entry, in mask order, for lean storage).
//!
//! The dense operand is never indexed element by element: it is packed so that each weight row
//! `k` is a contiguous run (see [`Layout`]), and each active entry becomes one vectorised
//! multiply-add over a run (forward, input gradient) or one dot product of two runs (weight
//! gradient). [`MatrixPlan`] packs a row-major `X` (linear layers); [`ConvPlan`] packs an NHWC
//! image batch directly, without the `kh·kw`-times larger im2col matrix. Inner loops are safe
//! code compiled for the baseline target and for AVX2 + FMA, picked at run time (see [`Isa`]).
//!
//! Work is split across the current rayon pool so that every output element is computed by one
//! task in a fixed order: results are bit-identical whatever the thread count. Whether a layer
//! runs sparse is decided by [`policy`], from measurements on the project machine.

mod conv;
mod layout;
mod matrix;
pub mod policy;
mod products;
mod simd;
mod transpose;
mod weight;

pub use conv::{ConvPlan, WeightGrad};
pub use layout::Layout;
pub use matrix::{MAX_PANEL, MatrixPlan, matmul, matmul_transposed, weight_grad};
pub use simd::Isa;
pub use weight::SparseWeight;

/// Reusable buffers of one layer's sparse products (packed input, result, packed output
/// gradient, packed input gradient, per-entry weight gradient), so that steps do not allocate.
#[derive(Clone, Debug, Default)]
pub struct Workspace {
    /// The packed input (kept from the forward pass for the weight gradient).
    pub src: Vec<f32>,
    /// The packed forward result.
    pub out: Vec<f32>,
    /// The packed output gradient.
    pub out_grad: Vec<f32>,
    /// The packed input gradient.
    pub src_grad: Vec<f32>,
    /// The weight gradient at active entries.
    pub weight_grad: Vec<f32>,
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::mask::Mask;
    use crate::rng;
    use rand::RngExt;
    use rand::seq::SliceRandom;

    /// Values uniform in [-1, 1).
    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        let mut r = rng::seeded(seed);
        (0..len).map(|_| r.random_range(-1.0..1.0)).collect()
    }

    /// A random mask keeping `⌊density·len⌋` elements; a negative density keeps exactly one.
    pub(crate) fn random_mask(len: usize, density: f64, seed: u64) -> Mask {
        let keep = if density < 0.0 {
            1.min(len)
        } else {
            (density * len as f64) as usize
        };
        let mut idx: Vec<usize> = (0..len).collect();
        idx.shuffle(&mut rng::seeded(seed ^ 0x5eed));
        idx.truncate(keep);
        Mask::from_indices(len, &idx).unwrap()
    }

    pub(crate) fn thread_pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }
}
