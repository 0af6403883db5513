//! Kernel benchmarks: GEMM on the `cnn`'s conv2 shapes (1 vs 2 threads, same run), im2col, a
//! conv layer's training step (dense, and masked at 5 % on the sparse kernels), and the sparse
//! kernels against dense ones on the `cnn`'s fc1 and conv2 shapes at 1, 5, 10 and 20 % density
//! (2 threads; plus the portable, non-AVX2 variant at 5 %).
//! `cargo bench -p fedtiny-common --bench kernels [-- FILTER]`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fedtiny_common::kernels::sparse::policy::SparseMode;
use fedtiny_common::kernels::sparse::{ConvPlan, Isa, MatrixPlan, SparseWeight, Workspace};
use fedtiny_common::kernels::{ConvGeometry, gemm, im2col};
use fedtiny_common::layers::{Conv2d, Layer, SlotMut};
use fedtiny_common::mask::Mask;
use fedtiny_common::rng;
use fedtiny_common::tensor::{Mode, from_vec};
use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rand::RngExt;
use rand::seq::SliceRandom;

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
    let mut sparse = Conv2d::new(32, 64, 3, 1, 1, false, &mut rng::seeded(4))
        .unwrap()
        .prunable()
        .with_sparse_mode(SparseMode::Always);
    let mask = random_mask(288 * 64, 0.05, 5);
    sparse.visit_mut("", &mut |_, slot| {
        if let SlotMut::Param(p) = slot {
            p.set_mask(Some(mask.clone())).unwrap();
        }
    });
    c.bench_function(
        "conv2d 32->64 k3 forward+backward, batch 64, 5 % sparse",
        |b| {
            b.iter(|| {
                pool.install(|| {
                    sparse.forward(x.clone(), Mode::Train).unwrap();
                    sparse.backward(dy.clone()).unwrap()
                })
            })
        },
    );
}

/// The first convolution of the models (3×3 over one channel, 28×28, batch 64, no input
/// gradient), unmasked, on the GEMM and on the direct kernels.
fn bench_first_conv(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let x = from_vec(&[64, 28, 28, 1], vec![0.1; 64 * 28 * 28]).unwrap();
    let dy = from_vec(&[64, 28, 28, 16], vec![0.01; 64 * 28 * 28 * 16]).unwrap();
    for (name, mode) in [("gemm", SparseMode::Never), ("direct", SparseMode::Auto)] {
        let mut conv = Conv2d::new(1, 16, 3, 1, 1, false, &mut rng::seeded(4))
            .unwrap()
            .without_input_grad()
            .with_sparse_mode(mode);
        c.bench_function(
            &format!("conv2d 1->16 k3 28x28 step, batch 64, {name}"),
            |b| {
                b.iter(|| {
                    pool.install(|| {
                        conv.forward(x.clone(), Mode::Train).unwrap();
                        conv.backward(dy.clone()).unwrap()
                    })
                })
            },
        );
    }
}

fn random_mask(len: usize, density: f64, seed: u64) -> Mask {
    let mut idx: Vec<usize> = (0..len).collect();
    idx.shuffle(&mut rng::seeded(seed));
    idx.truncate(((density * len as f64) as usize).max(1));
    Mask::from_indices(len, &idx).unwrap()
}

fn view(s: &[f32], r: usize, c: usize) -> ArrayView2<'_, f32> {
    ArrayView2::from_shape((r, c), s).unwrap()
}

fn view_mut(s: &mut [f32], r: usize, c: usize) -> ArrayViewMut2<'_, f32> {
    ArrayViewMut2::from_shape((r, c), s).unwrap()
}

const DENSITIES: [f64; 4] = [0.01, 0.05, 0.10, 0.20];

fn sparse_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    g
}

/// The densities to measure, with the detected instruction set, plus the portable variant at
/// 5 % (what the code would do without its AVX2 + FMA build).
fn variants() -> impl Iterator<Item = (f64, Isa)> {
    DENSITIES
        .iter()
        .map(|&d| (d, Isa::detect()))
        .chain([(0.05, Isa::portable())])
}

/// fc1 of the cnn at batch 64: `X[64, 3136]·W[3136, 128]`. "fwd" packs X and unpacks Y, "dx"
/// packs dY and unpacks dX, "dw" reuses both packs, and "step" is all three as a training step
/// does them.
fn bench_sparse_fc1(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let (m, k, n) = (64, 3136, 128);
    let x = random(m, k, 1);
    let x = x.as_slice().unwrap();
    let dy = random(m, n, 2);
    let dy = dy.as_slice().unwrap();
    let wd = random(k, n, 3);
    let mut g = sparse_group(c, "sparse fc1 64x3136x128");
    let (mut y, mut dx, mut dw) = (vec![0.0; m * n], vec![0.0; m * k], vec![0.0; k * n]);
    let fwd = |y: &mut [f32]| gemm(view(x, m, k), wd.view(), 0.0, view_mut(y, m, n));
    let bwd_x = |dx: &mut [f32]| gemm(view(dy, m, n), wd.t(), 0.0, view_mut(dx, m, k));
    let bwd_w = |dw: &mut [f32]| gemm(view(x, m, k).t(), view(dy, m, n), 0.0, view_mut(dw, k, n));
    g.bench_function("dense fwd", |b| b.iter(|| pool.install(|| fwd(&mut y))));
    g.bench_function("dense dx", |b| b.iter(|| pool.install(|| bwd_x(&mut dx))));
    g.bench_function("dense dw", |b| b.iter(|| pool.install(|| bwd_w(&mut dw))));
    g.bench_function("dense step", |b| {
        b.iter(|| {
            pool.install(|| {
                fwd(&mut y);
                bwd_w(&mut dw);
                bwd_x(&mut dx)
            })
        })
    });
    for (density, isa) in variants() {
        let mask = random_mask(k * n, density, 4);
        let w = SparseWeight::new(wd.as_slice().unwrap(), &mask, k, n).unwrap();
        let plan = MatrixPlan::new(m, k).unwrap().with_isa(isa);
        let mut ws = Workspace::default();
        plan.pack_input(x, &mut ws.src).unwrap();
        plan.pack_output_grad(dy, n, &mut ws.out_grad).unwrap();
        let tag = format!("{:.0}% {}", density * 100.0, isa.name());
        let fwd = |ws: &mut Workspace, y: &mut [f32]| {
            plan.pack_input(x, &mut ws.src).unwrap();
            plan.forward(&w, &ws.src, &mut ws.out, y, false).unwrap()
        };
        let bwd_x = |ws: &mut Workspace, dx: &mut [f32]| {
            plan.pack_output_grad(dy, n, &mut ws.out_grad).unwrap();
            plan.input_grad(&w, &ws.out_grad, &mut ws.src_grad, dx)
                .unwrap()
        };
        let bwd_w = |ws: &mut Workspace, dw: &mut [f32]| {
            plan.weight_grad(&w, &ws.src, &ws.out_grad, &mut ws.weight_grad, dw)
                .unwrap()
        };
        g.bench_function(format!("sparse fwd {tag}"), |b| {
            b.iter(|| pool.install(|| fwd(&mut ws, &mut y)))
        });
        g.bench_function(format!("sparse dx {tag}"), |b| {
            b.iter(|| pool.install(|| bwd_x(&mut ws, &mut dx)))
        });
        g.bench_function(format!("sparse dw {tag}"), |b| {
            b.iter(|| pool.install(|| bwd_w(&mut ws, &mut dw)))
        });
        g.bench_function(format!("sparse step {tag}"), |b| {
            b.iter(|| {
                pool.install(|| {
                    fwd(&mut ws, &mut y);
                    bwd_x(&mut ws, &mut dx);
                    bwd_w(&mut ws, &mut dw)
                })
            })
        });
    }
    g.finish();
}

/// conv2 of the cnn at batch 64: 32→64 channels, 3×3, on 14×14 (im2col `[12544, 288]·[288, 64]`).
/// Dense "fwd" is im2col + GEMM and "dx" is GEMM + col2im; sparse runs without im2col: "fwd"
/// packs the input, "dx" and "dw" are the fused backward pass asked for one gradient, and
/// "step" is forward + backward with both gradients (dense: im2col, 3 GEMMs, col2im).
fn bench_sparse_conv2(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let geom = ConvGeometry::new(64, 14, 14, 32, 3, 3, 1, 1).unwrap();
    let (rows, k, n) = (geom.rows(), geom.patch(), 64);
    let x = random(64 * 14 * 14, 32, 1);
    let x = x.as_slice().unwrap();
    let dy = random(rows, n, 2);
    let dy = dy.as_slice().unwrap();
    let wd = random(k, n, 3);
    let mut g = sparse_group(c, "sparse conv2 64x14x14x32 k3 ->64");
    let mut cols = vec![0.0; rows * k];
    let (mut y, mut dx, mut dw) = (vec![0.0; rows * n], vec![0.0; x.len()], vec![0.0; k * n]);
    let fwd = |cols: &mut [f32], y: &mut [f32]| {
        im2col::im2col(x, &geom, cols);
        gemm(view(cols, rows, k), wd.view(), 0.0, view_mut(y, rows, n))
    };
    let bwd_x = |cols: &mut [f32], dx: &mut [f32]| {
        gemm(view(dy, rows, n), wd.t(), 0.0, view_mut(cols, rows, k));
        im2col::col2im(cols, &geom, dx)
    };
    let bwd_w = |cols: &[f32], dw: &mut [f32]| {
        gemm(
            view(cols, rows, k).t(),
            view(dy, rows, n),
            0.0,
            view_mut(dw, k, n),
        )
    };
    g.bench_function("dense fwd", |b| {
        b.iter(|| pool.install(|| fwd(&mut cols, &mut y)))
    });
    g.bench_function("dense dx", |b| {
        b.iter(|| pool.install(|| bwd_x(&mut cols, &mut dx)))
    });
    fwd(&mut cols, &mut y);
    g.bench_function("dense dw", |b| {
        b.iter(|| pool.install(|| bwd_w(&cols, &mut dw)))
    });
    g.bench_function("dense step", |b| {
        b.iter(|| {
            pool.install(|| {
                fwd(&mut cols, &mut y);
                bwd_w(&cols, &mut dw);
                bwd_x(&mut cols, &mut dx)
            })
        })
    });
    for (density, isa) in variants() {
        let mask = random_mask(k * n, density, 4);
        let w = SparseWeight::new(wd.as_slice().unwrap(), &mask, k, n).unwrap();
        let plan = ConvPlan::new(&geom).unwrap().with_isa(isa);
        let mut ws = Workspace::default();
        plan.forward(&w, x, None, &mut ws.src, &mut y).unwrap();
        let tag = format!("{:.0}% {}", density * 100.0, isa.name());
        g.bench_function(format!("sparse fwd {tag}"), |b| {
            b.iter(|| pool.install(|| plan.forward(&w, x, None, &mut ws.src, &mut y).unwrap()))
        });
        let bwd = |ws: &mut Workspace, dx: Option<&mut [f32]>, dw: Option<&mut [f32]>| {
            plan.backward(&w, &ws.src, dy, dx, dw, &mut ws.weight_grad)
                .unwrap()
        };
        g.bench_function(format!("sparse dx {tag}"), |b| {
            b.iter(|| pool.install(|| bwd(&mut ws, Some(&mut dx), None)))
        });
        g.bench_function(format!("sparse dw {tag}"), |b| {
            b.iter(|| pool.install(|| bwd(&mut ws, None, Some(&mut dw))))
        });
        g.bench_function(format!("sparse step {tag}"), |b| {
            b.iter(|| {
                pool.install(|| {
                    plan.forward(&w, x, None, &mut ws.src, &mut y).unwrap();
                    bwd(&mut ws, Some(&mut dx), Some(&mut dw))
                })
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_im2col,
    bench_conv_step,
    bench_first_conv,
    bench_sparse_fc1,
    bench_sparse_conv2
);
criterion_main!(benches);
