//! FedTiny's payloads through bytes: top-K requests and lists on train tasks and results,
//! BatchNorm calibration and candidate evaluation; round trips, typed errors for every
//! validation rule, and `check_answer`.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

mod support;

use fedtiny_common::codec::{CodecError, Limits};
use fedtiny_common::fedtiny::Allocation;
use fedtiny_common::mask::{Mask, MaskSet};
use fedtiny_common::models::Model;
use fedtiny_common::param::Role;
use fedtiny_common::task::{Task, TaskResult};
use fedtiny_proto::convert::{
    MAX_CANDIDATES, WireError, check_answer, check_candidate_statistics, decode_result,
    decode_task, encode_result, encode_task, result_to_pb, task_kind, task_to_pb,
};
use fedtiny_proto::pb;
use prost::Message;
use support::*;

fn limits() -> Limits {
    Limits::default()
}

fn setup(d: f64) -> (Model, MaskSet) {
    let mut model = tiny_cnn(1);
    let masks = random_masks(&mut model, d, 3, 2);
    (model, masks)
}

/// A dense model (the pre-trained `w0` of adaptive BatchNorm selection).
fn dense() -> Model {
    tiny_cnn(4)
}

/// Names of a model's tensors of a role.
fn names_with(model: &Model, role: Role) -> Vec<String> {
    model
        .state_dict()
        .entries
        .into_iter()
        .filter(|(_, e)| e.role == role)
        .map(|(n, _)| n)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

#[test]
fn new_tasks_round_trip_with_and_without_masks_in_the_payload() {
    let (model, masks) = setup(0.3);
    let w0 = dense();
    let empty = MaskSet::default();
    for allocation in [Allocation::Noise, Allocation::Erk, Allocation::Uniform] {
        for n in [1, 3, MAX_CANDIDATES] {
            for task in [
                calibrate_task(&w0, n, allocation, true),
                eval_candidates_task(&w0, n, allocation, true),
            ] {
                let bytes = encode_task(&task, None).unwrap();
                assert_eq!(decode_task(&bytes, None, &limits()).unwrap(), task);
                assert_eq!(decode_task(&bytes, Some(&masks), &limits()).unwrap(), task);
            }
            for task in [
                calibrate_task(&w0, n, allocation, false),
                eval_candidates_task(&w0, n, allocation, false),
            ] {
                let bytes = encode_task(&task, Some(&empty)).unwrap();
                assert_eq!(decode_task(&bytes, Some(&empty), &limits()).unwrap(), task);
            }
        }
    }
    let task = adjust_task(&model, &masks, true);
    let bytes = encode_task(&task, None).unwrap();
    assert_eq!(decode_task(&bytes, None, &limits()).unwrap(), task);
    let task = adjust_task(&model, &masks, false);
    let bytes = encode_task(&task, Some(&masks)).unwrap();
    assert_eq!(decode_task(&bytes, Some(&masks), &limits()).unwrap(), task);
}

#[test]
fn the_adjust_list_travels_in_order_and_k_may_be_zero_or_the_element_count() {
    let (model, masks) = setup(0.3);
    let mut task = adjust_task(&model, &masks, false);
    let Task::Train(t) = &mut task else {
        unreachable!()
    };
    t.adjust.reverse();
    let n = model.state_dict().get(&t.adjust[0].0).unwrap().values.len();
    t.adjust[0].1 = n;
    t.adjust[1].1 = 0;
    let bytes = encode_task(&task, Some(&masks)).unwrap();
    assert_eq!(decode_task(&bytes, Some(&masks), &limits()).unwrap(), task);
}

#[test]
fn new_results_round_trip_and_answer_their_tasks() {
    let (model, masks) = setup(0.2);
    let w0 = dense();
    let empty = MaskSet::default();
    let result = adjust_result(&model, &masks);
    let bytes = encode_result(&result, &masks).unwrap();
    let back = decode_result(&bytes, &masks, 7, &limits()).unwrap();
    assert_eq!(back, result);
    check_answer(&adjust_task(&model, &masks, false), &back, &masks).unwrap();
    for n in [1, 4, MAX_CANDIDATES] {
        let result = calibrate_result(&w0, n);
        let bytes = encode_result(&result, &empty).unwrap();
        let back = decode_result(&bytes, &empty, 0, &limits()).unwrap();
        assert_eq!(back, result);
        check_answer(
            &calibrate_task(&w0, n, Allocation::Noise, false),
            &back,
            &masks,
        )
        .unwrap();

        let result = eval_candidates_result(n);
        let bytes = encode_result(&result, &empty).unwrap();
        let back = decode_result(&bytes, &empty, 0, &limits()).unwrap();
        assert_eq!(back, result);
        check_answer(
            &eval_candidates_task(&w0, n, Allocation::Erk, false),
            &back,
            &masks,
        )
        .unwrap();
    }
    // A train result without top-K lists answers a train task without requests.
    let plain = train_result(&model, &masks);
    check_answer(&train_task(&model, &masks, false), &plain, &masks).unwrap();
    check_answer(
        &evaluate_task(&model, &masks, false),
        &evaluate_result(),
        &masks,
    )
    .unwrap();
}

#[test]
fn new_kinds_are_announced() {
    let (model, masks) = setup(0.2);
    let w0 = dense();
    assert_eq!(
        task_kind(&calibrate_task(&w0, 2, Allocation::Noise, true)),
        pb::TaskKind::Calibrate
    );
    assert_eq!(
        task_kind(&eval_candidates_task(&w0, 2, Allocation::Noise, true)),
        pb::TaskKind::EvaluateCandidates
    );
    // Top-K requests ride on train tasks.
    assert_eq!(
        task_kind(&adjust_task(&model, &masks, true)),
        pb::TaskKind::Train
    );
}

#[test]
fn top_k_lists_travel_as_the_smaller_of_index_and_bitmap_values_with_the_tensor_shape() {
    let (model, masks) = setup(0.2);
    let result = adjust_result(&model, &masks);
    let TaskResult::Train(r) = &result else {
        unreachable!()
    };
    let p = result_to_pb(&result, &masks).unwrap();
    let Some(pb::result_payload::Result::Train(t)) = p.result else {
        panic!("not a train result")
    };
    assert_eq!(t.topk.len(), r.topk.len());
    for (tensor, (name, pairs)) in t.topk.iter().zip(&r.topk) {
        let e = r.state.get(name).unwrap();
        assert_eq!(&tensor.name, name);
        assert_eq!(
            tensor.shape,
            e.shape.iter().map(|&d| d as u64).collect::<Vec<_>>()
        );
        assert!(tensor.prunable);
        assert_eq!(tensor.values.len(), 4 * pairs.len());
        let bitmap_bytes = e.values.len().div_ceil(8);
        if bitmap_bytes < 4 * pairs.len() {
            assert_eq!(tensor.encoding, pb::Encoding::BitmapValues as i32);
            assert_eq!(tensor.bitmap.len(), bitmap_bytes);
            assert!(tensor.indices.is_empty());
        } else {
            assert_eq!(tensor.encoding, pb::Encoding::IndexValues as i32);
            assert_eq!(tensor.indices.len(), 4 * pairs.len());
            assert!(tensor.bitmap.is_empty());
        }
    }
    // Unsorted lists are sorted by the encoder.
    let mut shuffled = result.clone();
    if let TaskResult::Train(r) = &mut shuffled {
        r.topk[0].1.reverse();
    }
    let bytes = encode_result(&shuffled, &masks).unwrap();
    assert_eq!(decode_result(&bytes, &masks, 7, &limits()).unwrap(), result);
}

#[test]
fn a_candidate_evaluation_without_w0_round_trips_small_and_its_statistics_are_still_checked() {
    let w0 = dense();
    let with = eval_candidates_task(&w0, 3, Allocation::Noise, true);
    let Task::EvaluateCandidates(mut t) = with.clone() else {
        panic!("not a candidate evaluation")
    };
    let w0_state = t.model.as_ref().unwrap().state.clone();
    t.model = None;
    let without = Task::EvaluateCandidates(t.clone());
    let small = encode_task(&without, None).unwrap();
    assert_eq!(decode_task(&small, None, &limits()).unwrap(), without);
    let full = encode_task(&with, None).unwrap();
    // w0 is the bulk of the full task; without it only the statistics travel.
    assert!(
        (small.len() as f64) < 0.2 * full.len() as f64,
        "{} vs {}",
        small.len(),
        full.len()
    );
    // The receiver checks the statistics against the w0 it kept.
    check_candidate_statistics(&w0_state, &t.bn).unwrap();
    let mut short = t.bn.clone();
    let name = short[1].entries.keys().next().unwrap().clone();
    short[1].entries.remove(&name);
    assert!(matches!(
        check_candidate_statistics(&w0_state, &short),
        Err(WireError::MissingTensor { ref tensor, .. }) if *tensor == name
    ));
    // Without a model on the wire, the sets must still agree with each other.
    let e = corrupt_eval(|t| {
        t.model = None;
        t.bn[2].tensors.pop();
    });
    assert!(matches!(e, Err(WireError::MissingTensor { .. })), "{e:?}");
}

#[test]
fn bn_statistics_travel_without_masks() {
    let w0 = dense();
    let task = eval_candidates_task(&w0, 3, Allocation::Noise, false);
    let empty = MaskSet::default();
    let p = task_to_pb(&task, Some(&empty)).unwrap();
    let Some(pb::task_payload::Task::EvaluateCandidates(t)) = p.task else {
        panic!("not a candidate evaluation")
    };
    assert_eq!(t.bn.len(), 3);
    for c in &t.bn {
        assert!(!c.tensors.is_empty());
        for x in &c.tensors {
            assert_ne!(x.encoding, pb::Encoding::MaskOrder as i32);
            assert!(
                x.role == pb::Role::RunningMean as i32 || x.role == pb::Role::RunningVar as i32
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Task validation
// ---------------------------------------------------------------------------------------------

/// Encodes a calibration task of 3 candidates, lets `f` corrupt its message, decodes it.
fn corrupt_calibrate(f: impl FnOnce(&mut pb::CalibrateTask)) -> Result<Task, WireError> {
    let w0 = dense();
    let mut p = task_to_pb(&calibrate_task(&w0, 3, Allocation::Noise, true), None).unwrap();
    let Some(pb::task_payload::Task::Calibrate(t)) = &mut p.task else {
        panic!("not a calibration task")
    };
    f(t);
    decode_task(&p.encode_to_vec(), None, &limits())
}

/// Encodes a candidate evaluation task of 3 candidates, lets `f` corrupt its message, decodes it.
fn corrupt_eval(f: impl FnOnce(&mut pb::CandidateEvalTask)) -> Result<Task, WireError> {
    corrupt_eval_with(&limits(), f)
}

fn corrupt_eval_with(
    limits: &Limits,
    f: impl FnOnce(&mut pb::CandidateEvalTask),
) -> Result<Task, WireError> {
    let w0 = dense();
    let mut p = task_to_pb(&eval_candidates_task(&w0, 3, Allocation::Noise, true), None).unwrap();
    let Some(pb::task_payload::Task::EvaluateCandidates(t)) = &mut p.task else {
        panic!("not a candidate evaluation")
    };
    f(t);
    decode_task(&p.encode_to_vec(), None, limits)
}

/// Encodes an adjustment train task, lets `f` corrupt its message, decodes it.
fn corrupt_adjust(f: impl FnOnce(&mut pb::TrainTask)) -> Result<Task, WireError> {
    let (model, masks) = setup(0.2);
    let mut p = task_to_pb(&adjust_task(&model, &masks, false), Some(&masks)).unwrap();
    let Some(pb::task_payload::Task::Train(t)) = &mut p.task else {
        panic!("not a train task")
    };
    f(t);
    decode_task(&p.encode_to_vec(), Some(&masks), &limits())
}

fn out_of_range(e: Result<Task, WireError>, want: &str) {
    match e {
        Err(WireError::OutOfRange { field, .. }) if field == want => {}
        other => panic!("expected {want} out of range, got {other:?}"),
    }
}

#[test]
fn density_and_fraction_must_be_in_the_unit_interval() {
    for bad in [0.0, -0.1, 1.0 + 1e-9, f64::NAN, f64::INFINITY] {
        out_of_range(
            corrupt_calibrate(|t| t.candidates.as_mut().unwrap().density = bad),
            "CandidateSet.density",
        );
        out_of_range(
            corrupt_eval(|t| t.candidates.as_mut().unwrap().density = bad),
            "CandidateSet.density",
        );
        out_of_range(
            corrupt_calibrate(|t| t.validation.as_mut().unwrap().fraction = bad),
            "Validation.fraction",
        );
        out_of_range(
            corrupt_eval(|t| t.validation.as_mut().unwrap().fraction = bad),
            "Validation.fraction",
        );
    }
    // Both ends of (0, 1] that are in it.
    corrupt_calibrate(|t| {
        t.candidates.as_mut().unwrap().density = 1.0;
        t.validation.as_mut().unwrap().fraction = f64::MIN_POSITIVE;
    })
    .unwrap();
}

#[test]
fn a_candidate_set_has_one_to_64_seeds_and_a_known_allocation() {
    out_of_range(
        corrupt_calibrate(|t| t.candidates.as_mut().unwrap().seeds.clear()),
        "CandidateSet.seeds",
    );
    out_of_range(
        corrupt_calibrate(|t| t.candidates.as_mut().unwrap().seeds = (0..65).collect()),
        "CandidateSet.seeds",
    );
    let Task::Calibrate(t) =
        corrupt_calibrate(|t| t.candidates.as_mut().unwrap().seeds = (0..64).collect()).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(t.candidates.seeds.len(), MAX_CANDIDATES);
    for value in [0, 4, -1] {
        let e = corrupt_calibrate(|t| t.candidates.as_mut().unwrap().allocation = value);
        assert!(
            matches!(e, Err(WireError::UnknownEnum { field: "CandidateSet.allocation", value: v }) if v == value),
            "{e:?}"
        );
    }
}

#[test]
fn passes_and_batch_sizes_are_at_least_one() {
    out_of_range(corrupt_calibrate(|t| t.passes = 0), "CalibrateTask.passes");
    out_of_range(
        corrupt_calibrate(|t| t.batch_size = 0),
        "CalibrateTask.batch_size",
    );
    out_of_range(
        corrupt_eval(|t| t.batch_size = 0),
        "CandidateEvalTask.batch_size",
    );
}

#[test]
fn missing_messages_are_typed_errors() {
    let missing = |e: Result<Task, WireError>, want: &str| match e {
        Err(WireError::Missing { field }) if field == want => {}
        other => panic!("expected {want} missing, got {other:?}"),
    };
    missing(corrupt_calibrate(|t| t.model = None), "CalibrateTask.model");
    missing(
        corrupt_calibrate(|t| t.candidates = None),
        "CalibrateTask.candidates",
    );
    missing(
        corrupt_calibrate(|t| t.validation = None),
        "CalibrateTask.validation",
    );
    missing(
        corrupt_eval(|t| t.candidates = None),
        "CandidateEvalTask.candidates",
    );
    missing(
        corrupt_eval(|t| t.validation = None),
        "CandidateEvalTask.validation",
    );
}

#[test]
fn there_are_as_many_bn_statistics_as_candidates() {
    let e = corrupt_eval(|t| {
        t.bn.pop();
    });
    assert!(matches!(
        e,
        Err(WireError::CountMismatch {
            field: "CandidateEvalTask.bn",
            expected: 3,
            actual: 2
        })
    ));
    let e = corrupt_eval(|t| {
        let first = t.bn[0].clone();
        t.bn.push(first);
    });
    assert!(matches!(
        e,
        Err(WireError::CountMismatch {
            expected: 3,
            actual: 4,
            ..
        })
    ));
}

/// The first running variance of candidate 1.
fn var_tensor(t: &mut pb::CandidateEvalTask) -> &mut pb::Tensor {
    t.bn[1]
        .tensors
        .iter_mut()
        .find(|x| x.role == pb::Role::RunningVar as i32)
        .expect("a running variance")
}

#[test]
fn bn_tensors_are_finite_running_statistics_within_limits() {
    let e = corrupt_eval(|t| {
        let x = var_tensor(t);
        assert_eq!(x.encoding, pb::Encoding::Dense as i32);
        x.values[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::NonFinite { position: 1, .. }))
    ));
    let e = corrupt_eval(|t| {
        var_tensor(t).values[..4].copy_from_slice(&(-0.5f32).to_le_bytes());
    });
    match e {
        Err(WireError::OutOfRange { field, detail }) => {
            assert_eq!(field, "CandidateEvalTask.bn");
            assert!(detail.contains("running variance"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let e = corrupt_eval(|t| var_tensor(t).role = pb::Role::BnScale as i32);
    assert!(matches!(
        e,
        Err(WireError::NotRunningStatistic {
            field: "CandidateEvalTask.bn",
            role: Role::BnScale,
            ..
        })
    ));
    let e = corrupt_eval(|t| var_tensor(t).prunable = true);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CandidateEvalTask.bn",
            ..
        })
    ));
    let e = corrupt_eval(|t| var_tensor(t).role = 77);
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "Tensor.role",
            value: 77
        })
    ));
    // Mask order needs a mask, and statistics have none.
    let e = corrupt_eval(|t| var_tensor(t).encoding = pb::Encoding::MaskOrder as i32);
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::MissingMask { .. }))
    ));
    let e = corrupt_eval(|t| {
        let x = var_tensor(t).clone();
        t.bn[1].tensors.push(x);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::DuplicateTensor { .. }))
    ));
    let e = corrupt_eval(|t| var_tensor(t).shape = vec![u64::MAX / 2, 4]);
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::TooLarge { .. }))
    ));
    let e = corrupt_eval(|t| {
        var_tensor(t).values.pop();
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::Misaligned { .. }))
    ));
}

#[test]
fn bn_statistics_are_exactly_the_models_running_statistics() {
    let e = corrupt_eval(|t| {
        t.bn[2].tensors.pop();
    });
    assert!(matches!(
        e,
        Err(WireError::MissingTensor {
            field: "CandidateEvalTask.bn",
            ..
        })
    ));
    let e = corrupt_eval(|t| var_tensor(t).name = "bn9.running_var".into());
    assert!(matches!(
        e,
        Err(WireError::UnknownTensor { field: "CandidateEvalTask.bn", ref tensor }) if tensor == "bn9.running_var"
    ));
    let e = corrupt_eval(|t| {
        let x = var_tensor(t);
        x.shape = vec![x.values.len() as u64 / 4 / 2, 2];
    });
    assert!(matches!(
        e,
        Err(WireError::ShapeMismatch {
            field: "CandidateEvalTask.bn",
            ..
        })
    ));
    let e = corrupt_eval(|t| var_tensor(t).role = pb::Role::RunningMean as i32);
    assert!(matches!(
        e,
        Err(WireError::RoleMismatch {
            expected: Role::RunningVar,
            actual: Role::RunningMean,
            ..
        })
    ));
}

#[test]
fn bn_statistics_of_all_candidates_together_are_within_the_total_limit() {
    // Two candidates' statistics fit, three do not: refused before anything is decoded. (The
    // model's state is dropped so that it is not what hits the limit.)
    let w0 = dense();
    let one: usize = bn_stats(&w0, 1, 0)[0].num_values();
    let no_state = |t: &mut pb::CandidateEvalTask| t.model.as_mut().unwrap().state.clear();
    let tight = Limits {
        max_total_elements: 3 * one - 1,
        ..Limits::default()
    };
    let e = corrupt_eval_with(&tight, no_state);
    assert!(
        matches!(e, Err(WireError::Codec(CodecError::TotalTooLarge { .. }))),
        "{e:?}"
    );
    // At exactly the limit, decoding goes on (and fails later: the model has no statistics).
    let exact = Limits {
        max_total_elements: 3 * one,
        ..Limits::default()
    };
    let e = corrupt_eval_with(&exact, no_state);
    assert!(matches!(e, Err(WireError::UnknownTensor { .. })), "{e:?}");
    // Sparse encodings count at their dense size: empty index lists with huge shapes, each
    // candidate within the per-state limit, all together not, are refused without allocating.
    let e = corrupt_eval(|t| {
        for c in &mut t.bn {
            for x in &mut c.tensors[..2] {
                x.encoding = pb::Encoding::IndexValues as i32;
                x.values.clear();
                x.shape = vec![60 << 20];
            }
        }
    });
    assert!(
        matches!(e, Err(WireError::Codec(CodecError::TotalTooLarge { .. }))),
        "{e:?}"
    );
    // And the tensor count of each candidate is limited like a state's.
    let few = Limits {
        max_tensors: 1,
        ..Limits::default()
    };
    let e = corrupt_eval_with(&few, |t| t.model.as_mut().unwrap().state.truncate(1));
    assert!(
        matches!(e, Err(WireError::Codec(CodecError::TooManyTensors { .. }))),
        "{e:?}"
    );
}

#[test]
fn adjust_requests_name_prunable_tensors_once_with_k_within_the_element_count() {
    let e = corrupt_adjust(|t| {
        let first = t.adjust[0].clone();
        t.adjust.push(first);
    });
    assert!(matches!(
        e,
        Err(WireError::DuplicateName {
            field: "TrainTask.adjust",
            ..
        })
    ));
    let e = corrupt_adjust(|t| t.adjust[0].name = "nope.weight".into());
    assert!(matches!(
        e,
        Err(WireError::UnknownTensor { field: "TrainTask.adjust", ref tensor }) if tensor == "nope.weight"
    ));
    let (model, _) = setup(0.2);
    let bias = names_with(&model, Role::Bias).remove(0);
    let b = bias.clone();
    let e = corrupt_adjust(move |t| t.adjust[0].name = b);
    assert!(matches!(
        e,
        Err(WireError::NotPrunable { field: "TrainTask.adjust", ref tensor }) if *tensor == bias
    ));
    let state = model.state_dict();
    let e = corrupt_adjust(|t| {
        let n = state.get(&t.adjust[1].name).unwrap().values.len();
        t.adjust[1].k = n as u64 + 1;
    });
    out_of_range(e, "AdjustTensor.k");
    let e = corrupt_adjust(|t| t.adjust[1].k = u64::MAX);
    out_of_range(e, "AdjustTensor.k");
}

// ---------------------------------------------------------------------------------------------
// Result validation
// ---------------------------------------------------------------------------------------------

/// Encodes `result`, lets `f` corrupt its message, decodes it for round `round`.
fn corrupt_result(
    result: &TaskResult,
    masks: &MaskSet,
    round: u64,
    f: impl FnOnce(&mut pb::result_payload::Result),
) -> Result<TaskResult, WireError> {
    let mut p = result_to_pb(result, masks).unwrap();
    f(p.result.as_mut().unwrap());
    decode_result(&p.encode_to_vec(), masks, round, &limits())
}

/// Corrupts the top-K tensors of an adjustment result (each re-encoded as index + values, the
/// encoding the corruptions edit).
fn corrupt_topk(f: impl FnOnce(&mut Vec<pb::Tensor>)) -> Result<TaskResult, WireError> {
    let (model, masks) = setup(0.2);
    corrupt_result(&adjust_result(&model, &masks), &masks, 7, |r| {
        let pb::result_payload::Result::Train(t) = r else {
            panic!("not a train result")
        };
        for tensor in &mut t.topk {
            if tensor.encoding == pb::Encoding::BitmapValues as i32 {
                let idx: Vec<u32> = (0..8 * tensor.bitmap.len() as u32)
                    .filter(|&i| tensor.bitmap[i as usize / 8] & (1 << (i % 8)) != 0)
                    .collect();
                tensor.indices = le(&idx);
                tensor.bitmap.clear();
                tensor.encoding = pb::Encoding::IndexValues as i32;
            }
        }
        f(&mut t.topk)
    })
}

fn le(indices: &[u32]) -> Vec<u8> {
    indices.iter().flat_map(|i| i.to_le_bytes()).collect()
}

#[test]
fn top_k_entries_are_in_range_strictly_ascending_and_finite() {
    let e = corrupt_topk(|t| {
        let n: u64 = t[0].shape.iter().product();
        let count = t[0].indices.len() / 4;
        let mut idx: Vec<u32> = (0..count as u32).collect();
        *idx.last_mut().unwrap() = n as u32;
        t[0].indices = le(&idx);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::IndexOutOfRange { .. }))
    ));
    let e = corrupt_topk(|t| {
        t[0].indices = le(&[5, 3]);
        t[0].values.truncate(8);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::IndicesNotAscending { .. }))
    ));
    let e = corrupt_topk(|t| {
        t[0].indices = le(&[4, 4]);
        t[0].values.truncate(8);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::IndicesNotAscending { .. }))
    ));
    let e = corrupt_topk(|t| t[0].values[..4].copy_from_slice(&f32::INFINITY.to_le_bytes()));
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::NonFinite { .. }))
    ));
    let e = corrupt_topk(|t| {
        let n = t[0].values.len();
        t[0].values.truncate(n - 4);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::ValueCount { .. }))
    ));
    let e = corrupt_topk(|t| t[0].encoding = pb::Encoding::Dense as i32);
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::WrongEncoding { .. }))
    ));
    // A bitmap list with stray index bytes.
    let e = corrupt_topk(|t| t[0].encoding = pb::Encoding::BitmapValues as i32);
    assert!(e.is_err(), "{e:?}");
    let e = corrupt_topk(|t| t[0].bitmap = vec![1]);
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::UnexpectedField { .. }))
    ));
}

#[test]
fn top_k_lists_name_prunable_tensors_of_the_state_once_with_their_shape() {
    let e = corrupt_topk(|t| {
        let first = t[0].clone();
        t.push(first);
    });
    assert!(matches!(
        e,
        Err(WireError::DuplicateName {
            field: "TrainResult.topk",
            ..
        })
    ));
    let e = corrupt_topk(|t| t[0].name = "nope.weight".into());
    assert!(matches!(
        e,
        Err(WireError::UnknownTensor {
            field: "TrainResult.topk",
            ..
        })
    ));
    let (model, _) = setup(0.2);
    let bias = names_with(&model, Role::Bias).remove(0);
    let e = corrupt_topk(|t| t[0].name = bias);
    assert!(matches!(
        e,
        Err(WireError::NotPrunable {
            field: "TrainResult.topk",
            ..
        })
    ));
    let e = corrupt_topk(|t| t[0].prunable = false);
    assert!(matches!(e, Err(WireError::NotPrunable { .. })));
    let e = corrupt_topk(|t| t[0].role = pb::Role::Bias as i32);
    assert!(matches!(
        e,
        Err(WireError::RoleMismatch {
            expected: Role::Weight,
            actual: Role::Bias,
            ..
        })
    ));
    let e = corrupt_topk(|t| t[0].shape.push(1));
    assert!(matches!(
        e,
        Err(WireError::ShapeMismatch {
            field: "TrainResult.topk",
            ..
        })
    ));
    let e = corrupt_topk(|t| t[0].shape = vec![u64::MAX / 2, 4]);
    assert!(matches!(e, Err(WireError::ShapeMismatch { .. })));
    // Encoding refuses a list for a tensor the state does not have, or an index out of range.
    let (model, masks) = setup(0.2);
    let mut bad = adjust_result(&model, &masks);
    if let TaskResult::Train(r) = &mut bad {
        r.topk[0].0 = "nope.weight".into();
    }
    assert!(matches!(
        encode_result(&bad, &masks),
        Err(WireError::UnknownTensor { .. })
    ));
    let mut bad = adjust_result(&model, &masks);
    if let TaskResult::Train(r) = &mut bad {
        r.topk[0].1.push((u32::MAX, 1.0));
    }
    assert!(matches!(
        encode_result(&bad, &masks),
        Err(WireError::Codec(CodecError::IndexOutOfRange { .. }))
    ));
}

#[test]
fn new_results_are_checked_for_their_round() {
    let w0 = dense();
    let empty = MaskSet::default();
    for result in [calibrate_result(&w0, 2), eval_candidates_result(2)] {
        let bytes = encode_result(&result, &empty).unwrap();
        assert!(matches!(
            decode_result(&bytes, &empty, 3, &limits()),
            Err(WireError::RoundMismatch {
                expected: 3,
                actual: 0
            })
        ));
    }
    // Every per-candidate evaluation carries the round too.
    let e = corrupt_result(&eval_candidates_result(3), &empty, 0, |r| {
        if let pb::result_payload::Result::EvaluateCandidates(c) = r {
            c.stats[2].round = 1;
        }
    });
    assert!(matches!(
        e,
        Err(WireError::RoundMismatch {
            expected: 0,
            actual: 1
        })
    ));
}

#[test]
fn bad_calibration_results_are_typed_errors() {
    let w0 = dense();
    let empty = MaskSet::default();
    let decode = |f: &dyn Fn(&mut pb::CalibrateResult)| {
        corrupt_result(&calibrate_result(&w0, 3), &empty, 0, |r| {
            let pb::result_payload::Result::Calibrate(c) = r else {
                panic!("not a calibration result")
            };
            f(c)
        })
    };
    let e = decode(&|c| c.val_count = 0);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CalibrateResult.val_count",
            ..
        })
    ));
    let e = decode(&|c| c.bn.clear());
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CalibrateResult.bn",
            ..
        })
    ));
    let e = decode(&|c| {
        let first = c.bn[0].clone();
        c.bn.resize(MAX_CANDIDATES + 1, first);
    });
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CalibrateResult.bn",
            ..
        })
    ));
    // Candidates disagree with each other.
    let e = decode(&|c| {
        c.bn[2].tensors.pop();
    });
    assert!(matches!(
        e,
        Err(WireError::MissingTensor {
            field: "CalibrateResult.bn",
            ..
        })
    ));
    let e = decode(&|c| c.bn[1].tensors[0].shape.push(1));
    assert!(matches!(
        e,
        Err(WireError::ShapeMismatch {
            field: "CalibrateResult.bn",
            ..
        })
    ));
    let e = decode(&|c| c.bn[1].tensors[0].values[..4].copy_from_slice(&f32::NAN.to_le_bytes()));
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::NonFinite { .. }))
    ));
    let e = decode(&|c| c.bn[0].tensors[0].role = pb::Role::Weight as i32);
    assert!(matches!(
        e,
        Err(WireError::NotRunningStatistic {
            field: "CalibrateResult.bn",
            ..
        })
    ));
}

#[test]
fn bad_candidate_evaluations_are_typed_errors() {
    let empty = MaskSet::default();
    let decode = |f: &dyn Fn(&mut pb::CandidateEvalResult)| {
        corrupt_result(&eval_candidates_result(3), &empty, 0, |r| {
            let pb::result_payload::Result::EvaluateCandidates(c) = r else {
                panic!("not a candidate evaluation")
            };
            f(c)
        })
    };
    let e = decode(&|c| c.stats.clear());
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CandidateEvalResult.stats",
            ..
        })
    ));
    let e = decode(&|c| {
        let first = c.stats[0];
        c.stats.resize(MAX_CANDIDATES + 1, first);
    });
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "CandidateEvalResult.stats",
            ..
        })
    ));
    let e = decode(&|c| c.stats[1].correct = c.stats[1].count + 1);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "EvaluateResult.correct",
            ..
        })
    ));
    let e = decode(&|c| c.stats[1].loss_sum = f64::NAN);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "EvaluateResult.loss_sum",
            ..
        })
    ));
}

// ---------------------------------------------------------------------------------------------
// check_answer
// ---------------------------------------------------------------------------------------------

#[test]
fn check_answer_matches_kind_round_and_counts() {
    let (model, masks) = setup(0.2);
    let w0 = dense();
    let e = check_answer(
        &train_task(&model, &masks, false),
        &evaluate_result(),
        &masks,
    );
    assert!(matches!(
        e,
        Err(WireError::KindMismatch {
            expected: "train",
            actual: "evaluate"
        })
    ));
    let e = check_answer(
        &calibrate_task(&w0, 3, Allocation::Noise, false),
        &eval_candidates_result(3),
        &masks,
    );
    assert!(matches!(
        e,
        Err(WireError::KindMismatch {
            expected: "calibrate",
            actual: "evaluate-candidates"
        })
    ));
    let e = check_answer(
        &evaluate_task(&model, &masks, false),
        &eval_candidates_result(1),
        &masks,
    );
    assert!(matches!(e, Err(WireError::KindMismatch { .. })));
    // Round.
    let mut late = calibrate_task(&w0, 3, Allocation::Noise, false);
    if let Task::Calibrate(t) = &mut late {
        t.round = 1;
    }
    assert!(matches!(
        check_answer(&late, &calibrate_result(&w0, 3), &masks),
        Err(WireError::RoundMismatch {
            expected: 1,
            actual: 0
        })
    ));
    // One answer per candidate.
    assert!(matches!(
        check_answer(
            &calibrate_task(&w0, 3, Allocation::Noise, false),
            &calibrate_result(&w0, 2),
            &masks
        ),
        Err(WireError::CountMismatch {
            field: "CalibrateResult.bn",
            expected: 3,
            actual: 2
        })
    ));
    assert!(matches!(
        check_answer(
            &eval_candidates_task(&w0, 3, Allocation::Noise, false),
            &eval_candidates_result(4),
            &masks
        ),
        Err(WireError::CountMismatch {
            field: "CandidateEvalResult.stats",
            expected: 3,
            actual: 4
        })
    ));
}

#[test]
fn check_answer_holds_calibration_statistics_against_the_model() {
    let w0 = dense();
    let task = calibrate_task(&w0, 2, Allocation::Noise, false);
    let mut result = calibrate_result(&w0, 2);
    let TaskResult::Calibrate(r) = &mut result else {
        unreachable!()
    };
    // Consistent among candidates, but not the model's: every candidate lacks a tensor.
    let name = names_with(&w0, Role::RunningMean).remove(0);
    for s in &mut r.bn {
        s.entries.remove(&name);
    }
    assert!(matches!(
        check_answer(&task, &result, &MaskSet::default()),
        Err(WireError::MissingTensor { field: "CalibrateResult.bn", ref tensor }) if *tensor == name
    ));
}

#[test]
fn check_answer_matches_top_k_lists_to_requests() {
    let (model, masks) = setup(0.2);
    let task = adjust_task(&model, &masks, false);
    let good = adjust_result(&model, &masks);
    let with = |f: &dyn Fn(&mut fedtiny_common::task::TrainResult)| {
        let mut r = good.clone();
        if let TaskResult::Train(t) = &mut r {
            f(t)
        }
        check_answer(&task, &r, &masks)
    };
    assert!(matches!(
        with(&|r| {
            r.topk.pop();
        }),
        Err(WireError::MissingTensor {
            field: "TrainResult.topk",
            ..
        })
    ));
    assert!(matches!(
        with(&|r| {
            let first = r.topk[0].clone();
            r.topk.push(first);
        }),
        Err(WireError::DuplicateName { .. })
    ));
    assert!(matches!(
        with(&|r| r.topk[0].0 = "bn1.running_mean".into()),
        Err(WireError::UnknownTensor { .. })
    ));
    assert!(matches!(
        with(&|r| {
            let extra = (u32::MAX, 1.0);
            r.topk[0].1.push(extra);
        }),
        Err(WireError::OutOfRange {
            field: "TrainResult.topk",
            ..
        })
    ));
    assert!(matches!(
        with(&|r| r.mask_version += 1),
        Err(WireError::MaskVersionMismatch { .. })
    ));
    // Lists without a request.
    assert!(matches!(
        check_answer(&train_task(&model, &masks, false), &good, &masks),
        Err(WireError::UnknownTensor { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// PruneFL and FedDST answers
// ---------------------------------------------------------------------------------------------

/// A top-K list may only name pruned positions of the task's masks.
#[test]
fn check_answer_refuses_lists_at_active_positions() {
    let (model, masks) = setup(0.2);
    let task = adjust_task(&model, &masks, false);
    let mut result = adjust_result(&model, &masks);
    let TaskResult::Train(r) = &mut result else {
        unreachable!()
    };
    let (name, pairs) = &mut r.topk[0];
    let active = masks.get(name).unwrap().iter_active().next().unwrap() as u32;
    pairs[0] = (active, 0.5);
    pairs.sort_by_key(|p| p.0);
    pairs.dedup_by_key(|p| p.0);
    assert!(matches!(
        check_answer(&task, &result, &masks),
        Err(WireError::OutOfRange { field: "TrainResult.topk", ref detail }) if detail.contains("active")
    ));
}

/// A FedDST answer: the client's own mask (K positions swapped) travels with the state in its
/// mask order, round-trips exactly, and answers its task; masks that change the active count,
/// grow more than K positions, or answer another kind of request are refused.
#[test]
fn client_masks_travel_with_the_state_and_are_checked() {
    use fedtiny_common::task::AdjustKind;
    let (model, masks) = setup(0.2);
    let Task::Train(mut t) = adjust_task(&model, &masks, false) else {
        unreachable!()
    };
    t.adjust_kind = AdjustKind::ClientPruneGrow;
    let name = t.adjust[0].0.clone();
    let held = masks.get(&name).unwrap().clone();
    // FedDST's K is a fraction of the active weights.
    let k = (held.active() / 2).max(1);
    t.adjust[0].1 = k;
    let task = Task::Train(t.clone());
    // Swap the first k active positions for the first k pruned ones.
    let swap = |count: usize| {
        let mut own = held.clone();
        let active: Vec<usize> = held.iter_active().take(count).collect();
        let pruned: Vec<usize> = (0..held.len())
            .filter(|&i| !held.get(i))
            .take(count)
            .collect();
        for (&a, &p) in active.iter().zip(&pruned) {
            own.set(a, false);
            own.set(p, true);
        }
        own
    };
    let own = swap(k);
    let TaskResult::Train(mut r) = train_result(&model, &masks) else {
        unreachable!()
    };
    // The state is masked by the own mask: zero where it prunes, values where it grew.
    let e = r.state.entries.get_mut(&name).unwrap();
    for (i, v) in e.values.iter_mut().enumerate() {
        *v = if own.get(i) {
            0.25 + i as f32 * 1e-3
        } else {
            0.0
        };
    }
    r.masks = vec![(name.clone(), own.clone())];
    let result = TaskResult::Train(r.clone());
    let bytes = encode_result(&result, &masks).unwrap();
    let back = decode_result(&bytes, &masks, 7, &limits()).unwrap();
    assert_eq!(back, result);
    check_answer(&task, &back, &masks).unwrap();

    // More than K grown positions.
    let mut greedy = r.clone();
    greedy.masks = vec![(name.clone(), swap(k + 1))];
    assert!(matches!(
        check_answer(&task, &TaskResult::Train(greedy), &masks),
        Err(WireError::OutOfRange {
            field: "TrainResult.masks",
            ..
        })
    ));
    // A different active count does not even decode.
    let mut fewer = held.clone();
    fewer.set(held.iter_active().next().unwrap(), false);
    let mut short = r.clone();
    short.masks = vec![(name.clone(), fewer.clone())];
    let e = short.state.entries.get_mut(&name).unwrap();
    for (i, v) in e.values.iter_mut().enumerate() {
        if !fewer.get(i) {
            *v = 0.0;
        }
    }
    let p = result_to_pb(&TaskResult::Train(short.clone()), &masks);
    assert!(matches!(
        p,
        Err(WireError::OutOfRange {
            field: "TrainResult.masks",
            ..
        })
    ));
    // Masks answering a FedTiny (pruned top-K) request.
    let Task::Train(mut fedtiny) = task.clone() else {
        unreachable!()
    };
    fedtiny.adjust_kind = AdjustKind::PrunedTopK;
    assert!(matches!(
        check_answer(&Task::Train(fedtiny), &back, &masks),
        Err(WireError::UnknownTensor {
            field: "TrainResult.masks",
            ..
        })
    ));
    // A mask for a tensor that has no mask in the task.
    let mut stray = r;
    stray.masks = vec![("bn1.weight".into(), Mask::from_indices(4, &[0]).unwrap())];
    assert!(result_to_pb(&TaskResult::Train(stray), &masks).is_err());
}

/// The adjustment kind travels with the task; an unknown value is a typed error.
#[test]
fn the_adjust_kind_travels_and_unknown_kinds_are_refused() {
    use fedtiny_common::task::AdjustKind;
    let (model, masks) = setup(0.2);
    for kind in [
        AdjustKind::PrunedTopK,
        AdjustKind::SquaredGradientSum,
        AdjustKind::ClientPruneGrow,
    ] {
        let Task::Train(mut t) = adjust_task(&model, &masks, false) else {
            unreachable!()
        };
        t.adjust_kind = kind;
        let task = Task::Train(t);
        let bytes = encode_task(&task, Some(&masks)).unwrap();
        assert_eq!(decode_task(&bytes, Some(&masks), &limits()).unwrap(), task);
    }
    let e = corrupt_adjust(|t| t.adjust_kind = 9);
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "TrainTask.adjust_kind",
            value: 9
        })
    ));
}
