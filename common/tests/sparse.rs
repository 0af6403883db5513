//! The sparse kernels through the layers: the sparse and dense paths of the same masked layer
//! agree (outputs and every gradient, within 1e-5 relative to the tensor's largest magnitude),
//! `dense_grad` gives the dense path's full weight gradient, the policy routes low-density
//! layers of the real models to the sparse kernels, and masked training stays bit-identical
//! whatever the thread count.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_common::kernels::sparse::policy::{self, LayerShape, SparseMode};
use fedtiny_common::layers::{Conv2d, Layer, Linear, Slot, SlotMut};
use fedtiny_common::loss::softmax_cross_entropy;
use fedtiny_common::mask::Mask;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::parallel::thread_pool;
use fedtiny_common::pruning::random_masks;
use fedtiny_common::rng;
use fedtiny_common::state::StateDict;
use fedtiny_common::tensor::{Mode, Tensor};
use rand::RngExt;
use support::{random_mask, random_tensor};

const REL: f32 = 1e-5;

/// Installs `mask` on the weight, sets `dense_grad`, and gives the bias (if any) random values.
fn prepare(layer: &mut dyn Layer, mask: &Mask, dense_grad: bool, seed: u64) {
    let mut r = rng::seeded(seed);
    layer.visit_mut("", &mut |name, slot| {
        if let SlotMut::Param(p) = slot {
            if name == "weight" {
                p.set_mask(Some(mask.clone())).unwrap();
                p.dense_grad = dense_grad;
            } else {
                p.value.mapv_inplace(|_| r.random_range(-0.5..0.5));
            }
        }
    });
}

/// Every parameter's gradient, by name.
fn grads(layer: &dyn Layer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    layer.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.push((name.to_string(), p.grad.iter().copied().collect()));
        }
    });
    out
}

/// `max |a − b| ≤ REL · max(|b|)`, optionally only where `keep(i)`.
fn assert_agree(a: &[f32], b: &[f32], keep: impl Fn(usize) -> bool, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if keep(i) {
            assert!(
                (x - y).abs() <= REL * scale,
                "{what}[{i}]: sparse {x} dense {y} (scale {scale})"
            );
        }
    }
}

/// A layer that can say which kernels its last forward pass ran.
trait SparseLayer: Layer {
    fn ran(&self) -> bool;
}

impl SparseLayer for Conv2d {
    fn ran(&self) -> bool {
        self.ran_sparse()
    }
}

impl SparseLayer for Linear {
    fn ran(&self) -> bool {
        self.ran_sparse()
    }
}

/// Runs forward and backward on the sparse-forced and dense-forced builds of one layer and
/// compares everything.
fn compare<L: SparseLayer>(what: &str, make: &dyn Fn(SparseMode) -> L, x: &Tensor, mask: &Mask) {
    for dense_grad in [false, true] {
        let run = |mode: SparseMode| {
            let mut l = make(mode);
            prepare(&mut l, mask, dense_grad, 3);
            let y = l.forward(x.clone(), Mode::Train).unwrap();
            let dy = random_tensor(y.shape(), &mut rng::seeded(4));
            let dx = l.backward(dy).unwrap();
            assert_eq!(l.ran(), mode == SparseMode::Always, "{what}");
            let eval = l.forward(x.clone(), Mode::Eval).unwrap();
            (y, dx, grads(&l), eval)
        };
        let (ys, dxs, gs, es) = run(SparseMode::Always);
        let (yd, dxd, gd, ed) = run(SparseMode::Never);
        let what = format!("{what} dense_grad={dense_grad}");
        let all = |_: usize| true;
        assert_agree(
            ys.as_slice().unwrap(),
            yd.as_slice().unwrap(),
            all,
            &format!("{what} y"),
        );
        assert_agree(
            es.as_slice().unwrap(),
            ed.as_slice().unwrap(),
            all,
            &format!("{what} eval"),
        );
        assert_agree(
            dxs.as_slice().unwrap(),
            dxd.as_slice().unwrap(),
            all,
            &format!("{what} dx"),
        );
        for ((name, s), (_, d)) in gs.iter().zip(&gd) {
            if name == "weight" && !dense_grad {
                assert_agree(s, d, |i| mask.get(i), &format!("{what} d{name} (active)"));
                assert!(
                    (0..s.len()).all(|i| mask.get(i) || s[i] == 0.0),
                    "{what}: pruned grads"
                );
            } else {
                assert_agree(s, d, all, &format!("{what} d{name}"));
            }
        }
    }
}

#[test]
fn sparse_and_dense_conv_agree_on_random_masked_layers() {
    let mut r = rng::seeded(1);
    for (n, h, w, cin, cout, k, stride, pad, bias) in [
        (2, 9, 9, 8, 16, 3, 1, 1, false),
        (3, 10, 7, 5, 6, 3, 2, 1, true),
        (2, 8, 8, 16, 8, 1, 2, 0, false),
        (4, 6, 6, 4, 9, 1, 1, 0, true),
        (2, 3, 3, 16, 32, 3, 1, 1, false),
        (1, 11, 13, 3, 5, 5, 1, 2, true),
        (2, 1, 1, 12, 7, 3, 1, 1, false),
        // Outputs as long as the inputs: the sparse passes write over their inputs.
        (2, 7, 6, 8, 8, 3, 1, 1, true),
        (2, 6, 6, 2, 8, 3, 2, 1, false),
    ] {
        for density in [0.01, 0.05, 0.2, 0.6, 1.0] {
            let x = random_tensor(&[n, h, w, cin], &mut r);
            let mask = random_mask(k * k * cin * cout, density, &mut r);
            let make = move |mode: SparseMode| {
                Conv2d::new(cin, cout, k, stride, pad, bias, &mut rng::seeded(2))
                    .unwrap()
                    .prunable()
                    .with_sparse_mode(mode)
            };
            compare(
                &format!("conv {cin}->{cout} k{k} s{stride} p{pad} on {h}x{w} d{density}"),
                &make,
                &x,
                &mask,
            );
        }
    }
}

#[test]
fn sparse_and_dense_linear_agree_on_random_masked_layers() {
    let mut r = rng::seeded(5);
    for (rows, fi, fo) in [(1, 3, 2), (7, 33, 5), (64, 300, 40), (300, 17, 9)] {
        for density in [0.01, 0.05, 0.2, 0.6, 1.0] {
            let x = random_tensor(&[rows, fi], &mut r);
            let mask = random_mask(fi * fo, density, &mut r);
            let make = move |mode: SparseMode| {
                Linear::new(fi, fo, &mut rng::seeded(6))
                    .unwrap()
                    .prunable()
                    .with_sparse_mode(mode)
            };
            compare(
                &format!("linear {rows}x{fi}->{fo} d{density}"),
                &make,
                &x,
                &mask,
            );
        }
    }
}

/// The policy sends the real models' prunable layers to the sparse kernels at 1 % density and
/// keeps them dense at 100 %, and Auto follows it.
#[test]
fn auto_mode_follows_the_policy_on_model_shapes() {
    let fc1 = LayerShape::Linear {
        weights: 3136 * 128,
    };
    let conv2 = LayerShape::Conv {
        pixels: 196,
        taps: 9,
        patch: 288,
    };
    for shape in [fc1, conv2] {
        assert!(
            policy::use_sparse(SparseMode::Auto, &shape, 0.01),
            "{shape:?}"
        );
        assert!(
            !policy::use_sparse(SparseMode::Auto, &shape, 1.0),
            "{shape:?}"
        );
        assert!(policy::use_sparse(SparseMode::Always, &shape, 1.0));
        assert!(!policy::use_sparse(SparseMode::Never, &shape, 0.01));
    }
    let mut r = rng::seeded(8);
    let x = random_tensor(&[64, 3136], &mut r);
    for (density, sparse) in [(0.01, true), (1.0, false)] {
        let mut l = Linear::new(3136, 128, &mut r).unwrap().prunable();
        prepare(&mut l, &random_mask(3136 * 128, density, &mut r), false, 1);
        l.forward(x.clone(), Mode::Eval).unwrap();
        assert_eq!(l.ran_sparse(), sparse, "fc1 at {density}");
    }
    let x = random_tensor(&[8, 14, 14, 32], &mut r);
    for (density, sparse) in [(0.01, true), (1.0, false)] {
        let mut c = Conv2d::new(32, 64, 3, 1, 1, false, &mut r)
            .unwrap()
            .prunable();
        prepare(&mut c, &random_mask(288 * 64, density, &mut r), false, 1);
        c.forward(x.clone(), Mode::Eval).unwrap();
        assert_eq!(c.ran_sparse(), sparse, "conv2 at {density}");
    }
}

/// A first convolution (3×3 over one channel) runs the direct kernels unmasked, and agrees with
/// the GEMM path: output, input gradient and the full weight gradient.
#[test]
fn unmasked_small_patch_convolutions_run_the_direct_kernels() {
    let mut r = rng::seeded(9);
    let x = random_tensor(&[6, 9, 7, 1], &mut r);
    let run = |mode: SparseMode| {
        let mut c = Conv2d::new(1, 16, 3, 1, 1, true, &mut rng::seeded(10))
            .unwrap()
            .with_sparse_mode(mode);
        let y = c.forward(x.clone(), Mode::Train).unwrap();
        let dy = random_tensor(y.shape(), &mut rng::seeded(11));
        let dx = c.backward(dy).unwrap();
        (c.ran_sparse(), y, dx, grads(&c))
    };
    let (direct, y, dx, g) = run(SparseMode::Auto);
    let (gemm, yd, dxd, gd) = run(SparseMode::Never);
    assert!(direct && !gemm);
    let all = |_: usize| true;
    assert_agree(y.as_slice().unwrap(), yd.as_slice().unwrap(), all, "y");
    assert_agree(dx.as_slice().unwrap(), dxd.as_slice().unwrap(), all, "dx");
    assert_eq!(g.len(), 2);
    for ((name, a), (_, b)) in g.iter().zip(&gd) {
        assert!(
            b.iter().all(|v| *v != 0.0),
            "{name}: every entry has a gradient"
        );
        assert_agree(a, b, all, name);
    }
    // A larger patch stays on the GEMM when unmasked.
    let mut c = Conv2d::new(2, 16, 3, 1, 1, false, &mut r).unwrap();
    c.forward(random_tensor(&[2, 5, 5, 2], &mut r), Mode::Eval)
        .unwrap();
    assert!(!c.ran_sparse());
}

/// On the sparse kernels, a convolution whose output is as long as its input writes the output
/// over the input and the input gradient over the output gradient (no fresh buffers); one that
/// changes the length does not. Correctness of both is checked above against the dense path.
#[test]
fn equal_length_sparse_convolutions_write_over_their_inputs() {
    let mut r = rng::seeded(12);
    for (cin, cout, stride, in_place) in [(8, 8, 1, true), (2, 8, 2, true), (8, 16, 1, false)] {
        let mut c = Conv2d::new(cin, cout, 3, stride, 1, false, &mut rng::seeded(13))
            .unwrap()
            .prunable()
            .with_sparse_mode(SparseMode::Always);
        let mask = random_mask(9 * cin * cout, 0.2, &mut r);
        prepare(&mut c, &mask, false, 14);
        let x = random_tensor(&[3, 6, 6, cin], &mut r);
        let x_at = x.as_ptr();
        let y = c.forward(x, Mode::Train).unwrap();
        assert!(c.ran_sparse());
        let dy = random_tensor(y.shape(), &mut r);
        let dy_at = dy.as_ptr();
        let dx = c.backward(dy).unwrap();
        let what = format!("{cin}->{cout} stride {stride}");
        assert_eq!(y.as_ptr() == x_at, in_place, "output over input, {what}");
        assert_eq!(dx.as_ptr() == dy_at, in_place, "input gradient, {what}");
        assert_eq!(dx.shape(), &[3, 6, 6, cin]);
    }
}

/// A few masked training steps (sparse kernels under the policy) on 1 and 2 threads.
fn masked_steps(threads: usize, arch: Arch, width: f64, density: f64) -> StateDict {
    let spec = ModelSpec::new(arch, [12, 12, 1], 10, width).unwrap();
    thread_pool(threads).unwrap().install(|| {
        let mut model = Model::new(&spec, 3).unwrap();
        let masks = random_masks(&model, density, &mut rng::seeded(4)).unwrap();
        model.set_masks(&masks).unwrap();
        let mut opt = OptimizerConfig::default().build().unwrap();
        let mut r = rng::seeded(5);
        for _ in 0..3 {
            let x = random_tensor(&[16, 12, 12, 1], &mut r);
            let labels: Vec<usize> = (0..16).map(|_| r.random_range(0..10)).collect();
            let y = model.forward(x, Mode::Train).unwrap();
            let out = softmax_cross_entropy(&y, &labels).unwrap();
            model.backward(out.grad).unwrap();
            opt.step(&mut model).unwrap();
        }
        let state = model.state_dict();
        for (name, m) in &masks.masks {
            let v = &state.get(name).unwrap().values;
            assert!(
                (0..v.len()).all(|i| m.get(i) || v[i] == 0.0),
                "{name}: pruned weight moved"
            );
        }
        state
    })
}

#[test]
fn masked_training_does_not_depend_on_the_thread_count() {
    for (arch, width) in [
        (Arch::Cnn, 0.5),
        (Arch::Resnet18, 0.125),
        (Arch::Vgg11, 0.125),
    ] {
        let one = masked_steps(1, arch, width, 0.03);
        assert_eq!(one, masked_steps(2, arch, width, 0.03), "{arch}");
    }
}

/// The definition of a convolution over single-pixel inputs, in f64: with padding `pad` only
/// tap `(pad, pad)` reads data. Returns the output, the input gradient and the full weight
/// gradient for the weight `w` (`[k, k, cin, cout]`), bias `b` and output gradient `dy`.
#[allow(clippy::too_many_arguments)]
fn single_pixel_reference(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    dy: &[f32],
    (n, cin, cout, k, pad): (usize, usize, usize, usize, usize),
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let t = pad * k + pad;
    let wt = |ci: usize, o: usize| f64::from(w[(t * cin + ci) * cout + o]);
    let mut y = vec![0.0; n * cout];
    let mut dx = vec![0.0; n * cin];
    let mut dw = vec![0.0; k * k * cin * cout];
    for i in 0..n {
        for o in 0..cout {
            y[i * cout + o] = f64::from(b[o]);
            for ci in 0..cin {
                let xv = f64::from(x[i * cin + ci]);
                let g = f64::from(dy[i * cout + o]);
                y[i * cout + o] += xv * wt(ci, o);
                dx[i * cin + ci] += g * wt(ci, o);
                dw[(t * cin + ci) * cout + o] += xv * g;
            }
        }
    }
    (y, dx, dw)
}

fn assert_near(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// A convolution over a single pixel, whose other taps read padding only, runs as a linear layer
/// on its live tap: outputs and gradients match the definition with every kernel mode, dense and
/// lean storage, masked (sparse kernels under `Auto` and `Always`) or not, with and without
/// `dense_grad`, and after the mask changes between steps.
#[test]
fn single_pixel_convolutions_match_the_definition() {
    let (n, cin, cout, k, pad) = (6, 12, 7, 3, 1);
    let mut r = rng::seeded(21);
    let x = random_tensor(&[n, 1, 1, cin], &mut r);
    let dy = random_tensor(&[n, 1, 1, cout], &mut r);
    // Below and above the crossover of the automatic choice.
    let masks = [
        random_mask(k * k * cin * cout, 0.1, &mut r),
        random_mask(k * k * cin * cout, 0.3, &mut r),
    ];
    for masked in [false, true] {
        for dense_grad in [false, true] {
            for lean in [false, true] {
                for mode in [SparseMode::Auto, SparseMode::Always, SparseMode::Never] {
                    let what =
                        format!("masked {masked} dense_grad {dense_grad} lean {lean} {mode:?}");
                    let mut c = Conv2d::new(cin, cout, k, 1, pad, true, &mut rng::seeded(22))
                        .unwrap()
                        .with_sparse_mode(mode);
                    for (step, mask) in masks.iter().enumerate() {
                        let mut b = Vec::new();
                        c.visit_mut("", &mut |name, slot| {
                            if let SlotMut::Param(p) = slot {
                                if name == "weight" {
                                    p.set_lean_allowed(lean).unwrap();
                                    if masked {
                                        p.set_mask(Some(mask.clone())).unwrap();
                                    }
                                    p.dense_grad = dense_grad;
                                } else {
                                    p.value.mapv_inplace(|_| r.random_range(-0.5..0.5));
                                    b = p.value.iter().copied().collect();
                                }
                            }
                        });
                        let mut w = Vec::new();
                        c.visit("", &mut |name, slot| {
                            if let Slot::Param(p) = slot
                                && name == "weight"
                            {
                                w = p.value_dense().iter().copied().collect();
                            }
                        });
                        let y = c.forward(x.clone(), Mode::Train).unwrap();
                        let shape = LayerShape::SinglePixel;
                        let sparse = masked && policy::use_sparse(mode, &shape, mask.density());
                        assert_eq!(
                            sparse,
                            masked
                                && (mode == SparseMode::Always
                                    || (mode == SparseMode::Auto && step == 0)),
                            "{what}"
                        );
                        assert_eq!(c.ran_sparse(), sparse, "{what}");
                        let dx = c.backward(dy.clone()).unwrap();
                        let (wy, wdx, mut wdw) = single_pixel_reference(
                            x.as_slice().unwrap(),
                            &w,
                            &b,
                            dy.as_slice().unwrap(),
                            (n, cin, cout, k, pad),
                        );
                        if sparse && !dense_grad {
                            for (i, v) in wdw.iter_mut().enumerate() {
                                if !mask.get(i) {
                                    *v = 0.0;
                                }
                            }
                        }
                        let what = format!("{what} step {step}");
                        assert_eq!(y.shape(), &[n, 1, 1, cout]);
                        assert_near(y.as_slice().unwrap(), &wy, &format!("{what} y"));
                        assert_near(dx.as_slice().unwrap(), &wdx, &format!("{what} dx"));
                        let mut dw = Vec::new();
                        c.visit("", &mut |name, slot| {
                            if let Slot::Param(p) = slot
                                && name == "weight"
                            {
                                dw = p.grad_dense().iter().copied().collect();
                            }
                        });
                        assert_near(&dw, &wdw, &format!("{what} dw"));
                        let eval = c.forward(x.clone(), Mode::Eval).unwrap();
                        assert_eq!(eval, y, "{what} eval");
                    }
                }
            }
        }
    }
}
