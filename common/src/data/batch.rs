//! Filling training batches: bytes → normalised, optionally augmented `f32` NHWC.
//!
//! Decisions:
//! - [`Dataset::fill_batch`] is the per-step hot path. It turns each channel's `(mean, std)` into
//!   one `scale = 1 / (255·std)` and one `shift = −mean / std` before the loop, so each value costs
//!   one multiply-add and no division; it allocates nothing (the `labels` vector is cleared and
//!   refilled, so it keeps its capacity across steps).
//! - The multi-channel loop runs over fixed 48-value blocks against a repeated pattern of the
//!   per-channel constants, so it vectorises for 3 channels as well as for 1.
//! - Augmentation ([`Augment`]) normalises the whole image in one pass, then moves rows and pixels
//!   in place (`copy_within`, a memmove) and fills the uncovered places with the normalised value
//!   of pixel 0, rather than computing a source coordinate per value.
//! - Random draws per sample, in order: row offset, column offset (only when `crop_padding > 0`),
//!   then the flip coin (only when `horizontal_flip`). The same generator state therefore
//!   reproduces the same batch; a no-op augmentation draws nothing.
//! - Everything is validated before anything is written: batch buffer length, indices, channel
//!   count of the normalisation, finite positive standard deviations, and a crop padding no larger
//!   than the image's longer side (beyond that every crop would be blank).

use rand::RngExt;

use super::transform::MAX_CHANNELS;
use super::{Augment, DataError, Dataset, Normalization};

/// Values per block in the vectorised loop: a multiple of every channel count that divides it
/// (1, 2, 3, 4, 6, 8, 12, 16), so block position `j` always holds channel `j % channels`.
const BLOCK: usize = 48;

/// Per-channel `scale` and `shift`, on the stack, also laid out as one block-long pattern.
struct Affine {
    scale: [f32; MAX_CHANNELS],
    shift: [f32; MAX_CHANNELS],
    block_scale: [f32; BLOCK],
    block_shift: [f32; BLOCK],
    channels: usize,
}

impl Affine {
    fn new(norm: &Normalization) -> Self {
        let mut a = Affine {
            scale: [0.0; MAX_CHANNELS],
            shift: [0.0; MAX_CHANNELS],
            block_scale: [0.0; BLOCK],
            block_shift: [0.0; BLOCK],
            channels: norm.mean.len(),
        };
        for (c, (m, s)) in norm.mean.iter().zip(&norm.std).enumerate() {
            a.scale[c] = 1.0 / (255.0 * s);
            a.shift[c] = -m / s;
        }
        for j in 0..BLOCK {
            a.block_scale[j] = a.scale[j % a.channels];
            a.block_shift[j] = a.shift[j % a.channels];
        }
        a
    }

    /// Normalises whole pixels `src` (a multiple of `channels` bytes) into `dst`.
    #[inline]
    fn run(&self, src: &[u8], dst: &mut [f32]) {
        if BLOCK.is_multiple_of(self.channels) {
            // Element-wise over constant-length blocks: vectorises for any such channel count.
            let (k, b) = (&self.block_scale, &self.block_shift);
            let (dst_blocks, dst_rest) = dst.as_chunks_mut::<BLOCK>();
            let (src_blocks, src_rest) = src.as_chunks::<BLOCK>();
            for (d, s) in dst_blocks.iter_mut().zip(src_blocks) {
                for j in 0..BLOCK {
                    d[j] = f32::from(s[j]) * k[j] + b[j];
                }
            }
            for (j, (d, &s)) in dst_rest.iter_mut().zip(src_rest).enumerate() {
                *d = f32::from(s) * k[j] + b[j];
            }
        } else {
            self.run_any(src, dst);
        }
    }

    /// The loop for channel counts that do not divide [`BLOCK`].
    fn run_any(&self, src: &[u8], dst: &mut [f32]) {
        let c = self.channels;
        let (k, b) = (&self.scale[..c], &self.shift[..c]);
        for (dp, sp) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
            for i in 0..c {
                dp[i] = f32::from(sp[i]) * k[i] + b[i];
            }
        }
    }

    /// Fills whole pixels of `dst` with the normalised value of pixel 0.
    #[inline]
    fn fill_zero_pixel(&self, dst: &mut [f32]) {
        let c = self.channels;
        if c == 1 {
            dst.fill(self.shift[0]);
        } else {
            for dp in dst.chunks_exact_mut(c) {
                dp.copy_from_slice(&self.shift[..c]);
            }
        }
    }

    /// Reverses the order of the pixels of `dst`, keeping each pixel's channels in order.
    #[inline]
    fn reverse_pixels(&self, dst: &mut [f32]) {
        match self.channels {
            1 => dst.reverse(),
            2 => dst.as_chunks_mut::<2>().0.reverse(),
            3 => dst.as_chunks_mut::<3>().0.reverse(),
            4 => dst.as_chunks_mut::<4>().0.reverse(),
            c => {
                // Reverse all values, then each pixel's channels back into order.
                dst.reverse();
                dst.chunks_exact_mut(c).for_each(<[f32]>::reverse);
            }
        }
    }
}

impl Dataset {
    /// Fills `images` (length `indices.len()·H·W·C`, NHWC `f32`, normalised by `norm`) with the
    /// samples at `indices`, and replaces the contents of `labels` with their labels. With
    /// `augment`, each sample is randomly cropped and/or flipped using the given generator.
    ///
    /// Errors ([`DataError::InvalidArgument`], nothing written): wrong `images` length, an index
    /// out of range, or a normalisation that is invalid or for another channel count.
    pub fn fill_batch(
        &self,
        indices: &[usize],
        norm: &Normalization,
        augment: Option<(&Augment, &mut crate::rng::Rng)>,
        images: &mut [f32],
        labels: &mut Vec<usize>,
    ) -> Result<(), DataError> {
        let n = self.sample_len();
        if images.len() != indices.len() * n {
            return Err(DataError::InvalidArgument(format!(
                "batch buffer holds {} values, {} samples of {:?} need {}",
                images.len(),
                indices.len(),
                self.sample_shape(),
                indices.len() * n
            )));
        }
        norm.validate()?;
        if norm.channels() != self.channels() {
            return Err(DataError::InvalidArgument(format!(
                "normalisation is for {} channels but dataset `{}` has {}",
                norm.channels(),
                self.name(),
                self.channels()
            )));
        }
        self.check_indices(indices)?;
        if let Some((aug, _)) = &augment {
            let side = self.height().max(self.width());
            if aug.crop_padding > side {
                return Err(DataError::InvalidArgument(format!(
                    "crop padding {} exceeds the {side}-pixel side of dataset `{}`",
                    aug.crop_padding,
                    self.name()
                )));
            }
        }

        let affine = Affine::new(norm);
        labels.clear();
        labels.extend(indices.iter().map(|&i| usize::from(self.label(i))));
        match augment {
            Some((aug, rng)) if !aug.is_noop() => {
                for (&i, dst) in indices.iter().zip(images.chunks_exact_mut(n)) {
                    self.augment_one(i, aug, rng, &affine, dst);
                }
            }
            _ => {
                for (&i, dst) in indices.iter().zip(images.chunks_exact_mut(n)) {
                    affine.run(self.image(i), dst);
                }
            }
        }
        Ok(())
    }

    /// Writes sample `i`, cropped and/or flipped, normalised, into `dst`: the whole image is
    /// normalised in one vectorised pass, then rows and pixels are moved in place (memmove) and
    /// the uncovered places filled with the value of pixel 0.
    fn augment_one(
        &self,
        i: usize,
        aug: &Augment,
        rng: &mut crate::rng::Rng,
        affine: &Affine,
        dst: &mut [f32],
    ) {
        let p = aug.crop_padding;
        let (dy, dx) = if p > 0 {
            (rng.random_range(0..=2 * p), rng.random_range(0..=2 * p))
        } else {
            (p, p)
        };
        let flip = aug.horizontal_flip && rng.random::<bool>();
        affine.run(self.image(i), dst);
        let row = self.width() * self.channels();
        // Output row y shows source row y + dy − p; output column x shows source column
        // x + dx − p, before the flip.
        shift_units(dst, row, dy, p, affine);
        if dx != p || flip {
            for r in dst.chunks_exact_mut(row) {
                shift_units(r, self.channels(), dx, p, affine);
                if flip {
                    affine.reverse_pixels(r);
                }
            }
        }
    }
}

/// Treats `buf` as a sequence of `unit`-long items and makes item `j` hold what item
/// `j + to − from` held, filling items whose source lies outside with the value of pixel 0.
#[inline]
fn shift_units(buf: &mut [f32], unit: usize, to: usize, from: usize, affine: &Affine) {
    let n = buf.len() / unit;
    if to > from {
        let k = (to - from).min(n);
        buf.copy_within(k * unit.., 0);
        affine.fill_zero_pixel(&mut buf[(n - k) * unit..]);
    } else if to < from {
        let k = (from - to).min(n);
        buf.copy_within(..(n - k) * unit, k * unit);
        affine.fill_zero_pixel(&mut buf[..k * unit]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use proptest::prelude::*;

    fn rgb(n: usize, h: usize, w: usize) -> Dataset {
        let images = (0..n * h * w * 3).map(|i| (i * 37 % 251) as u8).collect();
        let labels = (0..n).map(|i| (i % 10) as u8).collect();
        Dataset::new("rgb", images, labels, h, w, 3, 10).unwrap()
    }

    /// Straightforward reference: pad, crop, flip, normalise, with explicit coordinates.
    fn reference(
        d: &Dataset,
        i: usize,
        norm: &Normalization,
        dy: usize,
        dx: usize,
        p: usize,
        flip: bool,
    ) -> Vec<f32> {
        let (h, w, c) = (d.height(), d.width(), d.channels());
        let mut out = Vec::new();
        for y in 0..h {
            for x in 0..w {
                let xc = if flip { w - 1 - x } else { x };
                let (py, px) = (y + dy, xc + dx);
                for ch in 0..c {
                    let v = if py < p || px < p || py - p >= h || px - p >= w {
                        0
                    } else {
                        d.image(i)[((py - p) * w + (px - p)) * c + ch]
                    };
                    out.push(norm.apply(ch, v));
                }
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn plain_batch_matches_reference() {
        let d = rgb(5, 4, 3);
        let norm = Normalization::cifar10();
        let mut images = vec![0.0; 2 * d.sample_len()];
        let mut labels = vec![99; 7];
        d.fill_batch(&[4, 1], &norm, None, &mut images, &mut labels)
            .unwrap();
        assert_eq!(labels, vec![4, 1]);
        let mut want = reference(&d, 4, &norm, 0, 0, 0, false);
        want.extend(reference(&d, 1, &norm, 0, 0, 0, false));
        assert!(close(&images, &want));

        let g = Dataset::new("g", vec![0, 255, 128, 1], vec![0, 1], 1, 2, 1, 2).unwrap();
        let norm = Normalization::fashion_mnist();
        let mut images = vec![0.0; 4];
        g.fill_batch(&[1, 0], &norm, None, &mut images, &mut labels)
            .unwrap();
        let want: Vec<f32> = [128u8, 1, 0, 255]
            .iter()
            .map(|&v| norm.apply(0, v))
            .collect();
        assert!(close(&images, &want));
        assert!((images[2] - (-0.2860 / 0.3530)).abs() < 1e-6);
    }

    #[test]
    fn identity_scales_to_unit_interval() {
        let g = Dataset::new("g", vec![0, 255], vec![0], 1, 2, 1, 1).unwrap();
        let mut images = vec![0.0; 2];
        g.fill_batch(
            &[0],
            &Normalization::identity(1),
            None,
            &mut images,
            &mut Vec::new(),
        )
        .unwrap();
        assert!(close(&images, &[0.0, 1.0]));
    }

    #[test]
    fn errors_are_typed_and_write_nothing() {
        let d = rgb(3, 2, 2);
        let norm = Normalization::cifar10();
        let mut images = vec![7.0; d.sample_len()];
        let mut labels = Vec::new();
        let bad = [
            d.fill_batch(&[0, 1], &norm, None, &mut images, &mut labels),
            d.fill_batch(&[3], &norm, None, &mut images, &mut labels),
            d.fill_batch(
                &[0],
                &Normalization::fashion_mnist(),
                None,
                &mut images,
                &mut labels,
            ),
            d.fill_batch(
                &[0],
                &Normalization {
                    mean: vec![0.0; 3],
                    std: vec![1.0, 0.0, 1.0],
                },
                None,
                &mut images,
                &mut labels,
            ),
        ];
        for r in bad {
            assert!(matches!(r, Err(DataError::InvalidArgument(_))), "{r:?}");
        }
        assert!(images.iter().all(|&v| v == 7.0));
        assert!(Normalization::new(vec![0.5], vec![f32::NAN]).is_err());
        assert!(Normalization::new(vec![], vec![]).is_err());
        assert!(Normalization::new(vec![0.5], vec![0.5]).is_ok());
    }

    #[test]
    fn augmentation_is_reproducible_and_varies() {
        let d = rgb(4, 6, 5);
        let norm = Normalization::cifar10();
        let aug = Augment {
            crop_padding: 2,
            horizontal_flip: true,
        };
        let idx = [0, 1, 2, 3, 0, 1, 2, 3];
        let run = |seed| {
            let mut r = rng::seeded(seed);
            let mut images = vec![0.0; idx.len() * d.sample_len()];
            d.fill_batch(
                &idx,
                &norm,
                Some((&aug, &mut r)),
                &mut images,
                &mut Vec::new(),
            )
            .unwrap();
            images
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        // A no-op augmentation is exactly the plain path and draws nothing.
        let mut r = rng::seeded(3);
        let before = r.clone();
        let mut a = vec![0.0; d.sample_len()];
        let mut b = vec![0.0; d.sample_len()];
        d.fill_batch(
            &[2],
            &norm,
            Some((&Augment::default(), &mut r)),
            &mut a,
            &mut Vec::new(),
        )
        .unwrap();
        d.fill_batch(&[2], &norm, None, &mut b, &mut Vec::new())
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(r, before);
    }

    #[test]
    fn padding_takes_the_normalised_value_of_pixel_zero() {
        // Padding as large as the image: some crops are all padding.
        let d = Dataset::new("w", vec![255; 4], vec![0], 2, 2, 1, 1).unwrap();
        let norm = Normalization::fashion_mnist();
        let aug = Augment {
            crop_padding: 2,
            horizontal_flip: false,
        };
        let mut r = rng::seeded(0);
        let zero = norm.apply(0, 0);
        let mut saw_padding = false;
        for _ in 0..50 {
            let mut images = vec![0.0; 4];
            d.fill_batch(
                &[0],
                &norm,
                Some((&aug, &mut r)),
                &mut images,
                &mut Vec::new(),
            )
            .unwrap();
            for &v in &images {
                assert!((v - zero).abs() < 1e-6 || (v - norm.apply(0, 255)).abs() < 1e-6);
                saw_padding |= (v - zero).abs() < 1e-6;
            }
        }
        assert!(saw_padding);
    }

    #[test]
    fn crop_padding_larger_than_the_image_is_refused() {
        let d = rgb(1, 4, 3);
        let aug = Augment {
            crop_padding: 5,
            horizontal_flip: false,
        };
        let mut images = vec![0.0; d.sample_len()];
        let r = d.fill_batch(
            &[0],
            &Normalization::cifar10(),
            Some((&aug, &mut rng::seeded(0))),
            &mut images,
            &mut Vec::new(),
        );
        assert!(matches!(r, Err(DataError::InvalidArgument(_))), "{r:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// The blocked plain path equals the per-value reference for any channel count.
        #[test]
        fn plain_path_matches_reference_for_any_channel_count(
            c in 1usize..=MAX_CHANNELS,
            n in 1usize..40,
        ) {
            let images = (0..n * c).map(|i| (i * 53 % 256) as u8).collect();
            let d = Dataset::new("px", images, vec![0], 1, n, c, 1).unwrap();
            let norm = Normalization::new(
                (0..c).map(|k| 0.03 * k as f32).collect(),
                (0..c).map(|k| 0.1 + 0.02 * k as f32).collect(),
            )
            .unwrap();
            let mut out = vec![0.0; d.sample_len()];
            d.fill_batch(&[0], &norm, None, &mut out, &mut Vec::new()).unwrap();
            let want: Vec<f32> = d.image(0).iter().enumerate().map(|(j, &v)| norm.apply(j % c, v)).collect();
            prop_assert!(close(&out, &want));
        }

        /// The fast path equals the reference for the offsets and flip it drew.
        #[test]
        fn augmented_sample_matches_reference(
            seed in any::<u64>(),
            h in 1usize..7,
            w in 1usize..7,
            c in prop_oneof![Just(1usize), Just(2), Just(3), Just(5), Just(6)],
            p in 0usize..7,
            flip in any::<bool>(),
            i in 0usize..3,
        ) {
            let p = p.min(h.max(w));
            let images = (0..3 * h * w * c).map(|i| (i * 37 % 251) as u8).collect();
            let d = Dataset::new("multi", images, vec![0, 1, 2], h, w, c, 3).unwrap();
            let norm = Normalization::new(
                (0..c).map(|k| 0.1 * k as f32).collect(),
                (0..c).map(|k| 0.2 + 0.05 * k as f32).collect(),
            )
            .unwrap();
            let aug = Augment { crop_padding: p, horizontal_flip: flip };
            let mut r = rng::seeded(seed);
            let mut replay = r.clone();
            let mut images = vec![0.0; d.sample_len()];
            d.fill_batch(&[i], &norm, Some((&aug, &mut r)), &mut images, &mut Vec::new()).unwrap();
            let (dy, dx) = if p > 0 {
                (replay.random_range(0..=2 * p), replay.random_range(0..=2 * p))
            } else {
                (p, p)
            };
            let flipped = flip && replay.random::<bool>();
            let want = reference(&d, i, &norm, dy, dx, p, flipped);
            prop_assert!(close(&images, &want), "dy {} dx {} flip {}", dy, dx, flipped);
        }
    }
}
