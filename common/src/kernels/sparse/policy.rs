//! When a layer runs its sparse kernels: a density crossover per layer shape, from measurements
//! on the project machine (2 cores, AVX2/FMA; the dense side is matrixmultiply's AVX-512 GEMM).
//!
//! Measured: one conv or linear layer's training step (forward + backward with both gradients,
//! batch 64, 2 threads, `Conv2d`/`Linear` forced sparse against forced dense, minimum of 30
//! runs, three runs of the sweep on a machine shared with other jobs, ±30 % run to run).
//! Sparse speed-up over dense at density 1 / 5 / 10 / 20 / 30 / 50 %, and the crossover:
//!
//! | layer (input, channels) | waste | 1 % | 5 % | 10 % | 20 % | 30 % | 50 % | crossover |
//! |---|---|---|---|---|---|---|---|---|
//! | cnn conv2 (14², 32→64) | 1.31 | 8–18× | 5–14× | 3.6–9× | 1.8–4× | 1.8–2.1× | 0.9–1.6× | ≈ 0.5 |
//! | vgg conv2 (14², 16→32) | 1.31 | 7× | 5× | 3.4–4.3× | 2.2–2.7× | 1.9–2.2× | 1.2–1.6× | > 0.5 |
//! | resnet layer1 (28², 16→16) | 1.16 | 12× | 11× | 7–8× | 5–6× | 4× | 3.2–3.4× | ≫ 0.5 |
//! | resnet layer2 conv1 (28², s2, 16→32) | 1.18 | 5–9× | 3.3–4.6× | 2.7–3× | 2–2.8× | 1.8–2.7× | 1.2–1.5× | > 0.5 |
//! | resnet layer2 shortcut (28², 1×1 s2) | 1.02 | 1.2–2× | 1.3–1.5× | 1.2–1.3× | 1.2× | 1.2–1.4× | 1–1.4× | ≈ 0.5 |
//! | vgg conv3/conv4 (7², →64) | 1.71 | 8–12× | 3.5–4.8× | 2.2–2.6× | 1.3–1.4× | 0.9–1.7× | 0.5× | ≈ 0.3 |
//! | resnet layer3 conv1 (14², s2, 32→64) | 1.31 | 1.6–2.4× | 1.9–2× | 1.4–1.7× | 0.7–1× | 0.5–0.8× | 0.3–0.5× | ≈ 0.2 |
//! | resnet layer4 conv1 (7², s2, 64→128) | 1.64 | 6–8× | 2.7–3.9× | 1.6–2.4× | 0.8–1.3× | 0.5–0.9× | 0.2–0.4× | ≈ 0.2 |
//! | resnet layer4 conv2 (4², 128→128) | 2.25 | 8–12× | 4.2–4.6× | 1.9–2× | 0.8× | 0.5× | 0.4× | ≈ 0.17 |
//! | vgg conv5/conv6 (3², →128) | 2.9 | 4–8× | 1.9–3.3× | 1.1–1.6× | 0.5–0.7× | 0.3–0.5× | 0.2× | ≈ 0.13 |
//! | resnet layer4 shortcut (7², 1×1 s2, →128) | 1.0 | 1.1–1.6× | 1–1.5× | 0.9–1.3× | 0.7–1× | 0.7–0.9× | 0.6× | ≈ 0.1–0.2 |
//! | vgg conv7 (1², 128→128) | 9.4 | 1.3–1.7× | 0.5× | 0.2–0.3× | 0.1× | – | – | ≈ 0.02 |
//! | cnn fc1 (3136→128) | – | 4.9–6× | 2–2.7× | 1.3–1.6× | 0.8× | 0.5× | 0.3–0.5× | ≈ 0.15 |
//! | cnn fc2, vgg fc (128→10) | – | 1.3–1.6× | 1.1–1.4× | 1–1.2× | 0.8–1× | 0.7–0.9× | 0.7× | ≈ 0.1–0.2 |
//!
//! (`waste` is [`super::ConvPlan::waste`], the grid positions the sparse convolution computes
//! per output pixel.) The sparse cost grows with the waste, and with the stride (the packed
//! input is `s²` times the output per channel); the dense GEMM is least efficient for few
//! output channels, so layers with `cout ≤ 64` gain longest. The policy below,
//! `crossover = C / (waste · stride)` with `C = 0.6` for `cout ≤ 64` and `0.35` above, and
//! `0.15` for linear layers, is within the measured range for every row except where it is
//! conservative (resnet layer2, whose sparse kernels still win at 30–50 %). Near a crossover the
//! two paths cost about the same, so the exact value matters little.
//!
//! A convolution whose patch `kh·kw·cin` is at most [`SMALL_PATCH`] (the first convolution of
//! every model here: 3×3 over one input channel, patch 9) runs the direct kernels at any
//! density, unmasked included: a GEMM with an inner dimension of 9 spends its time packing
//! operands. Measured (`cargo bench -p fedtiny-common --bench kernels -- "conv2d 1->16"`,
//! 28×28, batch 64, forward + weight gradient, 2 threads, median of 100 samples, one run):
//! GEMM 1.97 ms, direct 1.04 ms. In whole models the direct first convolution raised `vgg11`
//! width ¼ dense training from 1,830–2,241 to 2,271–2,641 samples/s (alternated runs).

/// Which kernels a layer uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SparseMode {
    /// Sparse when the weight is masked and its density is below [`crossover`].
    #[default]
    Auto,
    /// Sparse whenever the weight is masked.
    Always,
    /// Always dense.
    Never,
}

/// The shape of a layer's products, as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LayerShape {
    /// A linear layer.
    Linear,
    /// A convolution.
    Conv {
        /// Output channels.
        fan_out: usize,
        /// Stride.
        stride: usize,
        /// Grid positions the sparse kernels compute per output pixel
        /// ([`super::ConvPlan::waste`]).
        waste: f64,
        /// Weights per output channel, `kh·kw·cin`.
        patch: usize,
    },
}

/// The largest convolution patch (`kh·kw·cin`) for which the direct kernels beat the GEMM at
/// any density, unmasked weights included (see the module documentation).
pub const SMALL_PATCH: usize = 16;

/// The density below which the sparse kernels are faster than the dense ones for `shape` (see
/// the module documentation for the measurements); infinite where they always are.
pub fn crossover(shape: &LayerShape) -> f64 {
    match *shape {
        LayerShape::Linear => 0.15,
        LayerShape::Conv { patch, .. } if patch <= SMALL_PATCH => f64::INFINITY,
        LayerShape::Conv {
            fan_out,
            stride,
            waste,
            ..
        } => {
            let c = if fan_out <= 64 { 0.6 } else { 0.35 };
            c / (waste.max(1.0) * stride.max(1) as f64)
        }
    }
}

/// Whether a layer of `shape` whose weight has `density` should run sparse under `mode`.
pub fn use_sparse(mode: SparseMode, shape: &LayerShape, density: f64) -> bool {
    match mode {
        SparseMode::Always => true,
        SparseMode::Never => false,
        SparseMode::Auto => density < crossover(shape),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crossovers_fall_with_waste_stride_and_width() {
        let conv = |fan_out, stride, waste| LayerShape::Conv {
            fan_out,
            stride,
            waste,
            patch: 288,
        };
        assert!((crossover(&conv(64, 1, 1.31)) - 0.458).abs() < 1e-3);
        assert!(crossover(&conv(64, 2, 1.31)) < crossover(&conv(64, 1, 1.31)));
        assert!(crossover(&conv(128, 1, 1.31)) < crossover(&conv(64, 1, 1.31)));
        assert!(crossover(&conv(128, 1, 9.4)) < 0.05);
        assert_eq!(crossover(&LayerShape::Linear), 0.15);
        let s = conv(64, 1, 1.31);
        assert!(use_sparse(SparseMode::Auto, &s, 0.2) && !use_sparse(SparseMode::Auto, &s, 0.5));
        assert!(use_sparse(SparseMode::Always, &s, 1.0));
        assert!(!use_sparse(SparseMode::Never, &s, 0.01));
        let first = LayerShape::Conv {
            fan_out: 16,
            stride: 1,
            waste: 1.15,
            patch: 9,
        };
        assert!(use_sparse(SparseMode::Auto, &first, 1.0));
        assert!(!use_sparse(SparseMode::Never, &first, 1.0));
    }
}
