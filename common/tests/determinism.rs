//! Same seed → bit-identical training, and the thread count does not change the result.
#![allow(clippy::unwrap_used)]

use fedtiny_common::data::{Augment, Dataset, Normalization};
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::parallel::thread_pool;
use fedtiny_common::rng;
use fedtiny_common::state::StateDict;
use fedtiny_common::train::{BatchOptions, NoHooks, train_epoch};
use rand::RngExt;

fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut r = rng::seeded(seed);
    let labels: Vec<u8> = (0..n).map(|_| r.random_range(0..10u8)).collect();
    // Class-dependent bright square plus noise, so there is something to learn.
    let mut images = vec![0u8; n * 28 * 28];
    for (i, &l) in labels.iter().enumerate() {
        for p in 0..28 * 28 {
            let (y, x) = (p / 28, p % 28);
            let on = y / 7 == usize::from(l) % 4 && x / 7 == usize::from(l) / 4;
            images[i * 784 + p] = if on { 200 } else { r.random_range(0..60u8) };
        }
    }
    Dataset::new("synthetic", images, labels, 28, 28, 1, 10).unwrap()
}

fn one_epoch(threads: usize, seed: u64, arch: Arch, width: f64) -> StateDict {
    let data = synthetic(300, 5);
    let spec = ModelSpec::new(arch, [28, 28, 1], 10, width).unwrap();
    let pool = thread_pool(threads).unwrap();
    pool.install(|| {
        let mut model = Model::new(&spec, seed).unwrap();
        let mut opt = OptimizerConfig::default().build().unwrap();
        let opts = BatchOptions {
            batch_size: 32,
            normalization: Normalization::fashion_mnist(),
            augment: Some(Augment {
                crop_padding: 2,
                horizontal_flip: true,
            }),
        };
        let idx: Vec<usize> = (0..data.len()).collect();
        let mut r = rng::seeded(seed);
        train_epoch(
            &mut model,
            opt.as_mut(),
            &data,
            &idx,
            &opts,
            &mut r,
            &mut NoHooks,
        )
        .unwrap();
        model.state_dict()
    })
}

#[test]
fn same_seed_one_thread_is_bit_identical() {
    let a = one_epoch(1, 7, Arch::Cnn, 0.5);
    let b = one_epoch(1, 7, Arch::Cnn, 0.5);
    assert_eq!(a, b);
    let c = one_epoch(1, 8, Arch::Cnn, 0.5);
    assert_ne!(a, c, "a different seed must give different weights");
}

#[test]
fn thread_count_does_not_change_the_result() {
    for (arch, width) in [(Arch::Cnn, 0.5), (Arch::Resnet18, 0.125)] {
        let one = one_epoch(1, 3, arch, width);
        let two = one_epoch(2, 3, arch, width);
        assert_eq!(one, two, "{arch}");
    }
}
