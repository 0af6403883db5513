//! CIFAR-style ResNet-18: a 3×3 stem conv (stride 1, no max-pool), four stages of two basic
//! blocks with 64, 128, 256, 512 channels (scaled by the width multiplier; stages 2–4 start with
//! stride 2), a 1×1 conv + BN shortcut where the shape changes, global average pooling and a
//! linear classifier. The last BN γ of every residual branch starts at 0.

use super::{ModelSpec, push_bn_relu};
use crate::Result;
use crate::layers::{BatchNorm2d, Conv2d, GlobalAvgPool, Linear, Residual, Sequential};
use crate::rng::Rng;

pub(super) fn build(spec: &ModelSpec, rng: &mut Rng, fuse: bool) -> Result<Sequential> {
    let cin = spec.input[2];
    let stem = spec.channels(64);
    let mut net = Sequential::new().with(
        "conv1",
        Conv2d::new(cin, stem, 3, 1, 1, false, rng)?.without_input_grad(),
    );
    push_bn_relu(&mut net, "bn1", "relu", stem, fuse);
    let mut c_in = stem;
    for (stage, reference) in [64usize, 128, 256, 512].into_iter().enumerate() {
        let c = spec.channels(reference);
        let mut layer = Sequential::new();
        for b in 0..2 {
            let stride = if stage > 0 && b == 0 { 2 } else { 1 };
            layer.push(b.to_string(), block(c_in, c, stride, rng, fuse)?);
            c_in = c;
        }
        net.push(format!("layer{}", stage + 1), layer);
    }
    Ok(net
        .with("pool", GlobalAvgPool::new())
        .with("fc", Linear::new(c_in, spec.classes, rng)?.prunable()))
}

fn block(cin: usize, cout: usize, stride: usize, rng: &mut Rng, fuse: bool) -> Result<Residual> {
    let mut branch = Sequential::new().with(
        "conv1",
        Conv2d::new(cin, cout, 3, stride, 1, false, rng)?.prunable(),
    );
    push_bn_relu(&mut branch, "bn1", "relu1", cout, fuse);
    let branch = branch
        .with(
            "conv2",
            Conv2d::new(cout, cout, 3, 1, 1, false, rng)?.prunable(),
        )
        .with("bn2", BatchNorm2d::new(cout).zero_gamma());
    let shortcut = if stride != 1 || cin != cout {
        Some(
            Sequential::new()
                .with(
                    "conv",
                    Conv2d::new(cin, cout, 1, stride, 0, false, rng)?.prunable(),
                )
                .with("bn", BatchNorm2d::new(cout)),
        )
    } else {
        None
    };
    Ok(Residual::new(branch, shortcut))
}
