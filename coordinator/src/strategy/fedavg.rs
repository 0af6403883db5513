//! Sparse FedAvg on a fixed mask: the mask is chosen once before round 1 (random, by magnitude,
//! by SNIP or by SynFlow at the configured density; dense at density 1), after the stage-0 pre-training
//! when there is a server set, and every round averages the clients' states weighted by their
//! sample counts.

use crate::stage0::{ServerSet, pre_train, snip_masks};
use fedtiny_common::mask::MaskSet;
use fedtiny_common::pruning::{magnitude_masks, random_masks};
use fedtiny_common::rng;
use fedtiny_common::synflow::synflow_masks;
use fedtiny_common::task::{ClientId, LocalTraining, Task, TrainResult};

use super::Strategy;
use crate::config::MaskRule;
use crate::error::Result;
use crate::global::GlobalModel;
use crate::proxy::Failure;

/// Sparse FedAvg with a fixed mask.
pub struct FedAvg {
    seed: u64,
    density: f64,
    rule: MaskRule,
    training: LocalTraining,
    server: Option<(ServerSet, usize)>,
}

impl FedAvg {
    /// A strategy with the run seed, mask settings and local-training settings.
    pub fn new(seed: u64, density: f64, rule: MaskRule, training: LocalTraining) -> Self {
        FedAvg {
            seed,
            density,
            rule,
            training,
            server: None,
        }
    }

    /// Pre-trains on the server set for `epochs` before choosing the mask (stage 0).
    pub fn with_server_set(mut self, set: Option<ServerSet>, epochs: usize) -> Self {
        self.server = set.map(|s| (s, epochs));
        self
    }
}

/// The training seed of a client in a round: a pure function of (run seed, client, round).
pub fn client_seed(seed: u64, client: &ClientId, round: u64) -> u64 {
    rng::derive(seed, &format!("train/{client}"), round)
}

impl Strategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn initialize(&mut self, global: &mut GlobalModel) -> Result<()> {
        if let Some((set, epochs)) = &self.server {
            pre_train(global, set, *epochs, &self.training.optimizer, self.seed)?;
        }
        let masks = if self.density >= 1.0 {
            MaskSet::default()
        } else {
            let model = global.to_model()?;
            match self.rule {
                MaskRule::Random => random_masks(
                    &model,
                    self.density,
                    &mut rng::derived(self.seed, "mask", 0),
                )?,
                MaskRule::Magnitude => magnitude_masks(&model, self.density)?,
                MaskRule::Synflow => synflow_masks(&model, self.density, 5)?,
                MaskRule::Snip => match &self.server {
                    Some((set, _)) => snip_masks(global, set, self.density, 5)?,
                    None => {
                        return Err(crate::error::CoordinatorError::Config {
                            origin: "mask.rule".into(),
                            message: "SNIP needs a server set (stage0.n_shots > 0)".into(),
                        });
                    }
                },
            }
        };
        global.set_masks(masks)
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
        _round: u64,
        global: &mut GlobalModel,
        results: &[(ClientId, TrainResult)],
        _failures: &[(ClientId, Failure)],
    ) -> Result<()> {
        global.state = super::average_states(&global.state, results)?;
        Ok(())
    }
}
