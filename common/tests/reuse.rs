//! Buffers reused across training steps: a layer's second step (with the buffers of its first)
//! equals the same step on a fresh layer bit for bit, also when the batch shape changes; where
//! the layer API shows it, the reuse itself is checked (the output written into the previous
//! step's output-gradient buffer, BatchNorm in place). The first step's output gradient is all
//! NaN, so any value left over in a reused buffer would show in the second step.
//!
//! And on whole models: two consecutive training steps equal the first step followed by the
//! second on a freshly built model holding the same state.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_common::kernels::sparse::policy::SparseMode;
use fedtiny_common::layers::*;
use fedtiny_common::loss::softmax_cross_entropy;
use fedtiny_common::mask::Mask;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::pruning::random_masks;
use fedtiny_common::rng::{self, Rng};
use fedtiny_common::tensor::{Mode, Tensor};
use rand::RngExt;
use support::{random_tensor, shaped_batchnorm};

fn nan(shape: &[usize]) -> Tensor {
    Tensor::from_elem(ndarray::IxDyn(shape), f32::NAN)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.iter().map(|v| v.to_bits()).collect()
}

fn grad_bits(layer: &dyn Layer) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    layer.visit("", &mut |name, slot| {
        if let Slot::Param(p) = slot {
            out.push((
                name.to_string(),
                p.grad.iter().map(|v| v.to_bits()).collect(),
            ));
        }
    });
    out
}

/// Runs a step with a NaN output gradient on `make()`, then steps on `inputs` (each with a
/// random output gradient); after each, the output, input gradient and parameter gradients
/// must equal one step on a fresh layer. Returns whether each later step's output was written
/// into the buffer of the previous step's output gradient.
fn check_reuse(
    name: &str,
    make: &dyn Fn() -> Box<dyn Layer>,
    first: &Tensor,
    inputs: &[Tensor],
    mode: Mode,
) -> Vec<bool> {
    let mut r = rng::seeded(5);
    let mut layer = make();
    let y = layer.forward(first.clone(), mode).unwrap();
    let g = nan(y.shape());
    let mut last_grad = g.as_ptr();
    layer.backward(g).unwrap();
    let mut reused = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        let y = layer.forward(x.clone(), mode).unwrap();
        reused.push(y.as_ptr() == last_grad);
        let g = random_tensor(y.shape(), &mut r);
        last_grad = g.as_ptr();
        let dx = layer.backward(g.clone()).unwrap();
        let mut fresh = make();
        let fy = fresh.forward(x.clone(), mode).unwrap();
        let fdx = fresh.backward(g).unwrap();
        assert_eq!(bits(&y), bits(&fy), "{name}: output of step {}", i + 2);
        assert_eq!(
            bits(&dx),
            bits(&fdx),
            "{name}: input gradient of step {}",
            i + 2
        );
        assert_eq!(
            grad_bits(layer.as_ref()),
            grad_bits(fresh.as_ref()),
            "{name}: parameter gradients of step {}",
            i + 2
        );
    }
    reused
}

/// Masks the layer's weight at `density` (seeded, at least one entry).
fn masked<L: Layer>(mut layer: L, density: f64) -> L {
    layer.visit_mut("", &mut |name, slot| {
        if let SlotMut::Param(p) = slot
            && name == "weight"
        {
            let mut r = rng::seeded(9);
            let mut m = Mask::from_fn(p.len(), |_| r.random_bool(density));
            if m.active() == 0 {
                m = Mask::from_fn(p.len(), |i| i == 0);
            }
            p.set_mask(Some(m)).unwrap();
        }
    });
    layer
}

#[test]
fn conv_steps_equal_fresh_layers() {
    let mut r = rng::seeded(1);
    for (cin, cout, k, stride, pad, bias, sparse) in [
        (3, 4, 3, 1, 1, false, None),
        (3, 4, 3, 2, 1, true, None),
        (3, 5, 1, 2, 0, false, None),
        (3, 4, 3, 1, 1, true, Some(0.2)),
        (4, 3, 3, 2, 1, false, Some(0.1)),
        (3, 5, 1, 1, 0, false, Some(0.3)),
    ] {
        let name = format!("conv {cin}->{cout} k{k} s{stride} sparse {sparse:?}");
        let make = move || -> Box<dyn Layer> {
            let conv = Conv2d::new(cin, cout, k, stride, pad, bias, &mut rng::seeded(3))
                .unwrap()
                .prunable();
            Box::new(match sparse {
                Some(d) => masked(conv.with_sparse_mode(SparseMode::Always), d),
                None => conv.with_sparse_mode(SparseMode::Never),
            })
        };
        let first = random_tensor(&[2, 6, 5, cin], &mut r);
        let same = random_tensor(&[2, 6, 5, cin], &mut r);
        let other = random_tensor(&[3, 5, 5, cin], &mut r);
        // Conv allocates its output each step (see `Conv2d`); its kept scratch must still
        // leave every step equal to a fresh layer's.
        check_reuse(&name, &make, &first, &[same, other.clone()], Mode::Train);
        // The stem computes no input gradient.
        let make_stem = move || -> Box<dyn Layer> {
            Box::new(
                Conv2d::new(cin, cout, k, stride, pad, bias, &mut rng::seeded(3))
                    .unwrap()
                    .without_input_grad(),
            )
        };
        check_reuse(&name, &make_stem, &first, &[other], Mode::Train);
    }
}

fn batchnorm(c: usize, relu: bool) -> BatchNorm2d {
    let bn = shaped_batchnorm(c);
    if relu { bn.with_relu("relu") } else { bn }
}

#[test]
fn batchnorm_works_in_place_and_steps_equal_fresh_layers() {
    let mut r = rng::seeded(2);
    for relu in [false, true] {
        for mode in [Mode::Train, Mode::Frozen] {
            let name = format!("batchnorm relu {relu} {mode:?}");
            let make = move || -> Box<dyn Layer> { Box::new(batchnorm(3, relu)) };
            let first = random_tensor(&[2, 4, 4, 3], &mut r);
            let inputs = [
                random_tensor(&[2, 4, 4, 3], &mut r),
                random_tensor(&[3, 2, 5, 3], &mut r),
            ];
            check_reuse(&name, &make, &first, &inputs, mode);
            // The output is the input's buffer, the input gradient the output gradient's.
            let mut bn = make();
            let x = random_tensor(&[2, 4, 4, 3], &mut r);
            let p = x.as_ptr();
            let y = bn.forward(x, mode).unwrap();
            assert_eq!(y.as_ptr(), p, "{name}: forward in place");
            let g = random_tensor(y.shape(), &mut r);
            let p = g.as_ptr();
            assert_eq!(
                bn.backward(g).unwrap().as_ptr(),
                p,
                "{name}: backward in place"
            );
        }
    }
}

#[test]
fn maxpool_reuses_its_output_buffer_and_steps_equal_fresh_layers() {
    let mut r = rng::seeded(4);
    for (k, stride) in [(2, 2), (3, 2)] {
        let name = format!("maxpool {k}/{stride}");
        let make = move || -> Box<dyn Layer> { Box::new(MaxPool2d::new(k, stride)) };
        let first = random_tensor(&[2, 6, 7, 3], &mut r);
        let inputs = [
            random_tensor(&[2, 6, 7, 3], &mut r),
            random_tensor(&[3, 5, 5, 3], &mut r),
        ];
        let reused = check_reuse(&name, &make, &first, &inputs, Mode::Train);
        assert_eq!(reused, [true, false], "{name}: output buffer reuse");
    }
}

#[test]
fn residual_steps_equal_fresh_blocks() {
    let mut r = rng::seeded(8);
    for projection in [false, true] {
        let name = format!("residual projection {projection}");
        let make = move || -> Box<dyn Layer> {
            let r = &mut rng::seeded(12);
            let (stride, cout) = if projection { (2, 4) } else { (1, 3) };
            let branch = Sequential::new()
                .with(
                    "conv1",
                    Conv2d::new(3, cout, 3, stride, 1, false, r).unwrap(),
                )
                .with("bn1", BatchNorm2d::new(cout).with_relu("relu1"))
                .with("conv2", Conv2d::new(cout, cout, 3, 1, 1, false, r).unwrap())
                .with("bn2", BatchNorm2d::new(cout));
            let shortcut = projection.then(|| {
                Sequential::new()
                    .with(
                        "conv",
                        Conv2d::new(3, cout, 1, stride, 0, false, r).unwrap(),
                    )
                    .with("bn", BatchNorm2d::new(cout))
            });
            Box::new(Residual::new(branch, shortcut))
        };
        let first = random_tensor(&[2, 4, 4, 3], &mut r);
        let inputs = [
            random_tensor(&[2, 4, 4, 3], &mut r),
            random_tensor(&[3, 6, 6, 3], &mut r),
        ];
        check_reuse(&name, &make, &first, &inputs, Mode::Train);
        // An evaluation pass between training steps changes nothing.
        let mut block = make();
        let mut fresh = make();
        let x = random_tensor(&[2, 4, 4, 3], &mut r);
        block.forward(x.clone(), Mode::Eval).unwrap();
        let y = block.forward(x.clone(), Mode::Train).unwrap();
        assert_eq!(
            bits(&y),
            bits(&fresh.forward(x, Mode::Train).unwrap()),
            "{name}"
        );
        let g = random_tensor(y.shape(), &mut r);
        let dx = block.backward(g.clone()).unwrap();
        assert_eq!(bits(&dx), bits(&fresh.backward(g).unwrap()), "{name}");
    }
}

fn images(n: usize, input: [usize; 3], r: &mut Rng) -> Tensor {
    let [h, w, c] = input;
    random_tensor(&[n, h, w, c], r)
}

fn state_bits(m: &Model) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    m.visit(&mut |name, slot| {
        let t = match slot {
            Slot::Param(p) => &p.value,
            Slot::Buffer(_, t) => t,
        };
        out.push((name.to_string(), t.iter().map(|v| v.to_bits()).collect()));
    });
    out
}

/// One SGD step (no momentum: the optimizer holds no state) on a batch; returns the logits.
fn step(m: &mut Model, x: Tensor, labels: &[usize]) -> Tensor {
    let opt = OptimizerConfig::Sgd {
        lr: 0.05,
        momentum: 0.0,
        weight_decay: 0.0,
        nesterov: false,
    };
    let y = m.forward(x, Mode::Train).unwrap();
    let out = softmax_cross_entropy(&y, labels).unwrap();
    m.backward(out.grad).unwrap();
    opt.build().unwrap().step(m).unwrap();
    y
}

#[test]
fn consecutive_model_steps_equal_steps_on_fresh_models() {
    for (arch, input, width, density) in [
        (Arch::Cnn, [8, 8, 1], 0.25, None),
        (Arch::Vgg11, [8, 8, 1], 0.125, Some(0.1)),
        (Arch::Resnet18, [8, 8, 1], 0.125, None),
        (Arch::Resnet18, [8, 8, 1], 0.125, Some(0.05)),
    ] {
        let what = format!("{arch} density {density:?}");
        let spec = ModelSpec::new(arch, input, 3, width).unwrap();
        let mut a = Model::new(&spec, 5).unwrap();
        let masks = density.map(|d| random_masks(&a, d, &mut rng::seeded(6)).unwrap());
        if let Some(m) = &masks {
            a.set_masks(m).unwrap();
        }
        let mut r = rng::seeded(7);
        let batches: Vec<(Tensor, Vec<usize>)> = [4, 4, 3]
            .into_iter()
            .enumerate()
            .map(|(s, n)| {
                (
                    images(n, input, &mut r),
                    (0..n).map(|i| (i + s) % 3).collect(),
                )
            })
            .collect();
        for (i, (x, labels)) in batches.iter().enumerate() {
            let before = a.state_dict();
            let y = step(&mut a, x.clone(), labels);
            if i == 0 {
                continue;
            }
            let mut fresh = Model::new(&spec, 99).unwrap();
            fresh.load_state_dict(&before).unwrap();
            if let Some(m) = &masks {
                fresh.set_masks(m).unwrap();
            }
            let fy = step(&mut fresh, x.clone(), labels);
            assert_eq!(bits(&y), bits(&fy), "{what}: logits of step {}", i + 1);
            assert_eq!(
                state_bits(&a),
                state_bits(&fresh),
                "{what}: state after step {}",
                i + 1
            );
        }
    }
}
