//! Adaptive BatchNorm selection on a client: `w0` arrives with the calibration task (1a) and is
//! kept for the candidate evaluation (1c), which then carries no model; the answer equals the one
//! to a 1c task that carries `w0`, and a client that kept nothing refuses with a typed error.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fedtiny_client::{ClientApp, ClientError, LocalData};
use fedtiny_common::data::{Dataset, Normalization};
use fedtiny_common::fedtiny::Allocation;
use fedtiny_common::mask::MaskSet;
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::param::Role;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{
    CalibrateTask, CandidateEvalTask, CandidateSet, ModelPayload, Task, TaskResult, Validation,
};

fn client() -> ClientApp {
    // 60 synthetic 28×28 images whose brightness depends on the label.
    let n = 60;
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let images: Vec<u8> = (0..n * 28 * 28)
        .map(|i| ((i / (28 * 28)) % 10 * 20 + (i * 7) % 31) as u8)
        .collect();
    let train = Dataset::new("synthetic", images, labels, 28, 28, 1, 10).unwrap();
    ClientApp::new(LocalData {
        train: Arc::new(train),
        train_indices: (0..n).collect(),
        test: None,
        normalization: Normalization::fashion_mnist(),
    })
}

fn w0() -> ModelPayload {
    let spec = ModelSpec::new(Arch::Cnn, [28, 28, 1], 10, 0.25).unwrap();
    let model = Model::new(&spec, 3).unwrap();
    ModelPayload {
        spec,
        mask_version: 0,
        masks: Some(MaskSet::default()),
        state: model.state_dict(),
    }
}

fn candidates() -> CandidateSet {
    CandidateSet {
        density: 0.1,
        allocation: Allocation::Noise,
        seeds: vec![11, 12],
    }
}

fn validation() -> Validation {
    Validation {
        fraction: 0.5,
        seed: 5,
    }
}

fn calibrate(app: &mut ClientApp) -> Vec<StateDict> {
    let task = Task::Calibrate(CalibrateTask {
        round: 0,
        model: w0(),
        candidates: candidates(),
        passes: 2,
        batch_size: 16,
        validation: validation(),
    });
    match app.handle(&task).unwrap() {
        TaskResult::Calibrate(r) => r.bn,
        other => panic!("unexpected {other:?}"),
    }
}

fn eval_task(model: Option<ModelPayload>, bn: Vec<StateDict>) -> Task {
    Task::EvaluateCandidates(CandidateEvalTask {
        round: 0,
        model,
        candidates: candidates(),
        bn,
        batch_size: 16,
        validation: validation(),
    })
}

#[test]
fn the_kept_w0_answers_like_a_shipped_one_and_is_released_after_the_selection() {
    let mut kept = client();
    let bn = calibrate(&mut kept);
    assert_eq!(bn.len(), 2);
    assert!(kept.w0().is_some(), "w0 is kept after 1a");
    let without = kept.handle(&eval_task(None, bn.clone())).unwrap();
    assert!(kept.w0().is_none(), "w0 is released after 1c");

    let mut shipped = client();
    let with = shipped.handle(&eval_task(Some(w0()), bn.clone())).unwrap();
    assert_eq!(without, with);
    let TaskResult::EvaluateCandidates(r) = &with else {
        panic!("unexpected {with:?}")
    };
    assert_eq!(r.stats.len(), 2);
    assert!(
        r.stats
            .iter()
            .all(|s| s.count == r.stats[0].count && s.count > 0 && s.loss_sum.is_finite())
    );

    // A second 1c without a model: the client kept nothing.
    let e = kept.handle(&eval_task(None, bn)).unwrap_err();
    assert!(matches!(e, ClientError::MissingW0), "{e}");
}

#[test]
fn statistics_that_do_not_match_the_kept_w0_are_refused() {
    let mut app = client();
    let mut bn = calibrate(&mut app);
    let name = bn[0]
        .entries
        .iter()
        .find(|(_, e)| e.role == Role::RunningVar)
        .map(|(n, _)| n.clone())
        .unwrap();
    bn[1].entries.remove(&name);
    let e = app.handle(&eval_task(None, bn)).unwrap_err();
    assert!(
        matches!(&e, ClientError::Wire(m) if m.contains(&name)),
        "{e}"
    );
}
