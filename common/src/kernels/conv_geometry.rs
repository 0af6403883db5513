//! The shape arithmetic of a 2-D convolution or pooling window.

use crate::{Error, Result};

/// Geometry of a windowed operation over an NHWC batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    /// Batch size.
    pub n: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Input channels.
    pub c: usize,
    /// Window height.
    pub kh: usize,
    /// Window width.
    pub kw: usize,
    /// Stride (both axes).
    pub stride: usize,
    /// Zero padding (both axes, both sides).
    pub pad: usize,
    /// Output height.
    pub oh: usize,
    /// Output width.
    pub ow: usize,
}

impl ConvGeometry {
    /// Computes the output size, failing when the window does not fit.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        kh: usize,
        kw: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Self> {
        if stride == 0 || kh == 0 || kw == 0 {
            return Err(Error::InvalidConfig(
                "window and stride must be positive".into(),
            ));
        }
        if h + 2 * pad < kh || w + 2 * pad < kw {
            return Err(Error::shape(
                "window",
                format!("input of at least {kh}x{kw} after padding"),
                format!("{h}x{w} with padding {pad}"),
            ));
        }
        Ok(ConvGeometry {
            n,
            h,
            w,
            c,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }

    /// Columns of the im2col matrix: `kh·kw·c`.
    pub fn patch(&self) -> usize {
        self.kh * self.kw * self.c
    }

    /// Rows of the im2col matrix: `n·oh·ow`.
    pub fn rows(&self) -> usize {
        self.n * self.oh * self.ow
    }

    /// True when im2col is the identity (1×1 window, stride 1, no padding).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// The input element count of one image.
    pub fn image_len(&self) -> usize {
        self.h * self.w * self.c
    }
}
