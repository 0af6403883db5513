//! Validated conversions between the `fedtiny.v1` wire messages and the core task types.
//!
//! A task travels as a serialized [`pb::TaskPayload`], a result as a serialized
//! [`pb::ResultPayload`] (both chunked, see [`crate::chunk`]). Tensors and masks are encoded by
//! [`fedtiny_common::codec`]; this module maps them to and from their messages and validates
//! everything else.
//!
//! Masks:
//! - Every model payload is masked against the mask set of version `mask_version`. Masked tensors
//!   (the prunable weights the set names) travel in mask order, as their active values only.
//! - The caller decides whether the masks travel by setting [`ModelPayload::masks`]: `Some` sends
//!   them in full (the receiver does not hold that version yet); `None` omits them, and the
//!   encoder needs the set the receiver already holds (`held_masks`) to put the tensors in mask
//!   order. On the receiving side a payload without masks is decoded against `held_masks`; a
//!   version other than the payload's is a [`WireError::MaskVersionMismatch`].
//! - A run without pruning uses an empty mask set (version 0): it costs nothing on the wire.
//! - A train result is masked against the mask set of its task; the coordinator decodes it
//!   against the set it sent for that round.
//!
//! FedTiny's payloads:
//! - A train task may ask for top-K gradient lists (`adjust`: tensor name and K); the result
//!   answers with one list per tensor (`topk`), each a tensor in [`Encoding::IndexValues`]
//!   ([`codec::encode_sparse`]) named after the tensor and with its shape. Requested tensors must
//!   be prunable tensors of the task's model, each named once, with K at most their element
//!   count; lists must name prunable tensors of the result's state with the same shape, once
//!   each.
//! - Adaptive BatchNorm selection sends a [`CandidateSet`] (density in (0, 1], 1 to
//!   [`MAX_CANDIDATES`] seeds) and a [`Validation`] subset (fraction in (0, 1]); BatchNorm
//!   statistics travel per candidate as a state of running means and variances (any encoding
//!   but mask order, finite, variances non-negative), one per candidate. A candidate
//!   evaluation task's statistics must be exactly the running statistics of its model; a
//!   calibration result's candidates must all have the same tensors and shapes.
//! - What [`decode_result`] cannot see (the result's candidate count against the task's, the
//!   top-K lists against the requests, a calibration result's statistics against the model) is
//!   checked by [`check_answer`], given the task.
//!
//! Decoding trusts nothing: malformed protobuf, missing messages and oneofs, unknown or
//! unspecified enum values, numbers that do not fit or are out of range (zero epochs, a
//! non-finite width, an accuracy above 1, ...) and every codec error become a [`WireError`].

use std::collections::{BTreeMap, BTreeSet};

use fedtiny_common::codec::{
    self, EncodedMask, EncodedMaskSet, EncodedTensor, Encoding, Limits, MaskEncoding,
};
use fedtiny_common::data::Augment;
use fedtiny_common::fedtiny::Allocation;
use fedtiny_common::mask::{Mask, MaskSet};
use fedtiny_common::models::{Arch, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::param::Role;
use fedtiny_common::state::{StateDict, StateEntry};
use fedtiny_common::task::{
    AdjustKind, CalibrateResult, CalibrateTask, CandidateEvalResult, CandidateEvalTask,
    CandidateSet, EvaluateResult, EvaluateTask, LocalTraining, ModelPayload, Task, TaskResult,
    TrainResult, TrainTask, Validation,
};
use prost::Message;

use crate::pb;

/// Why a wire message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The bytes are not a valid protobuf message of the expected type.
    #[error("malformed {message}: {source}")]
    Malformed {
        /// The message type expected.
        message: &'static str,
        /// What the protobuf decoder found.
        #[source]
        source: prost::DecodeError,
    },
    /// A tensor or mask failed to encode or decode.
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    /// A required message or oneof is absent.
    #[error("missing {field}")]
    Missing {
        /// The field, as `Message.field`.
        field: &'static str,
    },
    /// An enum field holds a value this version does not know (or the unspecified 0).
    #[error("{field} has unknown value {value}")]
    UnknownEnum {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The value received.
        value: i32,
    },
    /// A number does not fit its type or is outside its valid range.
    #[error("{field} is out of range: {detail}")]
    OutOfRange {
        /// The field, as `Message.field`.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The masks a payload is masked against are not the version it names.
    #[error("{context}: mask version {actual}, expected {expected}")]
    MaskVersionMismatch {
        /// Which masks were compared.
        context: &'static str,
        /// The version the payload names.
        expected: u64,
        /// The version of the masks at hand.
        actual: u64,
    },
    /// A payload omits its masks and none are held.
    #[error("{context}: the payload omits masks of version {version} and none are held")]
    MissingMasks {
        /// Where the masks were needed.
        context: &'static str,
        /// The version the payload names.
        version: u64,
    },
    /// A result is for another round than the task it answers.
    #[error("result for round {actual}, expected round {expected}")]
    RoundMismatch {
        /// The task's round.
        expected: u64,
        /// The result's round.
        actual: u64,
    },
    /// A result answers another kind of task than the one it was given for.
    #[error("a {actual} result does not answer a {expected} task")]
    KindMismatch {
        /// The task's kind.
        expected: &'static str,
        /// The result's kind.
        actual: &'static str,
    },
    /// A list does not have the length another one prescribes (one entry per candidate, ...).
    #[error("{field} has {actual} entries, expected {expected}")]
    CountMismatch {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The length required.
        expected: usize,
        /// The length received.
        actual: usize,
    },
    /// A name appears twice in a list whose names must be unique.
    #[error("{field}: `{name}` appears twice")]
    DuplicateName {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A tensor names no tensor of the state it refers to.
    #[error("{field}: the state has no tensor `{tensor}`")]
    UnknownTensor {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor named.
        tensor: String,
    },
    /// A tensor that must be present is not.
    #[error("{field}: tensor `{tensor}` is missing")]
    MissingTensor {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor missing.
        tensor: String,
    },
    /// A top-K request or list names a tensor that is not prunable.
    #[error("{field}: tensor `{tensor}` is not prunable")]
    NotPrunable {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor named.
        tensor: String,
    },
    /// A tensor's shape differs from the one of the tensor it refers to.
    #[error("{field}: tensor `{tensor}` has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor.
        tensor: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape received.
        actual: Vec<usize>,
    },
    /// A tensor's role differs from the one of the tensor it refers to.
    #[error("{field}: tensor `{tensor}` has role {actual:?}, expected {expected:?}")]
    RoleMismatch {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor.
        tensor: String,
        /// The role required.
        expected: Role,
        /// The role received.
        actual: Role,
    },
    /// A tensor among BatchNorm statistics is not a running mean or variance.
    #[error("{field}: tensor `{tensor}` has role {role:?}, not a running statistic")]
    NotRunningStatistic {
        /// The field, as `Message.field`.
        field: &'static str,
        /// The tensor.
        tensor: String,
        /// Its role.
        role: Role,
    },
}

/// Top-K gradient lists: per tensor name, (index, value) pairs ascending by index (the shape of
/// [`TrainResult::topk`]).
pub type TopKLists = Vec<(String, Vec<(u32, f32)>)>;

/// Most candidates a [`CandidateSet`] may hold (and so most BatchNorm statistics or evaluation
/// results a message may carry).
pub const MAX_CANDIDATES: usize = 64;

/// Shorthand for results of this module.
pub type Result<T, E = WireError> = std::result::Result<T, E>;

/// The gRPC status for a wire error: `InvalidArgument` with the error's message.
pub fn to_status(err: &WireError) -> tonic::Status {
    tonic::Status::invalid_argument(err.to_string())
}

// ---------------------------------------------------------------------------------------------
// Tasks and results
// ---------------------------------------------------------------------------------------------

/// The kind announced in a [`pb::TaskHeader`] for a task.
pub fn task_kind(task: &Task) -> pb::TaskKind {
    match task {
        Task::Train(_) => pb::TaskKind::Train,
        Task::Evaluate(_) => pb::TaskKind::Evaluate,
        Task::Calibrate(_) => pb::TaskKind::Calibrate,
        Task::EvaluateCandidates(_) => pb::TaskKind::EvaluateCandidates,
    }
}

/// Serializes a task as a [`pb::TaskPayload`]. `held_masks` is the mask set the receiver holds;
/// it is needed (with the payload's version) when the payload omits its masks.
pub fn encode_task(task: &Task, held_masks: Option<&MaskSet>) -> Result<Vec<u8>> {
    Ok(task_to_pb(task, held_masks)?.encode_to_vec())
}

/// Decodes and validates a serialized [`pb::TaskPayload`]. A payload that omits its masks is
/// decoded against `held_masks`, which must have the payload's mask version.
pub fn decode_task(bytes: &[u8], held_masks: Option<&MaskSet>, limits: &Limits) -> Result<Task> {
    let p = pb::TaskPayload::decode(bytes).map_err(|source| WireError::Malformed {
        message: "TaskPayload",
        source,
    })?;
    task_from_pb(p, held_masks, limits)
}

/// A task as its payload message (see [`encode_task`]).
pub fn task_to_pb(task: &Task, held_masks: Option<&MaskSet>) -> Result<pb::TaskPayload> {
    let t = match task {
        Task::Train(t) => pb::task_payload::Task::Train(pb::TrainTask {
            round: t.round,
            model: Some(model_to_pb(&t.model, held_masks)?),
            training: Some(training_to_pb(&t.training)),
            seed: t.seed,
            adjust: adjust_to_pb(&t.adjust),
            adjust_kind: adjust_kind_to_pb(t.adjust_kind) as i32,
        }),
        Task::Evaluate(t) => pb::task_payload::Task::Evaluate(pb::EvaluateTask {
            round: t.round,
            model: Some(model_to_pb(&t.model, held_masks)?),
            batch_size: t.batch_size as u64,
        }),
        Task::Calibrate(t) => pb::task_payload::Task::Calibrate(pb::CalibrateTask {
            round: t.round,
            model: Some(model_to_pb(&t.model, held_masks)?),
            candidates: Some(candidates_to_pb(&t.candidates)),
            passes: t.passes as u64,
            batch_size: t.batch_size as u64,
            validation: Some(validation_to_pb(&t.validation)),
        }),
        Task::EvaluateCandidates(t) => {
            pb::task_payload::Task::EvaluateCandidates(pb::CandidateEvalTask {
                round: t.round,
                model: t
                    .model
                    .as_ref()
                    .map(|m| model_to_pb(m, held_masks))
                    .transpose()?,
                candidates: Some(candidates_to_pb(&t.candidates)),
                bn: bn_to_pb(&t.bn)?,
                batch_size: t.batch_size as u64,
                validation: Some(validation_to_pb(&t.validation)),
            })
        }
    };
    Ok(pb::TaskPayload { task: Some(t) })
}

/// A task from its payload message, validated (see [`decode_task`]).
pub fn task_from_pb(
    p: pb::TaskPayload,
    held_masks: Option<&MaskSet>,
    limits: &Limits,
) -> Result<Task> {
    match p.task.ok_or(WireError::Missing {
        field: "TaskPayload.task",
    })? {
        pb::task_payload::Task::Train(t) => {
            let model = model_from_pb(
                t.model.ok_or(WireError::Missing {
                    field: "TrainTask.model",
                })?,
                held_masks,
                limits,
            )?;
            let training = training_from_pb(&t.training.ok_or(WireError::Missing {
                field: "TrainTask.training",
            })?)?;
            let adjust = adjust_from_pb(t.adjust, &model.state)?;
            let adjust_kind = adjust_kind_from_pb(t.adjust_kind)?;
            Ok(Task::Train(TrainTask {
                round: t.round,
                model,
                training,
                seed: t.seed,
                adjust,
                adjust_kind,
            }))
        }
        pb::task_payload::Task::Evaluate(t) => Ok(Task::Evaluate(EvaluateTask {
            round: t.round,
            model: model_from_pb(
                t.model.ok_or(WireError::Missing {
                    field: "EvaluateTask.model",
                })?,
                held_masks,
                limits,
            )?,
            batch_size: positive("EvaluateTask.batch_size", t.batch_size)?,
        })),
        pb::task_payload::Task::Calibrate(t) => {
            // The cheap checks first: the model is the bulk of the payload.
            let candidates = candidates_from_pb(t.candidates.ok_or(WireError::Missing {
                field: "CalibrateTask.candidates",
            })?)?;
            let passes = positive("CalibrateTask.passes", t.passes)?;
            let batch_size = positive("CalibrateTask.batch_size", t.batch_size)?;
            let validation = validation_from_pb(&t.validation.ok_or(WireError::Missing {
                field: "CalibrateTask.validation",
            })?)?;
            let model = model_from_pb(
                t.model.ok_or(WireError::Missing {
                    field: "CalibrateTask.model",
                })?,
                held_masks,
                limits,
            )?;
            Ok(Task::Calibrate(CalibrateTask {
                round: t.round,
                model,
                candidates,
                passes,
                batch_size,
                validation,
            }))
        }
        pb::task_payload::Task::EvaluateCandidates(t) => {
            const FIELD: &str = "CandidateEvalTask.bn";
            let candidates = candidates_from_pb(t.candidates.ok_or(WireError::Missing {
                field: "CandidateEvalTask.candidates",
            })?)?;
            expect_count(FIELD, candidates.seeds.len(), t.bn.len())?;
            let batch_size = positive("CandidateEvalTask.batch_size", t.batch_size)?;
            let validation = validation_from_pb(&t.validation.ok_or(WireError::Missing {
                field: "CandidateEvalTask.validation",
            })?)?;
            // Without a model, the client checks the statistics against the `w0` it kept.
            let model = t
                .model
                .map(|m| model_from_pb(m, held_masks, limits))
                .transpose()?;
            let bn = bn_from_pb(t.bn, FIELD, limits)?;
            let first = bn.first().cloned().unwrap_or_default();
            let reference = running_statistics(model.as_ref().map_or(&first, |m| &m.state));
            for stats in &bn {
                check_statistics(FIELD, &reference, stats)?;
            }
            Ok(Task::EvaluateCandidates(CandidateEvalTask {
                round: t.round,
                model,
                candidates,
                bn,
                batch_size,
                validation,
            }))
        }
    }
}

/// Serializes a result as a [`pb::ResultPayload`]. A train result's state is put in mask order
/// against `masks`, which must be the version the result names.
pub fn encode_result(result: &TaskResult, masks: &MaskSet) -> Result<Vec<u8>> {
    Ok(result_to_pb(result, masks)?.encode_to_vec())
}

/// Decodes and validates a serialized [`pb::ResultPayload`] answering a task of round `round`
/// whose model was masked with `masks` (the coordinator's set for that round): the round (of
/// every kind of result) and, for a train result, the mask version must match. Checks that need
/// the task itself are [`check_answer`]'s.
pub fn decode_result(
    bytes: &[u8],
    masks: &MaskSet,
    round: u64,
    limits: &Limits,
) -> Result<TaskResult> {
    let p = pb::ResultPayload::decode(bytes).map_err(|source| WireError::Malformed {
        message: "ResultPayload",
        source,
    })?;
    result_from_pb(p, masks, round, limits)
}

/// A result as its payload message (see [`encode_result`]).
pub fn result_to_pb(result: &TaskResult, masks: &MaskSet) -> Result<pb::ResultPayload> {
    let r = match result {
        TaskResult::Train(r) => {
            if r.mask_version != masks.version {
                return Err(WireError::MaskVersionMismatch {
                    context: "train result masks",
                    expected: r.mask_version,
                    actual: masks.version,
                });
            }
            let own = own_masks(masks, &r.masks)?;
            pb::result_payload::Result::Train(pb::TrainResult {
                round: r.round,
                mask_version: r.mask_version,
                num_samples: r.num_samples as u64,
                state: codec::encode_state(&r.state, Some(own.as_ref().unwrap_or(masks)))?
                    .into_iter()
                    .map(tensor_to_pb)
                    .collect(),
                train_loss: r.train_loss,
                train_accuracy: r.train_accuracy,
                seconds: r.seconds,
                peak_rss_bytes: r.peak_rss_bytes,
                topk: topk_to_pb(&r.topk, &r.state)?,
                masks: (!r.masks.is_empty()).then(|| {
                    masks_to_pb(codec::encode_masks(&MaskSet {
                        masks: r.masks.iter().cloned().collect(),
                        version: r.mask_version,
                    }))
                }),
            })
        }
        TaskResult::Evaluate(r) => pb::result_payload::Result::Evaluate(evaluate_to_pb(r)),
        TaskResult::Calibrate(r) => pb::result_payload::Result::Calibrate(pb::CalibrateResult {
            round: r.round,
            val_count: r.val_count as u64,
            bn: bn_to_pb(&r.bn)?,
        }),
        TaskResult::EvaluateCandidates(r) => {
            pb::result_payload::Result::EvaluateCandidates(pb::CandidateEvalResult {
                round: r.round,
                stats: r.stats.iter().map(evaluate_to_pb).collect(),
            })
        }
    };
    Ok(pb::ResultPayload { result: Some(r) })
}

/// A result from its payload message, validated (see [`decode_result`]).
pub fn result_from_pb(
    p: pb::ResultPayload,
    masks: &MaskSet,
    round: u64,
    limits: &Limits,
) -> Result<TaskResult> {
    match p.result.ok_or(WireError::Missing {
        field: "ResultPayload.result",
    })? {
        pb::result_payload::Result::Train(r) => {
            expect_round(round, r.round)?;
            if r.mask_version != masks.version {
                return Err(WireError::MaskVersionMismatch {
                    context: "train result",
                    expected: masks.version,
                    actual: r.mask_version,
                });
            }
            let client_masks: Vec<(String, Mask)> = match r.masks {
                Some(m) => masks_from_pb(m, limits)?.masks.into_iter().collect(),
                None => Vec::new(),
            };
            let own = own_masks(masks, &client_masks)?;
            let tensors = tensors_from_pb(r.state, limits)?;
            let state = codec::decode_state(&tensors, Some(own.as_ref().unwrap_or(masks)), limits)?;
            let topk = topk_from_pb(r.topk, &state, limits)?;
            Ok(TaskResult::Train(TrainResult {
                round: r.round,
                mask_version: r.mask_version,
                num_samples: positive("TrainResult.num_samples", r.num_samples)?,
                state,
                train_loss: non_negative("TrainResult.train_loss", r.train_loss)?,
                train_accuracy: fraction("TrainResult.train_accuracy", r.train_accuracy)?,
                seconds: non_negative("TrainResult.seconds", r.seconds)?,
                peak_rss_bytes: r.peak_rss_bytes,
                topk,
                masks: client_masks,
            }))
        }
        pb::result_payload::Result::Evaluate(r) => {
            Ok(TaskResult::Evaluate(evaluate_from_pb(r, round)?))
        }
        pb::result_payload::Result::Calibrate(r) => {
            const FIELD: &str = "CalibrateResult.bn";
            expect_round(round, r.round)?;
            let val_count = positive("CalibrateResult.val_count", r.val_count)?;
            candidate_count(FIELD, r.bn.len())?;
            let bn = bn_from_pb(r.bn, FIELD, limits)?;
            // Every candidate has the tensors and shapes of the first (the task's model is
            // checked by `check_answer`).
            if let Some(first) = bn.first() {
                let reference = running_statistics(first);
                for stats in &bn {
                    check_statistics(FIELD, &reference, stats)?;
                }
            }
            Ok(TaskResult::Calibrate(CalibrateResult {
                round: r.round,
                val_count,
                bn,
            }))
        }
        pb::result_payload::Result::EvaluateCandidates(r) => {
            expect_round(round, r.round)?;
            candidate_count("CandidateEvalResult.stats", r.stats.len())?;
            let stats = r
                .stats
                .into_iter()
                .map(|s| evaluate_from_pb(s, round))
                .collect::<Result<Vec<_>>>()?;
            Ok(TaskResult::EvaluateCandidates(CandidateEvalResult {
                round: r.round,
                stats,
            }))
        }
    }
}

/// An evaluation result as its message.
pub fn evaluate_to_pb(r: &EvaluateResult) -> pb::EvaluateResult {
    pb::EvaluateResult {
        round: r.round,
        loss_sum: r.loss_sum,
        correct: r.correct as u64,
        count: r.count as u64,
    }
}

/// An evaluation result from its message, validated: the round must be `round`, the loss sum
/// finite and non-negative, `correct` at most `count`.
pub fn evaluate_from_pb(r: pb::EvaluateResult, round: u64) -> Result<EvaluateResult> {
    expect_round(round, r.round)?;
    let correct = to_usize("EvaluateResult.correct", r.correct)?;
    let count = to_usize("EvaluateResult.count", r.count)?;
    if correct > count {
        return Err(WireError::OutOfRange {
            field: "EvaluateResult.correct",
            detail: format!("{correct} correct out of {count}"),
        });
    }
    Ok(EvaluateResult {
        round: r.round,
        loss_sum: non_negative("EvaluateResult.loss_sum", r.loss_sum)?,
        correct,
        count,
    })
}

/// Checks that a result (decoded by [`decode_result`]) answers `task`: the same kind and round;
/// for a train result, the task's mask version and exactly one top-K list per requested tensor,
/// each at most K long; for a calibration result, one state of BatchNorm statistics per candidate,
/// each exactly the running statistics of the task's model (names, roles, shapes); for a
/// candidate evaluation result, one entry per candidate.
///
/// `held` are the masks the task's model is masked with (the receiver's). Against them: a top-K
/// or squared-gradient list may only name pruned positions; a client's own mask (prune-and-grow)
/// may differ from the held one in at most K grown positions, and only a prune-and-grow request
/// may be answered with masks.
pub fn check_answer(task: &Task, result: &TaskResult, held: &MaskSet) -> Result<()> {
    const TOPK: &str = "TrainResult.topk";
    let result_round = match result {
        TaskResult::Train(r) => r.round,
        TaskResult::Evaluate(r) => r.round,
        TaskResult::Calibrate(r) => r.round,
        TaskResult::EvaluateCandidates(r) => r.round,
    };
    match (task, result) {
        (Task::Train(t), TaskResult::Train(r)) => {
            expect_round(t.round, result_round)?;
            if r.mask_version != t.model.mask_version {
                return Err(WireError::MaskVersionMismatch {
                    context: "train result",
                    expected: t.model.mask_version,
                    actual: r.mask_version,
                });
            }
            let requested: BTreeMap<&str, usize> =
                t.adjust.iter().map(|(n, k)| (n.as_str(), *k)).collect();
            if t.adjust_kind == AdjustKind::ClientPruneGrow {
                return check_own_masks(&requested, r, held);
            }
            if let Some((name, _)) = r.masks.first() {
                return Err(WireError::UnknownTensor {
                    field: "TrainResult.masks",
                    tensor: name.clone(),
                });
            }
            let mut answered = BTreeSet::new();
            for (name, pairs) in &r.topk {
                let &k = requested
                    .get(name.as_str())
                    .ok_or_else(|| WireError::UnknownTensor {
                        field: TOPK,
                        tensor: name.clone(),
                    })?;
                if !answered.insert(name.as_str()) {
                    return Err(WireError::DuplicateName {
                        field: TOPK,
                        name: name.clone(),
                    });
                }
                if pairs.len() > k {
                    return Err(WireError::OutOfRange {
                        field: TOPK,
                        detail: format!("{} pairs for `{name}`, {k} requested", pairs.len()),
                    });
                }
                if let Some(mask) = held.masks.get(name)
                    && let Some(&(i, _)) = pairs.iter().find(|(i, _)| mask.get(*i as usize))
                {
                    return Err(WireError::OutOfRange {
                        field: TOPK,
                        detail: format!("position {i} of `{name}` is active, not pruned"),
                    });
                }
            }
            if let Some(name) = requested.keys().find(|n| !answered.contains(*n)) {
                return Err(WireError::MissingTensor {
                    field: TOPK,
                    tensor: (*name).to_string(),
                });
            }
            Ok(())
        }
        (Task::Evaluate(t), TaskResult::Evaluate(_)) => expect_round(t.round, result_round),
        (Task::Calibrate(t), TaskResult::Calibrate(r)) => {
            const FIELD: &str = "CalibrateResult.bn";
            expect_round(t.round, result_round)?;
            expect_count(FIELD, t.candidates.seeds.len(), r.bn.len())?;
            let reference = running_statistics(&t.model.state);
            r.bn.iter()
                .try_for_each(|stats| check_statistics(FIELD, &reference, stats))
        }
        (Task::EvaluateCandidates(t), TaskResult::EvaluateCandidates(r)) => {
            expect_round(t.round, result_round)?;
            expect_count(
                "CandidateEvalResult.stats",
                t.candidates.seeds.len(),
                r.stats.len(),
            )
        }
        _ => Err(WireError::KindMismatch {
            expected: task_name(task),
            actual: result_name(result),
        }),
    }
}

/// A prune-and-grow answer: no lists; own masks only for requested tensors, each growing at
/// most K positions the held mask prunes (the active count was checked when decoding).
fn check_own_masks(
    requested: &BTreeMap<&str, usize>,
    r: &TrainResult,
    held: &MaskSet,
) -> Result<()> {
    const FIELD: &str = "TrainResult.masks";
    if let Some((name, _)) = r.topk.first() {
        return Err(WireError::UnknownTensor {
            field: "TrainResult.topk",
            tensor: name.clone(),
        });
    }
    for (name, own) in &r.masks {
        let k = *requested
            .get(name.as_str())
            .ok_or_else(|| WireError::UnknownTensor {
                field: FIELD,
                tensor: name.clone(),
            })?;
        let mask = held
            .masks
            .get(name)
            .ok_or_else(|| WireError::UnknownTensor {
                field: FIELD,
                tensor: name.clone(),
            })?;
        let grown = own.iter_active().filter(|&i| !mask.get(i)).count();
        if grown > k || own.len() != mask.len() || own.active() != mask.active() {
            return Err(WireError::OutOfRange {
                field: FIELD,
                detail: format!(
                    "mask of `{name}` grows {grown} positions ({k} allowed), {} of {} active \
                     (task: {} of {})",
                    own.active(),
                    own.len(),
                    mask.active(),
                    mask.len()
                ),
            });
        }
    }
    Ok(())
}

fn task_name(task: &Task) -> &'static str {
    match task {
        Task::Train(_) => "train",
        Task::Evaluate(_) => "evaluate",
        Task::Calibrate(_) => "calibrate",
        Task::EvaluateCandidates(_) => "evaluate-candidates",
    }
}

fn result_name(result: &TaskResult) -> &'static str {
    match result {
        TaskResult::Train(_) => "train",
        TaskResult::Evaluate(_) => "evaluate",
        TaskResult::Calibrate(_) => "calibrate",
        TaskResult::EvaluateCandidates(_) => "evaluate-candidates",
    }
}

// ---------------------------------------------------------------------------------------------
// FedTiny: top-K requests and lists, candidates, validation subsets, BatchNorm statistics
// ---------------------------------------------------------------------------------------------

/// The masks a train result's state is in: the task's, with the client's own masks (FedDST)
/// in place of those of the tensors it adjusted. `None` when the client sent none. Each own mask
/// must replace a mask of the task, with the same length and the same active count.
fn own_masks(task: &MaskSet, own: &[(String, Mask)]) -> Result<Option<MaskSet>> {
    const FIELD: &str = "TrainResult.masks";
    if own.is_empty() {
        return Ok(None);
    }
    let mut out = task.clone();
    let mut seen = BTreeSet::new();
    for (name, m) in own {
        if !seen.insert(name.as_str()) {
            return Err(WireError::DuplicateName {
                field: FIELD,
                name: name.clone(),
            });
        }
        let held = task
            .masks
            .get(name)
            .ok_or_else(|| WireError::UnknownTensor {
                field: FIELD,
                tensor: name.clone(),
            })?;
        if m.len() != held.len() || m.active() != held.active() {
            return Err(WireError::OutOfRange {
                field: FIELD,
                detail: format!(
                    "mask of `{name}`: {} of {} active, the task's has {} of {}",
                    m.active(),
                    m.len(),
                    held.active(),
                    held.len()
                ),
            });
        }
        out.masks.insert(name.clone(), m.clone());
    }
    Ok(Some(out))
}

/// An adjustment kind as its message enum.
pub fn adjust_kind_to_pb(k: AdjustKind) -> pb::AdjustKind {
    match k {
        AdjustKind::PrunedTopK => pb::AdjustKind::PrunedTopK,
        AdjustKind::SquaredGradientSum => pb::AdjustKind::SquaredGradientSum,
        AdjustKind::ClientPruneGrow => pb::AdjustKind::ClientPruneGrow,
    }
}

/// An adjustment kind from its message enum value.
pub fn adjust_kind_from_pb(v: i32) -> Result<AdjustKind> {
    match pb::AdjustKind::try_from(v) {
        Ok(pb::AdjustKind::PrunedTopK) => Ok(AdjustKind::PrunedTopK),
        Ok(pb::AdjustKind::SquaredGradientSum) => Ok(AdjustKind::SquaredGradientSum),
        Ok(pb::AdjustKind::ClientPruneGrow) => Ok(AdjustKind::ClientPruneGrow),
        Err(_) => Err(WireError::UnknownEnum {
            field: "TrainTask.adjust_kind",
            value: v,
        }),
    }
}

/// Top-K requests (tensor name, K) as their messages.
pub fn adjust_to_pb(adjust: &[(String, usize)]) -> Vec<pb::AdjustTensor> {
    adjust
        .iter()
        .map(|(name, k)| pb::AdjustTensor {
            name: name.clone(),
            k: *k as u64,
        })
        .collect()
}

/// Top-K requests from their messages, validated against the task model's `state`: each names a
/// prunable tensor of the state, once, with K at most its element count.
pub fn adjust_from_pb(
    adjust: Vec<pb::AdjustTensor>,
    state: &StateDict,
) -> Result<Vec<(String, usize)>> {
    const FIELD: &str = "TrainTask.adjust";
    let mut seen = BTreeSet::new();
    adjust
        .into_iter()
        .map(|a| {
            if !seen.insert(a.name.clone()) {
                return Err(WireError::DuplicateName {
                    field: FIELD,
                    name: a.name,
                });
            }
            let entry = prunable_entry(FIELD, state, &a.name)?;
            let k = to_usize("AdjustTensor.k", a.k)?;
            if k > entry.values.len() {
                return Err(WireError::OutOfRange {
                    field: "AdjustTensor.k",
                    detail: format!(
                        "K = {k} for `{}`, which has {} elements",
                        a.name,
                        entry.values.len()
                    ),
                });
            }
            Ok((a.name, k))
        })
        .collect()
}

/// Top-K lists as tensors in [`Encoding::IndexValues`] ([`codec::encode_sparse`]), each with the
/// role, prunable flag and shape of the tensor of `state` it is named after.
pub fn topk_to_pb(
    topk: &[(String, Vec<(u32, f32)>)],
    state: &StateDict,
) -> Result<Vec<pb::Tensor>> {
    topk.iter()
        .map(|(name, pairs)| {
            let e = state.get(name).ok_or_else(|| WireError::UnknownTensor {
                field: "TrainResult.topk",
                tensor: name.clone(),
            })?;
            Ok(tensor_to_pb(codec::encode_sparse(
                name, e.role, e.prunable, &e.shape, pairs,
            )?))
        })
        .collect()
}

/// Top-K lists from their tensors, validated against the result's `state`: each names a
/// prunable tensor of the state, once, with its role and shape, and is a valid
/// [`codec::decode_sparse`] list (indices in range and strictly ascending, values finite).
pub fn topk_from_pb(
    tensors: Vec<pb::Tensor>,
    state: &StateDict,
    limits: &Limits,
) -> Result<TopKLists> {
    const FIELD: &str = "TrainResult.topk";
    let mut seen = BTreeSet::new();
    tensors_from_pb(tensors, limits)?
        .into_iter()
        .map(|t| {
            if !seen.insert(t.name.clone()) {
                return Err(WireError::DuplicateName {
                    field: FIELD,
                    name: t.name,
                });
            }
            let e = prunable_entry(FIELD, state, &t.name)?;
            if !t.prunable {
                return Err(WireError::NotPrunable {
                    field: FIELD,
                    tensor: t.name,
                });
            }
            if t.role != e.role {
                return Err(WireError::RoleMismatch {
                    field: FIELD,
                    tensor: t.name,
                    expected: e.role,
                    actual: t.role,
                });
            }
            if t.shape != e.shape {
                return Err(WireError::ShapeMismatch {
                    field: FIELD,
                    tensor: t.name,
                    expected: e.shape.clone(),
                    actual: t.shape,
                });
            }
            let pairs = codec::decode_sparse(&t, limits)?;
            Ok((t.name, pairs))
        })
        .collect()
}

/// The entry of a prunable tensor of `state`.
fn prunable_entry<'a>(
    field: &'static str,
    state: &'a StateDict,
    name: &str,
) -> Result<&'a StateEntry> {
    let e = state.get(name).ok_or_else(|| WireError::UnknownTensor {
        field,
        tensor: name.to_string(),
    })?;
    if !e.prunable {
        return Err(WireError::NotPrunable {
            field,
            tensor: name.to_string(),
        });
    }
    Ok(e)
}

/// A candidate allocation rule as its wire enum.
pub fn allocation_to_pb(a: Allocation) -> pb::Allocation {
    match a {
        Allocation::Noise => pb::Allocation::Noise,
        Allocation::Erk => pb::Allocation::Erk,
        Allocation::Uniform => pb::Allocation::Uniform,
    }
}

/// A candidate allocation rule from its wire value.
pub fn allocation_from_pb(value: i32) -> Result<Allocation> {
    match pb::Allocation::try_from(value) {
        Ok(pb::Allocation::Noise) => Ok(Allocation::Noise),
        Ok(pb::Allocation::Erk) => Ok(Allocation::Erk),
        Ok(pb::Allocation::Uniform) => Ok(Allocation::Uniform),
        Ok(pb::Allocation::Unspecified) | Err(_) => Err(WireError::UnknownEnum {
            field: "CandidateSet.allocation",
            value,
        }),
    }
}

/// A candidate set as its message.
pub fn candidates_to_pb(c: &CandidateSet) -> pb::CandidateSet {
    pb::CandidateSet {
        density: c.density,
        allocation: allocation_to_pb(c.allocation) as i32,
        seeds: c.seeds.clone(),
    }
}

/// A candidate set from its message: density in (0, 1], a known allocation, 1 to
/// [`MAX_CANDIDATES`] seeds.
pub fn candidates_from_pb(c: pb::CandidateSet) -> Result<CandidateSet> {
    let density = open_unit("CandidateSet.density", c.density)?;
    let allocation = allocation_from_pb(c.allocation)?;
    candidate_count("CandidateSet.seeds", c.seeds.len())?;
    Ok(CandidateSet {
        density,
        allocation,
        seeds: c.seeds,
    })
}

/// A validation subset as its message.
pub fn validation_to_pb(v: &Validation) -> pb::Validation {
    pb::Validation {
        fraction: v.fraction,
        seed: v.seed,
    }
}

/// A validation subset from its message: the fraction in (0, 1].
pub fn validation_from_pb(v: &pb::Validation) -> Result<Validation> {
    Ok(Validation {
        fraction: open_unit("Validation.fraction", v.fraction)?,
        seed: v.seed,
    })
}

/// Per-candidate BatchNorm statistics as their messages (each state in the smallest encoding of
/// each tensor, none in mask order).
pub fn bn_to_pb(bn: &[StateDict]) -> Result<Vec<pb::CandidateStats>> {
    bn.iter()
        .map(|s| {
            Ok(pb::CandidateStats {
                tensors: codec::encode_state(s, None)?
                    .into_iter()
                    .map(tensor_to_pb)
                    .collect(),
            })
        })
        .collect()
}

/// Per-candidate BatchNorm statistics from their messages, validated: each candidate a state
/// within `limits` (any encoding but mask order, finite values, unique names) of running means
/// and variances only (not prunable, variances non-negative), and all candidates together within
/// [`Limits::max_total_elements`]. The caller checks the count and the tensors against a
/// reference (see [`check_answer`]).
pub fn bn_from_pb(
    bn: Vec<pb::CandidateStats>,
    field: &'static str,
    limits: &Limits,
) -> Result<Vec<StateDict>> {
    // Sparse encodings decode densely: bound the elements of all candidates together before
    // allocating any, or a small message could make the receiver allocate the per-state limit
    // once per candidate. Shapes that overflow or exceed the per-tensor limit are left to the
    // codec, which reports them per tensor.
    let mut total = 0usize;
    for t in bn.iter().flat_map(|c| &c.tensors) {
        let n = t
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= limits.max_elements_per_tensor);
        if let Some(n) = n {
            total = total
                .checked_add(n)
                .filter(|&t| t <= limits.max_total_elements)
                .ok_or_else(|| codec::CodecError::TotalTooLarge {
                    tensor: t.name.clone(),
                    limit: limits.max_total_elements,
                })?;
        }
    }
    bn.into_iter()
        .map(|c| {
            let tensors = tensors_from_pb(c.tensors, limits)?;
            let state = codec::decode_state(&tensors, None, limits)?;
            for (name, e) in &state.entries {
                if !matches!(e.role, Role::RunningMean | Role::RunningVar) {
                    return Err(WireError::NotRunningStatistic {
                        field,
                        tensor: name.clone(),
                        role: e.role,
                    });
                }
                if e.prunable {
                    return Err(WireError::OutOfRange {
                        field,
                        detail: format!("running statistic `{name}` is marked prunable"),
                    });
                }
                if e.role == Role::RunningVar
                    && let Some(i) = e.values.iter().position(|v| *v < 0.0)
                {
                    return Err(WireError::OutOfRange {
                        field,
                        detail: format!(
                            "running variance `{name}` is {} at element {i}",
                            e.values[i]
                        ),
                    });
                }
            }
            Ok(state)
        })
        .collect()
}

/// The running statistics (means and variances) of a state, by name.
fn running_statistics(state: &StateDict) -> BTreeMap<&str, &StateEntry> {
    state
        .entries
        .iter()
        .filter(|(_, e)| matches!(e.role, Role::RunningMean | Role::RunningVar))
        .map(|(n, e)| (n.as_str(), e))
        .collect()
}

/// Checks that every candidate's BatchNorm statistics are exactly the running means and variances
/// of `w0` (names, roles, shapes): for a receiver that kept `w0` from an earlier task.
pub fn check_candidate_statistics(w0: &StateDict, bn: &[StateDict]) -> Result<()> {
    let reference = running_statistics(w0);
    bn.iter()
        .try_for_each(|s| check_statistics("CandidateEvalTask.bn", &reference, s))
}

/// Checks that one candidate's statistics have exactly the tensors of `reference`, with their
/// roles and shapes.
fn check_statistics(
    field: &'static str,
    reference: &BTreeMap<&str, &StateEntry>,
    stats: &StateDict,
) -> Result<()> {
    for (name, e) in &stats.entries {
        let r = reference
            .get(name.as_str())
            .ok_or_else(|| WireError::UnknownTensor {
                field,
                tensor: name.clone(),
            })?;
        if e.role != r.role {
            return Err(WireError::RoleMismatch {
                field,
                tensor: name.clone(),
                expected: r.role,
                actual: e.role,
            });
        }
        if e.shape != r.shape {
            return Err(WireError::ShapeMismatch {
                field,
                tensor: name.clone(),
                expected: r.shape.clone(),
                actual: e.shape.clone(),
            });
        }
    }
    if let Some(name) = reference.keys().find(|n| !stats.entries.contains_key(**n)) {
        return Err(WireError::MissingTensor {
            field,
            tensor: (*name).to_string(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Model payloads, tensors and masks
// ---------------------------------------------------------------------------------------------

/// A model payload as its message. Masked tensors go in mask order against the payload's own
/// masks when it carries them, else against `held_masks` (the receiver's set), whose version
/// must be the payload's.
pub fn model_to_pb(m: &ModelPayload, held_masks: Option<&MaskSet>) -> Result<pb::ModelPayload> {
    let masks = pick_masks(
        m.masks.as_ref(),
        held_masks,
        m.mask_version,
        "model payload",
    )?;
    Ok(pb::ModelPayload {
        spec: Some(spec_to_pb(&m.spec)),
        mask_version: m.mask_version,
        masks: m
            .masks
            .as_ref()
            .map(|s| masks_to_pb(codec::encode_masks(s))),
        state: codec::encode_state(&m.state, Some(masks))?
            .into_iter()
            .map(tensor_to_pb)
            .collect(),
    })
}

/// A model payload from its message, validated. Without masks in the message, the state is
/// decoded against `held_masks`, which must have the message's mask version; the returned
/// payload then has `masks: None`.
pub fn model_from_pb(
    p: pb::ModelPayload,
    held_masks: Option<&MaskSet>,
    limits: &Limits,
) -> Result<ModelPayload> {
    let spec = spec_from_pb(&p.spec.ok_or(WireError::Missing {
        field: "ModelPayload.spec",
    })?)?;
    let sent = p.masks.map(|m| masks_from_pb(m, limits)).transpose()?;
    let masks = pick_masks(sent.as_ref(), held_masks, p.mask_version, "model payload")?;
    let tensors = tensors_from_pb(p.state, limits)?;
    let state = codec::decode_state(&tensors, Some(masks), limits)?;
    Ok(ModelPayload {
        spec,
        mask_version: p.mask_version,
        masks: sent,
        state,
    })
}

/// The masks a payload of version `version` is masked with: its own, else the held ones.
fn pick_masks<'a>(
    own: Option<&'a MaskSet>,
    held: Option<&'a MaskSet>,
    version: u64,
    context: &'static str,
) -> Result<&'a MaskSet> {
    let (masks, context) = match (own, held) {
        (Some(m), _) => (m, context),
        (None, Some(h)) => (h, "held masks"),
        (None, None) => return Err(WireError::MissingMasks { context, version }),
    };
    if masks.version != version {
        return Err(WireError::MaskVersionMismatch {
            context,
            expected: version,
            actual: masks.version,
        });
    }
    Ok(masks)
}

/// An encoded tensor as its message (the bytes are moved, not copied).
pub fn tensor_to_pb(t: EncodedTensor) -> pb::Tensor {
    pb::Tensor {
        role: role_to_pb(t.role) as i32,
        prunable: t.prunable,
        shape: t.shape.iter().map(|&d| d as u64).collect(),
        encoding: encoding_to_pb(t.encoding) as i32,
        name: t.name,
        values: t.values,
        bitmap: t.bitmap,
        indices: t.indices,
    }
}

/// An encoded tensor from its message (enums and dimensions checked; the bytes are checked by
/// [`codec::decode_tensor`]).
pub fn tensor_from_pb(t: pb::Tensor) -> Result<EncodedTensor> {
    let shape = t
        .shape
        .iter()
        .map(|&d| to_usize("Tensor.shape", d))
        .collect::<Result<Vec<_>>>()?;
    Ok(EncodedTensor {
        role: role_from_pb(t.role)?,
        prunable: t.prunable,
        shape,
        encoding: encoding_from_pb(t.encoding)?,
        name: t.name,
        values: t.values,
        bitmap: t.bitmap,
        indices: t.indices,
    })
}

fn tensors_from_pb(ts: Vec<pb::Tensor>, limits: &Limits) -> Result<Vec<EncodedTensor>> {
    if ts.len() > limits.max_tensors {
        return Err(codec::CodecError::TooManyTensors {
            count: ts.len(),
            limit: limits.max_tensors,
        }
        .into());
    }
    ts.into_iter().map(tensor_from_pb).collect()
}

/// An encoded mask set as its message (the bytes are moved, not copied).
pub fn masks_to_pb(m: EncodedMaskSet) -> pb::MaskSet {
    pb::MaskSet {
        version: m.version,
        masks: m
            .masks
            .into_iter()
            .map(|em| pb::Mask {
                name: em.name,
                len: em.len as u64,
                encoding: match em.encoding {
                    MaskEncoding::Bitmap => pb::MaskEncoding::Bitmap,
                    MaskEncoding::Indices => pb::MaskEncoding::Indices,
                } as i32,
                data: em.bytes,
            })
            .collect(),
    }
}

/// A mask set from its message, validated.
pub fn masks_from_pb(m: pb::MaskSet, limits: &Limits) -> Result<MaskSet> {
    if m.masks.len() > limits.max_tensors {
        return Err(codec::CodecError::TooManyTensors {
            count: m.masks.len(),
            limit: limits.max_tensors,
        }
        .into());
    }
    let masks = m
        .masks
        .into_iter()
        .map(|pm| {
            let encoding = match pb::MaskEncoding::try_from(pm.encoding) {
                Ok(pb::MaskEncoding::Bitmap) => MaskEncoding::Bitmap,
                Ok(pb::MaskEncoding::Indices) => MaskEncoding::Indices,
                _ => {
                    return Err(WireError::UnknownEnum {
                        field: "Mask.encoding",
                        value: pm.encoding,
                    });
                }
            };
            Ok(EncodedMask {
                len: to_usize("Mask.len", pm.len)?,
                name: pm.name,
                encoding,
                bytes: pm.data,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(codec::decode_masks(
        &EncodedMaskSet {
            version: m.version,
            masks,
        },
        limits,
    )?)
}

/// A tensor role as its wire enum.
pub fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::Weight => pb::Role::Weight,
        Role::Bias => pb::Role::Bias,
        Role::BnScale => pb::Role::BnScale,
        Role::BnShift => pb::Role::BnShift,
        Role::RunningMean => pb::Role::RunningMean,
        Role::RunningVar => pb::Role::RunningVar,
    }
}

/// A tensor role from its wire value.
pub fn role_from_pb(value: i32) -> Result<Role> {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Weight) => Ok(Role::Weight),
        Ok(pb::Role::Bias) => Ok(Role::Bias),
        Ok(pb::Role::BnScale) => Ok(Role::BnScale),
        Ok(pb::Role::BnShift) => Ok(Role::BnShift),
        Ok(pb::Role::RunningMean) => Ok(Role::RunningMean),
        Ok(pb::Role::RunningVar) => Ok(Role::RunningVar),
        Ok(pb::Role::Unspecified) | Err(_) => Err(WireError::UnknownEnum {
            field: "Tensor.role",
            value,
        }),
    }
}

/// A tensor encoding as its wire enum.
pub fn encoding_to_pb(e: Encoding) -> pb::Encoding {
    match e {
        Encoding::Dense => pb::Encoding::Dense,
        Encoding::BitmapValues => pb::Encoding::BitmapValues,
        Encoding::IndexValues => pb::Encoding::IndexValues,
        Encoding::MaskOrder => pb::Encoding::MaskOrder,
    }
}

/// A tensor encoding from its wire value.
pub fn encoding_from_pb(value: i32) -> Result<Encoding> {
    match pb::Encoding::try_from(value) {
        Ok(pb::Encoding::Dense) => Ok(Encoding::Dense),
        Ok(pb::Encoding::BitmapValues) => Ok(Encoding::BitmapValues),
        Ok(pb::Encoding::IndexValues) => Ok(Encoding::IndexValues),
        Ok(pb::Encoding::MaskOrder) => Ok(Encoding::MaskOrder),
        Ok(pb::Encoding::Unspecified) | Err(_) => Err(WireError::UnknownEnum {
            field: "Tensor.encoding",
            value,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// Model spec, optimizer, augmentation, local training
// ---------------------------------------------------------------------------------------------

/// A model spec as its message.
pub fn spec_to_pb(s: &ModelSpec) -> pb::ModelSpec {
    let [h, w, c] = s.input;
    pb::ModelSpec {
        arch: match s.arch {
            Arch::Cnn => pb::Arch::Cnn,
            Arch::Vgg11 => pb::Arch::Vgg11,
            Arch::Resnet18 => pb::Arch::Resnet18,
        } as i32,
        h: h as u64,
        w: w as u64,
        c: c as u64,
        classes: s.classes as u64,
        width: s.width,
    }
}

/// A model spec from its message, validated by [`ModelSpec::validate`].
pub fn spec_from_pb(p: &pb::ModelSpec) -> Result<ModelSpec> {
    let arch = match pb::Arch::try_from(p.arch) {
        Ok(pb::Arch::Cnn) => Arch::Cnn,
        Ok(pb::Arch::Vgg11) => Arch::Vgg11,
        Ok(pb::Arch::Resnet18) => Arch::Resnet18,
        Ok(pb::Arch::Unspecified) | Err(_) => {
            return Err(WireError::UnknownEnum {
                field: "ModelSpec.arch",
                value: p.arch,
            });
        }
    };
    let spec = ModelSpec {
        arch,
        input: [
            to_usize("ModelSpec.h", p.h)?,
            to_usize("ModelSpec.w", p.w)?,
            to_usize("ModelSpec.c", p.c)?,
        ],
        classes: to_usize("ModelSpec.classes", p.classes)?,
        width: p.width,
    };
    spec.validate().map_err(|e| WireError::OutOfRange {
        field: "ModelSpec",
        detail: e.to_string(),
    })?;
    Ok(spec)
}

/// An optimizer configuration as its oneof.
pub fn optimizer_to_pb(o: &OptimizerConfig) -> pb::local_training::Optimizer {
    match *o {
        OptimizerConfig::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
        } => pb::local_training::Optimizer::Sgd(pb::Sgd {
            lr,
            momentum,
            weight_decay,
            nesterov,
        }),
        OptimizerConfig::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
        } => pb::local_training::Optimizer::Adam(pb::Adam {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            amsgrad,
        }),
    }
}

/// An optimizer configuration from its oneof, validated by [`OptimizerConfig::validate`].
pub fn optimizer_from_pb(o: &pb::local_training::Optimizer) -> Result<OptimizerConfig> {
    let cfg = match *o {
        pb::local_training::Optimizer::Sgd(s) => OptimizerConfig::Sgd {
            lr: s.lr,
            momentum: s.momentum,
            weight_decay: s.weight_decay,
            nesterov: s.nesterov,
        },
        pb::local_training::Optimizer::Adam(a) => OptimizerConfig::Adam {
            lr: a.lr,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            weight_decay: a.weight_decay,
            amsgrad: a.amsgrad,
        },
    };
    cfg.validate().map_err(|e| WireError::OutOfRange {
        field: "LocalTraining.optimizer",
        detail: e.to_string(),
    })?;
    Ok(cfg)
}

/// Augmentation settings as their message.
pub fn augment_to_pb(a: &Augment) -> pb::Augment {
    pb::Augment {
        crop_padding: a.crop_padding as u64,
        horizontal_flip: a.horizontal_flip,
    }
}

/// Augmentation settings from their message.
pub fn augment_from_pb(a: &pb::Augment) -> Result<Augment> {
    Ok(Augment {
        crop_padding: to_usize("Augment.crop_padding", a.crop_padding)?,
        horizontal_flip: a.horizontal_flip,
    })
}

/// Local training settings as their message.
pub fn training_to_pb(t: &LocalTraining) -> pb::LocalTraining {
    pb::LocalTraining {
        epochs: t.epochs as u64,
        batch_size: t.batch_size as u64,
        optimizer: Some(optimizer_to_pb(&t.optimizer)),
        augment: t.augment.as_ref().map(augment_to_pb),
        max_steps: t.max_steps.map(|m| m as u64),
    }
}

/// Local training settings from their message: at least one epoch, a positive batch size, an
/// optimizer that validates.
pub fn training_from_pb(t: &pb::LocalTraining) -> Result<LocalTraining> {
    Ok(LocalTraining {
        epochs: positive("LocalTraining.epochs", t.epochs)?,
        batch_size: positive("LocalTraining.batch_size", t.batch_size)?,
        optimizer: optimizer_from_pb(t.optimizer.as_ref().ok_or(WireError::Missing {
            field: "LocalTraining.optimizer",
        })?)?,
        augment: t.augment.as_ref().map(augment_from_pb).transpose()?,
        max_steps: t
            .max_steps
            .map(|m| positive("LocalTraining.max_steps", m))
            .transpose()?,
    })
}

// ---------------------------------------------------------------------------------------------
// Number checks
// ---------------------------------------------------------------------------------------------

fn to_usize(field: &'static str, v: u64) -> Result<usize> {
    usize::try_from(v).map_err(|_| WireError::OutOfRange {
        field,
        detail: format!("{v} does not fit this platform's usize"),
    })
}

fn positive(field: &'static str, v: u64) -> Result<usize> {
    if v == 0 {
        return Err(WireError::OutOfRange {
            field,
            detail: "must be at least 1".into(),
        });
    }
    to_usize(field, v)
}

fn non_negative(field: &'static str, v: f64) -> Result<f64> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(WireError::OutOfRange {
            field,
            detail: format!("{v} is not a finite non-negative number"),
        })
    }
}

fn fraction(field: &'static str, v: f64) -> Result<f64> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(WireError::OutOfRange {
            field,
            detail: format!("{v} is not in [0, 1]"),
        })
    }
}

/// A number in (0, 1] (so finite).
fn open_unit(field: &'static str, v: f64) -> Result<f64> {
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(WireError::OutOfRange {
            field,
            detail: format!("{v} is not in (0, 1]"),
        })
    }
}

/// A number of candidates: 1 to [`MAX_CANDIDATES`].
fn candidate_count(field: &'static str, n: usize) -> Result<()> {
    if (1..=MAX_CANDIDATES).contains(&n) {
        Ok(())
    } else {
        Err(WireError::OutOfRange {
            field,
            detail: format!("{n} candidates, expected 1 to {MAX_CANDIDATES}"),
        })
    }
}

fn expect_count(field: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(WireError::CountMismatch {
            field,
            expected,
            actual,
        })
    }
}

fn expect_round(expected: u64, actual: u64) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(WireError::RoundMismatch { expected, actual })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_is_validated() {
        let spec = ModelSpec::new(Arch::Resnet18, [32, 32, 3], 10, 0.5).unwrap();
        assert_eq!(spec_from_pb(&spec_to_pb(&spec)).unwrap(), spec);
        let mut p = spec_to_pb(&spec);
        p.width = f64::NAN;
        assert!(matches!(
            spec_from_pb(&p),
            Err(WireError::OutOfRange {
                field: "ModelSpec",
                ..
            })
        ));
        let mut p = spec_to_pb(&spec);
        p.arch = 0;
        assert!(matches!(
            spec_from_pb(&p),
            Err(WireError::UnknownEnum { value: 0, .. })
        ));
        p.arch = 99;
        assert!(matches!(
            spec_from_pb(&p),
            Err(WireError::UnknownEnum { value: 99, .. })
        ));
    }

    #[test]
    fn optimizers_round_trip_and_are_validated() {
        for o in [
            OptimizerConfig::default(),
            OptimizerConfig::Sgd {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: 5e-4,
                nesterov: true,
            },
        ] {
            assert_eq!(optimizer_from_pb(&optimizer_to_pb(&o)).unwrap(), o);
        }
        let bad = pb::local_training::Optimizer::Sgd(pb::Sgd {
            lr: 0.0,
            ..Default::default()
        });
        assert!(matches!(
            optimizer_from_pb(&bad),
            Err(WireError::OutOfRange { .. })
        ));
    }

    #[test]
    fn training_needs_epochs_batch_and_optimizer() {
        let t = LocalTraining {
            epochs: 2,
            batch_size: 32,
            optimizer: OptimizerConfig::default(),
            augment: Some(Augment::cifar10()),
            max_steps: Some(7),
        };
        assert_eq!(training_from_pb(&training_to_pb(&t)).unwrap(), t);
        let mut p = training_to_pb(&t);
        p.epochs = 0;
        assert!(matches!(
            training_from_pb(&p),
            Err(WireError::OutOfRange {
                field: "LocalTraining.epochs",
                ..
            })
        ));
        let mut p = training_to_pb(&t);
        p.batch_size = 0;
        assert!(matches!(
            training_from_pb(&p),
            Err(WireError::OutOfRange {
                field: "LocalTraining.batch_size",
                ..
            })
        ));
        let mut p = training_to_pb(&t);
        p.optimizer = None;
        assert!(matches!(
            training_from_pb(&p),
            Err(WireError::Missing {
                field: "LocalTraining.optimizer"
            })
        ));
    }

    #[test]
    fn allocations_candidates_and_validation_round_trip_and_are_validated() {
        for a in [Allocation::Noise, Allocation::Erk, Allocation::Uniform] {
            assert_eq!(allocation_from_pb(allocation_to_pb(a) as i32).unwrap(), a);
        }
        assert!(matches!(
            allocation_from_pb(0),
            Err(WireError::UnknownEnum {
                field: "CandidateSet.allocation",
                value: 0
            })
        ));
        let c = CandidateSet {
            density: 1.0,
            allocation: Allocation::Erk,
            seeds: vec![3, 1, 3],
        };
        assert_eq!(candidates_from_pb(candidates_to_pb(&c)).unwrap(), c);
        let v = Validation {
            fraction: 0.25,
            seed: u64::MAX,
        };
        assert_eq!(validation_from_pb(&validation_to_pb(&v)).unwrap(), v);
        for bad in [0.0, -0.0, 1.5, f64::NAN, f64::NEG_INFINITY] {
            assert!(open_unit("x", bad).is_err(), "{bad}");
        }
        assert!(candidate_count("x", 0).is_err());
        assert!(candidate_count("x", MAX_CANDIDATES).is_ok());
        assert!(candidate_count("x", MAX_CANDIDATES + 1).is_err());
    }

    #[test]
    fn status_is_invalid_argument_with_the_message() {
        let e = WireError::RoundMismatch {
            expected: 3,
            actual: 4,
        };
        let s = to_status(&e);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), e.to_string());
    }
}
