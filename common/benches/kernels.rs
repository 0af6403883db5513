//! Kernel benchmarks: GEMM on the `cnn`'s conv2 shapes (1 vs 2 threads, same run), im2col, and
//! a conv layer's training step. `cargo bench -p fedtiny-common --bench kernels`.
#![allow(clippy::unwrap_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use fedtiny_common::kernels::{ConvGeometry, gemm, im2col};
use fedtiny_common::layers::{Conv2d, Layer};
use fedtiny_common::rng;
use fedtiny_common::tensor::{Mode, from_vec};
use ndarray::Array2;
use rand::RngExt;

fn random(m: usize, n: usize, seed: u64) -> Array2<f32> {
    let mut r = rng::seeded(seed);
    Array2::from_shape_fn((m, n), |_| r.random_range(-1.0..1.0))
}

fn bench_gemm(c: &mut Criterion) {
    // conv2 of the cnn at batch 64: cols [64·14·14, 288] × W [288, 64].
    let a = random(64 * 14 * 14, 288, 1);
    let b = random(288, 64, 2);
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut out = Array2::<f32>::zeros((64 * 14 * 14, 64));
        c.bench_function(
            &format!("gemm conv2 forward, {threads} thread(s)"),
            |bench| bench.iter(|| pool.install(|| gemm(a.view(), b.view(), 0.0, out.view_mut()))),
        );
        let dy = random(64 * 14 * 14, 64, 3);
        let mut dw = Array2::<f32>::zeros((288, 64));
        c.bench_function(
            &format!("gemm conv2 weight grad, {threads} thread(s)"),
            |bench| bench.iter(|| pool.install(|| gemm(a.t(), dy.view(), 0.0, dw.view_mut()))),
        );
    }
}

fn bench_im2col(c: &mut Criterion) {
    let g = ConvGeometry::new(64, 14, 14, 32, 3, 3, 1, 1).unwrap();
    let x: Vec<f32> = (0..g.n * g.image_len()).map(|i| i as f32).collect();
    let mut cols = vec![0.0; g.rows() * g.patch()];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    c.bench_function("im2col 64x14x14x32 k3", |b| {
        b.iter(|| pool.install(|| im2col::im2col(&x, &g, &mut cols)))
    });
}

fn bench_conv_step(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let mut conv = Conv2d::new(32, 64, 3, 1, 1, false, &mut rng::seeded(4)).unwrap();
    let x = from_vec(&[64, 14, 14, 32], vec![0.1; 64 * 14 * 14 * 32]).unwrap();
    let dy = from_vec(&[64, 14, 14, 64], vec![0.01; 64 * 14 * 14 * 64]).unwrap();
    c.bench_function("conv2d 32->64 k3 forward+backward, batch 64", |b| {
        b.iter(|| {
            pool.install(|| {
                conv.forward(x.clone(), Mode::Train).unwrap();
                conv.backward(dy.clone()).unwrap()
            })
        })
    });
}

criterion_group!(benches, bench_gemm, bench_im2col, bench_conv_step);
criterion_main!(benches);
