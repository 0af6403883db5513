//! The whole protocol over a real gRPC channel on loopback (plain HTTP/2, no TLS): join, poll a
//! task whose payload is larger than one chunk, fetch the rest, decode it, upload a result in
//! chunks (with a retried chunk), submit it, and decode it on the server side. Checks that the
//! generated service works with the `tonic-prost` codec and that chunked payloads stay far below
//! tonic's 4 MiB message limit.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

mod support;

use std::sync::Mutex;

use fedtiny_common::codec::Limits;
use fedtiny_common::mask::MaskSet;
use fedtiny_common::task::{Task, TaskResult};
use fedtiny_proto::chunk::{Reassembly, chunk_at, chunks, crc32};
use fedtiny_proto::convert::{decode_result, decode_task, encode_result, encode_task, to_status};
use fedtiny_proto::pb::federation_client::FederationClient;
use fedtiny_proto::pb::federation_server::{Federation, FederationServer};
use fedtiny_proto::pb::{self, poll_reply};
use support::*;
use tonic::{Request, Response, Status};

const MAX_CHUNK: u32 = 64 << 10;

struct Coordinator {
    task: Vec<u8>,
    masks: MaskSet,
    upload: Mutex<Option<Reassembly>>,
    result: Mutex<Option<TaskResult>>,
}

#[tonic::async_trait]
impl Federation for Coordinator {
    async fn join(&self, _: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        Ok(Response::new(pb::JoinReply {
            session_id: "s1".into(),
            run_id: "run".into(),
            heartbeat_interval_ms: 1000,
            poll_timeout_ms: 100,
            max_chunk_bytes: MAX_CHUNK,
        }))
    }

    async fn poll_task(
        &self,
        _: Request<pb::PollRequest>,
    ) -> Result<Response<pb::PollReply>, Status> {
        let first = chunk_at(&self.task, 0, MAX_CHUNK as usize)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::PollReply {
            reply: Some(poll_reply::Reply::Task(pb::TaskHeader {
                task_id: "t1".into(),
                round: 7,
                kind: pb::TaskKind::Train as i32,
                payload_bytes: self.task.len() as u64,
                payload_crc32: crc32(&self.task),
                first_chunk: first.to_vec(),
            })),
        }))
    }

    async fn fetch_chunk(
        &self,
        request: Request<pb::FetchChunkRequest>,
    ) -> Result<Response<pb::Chunk>, Status> {
        let r = request.into_inner();
        let max = r.max_bytes.clamp(1, MAX_CHUNK) as usize;
        let data =
            chunk_at(&self.task, r.offset, max).map_err(|e| Status::out_of_range(e.to_string()))?;
        Ok(Response::new(pb::Chunk {
            task_id: r.task_id,
            offset: r.offset,
            data: data.to_vec(),
        }))
    }

    async fn upload_chunk(
        &self,
        request: Request<pb::UploadChunkRequest>,
    ) -> Result<Response<pb::UploadAck>, Status> {
        let r = request.into_inner();
        let mut upload = self
            .upload
            .lock()
            .map_err(|_| Status::internal("poisoned"))?;
        if upload.is_none() {
            *upload = Some(
                Reassembly::new(r.payload_bytes, r.payload_crc32, 64 << 20)
                    .map_err(|e| Status::invalid_argument(e.to_string()))?,
            );
        }
        let re = upload
            .as_mut()
            .ok_or_else(|| Status::internal("no upload"))?;
        if re.expected_len() != r.payload_bytes || re.expected_crc32() != r.payload_crc32 {
            return Err(Status::invalid_argument("payload length or CRC changed"));
        }
        re.push(r.offset, &r.data)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::UploadAck {
            received_bytes: re.received_bytes(),
        }))
    }

    async fn submit_result(
        &self,
        request: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitReply>, Status> {
        let r = request.into_inner();
        let re = self
            .upload
            .lock()
            .map_err(|_| Status::internal("poisoned"))?
            .take()
            .ok_or_else(|| Status::failed_precondition("nothing uploaded"))?;
        if re.expected_len() != r.payload_bytes || re.expected_crc32() != r.payload_crc32 {
            return Err(Status::invalid_argument("submit disagrees with the upload"));
        }
        let bytes = re
            .finish()
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let result =
            decode_result(&bytes, &self.masks, 7, &Limits::default()).map_err(|e| to_status(&e))?;
        *self
            .result
            .lock()
            .map_err(|_| Status::internal("poisoned"))? = Some(result);
        Ok(Response::new(pb::SubmitReply {
            accepted: true,
            message: String::new(),
        }))
    }

    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        Ok(Response::new(pb::HeartbeatReply { run_over: false }))
    }

    async fn leave(
        &self,
        _: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        Ok(Response::new(pb::LeaveReply {}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_and_its_result_travel_in_chunks() {
    let mut model = cnn(3);
    let masks = random_masks(&mut model, 0.5, 1, 4);
    let task = train_task(&model, &masks, true);
    let task_bytes = encode_task(&task, None).unwrap();
    assert!(task_bytes.len() > 4 * MAX_CHUNK as usize);

    let svc = std::sync::Arc::new(Coordinator {
        task: task_bytes.clone(),
        masks: masks.clone(),
        upload: Mutex::new(None),
        result: Mutex::new(None),
    });
    let incoming =
        tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FederationServer::from_arc(svc.clone()))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            }),
    );

    let mut client = FederationClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let join = client
        .join(pb::JoinRequest {
            memory_budget_bytes: 64 << 20,
            num_train_samples: 600,
            client_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let poll = client
        .poll_task(pb::PollRequest {
            session_id: join.session_id.clone(),
            wait_ms: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let Some(poll_reply::Reply::Task(header)) = poll.reply else {
        panic!("expected a task")
    };
    let mut download =
        Reassembly::new(header.payload_bytes, header.payload_crc32, 64 << 20).unwrap();
    download.push(0, &header.first_chunk).unwrap();
    while !download.is_complete() {
        let chunk = client
            .fetch_chunk(pb::FetchChunkRequest {
                session_id: join.session_id.clone(),
                task_id: header.task_id.clone(),
                offset: download.received_bytes(),
                max_bytes: join.max_chunk_bytes,
            })
            .await
            .unwrap()
            .into_inner();
        download.push(chunk.offset, &chunk.data).unwrap();
    }
    let received = decode_task(&download.finish().unwrap(), None, &Limits::default()).unwrap();
    assert_eq!(received, task);
    let Task::Train(t) = received else {
        panic!("expected a train task")
    };
    let held = t.model.masks.clone().unwrap();

    let result = train_result(&model, &held);
    let result_bytes = encode_result(&result, &held).unwrap();
    let crc = crc32(&result_bytes);
    for (k, (offset, data)) in chunks(&result_bytes, join.max_chunk_bytes as usize).enumerate() {
        let request = pb::UploadChunkRequest {
            session_id: join.session_id.clone(),
            task_id: header.task_id.clone(),
            offset,
            data: data.to_vec(),
            payload_bytes: result_bytes.len() as u64,
            payload_crc32: crc,
        };
        let ack = client
            .upload_chunk(request.clone())
            .await
            .unwrap()
            .into_inner();
        if k == 1 {
            // A retry after a lost acknowledgement changes nothing.
            let again = client.upload_chunk(request).await.unwrap().into_inner();
            assert_eq!(again.received_bytes, ack.received_bytes);
        }
        assert_eq!(ack.received_bytes, offset + data.len() as u64);
    }
    let reply = client
        .submit_result(pb::SubmitRequest {
            session_id: join.session_id.clone(),
            task_id: header.task_id.clone(),
            payload_bytes: result_bytes.len() as u64,
            payload_crc32: crc,
            error: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(reply.accepted);
    assert_eq!(svc.result.lock().unwrap().as_ref(), Some(&result));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
