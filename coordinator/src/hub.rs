//! The registry of connected clients and their mailboxes: the meeting point of the gRPC
//! handlers (which the clients drive) and the round engine (which hands out tasks).
//!
//! Each client (identified by its certificate) has at most one slot, holding its session, when
//! it was last heard from, and at most one pending task. [`GrpcProxy::execute`] puts the encoded
//! task in the slot and waits; the client's long-poll takes the header, fetches the payload in
//! chunks, uploads its result in chunks and submits it, which resolves the waiting proxy. A
//! client that leaves, rejoins or falls silent fails its pending task with
//! [`Failure::Disconnected`], so the round goes on without it.
//!
//! No lock is ever held across an `.await`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fedtiny_common::codec::Limits;
use fedtiny_common::mask::MaskSet;
use fedtiny_common::state::StateDict;
use fedtiny_common::task::{ClientId, Task, TaskResult};
use fedtiny_proto::chunk::crc32;
use fedtiny_proto::convert;
use tokio::sync::{Notify, oneshot};

use crate::budget::DeclaredBudgets;
use crate::config::ServerSection;
use crate::proxy::{ClientPool, ClientProxy, Failure, Reply, ReplyFuture, Traffic};

/// A task waiting in a client's mailbox or being worked on.
pub struct PendingTask {
    /// Unique id of the task.
    pub task_id: String,
    /// Its round.
    pub round: u64,
    /// Whether it trains or evaluates.
    pub kind: fedtiny_proto::pb::TaskKind,
    /// The encoded task payload.
    pub payload: Arc<Vec<u8>>,
    /// CRC-32 of the payload.
    pub crc32: u32,
    /// The masks the result is decoded against.
    pub masks: Arc<MaskSet>,
    /// The result bytes uploaded so far.
    pub upload: Vec<u8>,
    /// Name and shape of every tensor a training result must have (the task's model state).
    layout: Vec<(String, Vec<usize>)>,
    /// The task without its weights (what [`convert::check_answer`] needs: kind, round, mask
    /// version, adjustment request, candidates and BatchNorm statistics).
    answer: Task,
    reply: Option<oneshot::Sender<Result<Reply, Failure>>>,
}

impl PendingTask {
    /// Resolves the task as failed (once; later calls do nothing).
    pub(crate) fn fail(&mut self, f: Failure) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Err(f));
        }
    }
}

/// One connected client.
pub struct Slot {
    /// The session id handed out at join.
    pub session_id: String,
    /// When the client was last heard from.
    pub last_seen: Instant,
    /// Training samples the client reported (informational).
    pub num_train_samples: u64,
    /// Memory budget the client declared (0 = none).
    pub memory_budget_bytes: u64,
    /// The task in its mailbox, if any.
    pub pending: Option<PendingTask>,
    /// The mask version this session has shown it holds (by answering a task masked with it).
    /// A new session starts with none, whatever the engine remembers of the client.
    held_masks: Option<u64>,
    notify: Arc<Notify>,
}

/// Why a handler refused a call.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The session is unknown (never joined, expired, or replaced by a newer join).
    #[error("unknown session for {0}: join again")]
    UnknownSession(ClientId),
    /// The task is not this client's current task.
    #[error("task `{task}` is not a current task of {client}")]
    UnknownTask {
        /// The client.
        client: ClientId,
        /// The task id it named.
        task: String,
    },
    /// The request is malformed (bad offsets, sizes, checksums).
    #[error("{0}")]
    Invalid(String),
}

impl From<HubError> for tonic::Status {
    fn from(e: HubError) -> Self {
        match e {
            HubError::UnknownSession(_) => tonic::Status::failed_precondition(e.to_string()),
            HubError::UnknownTask { .. } => tonic::Status::not_found(e.to_string()),
            HubError::Invalid(_) => tonic::Status::invalid_argument(e.to_string()),
        }
    }
}

/// The shared registry.
pub struct Hub {
    slots: Mutex<BTreeMap<ClientId, Slot>>,
    /// Server settings (timing and limits).
    pub server: ServerSection,
    /// Decoding limits of payloads.
    pub limits: Limits,
    /// Identifies the run to clients.
    pub run_id: String,
    /// The memory budgets clients declared, registered under `run_id` for the round engine.
    budgets: Arc<DeclaredBudgets>,
    run_over: AtomicBool,
    counter: AtomicU64,
    started: Instant,
}

impl Hub {
    /// An empty registry.
    pub fn new(server: ServerSection, run_id: String) -> Arc<Self> {
        Arc::new(Hub {
            slots: Mutex::new(BTreeMap::new()),
            server,
            limits: Limits::default(),
            budgets: crate::budget::register(&run_id),
            run_id,
            run_over: AtomicBool::new(false),
            counter: AtomicU64::new(1),
            started: Instant::now(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<ClientId, Slot>> {
        // A poisoned lock means a handler panicked mid-update; the map itself stays usable.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh_id(&self, prefix: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let t = self.started.elapsed().as_nanos() as u64;
        format!(
            "{prefix}-{n:x}-{:x}",
            fedtiny_common::rng::derive(t, prefix, n) & 0xffff_ffff
        )
    }

    /// The memory budgets clients declared.
    pub fn budgets(&self) -> &Arc<DeclaredBudgets> {
        &self.budgets
    }

    /// Whether the run is over.
    pub fn run_over(&self) -> bool {
        self.run_over.load(Ordering::SeqCst)
    }

    /// Marks the run over and wakes every long-poll.
    pub fn finish(&self) {
        self.run_over.store(true, Ordering::SeqCst);
        for slot in self.lock().values() {
            slot.notify.notify_waiters();
        }
    }

    fn alive_for(&self) -> Duration {
        Duration::from_millis(
            self.server.heartbeat_interval_ms * u64::from(self.server.missed_heartbeats),
        )
    }

    /// Registers (or re-registers) a client and returns its new session id. A previous session's
    /// pending task fails as disconnected. The client's memory budget (0 = none) replaces the
    /// one it declared before; the round engine applies it.
    pub fn join(&self, id: &ClientId, num_train_samples: u64, memory_budget_bytes: u64) -> String {
        let session_id = self.fresh_id("s");
        self.budgets.declare(id, memory_budget_bytes);
        let mut slots = self.lock();
        if let Some(mut old) = slots.remove(id) {
            if let Some(p) = old.pending.as_mut() {
                p.fail(Failure::Disconnected("the client joined again".into()));
            }
            old.notify.notify_waiters();
        }
        slots.insert(
            id.clone(),
            Slot {
                session_id: session_id.clone(),
                last_seen: Instant::now(),
                num_train_samples,
                memory_budget_bytes,
                pending: None,
                held_masks: None,
                notify: Arc::new(Notify::new()),
            },
        );
        tracing::info!(client = %id, memory_budget_bytes, "joined");
        session_id
    }

    /// Removes a client (it left); its pending task fails.
    pub fn leave(&self, id: &ClientId, session: &str) -> Result<(), HubError> {
        let mut slots = self.lock();
        match slots.get(id) {
            Some(s) if s.session_id == session => {}
            _ => return Err(HubError::UnknownSession(id.clone())),
        }
        if let Some(mut s) = slots.remove(id) {
            if let Some(p) = s.pending.as_mut() {
                p.fail(Failure::Disconnected("the client left".into()));
            }
            s.notify.notify_waiters();
        }
        tracing::info!(client = %id, "left");
        Ok(())
    }

    /// Runs `f` on the slot of a client with a valid session, refreshing `last_seen`.
    pub fn with_slot<R>(
        &self,
        id: &ClientId,
        session: &str,
        f: impl FnOnce(&mut Slot) -> Result<R, HubError>,
    ) -> Result<R, HubError> {
        let mut slots = self.lock();
        let slot = slots
            .get_mut(id)
            .filter(|s| s.session_id == session)
            .ok_or_else(|| HubError::UnknownSession(id.clone()))?;
        slot.last_seen = Instant::now();
        f(slot)
    }

    /// The notifier of a client's mailbox.
    pub fn notifier(&self, id: &ClientId, session: &str) -> Result<Arc<Notify>, HubError> {
        self.with_slot(id, session, |s| Ok(s.notify.clone()))
    }

    /// Drops clients silent for longer than the heartbeat allowance, failing their tasks.
    pub fn expire_silent(&self) {
        let limit = self.alive_for();
        let mut slots = self.lock();
        let gone: Vec<ClientId> = slots
            .iter()
            .filter(|(_, s)| s.last_seen.elapsed() > limit)
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(mut s) = slots.remove(&id) {
                tracing::warn!(client = %id, "silent too long: dropped");
                if let Some(p) = s.pending.as_mut() {
                    p.fail(Failure::Disconnected("no heartbeat".into()));
                }
                s.notify.notify_waiters();
            }
        }
    }

    /// Resolves a client's current task with the uploaded result (decoded and validated here:
    /// a malformed result fails the task as [`Failure::Invalid`] and is reported back to the
    /// client). `error` is the client's own failure report.
    pub fn submit(
        &self,
        id: &ClientId,
        session: &str,
        task_id: &str,
        payload_bytes: u64,
        payload_crc32: u32,
        error: Option<String>,
    ) -> Result<(), HubError> {
        let (mut pending, limits) = self.with_slot(id, session, |s| {
            match &s.pending {
                Some(p) if p.task_id == task_id => {}
                _ => {
                    return Err(HubError::UnknownTask {
                        client: id.clone(),
                        task: task_id.to_string(),
                    });
                }
            }
            Ok((s.pending.take(), self.limits))
        })?;
        let Some(p) = pending.as_mut() else {
            return Err(HubError::UnknownTask {
                client: id.clone(),
                task: task_id.to_string(),
            });
        };
        if let Some(msg) = error {
            p.fail(Failure::ClientError(msg));
            return Ok(());
        }
        let upload = std::mem::take(&mut p.upload);
        if upload.len() as u64 != payload_bytes || crc32(&upload) != payload_crc32 {
            let m = format!(
                "uploaded {} bytes with CRC {:08x}, submit says {payload_bytes} bytes with CRC {payload_crc32:08x}",
                upload.len(),
                crc32(&upload)
            );
            p.fail(Failure::Invalid(m.clone()));
            return Err(HubError::Invalid(m));
        }
        let decoded = convert::decode_result(&upload, &p.masks, p.round, &limits)
            .map_err(|e| e.to_string())
            .and_then(|result| check_result(p, &result).map(|()| result))
            .and_then(|result| {
                convert::check_answer(&p.answer, &result, &p.masks)
                    .map_err(|e| e.to_string())
                    .map(|()| result)
            });
        match decoded {
            Ok(result) => {
                if let TaskResult::Train(r) = &result {
                    let _ = self.with_slot(id, session, |s| {
                        s.held_masks = Some(r.mask_version);
                        Ok(())
                    });
                }
                if let Some(tx) = p.reply.take() {
                    let _ = tx.send(Ok(Reply {
                        result,
                        traffic: Traffic {
                            bytes_down: p.payload.len() as u64,
                            bytes_up: upload.len() as u64,
                        },
                    }));
                }
                Ok(())
            }
            Err(e) => {
                let m = format!("result refused: {e}");
                tracing::warn!(client = %id, task = task_id, "{m}");
                p.fail(Failure::Invalid(m.clone()));
                Err(HubError::Invalid(m))
            }
        }
    }

    /// The mask version the session of a client has shown it holds.
    fn held_masks(&self, id: &ClientId) -> Option<u64> {
        self.lock().get(id).and_then(|s| s.held_masks)
    }

    fn put_task(&self, id: &ClientId, task: PendingTask) -> Result<(), Failure> {
        let mut slots = self.lock();
        let slot = slots
            .get_mut(id)
            .ok_or_else(|| Failure::Disconnected("not connected".into()))?;
        if let Some(old) = slot.pending.as_mut() {
            old.fail(Failure::Disconnected("superseded by a newer task".into()));
        }
        slot.pending = Some(task);
        slot.notify.notify_waiters();
        slot.notify.notify_one();
        Ok(())
    }
}

/// The model a task carries.
fn model_mut(task: &mut Task) -> Option<&mut fedtiny_common::task::ModelPayload> {
    match task {
        Task::Train(t) => Some(&mut t.model),
        Task::Evaluate(t) => Some(&mut t.model),
        _ => None,
    }
}

/// A task stripped of everything but the BatchNorm statistics of its model (and of its masks).
fn skeleton(mut task: Task) -> Task {
    use fedtiny_common::param::Role;
    let model = match &mut task {
        Task::Train(t) => Some(&mut t.model),
        Task::Evaluate(t) => Some(&mut t.model),
        Task::Calibrate(t) => Some(&mut t.model),
        Task::EvaluateCandidates(t) => t.model.as_mut(),
    };
    if let Some(model) = model {
        model.masks = None;
        model
            .state
            .entries
            .retain(|_, e| matches!(e.role, Role::RunningMean | Role::RunningVar));
    }
    task
}

fn layout_of(state: &StateDict) -> Vec<(String, Vec<usize>)> {
    state
        .entries
        .iter()
        .map(|(name, e)| (name.clone(), e.shape.clone()))
        .collect()
}

/// Checks a decoded result against its task: the kind of answer, and for a training result the
/// name and shape of every tensor. (The engine validates again against the global model; these
/// checks run here so that the client hears of a malformed result.)
fn check_result(p: &PendingTask, result: &TaskResult) -> Result<(), String> {
    use fedtiny_proto::pb::TaskKind;
    let kind_ok = matches!(
        (p.kind, result),
        (TaskKind::Train, TaskResult::Train(_))
            | (TaskKind::Evaluate, TaskResult::Evaluate(_))
            | (TaskKind::Calibrate, TaskResult::Calibrate(_))
            | (
                TaskKind::EvaluateCandidates,
                TaskResult::EvaluateCandidates(_)
            )
    );
    if !kind_ok {
        return Err(format!(
            "expected a {} result",
            match p.kind {
                TaskKind::Train => "training",
                TaskKind::Evaluate => "evaluation",
                TaskKind::Calibrate => "calibration",
                TaskKind::EvaluateCandidates => "candidate evaluation",
                TaskKind::Unspecified => "task",
            }
        ));
    }
    if let TaskResult::Train(r) = result {
        if r.state.entries.len() != p.layout.len() {
            return Err(format!(
                "{} tensors, expected {}",
                r.state.entries.len(),
                p.layout.len()
            ));
        }
        for (name, shape) in &p.layout {
            match r.state.entries.get(name) {
                None => return Err(format!("missing tensor `{name}`")),
                Some(e) if &e.shape != shape => {
                    return Err(format!(
                        "tensor `{name}` has shape {:?}, expected {shape:?}",
                        e.shape
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The engine's handle on a gRPC client.
pub struct GrpcProxy {
    hub: Arc<Hub>,
    id: ClientId,
}

impl ClientProxy for GrpcProxy {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn execute(&self, task: Task, masks: Arc<MaskSet>) -> ReplyFuture {
        let hub = self.hub.clone();
        let id = self.id.clone();
        Box::pin(async move {
            let mut task = task;
            // The engine omits the masks for a client it saw answer with them, but a client that
            // came back (a new session, maybe a new process) may have lost them: send them again
            // until this session has shown it holds them.
            if hub.held_masks(&id) != Some(masks.version)
                && let Some(model) = model_mut(&mut task)
                && model.masks.is_none()
                && model.mask_version == masks.version
            {
                model.masks = Some((*masks).clone());
            }
            let layout = match &task {
                Task::Train(t) => layout_of(&t.model.state),
                _ => Vec::new(),
            };
            let payload = convert::encode_task(&task, Some(&masks))
                .map_err(|e| Failure::Invalid(format!("encoding the task: {e}")))?;
            let (round, kind) = (task.round(), convert::task_kind(&task));
            let answer = skeleton(task);
            let (tx, rx) = oneshot::channel();
            let pending = PendingTask {
                task_id: hub.fresh_id("t"),
                round,
                kind,
                crc32: crc32(&payload),
                payload: Arc::new(payload),
                masks,
                upload: Vec::new(),
                layout,
                answer,
                reply: Some(tx),
            };
            hub.put_task(&id, pending)?;
            rx.await
                .map_err(|_| Failure::Disconnected("the task was dropped".into()))?
        })
    }
}

/// The gRPC clients available to the engine: joined, heard from recently.
pub struct GrpcPool {
    hub: Arc<Hub>,
}

impl GrpcPool {
    /// The pool of a hub.
    pub fn new(hub: Arc<Hub>) -> Self {
        GrpcPool { hub }
    }
}

impl ClientPool for GrpcPool {
    fn available(&self) -> Vec<Arc<dyn ClientProxy>> {
        self.hub.expire_silent();
        self.hub
            .lock()
            .keys()
            .map(|id| {
                Arc::new(GrpcProxy {
                    hub: self.hub.clone(),
                    id: id.clone(),
                }) as Arc<dyn ClientProxy>
            })
            .collect()
    }

    fn finish(&self) {
        self.hub.finish();
    }
}
