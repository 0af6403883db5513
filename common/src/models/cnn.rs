//! The small `cnn`: conv3×3-32 + BN + ReLU + max-pool 2, conv3×3-64 + BN + ReLU + max-pool 2,
//! linear → 128 + ReLU, linear → classes (channel counts scaled by the width multiplier).

use super::{ModelSpec, push_bn_relu};
use crate::Result;
use crate::layers::{Conv2d, Flatten, Linear, MaxPool2d, Relu, Sequential};
use crate::rng::Rng;

pub(super) fn build(spec: &ModelSpec, rng: &mut Rng, fuse: bool) -> Result<Sequential> {
    let [h, w, cin] = spec.input;
    let (c1, c2, hidden) = (spec.channels(32), spec.channels(64), spec.channels(128));
    let (h2, w2) = (h / 2 / 2, w / 2 / 2);
    let mut net = Sequential::new().with(
        "conv1",
        Conv2d::new(cin, c1, 3, 1, 1, false, rng)?.without_input_grad(),
    );
    push_bn_relu(&mut net, "bn1", "relu1", c1, fuse);
    net.push("pool1", MaxPool2d::new(2, 2));
    net.push(
        "conv2",
        Conv2d::new(c1, c2, 3, 1, 1, false, rng)?.prunable(),
    );
    push_bn_relu(&mut net, "bn2", "relu2", c2, fuse);
    Ok(net
        .with("pool2", MaxPool2d::new(2, 2))
        .with("flatten", Flatten::new())
        .with("fc1", Linear::new(h2 * w2 * c2, hidden, rng)?.prunable())
        .with("relu3", Relu::new())
        .with("fc2", Linear::new(hidden, spec.classes, rng)?.prunable()))
}
