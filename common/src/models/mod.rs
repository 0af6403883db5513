//! Models: `cnn`, `vgg11` and `resnet18`, each for any input shape, class count and width.
//!
//! A [`Model`] owns its layers and exposes named state. Its prunable tensors are the conv and
//! linear weights except the stem (the first conv), as FedTiny specifies.

mod cnn;
mod resnet;
mod vgg;

use serde::{Deserialize, Serialize};

use crate::layers::{BatchNorm2d, Layer, OpInfo, Relu, Sequential, Slot, SlotMut};
use crate::mask::{Mask, MaskSet};
use crate::param::Param;
use crate::rng;
use crate::state::{StateDict, StateEntry};
use crate::tensor::{Mode, Tensor, from_vec};
use crate::{Error, Result};

/// The architectures fedtiny builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Two conv blocks and two linear layers (the small baseline model).
    Cnn,
    /// VGG-11 (configuration A) with BatchNorm and a global-average-pool classifier.
    Vgg11,
    /// CIFAR-style ResNet-18: 3×3 stem, no max-pool, [2, 2, 2, 2] basic blocks.
    Resnet18,
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cnn" => Ok(Arch::Cnn),
            "vgg11" => Ok(Arch::Vgg11),
            "resnet18" => Ok(Arch::Resnet18),
            other => Err(Error::InvalidConfig(format!(
                "unknown model `{other}` (expected cnn, vgg11 or resnet18)"
            ))),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Cnn => "cnn",
            Arch::Vgg11 => "vgg11",
            Arch::Resnet18 => "resnet18",
        })
    }
}

/// Everything needed to build a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture.
    pub arch: Arch,
    /// Input shape per sample, `[height, width, channels]`.
    pub input: [usize; 3],
    /// Number of classes.
    pub classes: usize,
    /// Width multiplier applied to every hidden channel count (1 = the reference width).
    pub width: f64,
}

impl ModelSpec {
    /// A spec, validated.
    pub fn new(arch: Arch, input: [usize; 3], classes: usize, width: f64) -> Result<Self> {
        let s = ModelSpec {
            arch,
            input,
            classes,
            width,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the ranges of every field.
    pub fn validate(&self) -> Result<()> {
        if !(self.width.is_finite() && self.width > 0.0 && self.width <= 16.0) {
            return Err(Error::InvalidConfig(format!(
                "model width {} must be in (0, 16]",
                self.width
            )));
        }
        if self.classes < 2 {
            return Err(Error::InvalidConfig(
                "a model needs at least 2 classes".into(),
            ));
        }
        let [h, w, c] = self.input;
        if h < 4 || w < 4 || c == 0 {
            return Err(Error::InvalidConfig(format!(
                "input {h}x{w}x{c} is too small (at least 4x4x1)"
            )));
        }
        Ok(())
    }

    /// A hidden channel count scaled by the width multiplier (at least 1).
    pub fn channels(&self, reference: usize) -> usize {
        ((reference as f64 * self.width).round() as usize).max(1)
    }
}

/// A model: its layers, built from a spec and a seed.
pub struct Model {
    spec: ModelSpec,
    net: Sequential,
}

impl Model {
    /// Builds the model with weights initialised from `seed`.
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Self> {
        Self::build(spec, seed, true)
    }

    /// Builds the model; with `fuse`, every BatchNorm directly followed by a ReLU applies that
    /// ReLU itself ([`BatchNorm2d::with_relu`]). Fused and unfused models have the same named
    /// tensors, operations and results.
    fn build(spec: &ModelSpec, seed: u64, fuse: bool) -> Result<Self> {
        spec.validate()?;
        let mut r = rng::derived(seed, "model-init", 0);
        let net = match spec.arch {
            Arch::Cnn => cnn::build(spec, &mut r, fuse)?,
            Arch::Vgg11 => vgg::build(spec, &mut r, fuse)?,
            Arch::Resnet18 => resnet::build(spec, &mut r, fuse)?,
        };
        let m = Model {
            spec: spec.clone(),
            net,
        };
        m.trace()?;
        Ok(m)
    }

    /// The spec it was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Runs the model on an NHWC batch and returns the logits `[n, classes]`.
    pub fn forward(&mut self, x: Tensor, mode: Mode) -> Result<Tensor> {
        let [h, w, c] = self.spec.input;
        if x.ndim() != 4 || x.shape()[1..] != [h, w, c] {
            return Err(Error::shape("model input", [0, h, w, c], x.shape()));
        }
        self.net.forward(x, mode)
    }

    /// Back-propagates the gradient of the loss with respect to the logits, writing every
    /// parameter's gradient.
    pub fn backward(&mut self, grad: Tensor) -> Result<()> {
        self.net.backward(grad).map(|_| ())
    }

    /// Visits every named tensor, read-only, in model order.
    pub fn visit(&self, f: &mut dyn FnMut(&str, Slot<'_>)) {
        self.net.visit("", f);
    }

    /// Visits every named tensor, mutably, in model order.
    pub fn visit_mut(&mut self, f: &mut dyn FnMut(&str, SlotMut<'_>)) {
        self.net.visit_mut("", f);
    }

    /// Visits every trainable parameter, mutably, in model order.
    pub fn for_each_param(&mut self, f: &mut dyn FnMut(&str, &mut Param)) {
        self.net.visit_mut("", &mut |name, slot| {
            if let SlotMut::Param(p) = slot {
                f(name, p);
            }
        });
    }

    /// Names of the prunable tensors, in model order.
    pub fn prunable_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && p.prunable
            {
                out.push(name.to_string());
            }
        });
        out
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        let mut n = 0;
        self.visit(&mut |_, slot| {
            if let Slot::Param(p) = slot {
                n += p.len();
            }
        });
        n
    }

    /// (active, total) over the prunable tensors.
    pub fn prunable_counts(&self) -> (usize, usize) {
        let (mut a, mut t) = (0, 0);
        self.visit(&mut |_, slot| {
            if let Slot::Param(p) = slot
                && p.prunable
            {
                a += p.active();
                t += p.len();
            }
        });
        (a, t)
    }

    /// Density over the prunable tensors (kept / total).
    pub fn density(&self) -> f64 {
        let (a, t) = self.prunable_counts();
        if t == 0 { 1.0 } else { a as f64 / t as f64 }
    }

    /// A copy of every named tensor (parameters and buffers).
    pub fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::default();
        self.visit(&mut |name, slot| {
            let (role, prunable, t) = match slot {
                Slot::Param(p) => (p.role, p.prunable, p.value_dense()),
                Slot::Buffer(role, t) => (role, false, std::borrow::Cow::Borrowed(t)),
            };
            sd.entries.insert(
                name.to_string(),
                StateEntry {
                    role,
                    prunable,
                    shape: t.shape().to_vec(),
                    values: t.iter().copied().collect(),
                },
            );
        });
        sd
    }

    /// Replaces every named tensor from `state`, which must hold exactly the model's tensors
    /// with the same shapes and only finite values. Nothing changes when it fails. Masks stay
    /// installed and are re-applied.
    pub fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        let mut names = Vec::new();
        let mut problem = None;
        self.visit(&mut |name, slot| {
            let shape = match slot {
                Slot::Param(p) => p.shape().to_vec(),
                Slot::Buffer(_, t) => t.shape().to_vec(),
            };
            names.push(name.to_string());
            match state.entries.get(name) {
                None => problem = problem.take().or(Some(format!("missing tensor `{name}`"))),
                Some(e)
                    if e.shape != shape || e.values.len() != shape.iter().product::<usize>() =>
                {
                    problem = problem.take().or(Some(format!(
                        "tensor `{name}` has shape {:?}, the model needs {shape:?}",
                        e.shape
                    )))
                }
                Some(e) if e.values.iter().any(|v| !v.is_finite()) => {
                    problem = problem
                        .take()
                        .or(Some(format!("tensor `{name}` has non-finite values")))
                }
                Some(_) => {}
            }
        });
        if let Some(p) = problem {
            return Err(Error::StateMismatch(p));
        }
        if state.entries.len() != names.len() {
            let extra: Vec<&String> = state
                .entries
                .keys()
                .filter(|k| !names.contains(k))
                .take(3)
                .collect();
            return Err(Error::StateMismatch(format!(
                "state has tensors the model does not: {extra:?}"
            )));
        }
        let mut err = None;
        self.visit_mut(&mut |name, slot| {
            let Some(e) = state.entries.get(name) else {
                return;
            };
            let r = match slot {
                SlotMut::Param(p) => {
                    from_vec(&e.shape, e.values.clone()).and_then(|t| p.set_value(t))
                }
                SlotMut::Buffer(_, t) => from_vec(&e.shape, e.values.clone()).map(|v| *t = v),
            };
            if let Err(e) = r {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// The masks currently installed, by tensor name (version 0; versions belong to callers).
    pub fn masks(&self) -> MaskSet {
        let mut set = MaskSet::default();
        self.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && let Some(m) = p.mask()
            {
                set.masks.insert(name.to_string(), m.clone());
            }
        });
        set
    }

    /// Installs `masks` on the prunable tensors (zeroing pruned weights); prunable tensors the
    /// set does not name become unmasked. Fails, changing nothing, if the set names a tensor that
    /// is not prunable or a mask has the wrong length.
    pub fn set_masks(&mut self, masks: &MaskSet) -> Result<()> {
        let mut lens = std::collections::BTreeMap::new();
        self.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && p.prunable
            {
                lens.insert(name.to_string(), p.len());
            }
        });
        for (name, m) in &masks.masks {
            match lens.get(name) {
                None => {
                    return Err(Error::StateMismatch(format!(
                        "mask for `{name}`, which is not a prunable tensor"
                    )));
                }
                Some(&n) if n != m.len() => {
                    return Err(Error::StateMismatch(format!(
                        "mask for `{name}` has {} elements, the tensor {n}",
                        m.len()
                    )));
                }
                Some(_) => {}
            }
        }
        let mut err = None;
        self.for_each_param(&mut |name, p| {
            if p.prunable
                && let Err(e) = p.set_mask(masks.masks.get(name).cloned())
            {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Installs a mask on one prunable tensor.
    pub fn set_mask(&mut self, name: &str, mask: Mask) -> Result<()> {
        let mut res = Err(Error::UnknownTensor(name.to_string()));
        let mut mask = Some(mask);
        self.for_each_param(&mut |n, p| {
            if n == name {
                res = if p.prunable {
                    p.set_mask(mask.take())
                } else {
                    Err(Error::StateMismatch(format!("`{name}` is not prunable")))
                };
            }
        });
        res
    }

    /// Chooses how masked prunable weights are stored (see [`crate::param`]): with `lean`, a
    /// masked weight whose layer runs its sparse kernels holds only its active values, gradients
    /// and (in the optimizer) moments; otherwise every weight is held dense, masked by zeroing
    /// (the default). Training computes the same values either way. Conversions are exact and
    /// happen now for weights already masked, else when masks are installed.
    pub fn set_lean_storage(&mut self, lean: bool) -> Result<()> {
        let mut err = None;
        self.for_each_param(&mut |_, p| {
            if p.prunable
                && let Err(e) = p.set_lean_allowed(lean)
            {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Names of the parameters currently held lean (active values only), in model order.
    pub fn lean_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && p.is_lean()
            {
                out.push(name.to_string());
            }
        });
        out
    }

    /// Traces the model for one sample: per-operation shapes and dense multiply-adds.
    pub fn trace(&self) -> Result<Vec<OpInfo>> {
        let mut ops = Vec::new();
        let out = self.net.trace("", &self.spec.input, &mut ops)?;
        if out != [self.spec.classes] {
            return Err(Error::shape("model output", [self.spec.classes], out));
        }
        Ok(ops)
    }

    /// Drops cached activations and scratch buffers.
    pub fn clear_cache(&mut self) {
        self.net.clear_cache();
    }
}

/// Appends BatchNorm `bn` over `channels` followed by ReLU `relu`: one fused layer with `fuse`,
/// the two layers otherwise. Either way the named tensors are `bn`'s.
fn push_bn_relu(net: &mut Sequential, bn: &str, relu: &str, channels: usize, fuse: bool) {
    if fuse {
        net.push(bn, BatchNorm2d::new(channels).with_relu(relu));
    } else {
        net.push(bn, BatchNorm2d::new(channels));
        net.push(relu, Relu::new());
    }
}

#[cfg(test)]
mod tests;
