//! Max pooling and global average pooling over NHWC batches.

use rayon::prelude::*;

use super::{OpInfo, OpKind, expect_grad};
use crate::kernels::ConvGeometry;
use crate::tensor::{Mode, Tensor, contiguous, from_vec, into_vec, reuse};
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
                    for oy in 0..g.oh {
                        for ox in 0..g.ow {
                            let base = (oy * g.ow + ox) * c;
                            let (o, a) = (&mut o[base..base + c], &mut a[base..base + c]);
                            o.fill(f32::NEG_INFINITY);
                            a.fill(0);
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let iy = oy * g.stride + ky;
                                    let ix = ox * g.stride + kx;
                                    let off = (iy * g.w + ix) * c;
                                    for ch in 0..c {
                                        let v = img[off + ch];
                                        // `>` keeps the first maximum; NaN never wins.
                                        if v > o[ch] {
                                            o[ch] = v;
                                            a[ch] = (off + ch) as u32;
                                        }
                                    }
                                }
                            }
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
        let mut dx = vec![0.0f32; g.n * g.image_len()];
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
        let mut dx = vec![0.0f32; n * hw * c];
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
