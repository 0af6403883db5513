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
//! Decoding trusts nothing: malformed protobuf, missing messages and oneofs, unknown or
//! unspecified enum values, numbers that do not fit or are out of range (zero epochs, a
//! non-finite width, an accuracy above 1, ...) and every codec error become a [`WireError`].

use fedtiny_common::codec::{
    self, EncodedMask, EncodedMaskSet, EncodedTensor, Encoding, Limits, MaskEncoding,
};
use fedtiny_common::data::Augment;
use fedtiny_common::mask::MaskSet;
use fedtiny_common::models::{Arch, ModelSpec};
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_common::param::Role;
use fedtiny_common::task::{
    EvaluateResult, EvaluateTask, LocalTraining, ModelPayload, Task, TaskResult, TrainResult,
    TrainTask,
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
}

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
        }),
        Task::Evaluate(t) => pb::task_payload::Task::Evaluate(pb::EvaluateTask {
            round: t.round,
            model: Some(model_to_pb(&t.model, held_masks)?),
            batch_size: t.batch_size as u64,
        }),
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
        pb::task_payload::Task::Train(t) => Ok(Task::Train(TrainTask {
            round: t.round,
            model: model_from_pb(
                t.model.ok_or(WireError::Missing {
                    field: "TrainTask.model",
                })?,
                held_masks,
                limits,
            )?,
            training: training_from_pb(&t.training.ok_or(WireError::Missing {
                field: "TrainTask.training",
            })?)?,
            seed: t.seed,
        })),
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
    }
}

/// Serializes a result as a [`pb::ResultPayload`]. A train result's state is put in mask order
/// against `masks`, which must be the version the result names.
pub fn encode_result(result: &TaskResult, masks: &MaskSet) -> Result<Vec<u8>> {
    Ok(result_to_pb(result, masks)?.encode_to_vec())
}

/// Decodes and validates a serialized [`pb::ResultPayload`] answering a task of round `round`
/// whose model was masked with `masks` (the coordinator's set for that round): the round and, for
/// a train result, the mask version must match.
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
            pb::result_payload::Result::Train(pb::TrainResult {
                round: r.round,
                mask_version: r.mask_version,
                num_samples: r.num_samples as u64,
                state: codec::encode_state(&r.state, Some(masks))?
                    .into_iter()
                    .map(tensor_to_pb)
                    .collect(),
                train_loss: r.train_loss,
                train_accuracy: r.train_accuracy,
                seconds: r.seconds,
                peak_rss_bytes: r.peak_rss_bytes,
            })
        }
        TaskResult::Evaluate(r) => pb::result_payload::Result::Evaluate(pb::EvaluateResult {
            round: r.round,
            loss_sum: r.loss_sum,
            correct: r.correct as u64,
            count: r.count as u64,
        }),
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
            let tensors = tensors_from_pb(r.state, limits)?;
            Ok(TaskResult::Train(TrainResult {
                round: r.round,
                mask_version: r.mask_version,
                num_samples: positive("TrainResult.num_samples", r.num_samples)?,
                state: codec::decode_state(&tensors, Some(masks), limits)?,
                train_loss: non_negative("TrainResult.train_loss", r.train_loss)?,
                train_accuracy: fraction("TrainResult.train_accuracy", r.train_accuracy)?,
                seconds: non_negative("TrainResult.seconds", r.seconds)?,
                peak_rss_bytes: r.peak_rss_bytes,
            }))
        }
        pb::result_payload::Result::Evaluate(r) => {
            expect_round(round, r.round)?;
            let correct = to_usize("EvaluateResult.correct", r.correct)?;
            let count = to_usize("EvaluateResult.count", r.count)?;
            if correct > count {
                return Err(WireError::OutOfRange {
                    field: "EvaluateResult.correct",
                    detail: format!("{correct} correct out of {count}"),
                });
            }
            Ok(TaskResult::Evaluate(EvaluateResult {
                round: r.round,
                loss_sum: non_negative("EvaluateResult.loss_sum", r.loss_sum)?,
                correct,
                count,
            }))
        }
    }
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
