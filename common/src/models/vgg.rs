//! VGG-11 (configuration A: 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M) with
//! BatchNorm after every conv and a global-average-pool classifier (one linear layer), so the
//! classifier's size does not depend on the input.
//!
//! Decision: a max-pool is skipped when the feature map is already 1 pixel high or wide (on a
//! 28×28 input the fifth pool would have nothing to pool); on 32×32 all five pools apply.

use super::{ModelSpec, push_bn_relu};
use crate::Result;
use crate::layers::{Conv2d, GlobalAvgPool, Linear, MaxPool2d, Sequential};
use crate::rng::Rng;

/// Configuration A; 0 stands for a max-pool.
const CONFIG_A: [usize; 13] = [64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0];

pub(super) fn build(spec: &ModelSpec, rng: &mut Rng, fuse: bool) -> Result<Sequential> {
    let [mut h, mut w, mut cin] = spec.input;
    let mut features = Sequential::new();
    let (mut convs, mut pools) = (0, 0);
    for &v in &CONFIG_A {
        if v == 0 {
            if h >= 2 && w >= 2 {
                pools += 1;
                features.push(format!("pool{pools}"), MaxPool2d::new(2, 2));
                h /= 2;
                w /= 2;
            }
            continue;
        }
        let c = spec.channels(v);
        let conv = Conv2d::new(cin, c, 3, 1, 1, false, rng)?;
        let conv = if convs == 0 {
            conv.without_input_grad()
        } else {
            conv.prunable()
        };
        convs += 1;
        features.push(format!("conv{convs}"), conv);
        push_bn_relu(
            &mut features,
            &format!("bn{convs}"),
            &format!("relu{convs}"),
            c,
            fuse,
        );
        cin = c;
    }
    Ok(Sequential::new()
        .with("features", features)
        .with("pool", GlobalAvgPool::new())
        .with(
            "classifier",
            Linear::new(cin, spec.classes, rng)?.prunable(),
        ))
}
