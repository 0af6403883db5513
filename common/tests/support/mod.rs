//! Helpers shared by the engine's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use fedtiny_common::layers::{BatchNorm2d, Layer, SlotMut};
use fedtiny_common::mask::Mask;
use fedtiny_common::rng::Rng;
use fedtiny_common::tensor::{Tensor, from_vec};
use rand::RngExt;
use rand::seq::SliceRandom;

/// A tensor of `shape` with values uniform in [-1, 1).
pub fn random_tensor(shape: &[usize], r: &mut Rng) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| r.random_range(-1.0..1.0)).collect()).unwrap()
}

/// A random mask over `len` entries keeping `round(density · len)` of them (at least one).
pub fn random_mask(len: usize, density: f64, r: &mut Rng) -> Mask {
    let keep = ((density * len as f64).round() as usize).max(1);
    let mut idx: Vec<usize> = (0..len).collect();
    idx.shuffle(r);
    idx.truncate(keep);
    Mask::from_indices(len, &idx).unwrap()
}

/// A BatchNorm over `c` channels with distinct, non-trivial γ, β and running statistics.
pub fn shaped_batchnorm(c: usize) -> BatchNorm2d {
    let mut bn = BatchNorm2d::new(c);
    bn.visit_mut("", &mut |name, slot| match slot {
        SlotMut::Param(p) => {
            let base = if name == "weight" { 1.5 } else { 0.3 };
            for (i, v) in p.value.iter_mut().enumerate() {
                *v = base - 0.4 * i as f32;
            }
        }
        SlotMut::Buffer(_, t) => {
            let base = if name == "running_mean" { 0.2 } else { 0.5 };
            for (i, v) in t.iter_mut().enumerate() {
                *v = base + 0.3 * i as f32;
            }
        }
    });
    bn
}
