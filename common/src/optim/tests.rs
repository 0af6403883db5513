//! Optimizer tests: the update rules against scalar references, and the mask invariant.

use super::*;
use crate::layers::Slot;
use crate::loss::softmax_cross_entropy;
use crate::mask::{Mask, MaskSet};
use crate::models::{Arch, Model, ModelSpec};
use crate::param::Role;
use crate::rng;
use crate::tensor::{Mode, from_vec};
use rand::RngExt;

fn small_model() -> Model {
    Model::new(&ModelSpec::new(Arch::Cnn, [8, 8, 1], 3, 0.25).unwrap(), 1).unwrap()
}

fn configs() -> Vec<OptimizerConfig> {
    vec![
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 1e-3,
            nesterov: false,
        },
        OptimizerConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-3,
            nesterov: false,
        },
        OptimizerConfig::Sgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-3,
            nesterov: true,
        },
        OptimizerConfig::Adam {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            amsgrad: false,
        },
        OptimizerConfig::default(),
    ]
}

/// Writes a fixed pseudo-random gradient into every parameter (no forward pass needed).
fn set_grads(model: &mut Model, seed: u64) {
    let mut r = rng::seeded(seed);
    model.for_each_param(&mut |_, p| {
        for g in p.grad.iter_mut() {
            *g = r.random_range(-1.0..1.0);
        }
    });
}

/// The update rules, one scalar at a time, in f64.
fn reference_step(cfg: &OptimizerConfig, w: f64, g: f64, s: &mut [f64; 3], t: i32) -> f64 {
    match *cfg {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } => {
            let (lr, mu, wd) = (f64::from(lr), f64::from(momentum), f64::from(weight_decay));
            let d = g + wd * w;
            if mu == 0.0 {
                return w - lr * d;
            }
            s[0] = mu * s[0] + d;
            w - lr * if nesterov { d + mu * s[0] } else { s[0] }
        }
        OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
        } => {
            let (lr, b1, b2, eps, wd) = (
                f64::from(lr),
                f64::from(beta1),
                f64::from(beta2),
                f64::from(eps),
                f64::from(weight_decay),
            );
            let g = g + wd * w;
            s[0] = b1 * s[0] + (1.0 - b1) * g;
            s[1] = b2 * s[1] + (1.0 - b2) * g * g;
            s[2] = s[2].max(s[1]);
            let v = if amsgrad { s[2] } else { s[1] };
            let bc1 = 1.0 - b1.powi(t);
            let bc2 = 1.0 - b2.powi(t);
            w - lr / bc1 * s[0] / (v.sqrt() / bc2.sqrt() + eps)
        }
    }
}

#[test]
fn updates_match_scalar_reference() {
    for cfg in configs() {
        let mut model = small_model();
        let mut opt = cfg.build().unwrap();
        let name = "fc1.weight";
        let get = |m: &Model| {
            let mut v = Vec::new();
            m.visit(&mut |n, s| {
                if let Slot::Param(p) = s
                    && n == name
                {
                    v = p.value.iter().map(|x| f64::from(*x)).collect();
                }
            });
            v
        };
        let mut w = get(&model);
        let mut state = vec![[0.0f64; 3]; w.len()];
        for t in 1..=4 {
            set_grads(&mut model, t as u64);
            let mut g = Vec::new();
            model.visit(&mut |n, s| {
                if let Slot::Param(p) = s
                    && n == name
                {
                    g = p.grad.iter().map(|x| f64::from(*x)).collect();
                }
            });
            opt.step(&mut model).unwrap();
            for i in 0..w.len() {
                w[i] = reference_step(&cfg, w[i], g[i], &mut state[i], t);
            }
            let got = get(&model);
            for (a, b) in got.iter().zip(&w) {
                assert!(
                    (a - b).abs() < 1e-5 * (1.0 + b.abs()),
                    "{cfg:?} step {t}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn pruned_weights_stay_exactly_zero_after_many_masked_steps() {
    let spec = ModelSpec::new(Arch::Cnn, [8, 8, 1], 3, 0.25).unwrap();
    for cfg in configs() {
        let mut model = Model::new(&spec, 2).unwrap();
        // Random masks at density ~0.3 on every prunable tensor.
        let mut r = rng::seeded(3);
        let mut set = MaskSet::default();
        model.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && p.prunable
            {
                let m = Mask::from_fn(p.len(), |_| r.random::<f32>() < 0.3);
                set.masks.insert(name.to_string(), m);
            }
        });
        model.set_masks(&set).unwrap();
        let mut opt = cfg.build().unwrap();
        let x = from_vec(
            &[6, 8, 8, 1],
            (0..6 * 64)
                .map(|i| ((i * 7919) % 97) as f32 / 50.0 - 1.0)
                .collect(),
        )
        .unwrap();
        let labels = [0, 1, 2, 0, 1, 2];
        for _ in 0..60 {
            let y = model.forward(x.clone(), Mode::Train).unwrap();
            let out = softmax_cross_entropy(&y, &labels).unwrap();
            model.backward(out.grad).unwrap();
            opt.step(&mut model).unwrap();
        }
        let mut checked = 0;
        model.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && let Some(m) = set.masks.get(name)
            {
                for (i, v) in p.value.iter().enumerate() {
                    if !m.get(i) {
                        assert_eq!(v.to_bits(), 0.0f32.to_bits(), "{cfg:?}: {name}[{i}] = {v}");
                        checked += 1;
                    }
                }
                // And the active weights did move.
                assert!(p.value.iter().any(|v| *v != 0.0));
            }
        });
        assert!(checked > 100);
    }
}

#[test]
fn invalid_configs_are_refused() {
    for bad in [
        OptimizerConfig::Sgd {
            lr: 0.0,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 1.0,
            weight_decay: 0.0,
            nesterov: false,
        },
        OptimizerConfig::Sgd {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        },
        OptimizerConfig::Adam {
            lr: f32::NAN,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        },
        OptimizerConfig::Adam {
            lr: 1e-3,
            beta1: 1.0,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
        },
    ] {
        assert!(bad.build().is_err(), "{bad:?}");
    }
}

#[test]
fn buffers_are_not_touched_by_the_optimizer() {
    let mut model = small_model();
    let before = model.state_dict();
    set_grads(&mut model, 9);
    OptimizerConfig::default()
        .build()
        .unwrap()
        .step(&mut model)
        .unwrap();
    let after = model.state_dict();
    for (name, e) in &before.entries {
        if matches!(e.role, Role::RunningMean | Role::RunningVar) {
            assert_eq!(e, &after.entries[name]);
        }
    }
}
