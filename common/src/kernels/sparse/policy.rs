//! When a layer runs its sparse kernels: a density crossover per layer shape, from measurements
//! on the project machine (2 cores, AVX2/FMA; the dense side is matrixmultiply's GEMM).
//!
//! Measured with `cargo test --release -p fedtiny-common --test crossover -- --ignored
//! --nocapture`: one conv or linear layer's training step (forward, input gradient and weight
//! gradient, batch 64, 2 threads), the layer forced sparse against forced dense, the fastest of
//! 7 rounds of 3 steps each (after a warm-up round), the two measured alternately. Sparse speed-up over dense at density
//! 1 / 5 / 10 / 20 / 30 / 50 %, and where it crosses 1 (ranges over the first three runs of the
//! sweep; the rows added later, vgg conv3, resnet layer3 shortcut and the width-1 shapes,
//! over the runs they were in, one to two):
//!
//! | layer (input, channels) | output pixels | 1 % | 5 % | 10 % | 20 % | 30 % | 50 % | crossover |
//! |---|---|---|---|---|---|---|---|---|
//! | resnet layer1 (28², 16→16) | 784 | 11× | 8.2× | 6.6–6.8× | 5.0× | 4.1–4.2× | 2.5–3.0× | > 0.5 |
//! | resnet w1 layer1 (28², 64→64) | 784 | 4.1× | 3.3× | 2.7× | 2.1× | 1.7× | 1.2× | > 0.5 |
//! | cnn conv2 (14², 32→64) | 196 | 9.1–10.5× | 5.2–5.4× | 3.5–3.6× | 2.2× | 1.6–1.7× | 1.03–1.07× | > 0.5 |
//! | vgg conv2 (14², 16→32) | 196 | 6.2–6.3× | 4.4–4.6× | 3.2–3.4× | 2.3× | 1.9–2.0× | 1.2–1.3× | > 0.5 |
//! | resnet layer2 conv1 (28², s2, 16→32) | 196 | 4.0–4.1× | 3.1–3.3× | 2.5–2.7× | 1.8–1.9× | 1.6× | 1.1× | > 0.5 |
//! | vgg conv3 (7², 32→64) | 49 | 4.5–4.7× | 2.9–3.0× | 2.1–2.2× | 1.3–1.4× | 1.1× | 0.7× | 0.33–0.35 |
//! | vgg conv4 (7², 64→64) | 49 | 6.3–6.4× | 3.5–3.6× | 2.4–2.5× | 1.3–1.5× | 0.9–1.0× | 0.6× | 0.29–0.32 |
//! | resnet layer3 conv1 (14², s2, 32→64) | 49 | 1.9× | 1.6× | 1.3× | 1.0× | 0.8× | 0.5× | 0.18–0.20 |
//! | resnet w1 layer3 conv2 (7², 256→256) | 49 | 11× | 4.2× | 2.5× | 1.2× | 0.8× | 0.45× | 0.25 |
//! | resnet layer4 conv1 (7², s2, 64→128) | 16 | 4.4–4.6× | 2.5× | 1.5–1.6× | 0.9–1.0× | 0.6–0.7× | 0.4× | 0.19–0.20 |
//! | resnet layer4 conv2 (4², 128→128) | 16 | 7.1–7.3× | 2.9–3.2× | 1.7–1.9× | 0.9–1.0× | 0.7× | 0.4× | 0.19–0.21 |
//! | resnet w1 layer4 conv2 (4², 512→512) | 16 | 11× | 3.2× | 1.8× | 0.9× | 0.4× | 0.3× | 0.19 |
//! | vgg conv6 (3², 128→128) | 9 | 5.2–5.5× | 2.3–2.4× | 1.4–1.5× | 0.8× | 0.6× | 0.35× | 0.17 |
//! | resnet layer3 shortcut (14², 1×1 s2, 32→64) | 49 | 1.4× | 1.2–1.3× | 1.2× | 1.1× | 0.9–1.0× | 0.75× | 0.23–0.27 |
//! | resnet layer4 shortcut (7², 1×1 s2, 64→128) | 16 | 1.2× | 1.0–1.1× | 1.0× | 0.8–0.9× | 0.7× | 0.55× | 0.08–0.12 |
//! | resnet w1 layer4 shortcut (7², 1×1 s2, 256→512) | 16 | 3.2× | 2.2× | 1.6× | 1.2× | 0.9× | 0.6× | 0.26 |
//! | vgg conv8 (1², runs as a 128→128 linear layer) | 1 | 1.2–1.3× | 0.7–0.8× | 0.5× | 0.35× | 0.25× | 0.17× | 0.03–0.04 |
//! | vgg w1 conv8 (1², as a 512→512 linear layer) | 1 | 1.2× | 0.5× | 0.35× | 0.24× | 0.2× | 0.13× | 0.02 |
//! | cnn fc1 (3136→128) | – | 2.7–2.9× | 1.7× | 1.1× | 0.75× | 0.55× | 0.4× | 0.13–0.14 |
//! | cnn fc2 (128→10) | – | 1.5–1.6× | 1.0–1.1× | 0.9–1.0× | 0.8× | 0.7× | 0.5–0.6× | 0.07–0.09 |
//!
//! What decides the crossover of a convolution is the size of its output map: the sparse
//! kernels vectorise along runs of output pixels, and short runs carry more per-entry overhead
//! and more margin ([`super::ConvPlan::waste`]), while the dense GEMM's efficiency barely moves.
//! The policy below reads the table: `0.6` for maps of at least 100 output pixels (every such
//! row still gains at 50 %), `0.25` from 36, `0.18` below; `0.12` for pointwise (1×1)
//! convolutions; for linear layers `0.15` from 100,000 weights and `0.05` below. It is within
//! the measured range or conservative (the sparse kernels would still win a little past it)
//! for every row except `resnet` layer3 conv1, whose crossover is 0.18–0.20 instead of 0.25
//! (from 0.2 to 0.25 its sparse step is 0.95–1.0× the dense one). Near a crossover the two
//! paths cost about the same, so the exact value matters little.
//!
//! The measured step leaves out the optimizer. In a model with lean storage
//! ([`crate::param`]) a layer on the sparse kernels also spares the optimizer its pruned
//! weights, which the table does not count. That decides the convolutions over single pixels:
//! alone they cross at 0.02–0.04, but their dense path keeps all `kh·kw` taps' weights (8/9
//! of them dead) for the optimizer, and in whole models the sparse path is faster at 10 %
//! (`fedtiny-sim bench --models vgg11 --width 0.25`, alternated binaries: 6,591 / 6,718
//! samples/s at d = 0.1 with the crossover at 0.15 against 5,822 / 6,228 with it at 0.03), so
//! their crossover is `0.15`.
//!
//! A convolution whose patch `kh·kw·cin` is at most [`SMALL_PATCH`] (the first convolution of
//! every model here: 3×3 over one input channel, patch 9; also `resnet`'s width-¼ layer2
//! shortcut, 1×1 over 16 channels, 1.3–1.8× faster sparse at every density in the table) runs
//! the direct kernels at any density, unmasked included: a GEMM with an inner dimension of 9
//! spends its time packing operands. Measured (`cargo bench -p fedtiny-common --bench kernels
//! -- "conv2d 1->16"`, 28×28, batch 64, forward + weight gradient, 2 threads, median of 100
//! samples, one run): GEMM 1.97 ms, direct 1.04 ms. In whole models the direct first
//! convolution raised `vgg11` width ¼ dense training from 1,830–2,241 to 2,271–2,641
//! samples/s (alternated runs).

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerShape {
    /// A linear layer.
    Linear {
        /// Weights, `fan_in·fan_out`.
        weights: usize,
    },
    /// A convolution over single pixels, which runs as a linear layer on the one tap that
    /// reads data.
    SinglePixel,
    /// A convolution.
    Conv {
        /// Output pixels per image, `oh·ow`.
        pixels: usize,
        /// Taps of the window, `kh·kw`.
        taps: usize,
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
        LayerShape::Linear { weights } if weights >= 100_000 => 0.15,
        LayerShape::Linear { .. } => 0.05,
        LayerShape::SinglePixel => 0.15,
        LayerShape::Conv { patch, .. } if patch <= SMALL_PATCH => f64::INFINITY,
        LayerShape::Conv { taps: 1, .. } => 0.12,
        LayerShape::Conv { pixels, .. } if pixels >= 100 => 0.6,
        LayerShape::Conv { pixels, .. } if pixels >= 36 => 0.25,
        LayerShape::Conv { .. } => 0.18,
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
    fn crossovers_follow_the_measured_table() {
        let conv = |pixels, taps, patch| LayerShape::Conv {
            pixels,
            taps,
            patch,
        };
        // cnn conv2, vgg conv4, resnet layer4 conv2, vgg conv6, resnet layer4 shortcut.
        assert_eq!(crossover(&conv(196, 9, 288)), 0.6);
        assert_eq!(crossover(&conv(49, 9, 576)), 0.25);
        assert_eq!(crossover(&conv(16, 9, 1152)), 0.18);
        assert_eq!(crossover(&conv(9, 9, 1152)), 0.18);
        assert_eq!(crossover(&conv(16, 1, 64)), 0.12);
        // cnn fc1, cnn fc2.
        assert_eq!(
            crossover(&LayerShape::Linear {
                weights: 3136 * 128
            }),
            0.15
        );
        assert_eq!(crossover(&LayerShape::Linear { weights: 1280 }), 0.05);
        // vgg conv8 on a 1×1 map.
        assert_eq!(crossover(&LayerShape::SinglePixel), 0.15);
        let s = conv(196, 9, 288);
        assert!(use_sparse(SparseMode::Auto, &s, 0.5) && !use_sparse(SparseMode::Auto, &s, 0.7));
        assert!(use_sparse(SparseMode::Always, &s, 1.0));
        assert!(!use_sparse(SparseMode::Never, &s, 0.01));
        // A first convolution: 3×3 over one channel.
        let first = conv(784, 9, 9);
        assert!(use_sparse(SparseMode::Auto, &first, 1.0));
        assert!(!use_sparse(SparseMode::Never, &first, 1.0));
    }
}
