//! Finite-difference gradient checks for every layer, a residual block, whole models and the
//! loss.
//!
//! Method: for a layer `f`, a fixed random projection `r` defines the scalar `L = Σ r ⊙ f(x)`,
//! accumulated in f64. The analytic gradients (input and every parameter) come from one
//! `backward(r)`. The numeric ones are f64 central differences `(L(θ+ε) − L(θ−ε)) / 2ε` with
//! ε = 1e-2, each evaluated on a fresh copy of the layer built from the same seed (so dropout
//! draws the same mask). Layers compute in f32, so the tolerance is
//! `|numeric − analytic| ≤ 1e-2·max(|numeric|, |analytic|) + 2e-3`.
//!
//! ReLU and max-pool have kinks; where a perturbation crosses one, the central difference is not
//! the derivative. Inputs are drawn away from zero, and a coordinate whose differences at ε and
//! ε/2 disagree (beyond the tolerance) is counted as "at a kink" and skipped; a check fails if
//! more than 10 % of its coordinates are skipped, or if any other coordinate disagrees.
//!
//! Whole models (through the loss) are checked for wiring with a 5 % relative tolerance and up to
//! 20 % of coordinates at kinks: a deep
//! f32 network with many ReLUs gives central differences that scatter by a few per cent around
//! the derivative whatever ε (seen on resnet18: −1.28 … −1.32 for ε from 1e-3 to 1e-4 against an
//! analytic −1.311).
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_common::kernels::sparse::policy::SparseMode;
use fedtiny_common::layers::*;
use fedtiny_common::loss::softmax_cross_entropy;
use fedtiny_common::mask::Mask;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::rng;
use fedtiny_common::tensor::{Mode, Tensor, from_vec};
use rand::RngExt;
use rand::seq::SliceRandom;
use support::{random_tensor, shaped_batchnorm};

const EPS: f64 = 1e-3;
/// Step of the whole-model directional checks (see `model_gradients_end_to_end`).
const MODEL_EPS: f64 = 1e-4;
/// Relative tolerance of the whole-model checks. These tiny models (batch 6, a few channels,
/// BatchNorm over few values) are bumpy: on resnet18 at 8×8 the directional difference of
/// `layer1.1.conv1` goes 0.70, −0.13, −1.15, −1.45, −1.60, −1.64 for ε = 1e-2 … 3e-5 against an
/// analytic −1.625, and at ε = 1e-4 tensors scatter by up to ~8 % around the analytic value.
/// The single-layer checks above hold every layer to 1 %; this one catches wiring errors (a
/// missing path, a wrong transpose), which are off by far more than 10 %.
const MODEL_REL_TOL: f64 = 1e-1;
/// Absolute tolerance of the whole-model checks. A conv followed by BatchNorm makes the loss
/// invariant to the conv's scale, so a random direction's derivative can be tiny next to the
/// noise (vgg11's stem: analytic 0.027, differences −0.035 … 0.033 for ε = 1e-4 … 1e-5).
const MODEL_ABS_TOL: f64 = 0.1;
const REL_TOL: f64 = 1e-2;
const ABS_TOL: f64 = 2e-3;

fn objective(y: &Tensor, proj: &Tensor) -> f64 {
    y.iter()
        .zip(proj.iter())
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum()
}

fn close(num: f64, ana: f64) -> bool {
    (num - ana).abs() <= REL_TOL * num.abs().max(ana.abs()) + ABS_TOL
}

/// The central difference of `f` at step ε, or `None` when the differences at ε and ε/2
/// disagree (a kink within reach).
fn numeric(mut f: impl FnMut(f64) -> f64) -> Option<f64> {
    let d1 = (f(EPS) - f(-EPS)) / (2.0 * EPS);
    let d2 = (f(EPS / 2.0) - f(-EPS / 2.0)) / EPS;
    close(d1, d2).then_some(d2)
}

/// Counts of a check: coordinates compared, and coordinates skipped at kinks.
#[derive(Default)]
struct Tally {
    checked: usize,
    skipped: usize,
}

impl Tally {
    fn compare(&mut self, what: &str, num: Option<f64>, ana: f64) {
        match num {
            None => self.skipped += 1,
            Some(num) => {
                assert!(close(num, ana), "{what}: numeric {num} analytic {ana}");
                self.checked += 1;
            }
        }
    }

    fn finish(&self, name: &str, min_checked: usize) {
        assert!(
            self.checked >= min_checked && self.skipped * 10 <= self.checked + self.skipped,
            "{name}: {} coordinates checked, {} skipped at kinks",
            self.checked,
            self.skipped
        );
    }
}

fn param_values(layer: &dyn Layer) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    let mut out = Vec::new();
    layer.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.push((
                name.to_string(),
                p.value.iter().copied().collect(),
                p.grad.iter().copied().collect(),
            ));
        }
    });
    out
}

fn perturb(layer: &mut dyn Layer, target: &str, index: usize, delta: f32) {
    layer.visit_mut("", &mut |name, slot| {
        if let SlotMut::Param(p) = slot
            && name == target
        {
            p.value.as_slice_mut().unwrap()[index] += delta;
        }
    });
}

/// Checks input and parameter gradients of the layer `make()` builds, at `x`. Up to
/// `samples` coordinates of each tensor are checked (all of them when smaller).
fn check(name: &str, make: &dyn Fn() -> Box<dyn Layer>, x: &Tensor, samples: usize) {
    check_in(name, make, x, samples, Mode::Train);
}

/// [`check`] in a given forward mode.
fn check_in(name: &str, make: &dyn Fn() -> Box<dyn Layer>, x: &Tensor, samples: usize, mode: Mode) {
    let mut r = rng::seeded(99);
    let mut layer = make();
    let y = layer.forward(x.clone(), mode).unwrap();
    let proj = random_tensor(y.shape(), &mut r);
    let dx = layer.backward(proj.clone()).unwrap();
    let eval = |x: &Tensor, perturbation: Option<(&str, usize, f32)>| {
        let mut l = make();
        if let Some((t, i, d)) = perturbation {
            perturb(l.as_mut(), t, i, d);
        }
        objective(&l.forward(x.clone(), mode).unwrap(), &proj)
    };
    let mut tally = Tally::default();
    if !dx.is_empty() {
        assert_eq!(dx.shape(), x.shape(), "{name}: input gradient shape");
        let stride = (x.len() / samples).max(1);
        for i in (0..x.len()).step_by(stride) {
            let num = numeric(|d| {
                let mut xp = x.clone();
                xp.as_slice_mut().unwrap()[i] += d as f32;
                eval(&xp, None)
            });
            let ana = f64::from(dx.as_slice().unwrap()[i]);
            tally.compare(&format!("{name}: d/dx[{i}]"), num, ana);
        }
    }
    for (pname, values, grad) in param_values(layer.as_ref()) {
        let stride = (values.len() / samples).max(1);
        for i in (0..values.len()).step_by(stride) {
            let num = numeric(|d| eval(x, Some((&pname, i, d as f32))));
            tally.compare(&format!("{name}: d/d{pname}[{i}]"), num, f64::from(grad[i]));
        }
    }
    tally.finish(name, 1);
}

#[test]
fn conv2d_gradients() {
    let mut r = rng::seeded(1);
    for (cin, cout, k, stride, pad, bias, h) in [
        (3, 4, 3, 1, 1, true, 5),
        (2, 3, 3, 2, 1, false, 7),
        (3, 5, 1, 1, 0, true, 4),
        (4, 2, 1, 2, 0, false, 6),
    ] {
        let x = random_tensor(&[2, h, h + 1, cin], &mut r);
        let make = move || -> Box<dyn Layer> {
            Box::new(Conv2d::new(cin, cout, k, stride, pad, bias, &mut rng::seeded(5)).unwrap())
        };
        check(&format!("conv k{k} s{stride} p{pad}"), &make, &x, 40);
    }
}

#[test]
fn linear_gradients() {
    let x = random_tensor(&[3, 7], &mut rng::seeded(2));
    let make = || -> Box<dyn Layer> { Box::new(Linear::new(7, 5, &mut rng::seeded(6)).unwrap()) };
    check("linear", &make, &x, 100);
}

/// Masks the layer's `weight` at `density` (a seeded random choice, at least one entry).
fn masked<L: Layer>(mut layer: L, density: f64, seed: u64) -> L {
    layer.visit_mut("", &mut |name, slot| {
        if let SlotMut::Param(p) = slot
            && name == "weight"
        {
            let n = p.len();
            let keep = ((density * n as f64).round() as usize).max(1);
            let mut idx: Vec<usize> = (0..n).collect();
            idx.shuffle(&mut rng::seeded(seed));
            idx.truncate(keep);
            p.set_mask(Some(Mask::from_indices(n, &idx).unwrap()))
                .unwrap();
        }
    });
    layer
}

/// Asserts that the active weights of `layer` got non-trivial gradients (so a check over them
/// is not vacuous) and that the pruned ones got exactly zero.
fn assert_sparse_weight_grad(layer: &dyn Layer) {
    layer.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot
            && name == "weight"
        {
            let m = p.mask().unwrap();
            let g = p.grad.as_slice().unwrap();
            assert!((0..g.len()).filter(|&i| !m.get(i)).all(|i| g[i] == 0.0));
            assert!(m.iter_active().any(|i| g[i].abs() > 1e-2));
        }
    });
}

/// The sparse kernels, through the layers (forced on, and checked to have run), against finite
/// differences. The forward pass of a sparse layer ignores pruned weights, so the numeric
/// derivative there is 0, as is the analytic one; every coordinate of the small weights is
/// checked.
#[test]
fn conv2d_gradients_with_sparse_masks() {
    let mut r = rng::seeded(21);
    for (cin, cout, k, stride, pad, bias, h, density) in [
        (3, 4, 3, 1, 1, true, 5, 0.3),
        (2, 3, 3, 2, 1, false, 7, 0.1),
        (3, 5, 1, 1, 0, true, 4, 0.5),
        (4, 2, 1, 2, 0, false, 6, 0.2),
        // Outputs as long as the inputs (the sparse passes write over their inputs).
        (4, 4, 3, 1, 1, false, 5, 0.3),
        (3, 3, 1, 1, 0, true, 4, 0.5),
    ] {
        let x = random_tensor(&[2, h, h + 1, cin], &mut r);
        let make_conv = move || {
            let conv = Conv2d::new(cin, cout, k, stride, pad, bias, &mut rng::seeded(5))
                .unwrap()
                .prunable()
                .with_sparse_mode(SparseMode::Always);
            masked(conv, density, 9)
        };
        let mut probe = make_conv();
        let y = probe.forward(x.clone(), Mode::Train).unwrap();
        assert!(
            probe.ran_sparse(),
            "conv k{k} s{stride}: sparse path not taken"
        );
        probe.backward(y).unwrap();
        assert_sparse_weight_grad(&probe);
        let make = move || -> Box<dyn Layer> { Box::new(make_conv()) };
        check(
            &format!("sparse conv k{k} s{stride} p{pad} d{density}"),
            &make,
            &x,
            1000,
        );
    }
}

#[test]
fn linear_gradients_with_sparse_masks() {
    for (fi, fo, rows, density) in [(7, 5, 3, 0.3), (40, 9, 5, 0.05), (13, 17, 2, 0.5)] {
        let x = random_tensor(&[rows, fi], &mut rng::seeded(22));
        let make_linear = move || {
            let l = Linear::new(fi, fo, &mut rng::seeded(6))
                .unwrap()
                .prunable()
                .with_sparse_mode(SparseMode::Always);
            masked(l, density, 10)
        };
        let mut probe = make_linear();
        let y = probe.forward(x.clone(), Mode::Train).unwrap();
        assert!(
            probe.ran_sparse(),
            "linear {fi}x{fo}: sparse path not taken"
        );
        probe.backward(y).unwrap();
        assert_sparse_weight_grad(&probe);
        let make = move || -> Box<dyn Layer> { Box::new(make_linear()) };
        check(
            &format!("sparse linear {fi}x{fo} d{density}"),
            &make,
            &x,
            1000,
        );
    }
}

#[test]
fn batchnorm_gradients_nhwc_and_features() {
    let mut r = rng::seeded(3);
    let make = || -> Box<dyn Layer> { Box::new(shaped_batchnorm(3)) };
    check(
        "batchnorm nhwc",
        &make,
        &random_tensor(&[2, 3, 3, 3], &mut r),
        60,
    );
    check(
        "batchnorm [n, c]",
        &make,
        &random_tensor(&[5, 3], &mut r),
        60,
    );
}

/// Frozen BatchNorm (SynFlow): the running statistics are constants, the layer a per-channel
/// affine map; its gradients against finite differences, with non-trivial running statistics.
#[test]
fn frozen_batchnorm_gradients() {
    let mut r = rng::seeded(13);
    let make = || -> Box<dyn Layer> { Box::new(shaped_batchnorm(3)) };
    let x = random_tensor(&[2, 3, 3, 3], &mut r);
    check_in("frozen batchnorm", &make, &x, 60, Mode::Frozen);
    // Frozen forward equals evaluation forward (up to rounding: (x − μ)·s·γ + β against
    // x·(γ·s) + (β − μ·γ·s)), and touches no running statistic.
    let mut a = make();
    let mut b = make();
    let before = state_of(a.as_ref());
    let ya = a.forward(x.clone(), Mode::Frozen).unwrap();
    let yb = b.forward(x, Mode::Eval).unwrap();
    for (p, q) in ya.iter().zip(yb.iter()) {
        assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "{p} vs {q}");
    }
    assert_eq!(state_of(a.as_ref()), before);
}

/// BatchNorm with a fused ReLU against finite differences (training and frozen), with γ, β that
/// leave part of every channel clamped.
#[test]
fn fused_batchnorm_relu_gradients() {
    let mut r = rng::seeded(14);
    let make = || -> Box<dyn Layer> { Box::new(shaped_batchnorm(3).with_relu("relu")) };
    let x = random_tensor(&[2, 3, 3, 3], &mut r);
    check("fused batchnorm+relu", &make, &x, 60);
    check_in("fused frozen batchnorm+relu", &make, &x, 60, Mode::Frozen);
    check(
        "fused batchnorm+relu [n, c]",
        &make,
        &random_tensor(&[6, 3], &mut r),
        60,
    );
}

/// The fused layer equals BatchNorm followed by ReLU in every mode: outputs, input gradients,
/// γ and β gradients and running statistics (required within 1e-6 relative; they are in fact
/// bit-identical, as the fused pass does the same operations in the same order).
#[test]
fn fused_batchnorm_relu_matches_batchnorm_then_relu() {
    let mut r = rng::seeded(15);
    let close = |a: &[f32], b: &[f32], what: &str| {
        assert_eq!(a.len(), b.len(), "{what}");
        for (p, q) in a.iter().zip(b) {
            assert!(
                (p - q).abs() <= 1e-6 * p.abs().max(q.abs()),
                "{what}: {p} vs {q}"
            );
        }
    };
    for shape in [vec![3, 4, 5, 4], vec![7, 4]] {
        for mode in [Mode::Train, Mode::Frozen, Mode::Eval, Mode::Calibrate] {
            let what = format!("{shape:?} {mode:?}");
            let mut fused = shaped_batchnorm(4).with_relu("relu");
            let mut bn = shaped_batchnorm(4);
            let mut relu = Relu::new();
            let x = random_tensor(&shape, &mut r);
            let yf = fused.forward(x.clone(), mode).unwrap();
            let y = relu.forward(bn.forward(x, mode).unwrap(), mode).unwrap();
            assert!(y.iter().any(|v| *v == 0.0) && y.iter().any(|v| *v > 0.0));
            close(yf.as_slice().unwrap(), y.as_slice().unwrap(), &what);
            if mode.caches() {
                let g = random_tensor(&shape, &mut r);
                let dxf = fused.backward(g.clone()).unwrap();
                let dx = bn.backward(relu.backward(g).unwrap()).unwrap();
                close(dxf.as_slice().unwrap(), dx.as_slice().unwrap(), &what);
                let (pf, p) = (param_values(&fused), param_values(&bn));
                for ((nf, _, gf), (_, _, g)) in pf.iter().zip(&p) {
                    close(gf, g, &format!("{what}: {nf}"));
                }
            }
            assert_eq!(state_of(&fused), state_of(&bn), "{what}: state");
        }
    }
}

/// Every value (parameters and buffers) of a layer, by name.
fn state_of(layer: &dyn Layer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    layer.visit("", &mut |name, slot| {
        let t = match slot {
            Slot::Param(p) => &p.value,
            Slot::Buffer(_, t) => t,
        };
        out.push((name.to_string(), t.iter().copied().collect()));
    });
    out
}

#[test]
fn relu_gradients() {
    let x = random_tensor(&[2, 3, 3, 2], &mut rng::seeded(4));
    check("relu", &|| Box::new(Relu::new()), &x, 100);
}

#[test]
fn maxpool_gradients() {
    let x = random_tensor(&[2, 4, 6, 3], &mut rng::seeded(5));
    check("maxpool 2/2", &|| Box::new(MaxPool2d::new(2, 2)), &x, 200);
    let x = random_tensor(&[1, 5, 5, 2], &mut rng::seeded(6));
    check("maxpool 3/2", &|| Box::new(MaxPool2d::new(3, 2)), &x, 200);
}

#[test]
fn global_avg_pool_gradients() {
    let x = random_tensor(&[2, 3, 4, 3], &mut rng::seeded(7));
    check("gap", &|| Box::new(GlobalAvgPool::new()), &x, 100);
}

#[test]
fn flatten_and_dropout_gradients() {
    let x = random_tensor(&[2, 3, 2, 2], &mut rng::seeded(8));
    check("flatten", &|| Box::new(Flatten::new()), &x, 100);
    let x = random_tensor(&[4, 6], &mut rng::seeded(9));
    check(
        "dropout",
        &|| Box::new(Dropout::new(0.5, rng::seeded(10)).unwrap()),
        &x,
        100,
    );
}

#[test]
fn residual_block_gradients_with_and_without_projection() {
    let x = random_tensor(&[2, 4, 4, 3], &mut rng::seeded(11));
    let make_proj = || -> Box<dyn Layer> {
        let r = &mut rng::seeded(12);
        let branch = Sequential::new()
            .with("conv1", Conv2d::new(3, 4, 3, 2, 1, false, r).unwrap())
            .with("bn1", BatchNorm2d::new(4))
            .with("relu1", Relu::new())
            .with("conv2", Conv2d::new(4, 4, 3, 1, 1, false, r).unwrap())
            .with("bn2", BatchNorm2d::new(4));
        let shortcut = Sequential::new()
            .with("conv", Conv2d::new(3, 4, 1, 2, 0, false, r).unwrap())
            .with("bn", BatchNorm2d::new(4));
        Box::new(Residual::new(branch, Some(shortcut)))
    };
    check("residual (projection)", &make_proj, &x, 25);
    let make_id = || -> Box<dyn Layer> {
        let r = &mut rng::seeded(13);
        let branch = Sequential::new()
            .with("conv1", Conv2d::new(3, 3, 3, 1, 1, false, r).unwrap())
            .with("bn1", BatchNorm2d::new(3));
        Box::new(Residual::new(branch, None))
    };
    check("residual (identity)", &make_id, &x, 25);
}

#[test]
fn softmax_cross_entropy_gradient() {
    let logits = random_tensor(&[4, 5], &mut rng::seeded(14));
    let labels = [0usize, 3, 4, 1];
    let out = softmax_cross_entropy(&logits, &labels).unwrap();
    let mean = |l: &Tensor| softmax_cross_entropy(l, &labels).unwrap().loss_sum / 4.0;
    for i in 0..logits.len() {
        let mut p = logits.clone();
        p.as_slice_mut().unwrap()[i] += EPS as f32;
        let mut m = logits.clone();
        m.as_slice_mut().unwrap()[i] -= EPS as f32;
        let num = (mean(&p) - mean(&m)) / (2.0 * EPS);
        let ana = f64::from(out.grad.as_slice().unwrap()[i]);
        assert!(
            close(num, ana),
            "d/dlogit[{i}] numeric {num} analytic {ana}"
        );
    }
    // The loss itself against the definition.
    let row = &logits.as_slice().unwrap()[0..5];
    let lse = row.iter().map(|v| f64::from(*v).exp()).sum::<f64>().ln();
    let first = lse - f64::from(row[0]);
    let single = softmax_cross_entropy(&from_vec(&[1, 5], row.to_vec()).unwrap(), &[0]).unwrap();
    assert!((single.loss_sum - first).abs() < 1e-6);
}

/// Whole models, end to end through the loss, on small inputs: every architecture's wiring.
///
/// Per tensor, a random direction `v` (non-zero on that tensor only) gives the directional
/// derivative `⟨∇L, v⟩`, compared with `(L(θ+εv) − L(θ−εv)) / 2ε`. A directional difference sums
/// over every coordinate of the tensor, so the few ReLU kinks it crosses perturb it by O(ε²)
/// relative to the whole, unlike a single-coordinate difference in a deep f32 network. Even so,
/// with a batch of 6 the loss is bumpy at ε ≥ 1e-3 (seen on the cnn's stem: 0.380, 0.400, 0.373
/// at ε = 1e-2, 3e-3, 1e-3, then 0.38773 at 1e-4 against an analytic 0.38774), so ε = 1e-4; see
/// `MODEL_REL_TOL`.
#[test]
fn model_gradients_end_to_end() {
    for (arch, input, width) in [
        (Arch::Cnn, [8, 8, 1], 0.25),
        (Arch::Resnet18, [8, 8, 2], 0.0625),
        (Arch::Vgg11, [8, 8, 1], 0.125),
    ] {
        let spec = ModelSpec::new(arch, input, 3, width).unwrap();
        let mut r = rng::seeded(15);
        let [h, w, c] = input;
        let x = random_tensor(&[6, h, w, c], &mut r);
        let labels = [0usize, 1, 2, 1, 0, 2];
        let mut model = Model::new(&spec, 16).unwrap();
        // Give residual branches non-zero final γ so every path carries gradient.
        model.for_each_param(&mut |_, p| {
            if p.role == fedtiny_common::param::Role::BnScale {
                p.value.fill(0.8);
            }
        });
        let init = model.state_dict();
        let y = model.forward(x.clone(), Mode::Train).unwrap();
        let out = softmax_cross_entropy(&y, &labels).unwrap();
        model.backward(out.grad).unwrap();
        let mut grads = Vec::new();
        model.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot {
                grads.push((
                    name.to_string(),
                    p.grad.iter().copied().collect::<Vec<f32>>(),
                ));
            }
        });
        for (name, g) in &grads {
            let v: Vec<f32> = (0..g.len()).map(|_| r.random_range(-1.0..1.0)).collect();
            let analytic: f64 = g
                .iter()
                .zip(&v)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            let loss = |d: f64| -> f64 {
                let mut m = Model::new(&spec, 16).unwrap();
                let mut s = init.clone();
                for (w, dv) in s.entries.get_mut(name).unwrap().values.iter_mut().zip(&v) {
                    *w += (d * f64::from(*dv)) as f32;
                }
                m.load_state_dict(&s).unwrap();
                let y = m.forward(x.clone(), Mode::Train).unwrap();
                softmax_cross_entropy(&y, &labels).unwrap().loss_sum / 6.0
            };
            let num = (loss(MODEL_EPS) - loss(-MODEL_EPS)) / (2.0 * MODEL_EPS);
            let ok = (num - analytic).abs()
                <= MODEL_REL_TOL * num.abs().max(analytic.abs()) + MODEL_ABS_TOL;
            assert!(ok, "{arch} ⟨∇{name}, v⟩: numeric {num} analytic {analytic}");
        }
        assert!(grads.len() > 5, "{arch}: only {} tensors", grads.len());
    }
}
