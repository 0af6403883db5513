//! Max pooling and global average pooling over NHWC batches.

use rayon::prelude::*;

use super::{OpInfo, OpKind, expect_grad};
use crate::kernels::ConvGeometry;
use crate::tensor::{Mode, Tensor, contiguous, from_vec, into_vec, reuse, zeros};
use crate::{Error, Result};

/// Max pooling with a square window and no padding. Training keeps the arg-max of every output.
///
/// Buffers are reused from one training step to the next: the arg-max indices live in a kept
/// buffer, and the output is written into the buffer of the previous backward pass's output
/// gradient (same shape). The input gradient is the one fresh buffer of a step (the input's
/// buffer is released in the forward pass rather than held until the backward pass).
pub struct MaxPool2d {
    k: usize,
    stride: usize,
    cache: Option<(ConvGeometry, Vec<u32>)>,
    /// The arg-max buffer after the backward pass (or an evaluation forward).
    arg_spare: Vec<u32>,
    /// The last output gradient's buffer, for the next forward's output.
    out_spare: Vec<f32>,
}

impl MaxPool2d {
    /// A `k×k` pool with the given stride.
    pub fn new(k: usize, stride: usize) -> Self {
        MaxPool2d {
            k,
            stride,
            cache: None,
            arg_spare: Vec::new(),
            out_spare: Vec::new(),
        }
    }
}

/// Channels that [`window_max`] handles at once, in registers.
const POOL_LANES: usize = 8;

/// The maximum over a window and its first arg-max, per channel: `out[ch]` is the largest of
/// `img[t + ch]` over the taps `t` (in tap order, `>` keeps the first maximum, NaN never wins;
/// `−∞` with arg-max 0 when every tap is NaN) and `arg[ch]` its index in `img`.
fn window_max(img: &[f32], taps: &[usize], out: &mut [f32], arg: &mut [u32]) {
    // Lane arrays live in registers, so the selects below stay selects (a select stored back to
    // memory would become a conditional store, which does not vectorise).
    let c = out.len();
    let mut c0 = 0;
    while c0 < c {
        let len = POOL_LANES.min(c - c0);
        let mut m = [f32::NEG_INFINITY; POOL_LANES];
        let mut am = [0u32; POOL_LANES];
        for &t in taps {
            let v = &img[t + c0..t + c0 + len];
            if len == POOL_LANES {
                for j in 0..POOL_LANES {
                    let take = v[j] > m[j];
                    m[j] = if take { v[j] } else { m[j] };
                    am[j] = if take { (t + c0 + j) as u32 } else { am[j] };
                }
            } else {
                for j in 0..len {
                    if v[j] > m[j] {
                        m[j] = v[j];
                        am[j] = (t + c0 + j) as u32;
                    }
                }
            }
        }
        out[c0..c0 + len].copy_from_slice(&m[..len]);
        arg[c0..c0 + len].copy_from_slice(&am[..len]);
        c0 += len;
    }
}

impl super::Layer for MaxPool2d {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        if x.ndim() != 4 {
            return Err(Error::shape("maxpool2d", "[n, h, w, c]", x.shape()));
        }
        let s = x.shape().to_vec();
        let g = ConvGeometry::new(s[0], s[1], s[2], s[3], self.k, self.k, self.stride, 0)?;
        let x = contiguous(x);
        let xs = x.as_slice().unwrap_or(&[]);
        let c = g.c;
        let out_img = g.oh * g.ow * c;
        // Every value is set below (each output pixel starts at −∞ with arg-max 0).
        let mut out = reuse(&mut self.out_spare, g.n * out_img);
        let mut arg = std::mem::take(&mut self.arg_spare);
        arg.resize(g.n * out_img, 0);
        if out_img > 0 && g.image_len() > 0 {
            out.par_chunks_mut(out_img)
                .zip(arg.par_chunks_mut(out_img))
                .zip(xs.par_chunks(g.image_len()))
                .for_each(|((o, a), img)| {
                    let mut taps = Vec::with_capacity(g.kh * g.kw);
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let base = (oy * g.ow + ox) * c;
                            taps.clear();
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let (iy, ix) = (oy * g.stride + ky, ox * g.stride + kx);
                                    taps.push((iy * g.w + ix) * c);
                                }
                            }
                            window_max(img, &taps, &mut o[base..base + c], &mut a[base..base + c]);
                        }
                    }
                });
        }
        if mode.caches() {
            self.cache = Some((g, arg));
        } else {
            self.arg_spare = arg;
        }
        from_vec(&[g.n, g.oh, g.ow, c], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let (g, arg) = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("maxpool2d".into()))?;
        if let Err(e) = expect_grad("maxpool2d", &grad, &[g.n, g.oh, g.ow, g.c]) {
            self.arg_spare = arg;
            return Err(e);
        }
        let dy = into_vec(grad);
        let out_img = g.oh * g.ow * g.c;
        // Accumulated into: starts at zero. The one fresh buffer of the step.
        let mut dx = zeros(g.n * g.image_len());
        if out_img > 0 && g.image_len() > 0 {
            dx.par_chunks_mut(g.image_len())
                .zip(dy.par_chunks(out_img))
                .zip(arg.par_chunks(out_img))
                .for_each(|((d, gy), a)| {
                    for (v, &i) in gy.iter().zip(a) {
                        d[i as usize] += v;
                    }
                });
        }
        self.arg_spare = arg;
        self.out_spare = dy;
        from_vec(&[g.n, g.h, g.w, g.c], dx)
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let &[h, w, c] = input else {
            return Err(Error::shape(prefix, "[h, w, c]", input));
        };
        let g = ConvGeometry::new(1, h, w, c, self.k, self.k, self.stride, 0)?;
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::MaxPool,
            macs: 0,
            weight: None,
            input_elems: h * w * c,
            output_elems: g.oh * g.ow * c,
            cached_elems: g.oh * g.ow * c,
        });
        Ok(vec![g.oh, g.ow, c])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
        self.arg_spare = Vec::new();
        self.out_spare = Vec::new();
    }
}

/// Mean over the spatial axes: `[n, h, w, c] → [n, c]`.
#[derive(Default)]
pub struct GlobalAvgPool {
    cache: Option<Vec<usize>>,
}

impl GlobalAvgPool {
    /// A global average pool.
    pub fn new() -> Self {
        GlobalAvgPool { cache: None }
    }
}

impl super::Layer for GlobalAvgPool {
    fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        if x.ndim() != 4 {
            return Err(Error::shape("global_avg_pool", "[n, h, w, c]", x.shape()));
        }
        let s = x.shape().to_vec();
        let (n, hw, c) = (s[0], s[1] * s[2], s[3]);
        let x = contiguous(x);
        let xs = x.as_slice().unwrap_or(&[]);
        let mut out = vec![0.0f32; n * c];
        if hw > 0 && c > 0 {
            for (o, img) in out.chunks_mut(c).zip(xs.chunks(hw * c)) {
                for px in img.chunks(c) {
                    for (a, v) in o.iter_mut().zip(px) {
                        *a += v;
                    }
                }
                let inv = 1.0 / hw as f32;
                o.iter_mut().for_each(|v| *v *= inv);
            }
        }
        if mode.caches() {
            self.cache = Some(s);
        }
        from_vec(&[n, c], out)
    }

    fn backward(&mut self, grad: Tensor) -> Result<Tensor> {
        let s = self
            .cache
            .take()
            .ok_or_else(|| Error::NoForwardCache("global_avg_pool".into()))?;
        let (n, hw, c) = (s[0], s[1] * s[2], s[3]);
        expect_grad("global_avg_pool", &grad, &[n, c])?;
        let g = contiguous(grad);
        let gs = g.as_slice().unwrap_or(&[]);
        let inv = 1.0 / hw.max(1) as f32;
        let mut dx = zeros(n * hw * c);
        if hw > 0 && c > 0 {
            for (img, gi) in dx.chunks_mut(hw * c).zip(gs.chunks(c)) {
                for px in img.chunks_mut(c) {
                    for (d, v) in px.iter_mut().zip(gi) {
                        *d = v * inv;
                    }
                }
            }
        }
        from_vec(&s, dx)
    }

    fn trace(&self, prefix: &str, input: &[usize], ops: &mut Vec<OpInfo>) -> Result<Vec<usize>> {
        let &[h, w, c] = input else {
            return Err(Error::shape(prefix, "[h, w, c]", input));
        };
        ops.push(OpInfo {
            name: prefix.to_string(),
            kind: OpKind::AvgPool,
            macs: 0,
            weight: None,
            input_elems: h * w * c,
            output_elems: c,
            cached_elems: 0,
        });
        Ok(vec![c])
    }

    fn clear_cache(&mut self) {
        self.cache = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::Layer;

    /// Naive max pooling: per output pixel and channel, the first maximum over the window (NaN
    /// never wins; −∞ and index 0 when every tap is NaN).
    fn naive(x: &[f32], g: &ConvGeometry) -> (Vec<f32>, Vec<u32>) {
        let (mut out, mut arg) = (Vec::new(), Vec::new());
        for n in 0..g.n {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    for ch in 0..g.c {
                        let (mut m, mut a) = (f32::NEG_INFINITY, 0u32);
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let (iy, ix) = (oy * g.stride + ky, ox * g.stride + kx);
                                let i = (iy * g.w + ix) * g.c + ch;
                                let v = x[n * g.image_len() + i];
                                if v > m {
                                    m = v;
                                    a = i as u32;
                                }
                            }
                        }
                        out.push(m);
                        arg.push(a);
                    }
                }
            }
        }
        (out, arg)
    }

    #[test]
    fn forward_matches_the_naive_pool_for_any_channel_count() {
        // Channel counts below, at and beyond the register lanes; rounded values make ties, and
        // some NaNs (one window all NaN) check that NaN never wins.
        for (c, k, stride) in [(3, 2, 2), (8, 2, 2), (16, 3, 2), (19, 2, 2), (24, 3, 1)] {
            let g = ConvGeometry::new(2, 6, 5, c, k, k, stride, 0).unwrap();
            let mut x: Vec<f32> = (0..g.n * g.image_len())
                .map(|i| ((i * 7919) % 13) as f32 - 6.0)
                .collect();
            for i in (0..x.len()).step_by(11) {
                x[i] = f32::NAN;
            }
            for ky in 0..k {
                for kx in 0..k {
                    x[(ky * g.w + kx) * c] = f32::NAN;
                }
            }
            let (want, want_arg) = naive(&x, &g);
            let mut pool = MaxPool2d::new(k, stride);
            let y = pool
                .forward(from_vec(&[2, 6, 5, c], x).unwrap(), Mode::Train)
                .unwrap();
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            let want: Vec<u32> = want.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "c {c} k {k} stride {stride}");
            assert_eq!(y[[0, 0, 0, 0]], f32::NEG_INFINITY, "all-NaN window");
            assert_eq!(pool.cache.as_ref().unwrap().1, want_arg, "c {c}: arg-max");
        }
    }

    #[test]
    fn training_steps_reuse_the_argmax_buffer() {
        let mut pool = MaxPool2d::new(2, 2);
        let x = |s: f32| {
            let v = (0..2 * 4 * 4 * 3).map(|i| (i as f32 * s).sin()).collect();
            from_vec(&[2, 4, 4, 3], v).unwrap()
        };
        let y = pool.forward(x(0.7), Mode::Train).unwrap();
        let p = pool.cache.as_ref().unwrap().1.as_ptr();
        pool.backward(y).unwrap();
        let y = pool.forward(x(1.1), Mode::Train).unwrap();
        assert_eq!(pool.cache.as_ref().unwrap().1.as_ptr(), p);
        pool.backward(y).unwrap();
        pool.clear_cache();
        assert_eq!(pool.arg_spare.capacity() + pool.out_spare.capacity(), 0);
    }
}
