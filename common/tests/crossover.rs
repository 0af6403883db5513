//! The measurement behind [`fedtiny_common::kernels::sparse::policy`]: one layer's training step
//! (forward, input gradient and weight gradient, batch 64, 2 threads) on the sparse kernels
//! against the dense ones, for the prunable layer shapes of the models at width ¼ on 28×28
//! inputs, at densities from 1 % to 50 %. Run with
//! `cargo test --release -p fedtiny-common --test crossover -- --ignored --nocapture`.
//!
//! It prints, per layer, the sparse speed-up at each density (minimum step time of each path,
//! the two paths measured alternately), the density where the sparse kernels stop being faster
//! (linear interpolation between the measured densities) and the policy's crossover.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Instant;

use fedtiny_common::kernels::ConvGeometry;
use fedtiny_common::kernels::sparse::ConvPlan;
use fedtiny_common::kernels::sparse::policy::{self, LayerShape, SparseMode};
use fedtiny_common::layers::{Conv2d, Layer, Linear, SlotMut};
use fedtiny_common::mask::Mask;
use fedtiny_common::parallel::thread_pool;
use fedtiny_common::rng::{self, Rng};
use fedtiny_common::tensor::{Mode, Tensor};
use support::{random_mask, random_tensor};

const DENSITIES: [f64; 6] = [0.01, 0.05, 0.1, 0.2, 0.3, 0.5];
const BATCH: usize = 64;

fn install(layer: &mut dyn Layer, mask: &Mask) {
    layer.visit_mut("", &mut |name, slot| {
        if let SlotMut::Param(p) = slot
            && name == "weight"
        {
            p.set_mask(Some(mask.clone())).unwrap();
        }
    });
}

/// The minimum time of one training step of each layer, measured alternately.
fn min_step_times(layers: &mut [Box<dyn Layer>], x: &Tensor) -> Vec<f64> {
    let dy = {
        let y = layers[0].forward(x.clone(), Mode::Train).unwrap();
        layers[0].backward(Tensor::zeros(y.raw_dim())).unwrap();
        random_tensor(y.shape(), &mut rng::seeded(3))
    };
    let mut best = vec![f64::INFINITY; layers.len()];
    for round in 0..8 {
        for (l, b) in layers.iter_mut().zip(&mut best) {
            let t0 = Instant::now();
            for _ in 0..3 {
                l.forward(x.clone(), Mode::Train).unwrap();
                l.backward(dy.clone()).unwrap();
            }
            if round > 0 {
                *b = b.min(t0.elapsed().as_secs_f64() / 3.0);
            }
        }
    }
    best
}

/// The sparse speed-up over dense at each density: `make(mode, rng)` builds the layer (a weight
/// of `len` elements), which gets the same random mask in both modes.
fn speedups(
    x: &Tensor,
    len: usize,
    r: &mut Rng,
    make: &dyn Fn(SparseMode, &mut Rng) -> Box<dyn Layer>,
) -> Vec<f64> {
    DENSITIES
        .iter()
        .map(|&d| {
            let mask = random_mask(len, d, r);
            let mut layers: Vec<Box<dyn Layer>> = [SparseMode::Always, SparseMode::Never]
                .into_iter()
                .map(|mode| {
                    let mut l = make(mode, r);
                    install(l.as_mut(), &mask);
                    l
                })
                .collect();
            let t = min_step_times(&mut layers, x);
            t[1] / t[0]
        })
        .collect()
}

/// Where the speed-up curve (falling with density) crosses 1, by linear interpolation.
fn crossing(speedups: &[f64]) -> String {
    if speedups[0] < 1.0 {
        return format!("< {}", DENSITIES[0]);
    }
    for i in 1..speedups.len() {
        if speedups[i] < 1.0 {
            let (d0, d1) = (DENSITIES[i - 1], DENSITIES[i]);
            let (s0, s1) = (speedups[i - 1], speedups[i]);
            return format!("{:.2}", d0 + (d1 - d0) * (s0 - 1.0) / (s0 - s1));
        }
    }
    format!("> {}", DENSITIES[DENSITIES.len() - 1])
}

fn report(name: &str, waste: Option<f64>, shape: &LayerShape, speedups: &[f64]) {
    let cells: Vec<String> = speedups.iter().map(|s| format!("{s:.2}×")).collect();
    println!(
        "| {name} | {} | {} | {} | {:.2} |",
        waste.map_or("–".to_string(), |w| format!("{w:.2}")),
        cells.join(" | "),
        crossing(speedups),
        policy::crossover(shape),
    );
}

#[test]
#[ignore = "measurement: takes a few minutes"]
fn measure_crossovers() {
    // (name, input size, cin, cout, kernel, stride, padding)
    let convs = [
        ("cnn conv2", 14, 32, 64, 3, 1, 1),
        ("vgg conv2", 14, 16, 32, 3, 1, 1),
        ("resnet layer1", 28, 16, 16, 3, 1, 1),
        ("resnet layer2 conv1", 28, 16, 32, 3, 2, 1),
        ("resnet layer2 shortcut", 28, 16, 32, 1, 2, 0),
        ("vgg conv3", 7, 32, 64, 3, 1, 1),
        ("vgg conv4", 7, 64, 64, 3, 1, 1),
        ("resnet layer3 shortcut", 14, 32, 64, 1, 2, 0),
        ("resnet layer3 conv1", 14, 32, 64, 3, 2, 1),
        ("resnet layer4 conv1", 7, 64, 128, 3, 2, 1),
        ("resnet layer4 conv2", 4, 128, 128, 3, 1, 1),
        ("vgg conv6", 3, 128, 128, 3, 1, 1),
        ("resnet layer4 shortcut", 7, 64, 128, 1, 2, 0),
        ("vgg conv8 (1×1 map)", 1, 128, 128, 3, 1, 1),
        ("resnet w1 layer1", 28, 64, 64, 3, 1, 1),
        ("resnet w1 layer3 conv2", 7, 256, 256, 3, 1, 1),
        ("resnet w1 layer4 conv2", 4, 512, 512, 3, 1, 1),
        ("resnet w1 layer4 shortcut", 7, 256, 512, 1, 2, 0),
        ("vgg w1 conv8 (1×1 map)", 1, 512, 512, 3, 1, 1),
    ];
    let linears = [("cnn fc1", 3136, 128), ("cnn fc2", 128, 10)];
    println!(
        "| layer | waste | {} | measured crossover | policy crossover |",
        DENSITIES.map(|d| format!("{:.0} %", d * 100.0)).join(" | ")
    );
    println!("|---|---|{}---|---|", "---|".repeat(DENSITIES.len()));
    thread_pool(2).unwrap().install(|| {
        let mut r = rng::seeded(1);
        for (name, size, cin, cout, k, stride, pad) in convs {
            let x = random_tensor(&[BATCH, size, size, cin], &mut r);
            let g = ConvGeometry::new(BATCH, size, size, cin, k, k, stride, pad).unwrap();
            let single = size == 1;
            let waste = (!single).then(|| ConvPlan::new(&g).unwrap().waste());
            let shape = if single {
                LayerShape::SinglePixel
            } else {
                LayerShape::Conv {
                    pixels: g.oh * g.ow,
                    taps: k * k,
                    patch: g.patch(),
                }
            };
            let speedups = speedups(&x, k * k * cin * cout, &mut r, &|mode, r| {
                let c = Conv2d::new(cin, cout, k, stride, pad, false, r).unwrap();
                Box::new(c.prunable().with_sparse_mode(mode))
            });
            report(name, waste, &shape, &speedups);
        }
        for (name, fi, fo) in linears {
            let x = random_tensor(&[BATCH, fi], &mut r);
            let speedups = speedups(&x, fi * fo, &mut r, &|mode, r| {
                let l = Linear::new(fi, fo, r).unwrap();
                Box::new(l.prunable().with_sparse_mode(mode))
            });
            let shape = LayerShape::Linear { weights: fi * fo };
            report(name, None, &shape, &speedups);
        }
    });
}
