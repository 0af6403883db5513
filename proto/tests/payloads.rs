//! Task and result payloads through bytes: round trips, mask handling, typed errors for
//! malformed input, and decoding arbitrary or mutated bytes without panicking.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

mod support;

use fedtiny_common::codec::{CodecError, Limits};
use fedtiny_common::mask::MaskSet;
use fedtiny_common::task::{Task, TaskResult};
use fedtiny_proto::convert::{
    WireError, decode_result, decode_task, encode_result, encode_task, result_to_pb, task_to_pb,
};
use fedtiny_proto::pb;
use proptest::prelude::*;
use prost::Message;
use support::*;

fn limits() -> Limits {
    Limits::default()
}

fn setup(d: f64) -> (fedtiny_common::models::Model, MaskSet) {
    let mut model = tiny_cnn(1);
    let masks = random_masks(&mut model, d, 3, 2);
    (model, masks)
}

#[test]
fn every_task_round_trips_with_masks_in_the_payload() {
    let (model, masks) = setup(0.3);
    for task in [
        train_task(&model, &masks, true),
        evaluate_task(&model, &masks, true),
    ] {
        let bytes = encode_task(&task, None).unwrap();
        // The receiver holds nothing, or an older version: the payload's masks win.
        assert_eq!(decode_task(&bytes, None, &limits()).unwrap(), task);
        let old = MaskSet {
            version: 1,
            ..MaskSet::default()
        };
        assert_eq!(decode_task(&bytes, Some(&old), &limits()).unwrap(), task);
    }
}

#[test]
fn every_task_round_trips_against_held_masks() {
    let (model, masks) = setup(0.3);
    for task in [
        train_task(&model, &masks, false),
        evaluate_task(&model, &masks, false),
    ] {
        let bytes = encode_task(&task, Some(&masks)).unwrap();
        assert_eq!(decode_task(&bytes, Some(&masks), &limits()).unwrap(), task);
    }
}

#[test]
fn omitting_masks_saves_their_bytes_and_masked_tensors_travel_in_mask_order() {
    let (model, masks) = setup(0.1);
    let with = encode_task(&train_task(&model, &masks, true), None).unwrap();
    let without = encode_task(&train_task(&model, &masks, false), Some(&masks)).unwrap();
    assert!(without.len() < with.len());
    let p = task_to_pb(&train_task(&model, &masks, false), Some(&masks)).unwrap();
    let Some(pb::task_payload::Task::Train(t)) = p.task else {
        panic!("not a train task")
    };
    let model_pb = t.model.unwrap();
    assert!(model_pb.masks.is_none());
    for tensor in &model_pb.state {
        match masks.get(&tensor.name) {
            Some(m) => {
                assert_eq!(tensor.encoding, pb::Encoding::MaskOrder as i32);
                assert_eq!(tensor.values.len(), 4 * m.active());
                assert!(tensor.bitmap.is_empty() && tensor.indices.is_empty());
            }
            None => assert_ne!(tensor.encoding, pb::Encoding::MaskOrder as i32),
        }
    }
}

#[test]
fn a_run_without_pruning_uses_an_empty_mask_set() {
    let model = tiny_cnn(5);
    let none = MaskSet::default();
    let task = train_task(&model, &none, false);
    let bytes = encode_task(&task, Some(&none)).unwrap();
    assert_eq!(decode_task(&bytes, Some(&none), &limits()).unwrap(), task);
}

#[test]
fn every_result_round_trips() {
    let (model, masks) = setup(0.2);
    let mut no_rss = train_result(&model, &masks);
    if let TaskResult::Train(r) = &mut no_rss {
        r.peak_rss_bytes = None;
    }
    for result in [train_result(&model, &masks), no_rss, evaluate_result()] {
        let bytes = encode_result(&result, &masks).unwrap();
        assert_eq!(decode_result(&bytes, &masks, 7, &limits()).unwrap(), result);
    }
}

#[test]
fn mask_versions_are_checked_on_both_sides() {
    let (model, masks) = setup(0.2);
    let other = MaskSet {
        version: masks.version + 1,
        ..masks.clone()
    };
    let task = train_task(&model, &masks, false);
    assert!(matches!(
        encode_task(&task, None),
        Err(WireError::MissingMasks { version: 3, .. })
    ));
    assert!(matches!(
        encode_task(&task, Some(&other)),
        Err(WireError::MaskVersionMismatch {
            expected: 3,
            actual: 4,
            ..
        })
    ));
    let bytes = encode_task(&task, Some(&masks)).unwrap();
    assert!(matches!(
        decode_task(&bytes, None, &limits()),
        Err(WireError::MissingMasks { version: 3, .. })
    ));
    assert!(matches!(
        decode_task(&bytes, Some(&other), &limits()),
        Err(WireError::MaskVersionMismatch {
            expected: 3,
            actual: 4,
            ..
        })
    ));
    // Masks in the payload must have the payload's version too.
    let mut task = train_task(&model, &masks, true);
    if let Task::Train(t) = &mut task {
        t.model.mask_version = 9;
    }
    assert!(matches!(
        encode_task(&task, None),
        Err(WireError::MaskVersionMismatch { expected: 9, .. })
    ));

    let result = train_result(&model, &masks);
    assert!(matches!(
        encode_result(&result, &other),
        Err(WireError::MaskVersionMismatch { .. })
    ));
    let bytes = encode_result(&result, &masks).unwrap();
    assert!(matches!(
        decode_result(&bytes, &other, 7, &limits()),
        Err(WireError::MaskVersionMismatch {
            expected: 4,
            actual: 3,
            ..
        })
    ));
    assert!(matches!(
        decode_result(&bytes, &masks, 8, &limits()),
        Err(WireError::RoundMismatch {
            expected: 8,
            actual: 7
        })
    ));
}

/// Encodes a task, lets `f` corrupt its message, and decodes it against the masks.
fn corrupt_task(f: impl FnOnce(&mut pb::TrainTask)) -> Result<Task, WireError> {
    let (model, masks) = setup(0.2);
    let mut p = task_to_pb(&train_task(&model, &masks, false), Some(&masks)).unwrap();
    let Some(pb::task_payload::Task::Train(t)) = &mut p.task else {
        panic!("not a train task")
    };
    f(t);
    decode_task(&p.encode_to_vec(), Some(&masks), &limits())
}

fn tensor(t: &mut pb::TrainTask, encoding: pb::Encoding) -> &mut pb::Tensor {
    t.model
        .as_mut()
        .unwrap()
        .state
        .iter_mut()
        .find(|x| x.encoding == encoding as i32)
        .expect("a tensor in that encoding")
}

#[test]
fn corrupted_tensors_are_typed_errors() {
    // Wrong tensor length.
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::MaskOrder).values.truncate(8);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::ValueCount { .. }))
    ));
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::Dense).values.pop();
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::Misaligned { .. }))
    ));
    // Index out of range.
    let e = corrupt_task(|t| {
        let x = tensor(t, pb::Encoding::Dense);
        let n = x.values.len() / 4;
        x.encoding = pb::Encoding::IndexValues as i32;
        x.indices = (n as u32).to_le_bytes().to_vec();
        x.values.truncate(4);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::IndexOutOfRange { .. }))
    ));
    // NaN values.
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::Dense).values[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::NonFinite { position: 0, .. }))
    ));
    // A shape that disagrees with the mask.
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::MaskOrder).shape.push(2);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::MaskLength { .. }))
    ));
    // A masked tensor sent densely.
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::MaskOrder).encoding = pb::Encoding::Dense as i32;
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::WrongEncoding { .. }))
    ));
    // Duplicate tensors.
    let e = corrupt_task(|t| {
        let m = t.model.as_mut().unwrap();
        let first = m.state[0].clone();
        m.state.push(first);
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::DuplicateTensor { .. }))
    ));
    // A shape dimension that does not fit, or overflows.
    let e = corrupt_task(|t| {
        tensor(t, pb::Encoding::Dense).shape = vec![u64::MAX / 2, 4];
    });
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::TooLarge { .. }))
    ));
}

#[test]
fn unknown_enums_missing_fields_and_bad_numbers_are_typed_errors() {
    let e = corrupt_task(|t| tensor(t, pb::Encoding::Dense).role = 42);
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "Tensor.role",
            value: 42
        })
    ));
    let e = corrupt_task(|t| tensor(t, pb::Encoding::Dense).encoding = 0);
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "Tensor.encoding",
            value: 0
        })
    ));
    let e = corrupt_task(|t| t.model.as_mut().unwrap().spec.as_mut().unwrap().arch = 7);
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "ModelSpec.arch",
            ..
        })
    ));
    let e =
        corrupt_task(|t| t.model.as_mut().unwrap().spec.as_mut().unwrap().width = f64::INFINITY);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "ModelSpec",
            ..
        })
    ));
    let e = corrupt_task(|t| t.training.as_mut().unwrap().epochs = 0);
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "LocalTraining.epochs",
            ..
        })
    ));
    let e = corrupt_task(|t| t.training.as_mut().unwrap().batch_size = 0);
    assert!(matches!(e, Err(WireError::OutOfRange { .. })));
    let e = corrupt_task(|t| t.training = None);
    assert!(matches!(
        e,
        Err(WireError::Missing {
            field: "TrainTask.training"
        })
    ));
    let e = corrupt_task(|t| t.model.as_mut().unwrap().spec = None);
    assert!(matches!(
        e,
        Err(WireError::Missing {
            field: "ModelPayload.spec"
        })
    ));
    let e = corrupt_task(|t| {
        let m = t.model.as_mut().unwrap();
        m.masks = Some(pb::MaskSet {
            version: m.mask_version,
            masks: vec![pb::Mask {
                name: "fc2.weight".into(),
                len: 4,
                encoding: 9,
                data: vec![],
            }],
        });
    });
    assert!(matches!(
        e,
        Err(WireError::UnknownEnum {
            field: "Mask.encoding",
            value: 9
        })
    ));
    let empty = pb::TaskPayload { task: None }.encode_to_vec();
    assert!(matches!(
        decode_task(&empty, None, &limits()),
        Err(WireError::Missing {
            field: "TaskPayload.task"
        })
    ));
    let empty = pb::ResultPayload { result: None }.encode_to_vec();
    assert!(matches!(
        decode_result(&empty, &MaskSet::default(), 0, &limits()),
        Err(WireError::Missing {
            field: "ResultPayload.result"
        })
    ));
}

#[test]
fn bad_result_numbers_are_typed_errors() {
    let (model, masks) = setup(0.2);
    let decode = |f: &dyn Fn(&mut pb::result_payload::Result)| {
        let mut p = result_to_pb(&train_result(&model, &masks), &masks).unwrap();
        f(p.result.as_mut().unwrap());
        decode_result(&p.encode_to_vec(), &masks, 7, &limits())
    };
    let train = |f: fn(&mut pb::TrainResult)| {
        move |r: &mut pb::result_payload::Result| {
            if let pb::result_payload::Result::Train(t) = r {
                f(t)
            }
        }
    };
    let e = decode(&train(|t| t.train_accuracy = 1.5));
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "TrainResult.train_accuracy",
            ..
        })
    ));
    let e = decode(&train(|t| t.train_loss = f64::NAN));
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "TrainResult.train_loss",
            ..
        })
    ));
    let e = decode(&train(|t| t.seconds = -1.0));
    assert!(matches!(e, Err(WireError::OutOfRange { .. })));
    let e = decode(&train(|t| t.num_samples = 0));
    assert!(matches!(e, Err(WireError::OutOfRange { .. })));
    let e = decode(&|r| {
        *r = pb::result_payload::Result::Evaluate(pb::EvaluateResult {
            round: 7,
            loss_sum: 1.0,
            correct: 11,
            count: 10,
        })
    });
    assert!(matches!(
        e,
        Err(WireError::OutOfRange {
            field: "EvaluateResult.correct",
            ..
        })
    ));
    // A result state that omits a masked tensor.
    let e = decode(&train(|t| t.state.retain(|x| x.name != "fc1.weight")));
    assert!(matches!(
        e,
        Err(WireError::Codec(CodecError::MaskWithoutTensor { .. }))
    ));
}

#[test]
fn truncated_payloads_are_malformed() {
    let (model, masks) = setup(0.2);
    let bytes = encode_task(&train_task(&model, &masks, true), None).unwrap();
    for cut in [1, 2, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        assert!(matches!(
            decode_task(&bytes[..cut], None, &limits()),
            Err(WireError::Malformed {
                message: "TaskPayload",
                ..
            })
        ));
    }
    let bytes = encode_result(&train_result(&model, &masks), &masks).unwrap();
    assert!(matches!(
        decode_result(&bytes[..bytes.len() - 1], &masks, 7, &limits()),
        Err(WireError::Malformed { .. })
    ));
}

#[test]
fn limits_bound_what_a_payload_can_make_the_receiver_allocate() {
    let (model, masks) = setup(0.2);
    let bytes = encode_task(&train_task(&model, &masks, false), Some(&masks)).unwrap();
    let tight = Limits {
        max_elements_per_tensor: 100,
        ..Limits::default()
    };
    assert!(matches!(
        decode_task(&bytes, Some(&masks), &tight),
        Err(WireError::Codec(CodecError::TooLarge { limit: 100, .. }))
    ));
    let few = Limits {
        max_tensors: 3,
        ..Limits::default()
    };
    assert!(matches!(
        decode_task(&bytes, Some(&masks), &few),
        Err(WireError::Codec(CodecError::TooManyTensors { .. }))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let masks = MaskSet::default();
        let _ = decode_task(&bytes, None, &limits());
        let _ = decode_task(&bytes, Some(&masks), &limits());
        let _ = decode_result(&bytes, &masks, 0, &limits());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn decoding_mutated_payloads_never_panics(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
        which in 0usize..9,
    ) {
        use fedtiny_common::fedtiny::Allocation;
        let (model, masks) = setup(0.2);
        let w0 = tiny_cnn(4);
        let empty = MaskSet::default();
        let mut bytes = match which {
            0 => encode_task(&train_task(&model, &masks, true), None).unwrap(),
            1 => encode_task(&evaluate_task(&model, &masks, false), Some(&masks)).unwrap(),
            2 => encode_task(&adjust_task(&model, &masks, false), Some(&masks)).unwrap(),
            3 => encode_task(&calibrate_task(&w0, 3, Allocation::Noise, true), None).unwrap(),
            4 => encode_task(&eval_candidates_task(&w0, 3, Allocation::Erk, true), None).unwrap(),
            5 => encode_result(&train_result(&model, &masks), &masks).unwrap(),
            6 => encode_result(&adjust_result(&model, &masks), &masks).unwrap(),
            7 => encode_result(&calibrate_result(&w0, 3), &empty).unwrap(),
            _ => encode_result(&eval_candidates_result(3), &empty).unwrap(),
        };
        for (i, x) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= x;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len()));
        }
        let finite = |s: &fedtiny_common::state::StateDict| {
            s.entries.values().all(|e| {
                e.values.len() == e.shape.iter().product::<usize>()
                    && e.values.iter().all(|v| v.is_finite())
            })
        };
        if which < 5 {
            match decode_task(&bytes, Some(&masks), &limits()) {
                Ok(Task::Train(t)) => {
                    prop_assert!(finite(&t.model.state), "decoded state has a bad tensor");
                    for (name, k) in &t.adjust {
                        let e = t.model.state.get(name);
                        prop_assert!(e.is_some_and(|e| e.prunable && *k <= e.values.len()));
                    }
                }
                Ok(Task::EvaluateCandidates(t)) => {
                    prop_assert!(t.model.as_ref().is_none_or(|m| finite(&m.state)));
                    prop_assert_eq!(t.bn.len(), t.candidates.seeds.len());
                    prop_assert!(t.bn.iter().all(finite), "decoded statistics have a bad tensor");
                }
                Ok(Task::Calibrate(t)) => {
                    prop_assert!(finite(&t.model.state));
                    prop_assert!(t.candidates.density > 0.0 && t.candidates.density <= 1.0);
                    prop_assert!(t.validation.fraction > 0.0 && t.validation.fraction <= 1.0);
                }
                _ => {}
            }
        } else {
            for (m, round) in [(&masks, 7), (&empty, 0)] {
                if let Ok(TaskResult::Train(r)) = decode_result(&bytes, m, round, &limits()) {
                    for (name, pairs) in &r.topk {
                        let n = r.state.get(name).map_or(0, |e| e.values.len());
                        prop_assert!(pairs.windows(2).all(|w| w[0].0 < w[1].0));
                        prop_assert!(pairs.iter().all(|&(i, v)| (i as usize) < n && v.is_finite()));
                    }
                }
            }
        }
    }
}
