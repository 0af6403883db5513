//! Fused BatchNorm + ReLU against the two layers in sequence, on whole models: same named
//! tensors in the same order, same operations, bit-identical training, evaluation and frozen
//! passes (dense and sparse kernels).

use super::*;
use crate::loss::softmax_cross_entropy;
use crate::optim::OptimizerConfig;
use crate::rng::{self, Rng};
use rand::RngExt;

fn images(n: usize, input: [usize; 3], r: &mut Rng) -> Tensor {
    let [h, w, c] = input;
    let v = (0..n * h * w * c)
        .map(|_| r.random_range(-1.0f32..1.0))
        .collect();
    from_vec(&[n, h, w, c], v).unwrap()
}

/// Every named tensor's values and (for parameters) gradient, as bits, in model order.
fn state_bits(m: &Model) -> Vec<(String, Vec<u32>, Vec<u32>)> {
    let mut out = Vec::new();
    m.visit(&mut |name, slot| {
        let (v, g) = match slot {
            Slot::Param(p) => (
                p.value.iter().map(|x| x.to_bits()).collect(),
                p.grad.iter().map(|x| x.to_bits()).collect(),
            ),
            Slot::Buffer(_, t) => (t.iter().map(|x| x.to_bits()).collect(), Vec::new()),
        };
        out.push((name.to_string(), v, g));
    });
    out
}

fn tensor_bits(t: &Tensor) -> Vec<u32> {
    t.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn fused_models_match_unfused_bit_for_bit() {
    let cases = [
        (Arch::Cnn, [8, 8, 1], 0.25),
        (Arch::Vgg11, [8, 8, 2], 0.125),
        (Arch::Resnet18, [8, 8, 1], 0.125),
    ];
    for (arch, input, width) in cases {
        for density in [None, Some(0.05)] {
            let spec = ModelSpec::new(arch, input, 3, width).unwrap();
            let mut fused = Model::new(&spec, 7).unwrap();
            let mut plain = Model::build(&spec, 7, false).unwrap();
            let what = format!("{arch} density {density:?}");
            if let Some(d) = density {
                let masks = crate::pruning::random_masks(&fused, d, &mut rng::seeded(3)).unwrap();
                fused.set_masks(&masks).unwrap();
                plain.set_masks(&masks).unwrap();
            }
            // Same named tensors (order, roles, values) and the same operations.
            let mut names = (Vec::new(), Vec::new());
            fused.visit(&mut |n, _| names.0.push(n.to_string()));
            plain.visit(&mut |n, _| names.1.push(n.to_string()));
            assert_eq!(names.0, names.1, "{what}: names");
            assert_eq!(fused.state_dict(), plain.state_dict(), "{what}");
            // The same operations; only the fused ReLUs cache nothing.
            let (tf, tp) = (fused.trace().unwrap(), plain.trace().unwrap());
            let shape = |t: &[crate::layers::OpInfo]| {
                t.iter()
                    .map(|o| {
                        let mut o = o.clone();
                        if o.kind == crate::layers::OpKind::Relu {
                            o.cached_elems = 0;
                        }
                        format!("{o:?}")
                    })
                    .collect::<Vec<_>>()
            };
            assert_eq!(shape(&tf), shape(&tp), "{what}: trace");
            let cached =
                |t: &[crate::layers::OpInfo]| t.iter().map(|o| o.cached_elems).sum::<usize>();
            assert!(
                cached(&tf) < cached(&tp),
                "{what}: the fused ReLUs cache nothing"
            );
            let opt = OptimizerConfig::Sgd {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 0.0,
                nesterov: false,
            };
            let (mut of, mut op) = (opt.build().unwrap(), opt.build().unwrap());
            let mut r = rng::seeded(11);
            for step in 0..3 {
                // A different batch size at the last step exercises resized buffers.
                let n = if step == 2 { 3 } else { 4 };
                let x = images(n, input, &mut r);
                let labels: Vec<usize> = (0..n).map(|i| (i + step) % 3).collect();
                let yf = fused.forward(x.clone(), Mode::Train).unwrap();
                let yp = plain.forward(x, Mode::Train).unwrap();
                assert_eq!(tensor_bits(&yf), tensor_bits(&yp), "{what}: step {step}");
                let lf = softmax_cross_entropy(&yf, &labels).unwrap();
                let lp = softmax_cross_entropy(&yp, &labels).unwrap();
                fused.backward(lf.grad).unwrap();
                plain.backward(lp.grad).unwrap();
                assert_eq!(
                    state_bits(&fused),
                    state_bits(&plain),
                    "{what}: step {step}"
                );
                of.step(&mut fused).unwrap();
                op.step(&mut plain).unwrap();
            }
            let x = images(5, input, &mut r);
            for mode in [Mode::Eval, Mode::Calibrate] {
                let yf = fused.forward(x.clone(), mode).unwrap();
                let yp = plain.forward(x.clone(), mode).unwrap();
                assert_eq!(tensor_bits(&yf), tensor_bits(&yp), "{what}: {mode:?}");
            }
            let yf = fused.forward(x.clone(), Mode::Frozen).unwrap();
            let yp = plain.forward(x, Mode::Frozen).unwrap();
            assert_eq!(tensor_bits(&yf), tensor_bits(&yp), "{what}: frozen");
            fused.backward(yf).unwrap();
            plain.backward(yp).unwrap();
            assert_eq!(state_bits(&fused), state_bits(&plain), "{what}: frozen");
        }
    }
}
