//! The `fedtiny.v1.Federation` gRPC service: thin handlers that authenticate the caller by its
//! certificate, touch the [`Hub`], and encode replies. Nothing heavy runs here; decoding a result
//! is the most they do.
//!
//! Identity is the common name of the client's certificate (checked by mutual TLS before any
//! handler runs), never a field of a message: one client cannot act on another's session or task.

use std::sync::Arc;
use std::time::Duration;

use fedtiny_common::task::ClientId;
use fedtiny_proto::pb::federation_server::Federation;
use fedtiny_proto::pb::{self, poll_reply};
use fedtiny_proto::tls;
use tonic::{Request, Response, Status};

use crate::hub::{Hub, HubError, PendingTask};
use crate::proxy::Failure;

/// The service implementation.
pub struct FederationService {
    hub: Arc<Hub>,
}

impl FederationService {
    /// A service over a hub.
    pub fn new(hub: Arc<Hub>) -> Self {
        FederationService { hub }
    }
}

fn identity<T>(request: &Request<T>) -> Result<ClientId, Status> {
    tls::authenticate(request).map(ClientId)
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        if self.hub.run_over() {
            return Err(Status::failed_precondition("the run is over"));
        }
        let session_id = self
            .hub
            .join(&id, r.num_train_samples, r.memory_budget_bytes);
        let s = &self.hub.server;
        Ok(Response::new(pb::JoinReply {
            session_id,
            run_id: self.hub.run_id.clone(),
            heartbeat_interval_ms: u32::try_from(s.heartbeat_interval_ms).unwrap_or(u32::MAX),
            poll_timeout_ms: u32::try_from(s.poll_timeout_ms).unwrap_or(u32::MAX),
            max_chunk_bytes: u32::try_from(s.chunk_bytes).unwrap_or(u32::MAX),
        }))
    }

    async fn poll_task(
        &self,
        request: Request<pb::PollRequest>,
    ) -> Result<Response<pb::PollReply>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        // A long-poll never outlasts the heartbeat interval: each poll refreshes the client's
        // liveness, so a client waiting for work is not mistaken for a silent one.
        let wait = Duration::from_millis(
            u64::from(r.wait_ms)
                .min(self.hub.server.poll_timeout_ms)
                .min(self.hub.server.heartbeat_interval_ms),
        );
        let deadline = tokio::time::Instant::now() + wait;
        let chunk = self.hub.server.chunk_bytes;
        loop {
            if self.hub.run_over() {
                return Ok(Response::new(pb::PollReply {
                    reply: Some(poll_reply::Reply::RunOver(pb::RunOver {
                        reason: "the run is complete".into(),
                    })),
                }));
            }
            let notify = self.hub.notifier(&id, &r.session_id)?;
            let notified = notify.notified();
            let header = self.hub.with_slot(&id, &r.session_id, |s| {
                Ok(s.pending.as_ref().map(|p| pb::TaskHeader {
                    task_id: p.task_id.clone(),
                    round: p.round,
                    kind: p.kind as i32,
                    payload_bytes: p.payload.len() as u64,
                    payload_crc32: p.crc32,
                    first_chunk: p.payload[..p.payload.len().min(chunk)].to_vec(),
                }))
            })?;
            if let Some(h) = header {
                return Ok(Response::new(pb::PollReply {
                    reply: Some(poll_reply::Reply::Task(h)),
                }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(pb::PollReply {
                    reply: Some(poll_reply::Reply::Idle(pb::Idle { retry_after_ms: 0 })),
                }));
            }
        }
    }

    async fn fetch_chunk(
        &self,
        request: Request<pb::FetchChunkRequest>,
    ) -> Result<Response<pb::Chunk>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        let max = (r.max_bytes as usize).clamp(1, self.hub.server.chunk_bytes);
        let data = self.hub.with_slot(&id, &r.session_id, |s| {
            let p = s
                .pending
                .as_ref()
                .filter(|p| p.task_id == r.task_id)
                .ok_or_else(|| HubError::UnknownTask {
                    client: id.clone(),
                    task: r.task_id.clone(),
                })?;
            fedtiny_proto::chunk::chunk_at(&p.payload, r.offset, max)
                .map(<[u8]>::to_vec)
                .map_err(|e| HubError::Invalid(e.to_string()))
        })?;
        Ok(Response::new(pb::Chunk {
            task_id: r.task_id,
            offset: r.offset,
            data,
        }))
    }

    async fn upload_chunk(
        &self,
        request: Request<pb::UploadChunkRequest>,
    ) -> Result<Response<pb::UploadAck>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        let (chunk_max, total_max) = (
            self.hub.server.chunk_bytes,
            self.hub.server.max_payload_bytes,
        );
        // A result over the limit can never be accepted: its task fails at once (and leaves the
        // mailbox), so the round does not wait for its deadline.
        let too_big = |p: &mut PendingTask, m: String| {
            tracing::warn!(client = %id, task = %r.task_id, "{m}");
            p.fail(Failure::Invalid(m.clone()));
            HubError::Invalid(m)
        };
        let received = self.hub.with_slot(&id, &r.session_id, |s| {
            let p = s
                .pending
                .as_mut()
                .filter(|p| p.task_id == r.task_id)
                .ok_or_else(|| HubError::UnknownTask {
                    client: id.clone(),
                    task: r.task_id.clone(),
                })?;
            if r.payload_bytes > total_max as u64 {
                let m = format!(
                    "result of {} bytes exceeds the limit of {total_max}",
                    r.payload_bytes
                );
                let e = too_big(p, m);
                s.pending = None;
                return Err(e);
            }
            if r.data.len() > chunk_max {
                return Err(HubError::Invalid(format!(
                    "chunk of {} bytes exceeds the limit of {chunk_max}",
                    r.data.len()
                )));
            }
            let have = p.upload.len() as u64;
            let end = r.offset.saturating_add(r.data.len() as u64);
            if r.offset == have {
                if end > total_max as u64 {
                    let e = too_big(p, format!("result exceeds the limit of {total_max} bytes"));
                    s.pending = None;
                    return Err(e);
                }
                p.upload.extend_from_slice(&r.data);
            } else if end == have
                && p.upload
                    .get(r.offset as usize..)
                    .is_some_and(|tail| tail == r.data.as_slice())
            {
                // A retried chunk that already arrived.
            } else {
                return Err(HubError::Invalid(format!(
                    "chunk at offset {} does not continue the upload ({have} bytes so far)",
                    r.offset
                )));
            }
            Ok(p.upload.len() as u64)
        })?;
        Ok(Response::new(pb::UploadAck {
            received_bytes: received,
        }))
    }

    async fn submit_result(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        let error = r.error.map(|e| e.message);
        let hub = self.hub.clone();
        // Decoding a large result is CPU work: keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            hub.submit(
                &id,
                &r.session_id,
                &r.task_id,
                r.payload_bytes,
                r.payload_crc32,
                error,
            )
        })
        .await
        .map_err(|e| Status::internal(format!("submit task failed: {e}")))??;
        Ok(Response::new(pb::SubmitReply {
            accepted: true,
            message: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        self.hub.with_slot(&id, &r.session_id, |_| Ok(()))?;
        Ok(Response::new(pb::HeartbeatReply {
            run_over: self.hub.run_over(),
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let id = identity(&request)?;
        let r = request.into_inner();
        self.hub.leave(&id, &r.session_id)?;
        Ok(Response::new(pb::LeaveReply {}))
    }
}
