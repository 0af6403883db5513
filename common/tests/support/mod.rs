//! Helpers shared by the engine's integration tests.

use fedtiny_common::layers::{BatchNorm2d, Layer, SlotMut};

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
