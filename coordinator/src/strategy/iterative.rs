//! Iterative magnitude pruning of the global model (LotteryFL-like baseline): training starts
//! dense (from the stage-0 weights) and every ΔT rounds until T_end the global model is pruned by
//! magnitude, layer-wise, to density `1 − (1 − d)·t / T_end`, reaching `d` at T_end.

use fedtiny_common::pruning::magnitude_masks;
use fedtiny_common::task::{ClientId, LocalTraining, Task, TrainResult};

use super::Strategy;
use crate::error::Result;
use crate::global::GlobalModel;
use crate::proxy::Failure;
use crate::stage0::{ServerSet, pre_train};

/// The iterative-magnitude baseline.
pub struct IterativeMagnitude {
    seed: u64,
    density: f64,
    every: u64,
    t_end: u64,
    training: LocalTraining,
    server: Option<(ServerSet, usize)>,
}

impl IterativeMagnitude {
    /// Prunes every `every` rounds until `t_end` to reach `density`.
    pub fn new(
        seed: u64,
        density: f64,
        every: u64,
        t_end: u64,
        training: LocalTraining,
        server: Option<(ServerSet, usize)>,
    ) -> Self {
        IterativeMagnitude {
            seed,
            density,
            every: every.max(1),
            t_end: t_end.max(1),
            training,
            server,
        }
    }

    /// The density after round `t`'s pruning, if round `t` prunes.
    pub fn target(&self, t: u64) -> Option<f64> {
        (t <= self.t_end && (t.is_multiple_of(self.every) || t == self.t_end))
            .then(|| 1.0 - (1.0 - self.density) * t as f64 / self.t_end as f64)
    }
}

impl Strategy for IterativeMagnitude {
    fn name(&self) -> &str {
        "iterative_magnitude"
    }

    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()> {
        if let Some((set, epochs)) = &self.server {
            pre_train(global, set, *epochs, &self.training.optimizer, self.seed)?;
        }
        Ok(())
    }

    fn configure_train(
        &mut self,
        round: u64,
        global: &GlobalModel,
        clients: &[ClientId],
    ) -> Result<Vec<(ClientId, Task)>> {
        Ok(super::train_tasks(
            round,
            global,
            clients,
            &self.training,
            self.seed,
            &[],
            fedtiny_common::task::AdjustKind::PrunedTopK,
        ))
    }

    fn aggregate_train(
        &mut self,
        round: u64,
        global: &mut GlobalModel,
        results: &[(ClientId, TrainResult)],
        _failures: &[(ClientId, Failure)],
    ) -> Result<()> {
        global.state = super::average_states(&global.state, results)?;
        if let Some(d) = self.target(round) {
            let masks = magnitude_masks(&global.to_model()?, d.clamp(self.density, 1.0))?;
            global.set_masks(masks)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_reaches_the_density_at_t_end() {
        let s = IterativeMagnitude::new(
            1,
            0.1,
            10,
            60,
            LocalTraining {
                epochs: 1,
                batch_size: 2,
                optimizer: Default::default(),
                augment: None,
                max_steps: None,
            },
            None,
        );
        assert_eq!(s.target(5), None);
        assert!((s.target(10).unwrap() - 0.85).abs() < 1e-12);
        assert!((s.target(60).unwrap() - 0.1).abs() < 1e-12);
        assert_eq!(s.target(70), None);
    }
}
