//! Normalisation and augmentation settings.
//!
//! A pixel byte `v` of channel `c` becomes `(v / 255 − mean[c]) / std[c]`. The per-step code that
//! applies both, [`Dataset::fill_batch`](super::Dataset::fill_batch), lives in
//! [`batch`](super::batch).
//!
//! Decisions:
//! - [`Normalization`] holds the usual per-channel statistics (in `[0, 1]` pixel units, as
//!   torchvision's `Normalize` after `ToTensor`) and checks them in [`Normalization::validate`];
//!   at most [`MAX_CHANNELS`] channels, so the batch code keeps its constants on the stack.
//! - [`Augment`] means the usual `RandomCrop(size, padding = p)` then `RandomHorizontalFlip(0.5)`:
//!   the image is conceptually padded by `p` pixels of value 0 on every side and an `H×W` window
//!   is taken at an offset drawn uniformly from `0..=2p` on each axis. Padding is in pixel space,
//!   before normalisation, so a padded position gets the normalised value of pixel 0, not 0.0.
//! - Both are serde types so run configurations can name them.

use super::DataError;

/// The largest channel count [`Normalization`] (and so [`Dataset::fill_batch`](super::Dataset::fill_batch)) supports.
pub const MAX_CHANNELS: usize = 16;

/// Per-channel normalisation constants, applied to pixel values scaled to `[0, 1]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Normalization {
    /// Mean of each channel (in `[0, 1]` pixel units).
    pub mean: Vec<f32>,
    /// Standard deviation of each channel (in `[0, 1]` pixel units); must be positive.
    pub std: Vec<f32>,
}

impl Normalization {
    /// Builds a normalisation, checking that both vectors have the same non-zero length at most
    /// [`MAX_CHANNELS`], that the means are finite and the deviations finite and positive.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self, DataError> {
        let n = Normalization { mean, std };
        n.validate()?;
        Ok(n)
    }

    /// The Fashion-MNIST training-set statistics: mean 0.2860, std 0.3530.
    pub fn fashion_mnist() -> Self {
        Normalization {
            mean: vec![0.2860],
            std: vec![0.3530],
        }
    }

    /// The CIFAR-10 training-set statistics (R, G, B): mean (0.4914, 0.4822, 0.4465), std
    /// (0.2470, 0.2435, 0.2616).
    pub fn cifar10() -> Self {
        Normalization {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2470, 0.2435, 0.2616],
        }
    }

    /// Mean 0 and std 1 for each of `channels` channels: pixels are only scaled to `[0, 1]`.
    pub fn identity(channels: usize) -> Self {
        Normalization {
            mean: vec![0.0; channels],
            std: vec![1.0; channels],
        }
    }

    /// Number of channels this normalisation is for.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Checks the invariants listed at [`Normalization::new`].
    pub fn validate(&self) -> Result<(), DataError> {
        let c = self.mean.len();
        if c == 0 || c != self.std.len() || c > MAX_CHANNELS {
            return Err(DataError::InvalidArgument(format!(
                "normalisation has {c} means and {} standard deviations; expected the same \
                 number, between 1 and {MAX_CHANNELS}",
                self.std.len()
            )));
        }
        if self.mean.iter().any(|m| !m.is_finite())
            || self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(DataError::InvalidArgument(format!(
                "normalisation needs finite means and finite positive standard deviations, got \
                 mean {:?}, std {:?}",
                self.mean, self.std
            )));
        }
        Ok(())
    }

    /// The normalised value of a pixel byte `v` in channel `c` (reference for tests and callers
    /// that convert single values).
    pub fn apply(&self, c: usize, v: u8) -> f32 {
        (f32::from(v) / 255.0 - self.mean[c]) / self.std[c]
    }
}

/// Random augmentation applied per sample when filling a training batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Zero-pixel padding on each side before the random crop back to `H×W`; 0 disables the crop.
    pub crop_padding: usize,
    /// Flip horizontally with probability 1/2.
    pub horizontal_flip: bool,
}

impl Augment {
    /// The usual CIFAR-10 augmentation: 4-pixel padded random crop and horizontal flip.
    pub fn cifar10() -> Self {
        Augment {
            crop_padding: 4,
            horizontal_flip: true,
        }
    }

    /// Whether this augmentation does anything.
    pub fn is_noop(&self) -> bool {
        self.crop_padding == 0 && !self.horizontal_flip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_and_validation() {
        assert!(Normalization::fashion_mnist().validate().is_ok());
        assert!(Normalization::cifar10().validate().is_ok());
        assert_eq!(Normalization::cifar10().channels(), 3);
        let id = Normalization::identity(2);
        assert_eq!((id.apply(0, 0), id.apply(1, 255)), (0.0, 1.0));
        let f = Normalization::fashion_mnist();
        assert!((f.apply(0, 0) + 0.2860 / 0.3530).abs() < 1e-6);
        for (mean, std) in [
            (vec![0.5], vec![f32::NAN]),
            (vec![0.5], vec![0.0]),
            (vec![0.5], vec![-1.0]),
            (vec![f32::INFINITY], vec![1.0]),
            (vec![], vec![]),
            (vec![0.5, 0.5], vec![1.0]),
            (vec![0.0; MAX_CHANNELS + 1], vec![1.0; MAX_CHANNELS + 1]),
        ] {
            let r = Normalization::new(mean, std);
            assert!(matches!(r, Err(DataError::InvalidArgument(_))), "{r:?}");
        }
        assert!(Normalization::new(vec![0.5], vec![0.5]).is_ok());
        assert!(Augment::default().is_noop());
        assert!(!Augment::cifar10().is_noop());
    }
}
