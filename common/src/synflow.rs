//! SynFlow masks (Tanaka et al., 2020): data-free pruning by synaptic flow.
//!
//! Each iteration takes the model with every parameter and BatchNorm statistic replaced by its
//! absolute value (the "linearised" network), masked by the previous iteration's masks, feeds it
//! one all-ones input, and scores each prunable weight by `|w ⊙ ∂R/∂w|` with `R = Σ outputs`.
//! Then each prunable tensor keeps its highest-scoring entries at density `d^(i/iterations)`.
//!
//! Decisions:
//! - BatchNorm is differentiated as the affine map of its running statistics
//!   ([`Mode::Frozen`]), as the evaluation-mode network of the reference code; dropout is off.
//! - Layer-wise scope (each tensor keeps `max(⌊d_i·n⌋, 1)` entries), like every fixed-mask rule
//!   here; ties go to the lower index.
//! - Scores are only compared within a tensor, so a global scale of R does not matter; if R or a
//!   score overflows `f32` (very deep networks), the rule fails with an error instead of ranking
//!   infinities.

use crate::mask::MaskSet;
use crate::models::Model;
use crate::pruning::{check_density, masks_from_scores};
use crate::tensor::{Mode, Tensor};
use crate::{Error, Result};

/// SynFlow masks of `model` at `density`, pruned from dense in `iterations` steps.
pub fn synflow_masks(model: &Model, density: f64, iterations: u32) -> Result<MaskSet> {
    check_density(density)?;
    let iterations = iterations.max(1);
    let mut state = model.state_dict();
    for e in state.entries.values_mut() {
        for v in &mut e.values {
            *v = v.abs();
        }
    }
    let spec = model.spec().clone();
    let [h, w, c] = spec.input;
    let mut masks = MaskSet::default();
    for i in 1..=iterations {
        let d_i = density.powf(f64::from(i) / f64::from(iterations));
        let mut net = Model::new(&spec, 0)?;
        net.load_state_dict(&state)?;
        net.set_masks(&masks)?;
        let out = net.forward(Tensor::ones(ndarray::IxDyn(&[1, h, w, c])), Mode::Frozen)?;
        if !out.iter().all(|v| v.is_finite()) {
            return Err(Error::NonFinite(
                "SynFlow: the linearised network's output overflowed".into(),
            ));
        }
        net.backward(Tensor::ones(out.raw_dim()))?;
        let next = masks_from_scores(&net, d_i, &mut |name, p| {
            let score: Vec<f32> = p
                .value_dense()
                .iter()
                .zip(p.grad_dense().iter())
                .map(|(w, g)| (w * g).abs())
                .collect();
            if score.iter().any(|s| !s.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "SynFlow scores of `{name}` overflowed"
                )));
            }
            Ok(Some(score))
        })?;
        masks = next;
    }
    Ok(masks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{Slot, SlotMut};
    use crate::models::{Arch, ModelSpec};
    use crate::pruning::uniform_budget;

    fn cnn() -> Model {
        let spec = ModelSpec::new(Arch::Cnn, [8, 8, 1], 3, 0.25).unwrap();
        Model::new(&spec, 7).unwrap()
    }

    #[test]
    fn keeps_the_layerwise_budget_and_is_deterministic() {
        let model = cnn();
        let a = synflow_masks(&model, 0.1, 5).unwrap();
        let b = synflow_masks(&model, 0.1, 5).unwrap();
        assert_eq!(a, b);
        let mut sizes = Vec::new();
        model.visit(&mut |name, slot| {
            if let Slot::Param(p) = slot
                && p.prunable
            {
                sizes.push((name.to_string(), p.len()));
            }
        });
        assert!(!sizes.is_empty());
        for (name, n) in sizes {
            assert_eq!(a.masks[&name].active(), uniform_budget(n, 0.1), "{name}");
        }
    }

    /// On a hand-made two-layer linear path the synaptic flow through an input weight is its
    /// magnitude times the total magnitude leaving its output unit, so the scores (and the kept
    /// weights) are known in closed form.
    #[test]
    fn scores_follow_the_synaptic_flow_of_a_hand_made_network() {
        let mut model = cnn();
        // Zero every prunable weight but a few chosen ones in fc1 and fc2, so the flow is known.
        let mut fc1_len = 0;
        model.visit_mut(&mut |name, slot| {
            if let SlotMut::Param(p) = slot
                && p.prunable
            {
                p.value.fill(0.0);
                if name == "fc1.weight" {
                    fc1_len = p.len();
                }
            }
        });
        assert!(fc1_len > 0);
        // Without conv2 weights, fc1's input is the (positive) constant output of the BN/ReLU
        // after conv2 with zero weights: β of bn2 (abs) → identical for every input position.
        // Give every fc1 weight a distinct magnitude: the score |w·∂R/∂w| = |w|·x·(flow out of
        // its unit), with x equal across inputs; fc2 sets each unit's outgoing flow.
        let mut fc1_shape = Vec::new();
        model.visit_mut(&mut |name, slot| {
            if let SlotMut::Param(p) = slot {
                match name {
                    "fc1.weight" => {
                        fc1_shape = p.value.shape().to_vec();
                        for (i, v) in p.value.iter_mut().enumerate() {
                            *v = 1.0 + (i % 7) as f32;
                        }
                    }
                    "fc2.weight" => p.value.fill(1.0),
                    "bn2.bias" => p.value.fill(0.5),
                    _ => {}
                }
            }
        });
        let masks = synflow_masks(&model, 0.5, 1).unwrap();
        let m = &masks.masks["fc1.weight"];
        // Every kept fc1 weight has a magnitude at least that of every pruned one.
        let mut kept_min = f32::MAX;
        let mut pruned_max = 0.0f32;
        for i in 0..fc1_len {
            let w = 1.0 + (i % 7) as f32;
            if m.get(i) {
                kept_min = kept_min.min(w);
            } else {
                pruned_max = pruned_max.max(w);
            }
        }
        assert!(
            kept_min >= pruned_max,
            "kept {kept_min} pruned {pruned_max}"
        );
        assert_eq!(fc1_shape.len(), 2);
    }
}
