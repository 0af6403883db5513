//! The client's session with a coordinator over mutual-TLS gRPC.
//!
//! Every call is a client-initiated unary call that can be retried: join, long-poll for a task,
//! fetch its payload in chunks, train (in a blocking thread, while a heartbeat task keeps the
//! session alive), upload the result in chunks, submit. Transport failures reconnect with
//! exponential backoff and join again; a coordinator that says the run is over ends the session.
//!
//! A refused certificate shows up as a failure of the *first call* after connecting (the TLS
//! alert arrives then), so the session reports it as a certificate problem and does not retry
//! it blindly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedtiny_common::codec::Limits;
use fedtiny_proto::chunk::{chunks, crc32};
use fedtiny_proto::convert;
use fedtiny_proto::pb::federation_client::FederationClient;
use fedtiny_proto::pb::{self, poll_reply};
use fedtiny_proto::tls::{self, ClientTlsFiles, RefusalKind};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{ClientApp, ClientError};

/// How to reach the coordinator.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The coordinator's address, e.g. `https://127.0.0.1:7443`.
    pub endpoint: String,
    /// TLS material.
    pub tls: ClientTlsFiles,
    /// Memory budget declared at join (0 = none). The client also refuses training tasks whose
    /// predicted peak exceeds it (unless its [`ClientApp`] was given a budget of its own).
    pub memory_budget_bytes: u64,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
    /// Give up after this many consecutive failed connection attempts (0 = never).
    pub max_reconnects: u32,
    /// Kernel threads for local training (0 = one per core).
    pub threads: usize,
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The coordinator said the run is over.
    RunOver {
        /// Tasks completed in this session.
        tasks: u64,
    },
}

fn transport(e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(e.to_string())
}

fn refused(call: &'static str, status: &tonic::Status) -> ClientError {
    match tls::call_refusal_kind(status) {
        RefusalKind::ClientCertificateRejected => ClientError::Tls(format!(
            "the coordinator refused this client's certificate ({})",
            tls::error_chain(status)
        )),
        RefusalKind::ServerCertificateRejected => ClientError::Tls(format!(
            "the coordinator's certificate was refused ({})",
            tls::error_chain(status)
        )),
        _ if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ) =>
        {
            ClientError::Transport(format!("{call}: {}", tls::error_chain(status)))
        }
        // The coordinator forgot this session (it dropped a silent client, or restarted):
        // reconnect and join again.
        _ if status.code() == tonic::Code::FailedPrecondition
            && status.message().contains("unknown session") =>
        {
            ClientError::Transport(format!("{call}: {}", status.message()))
        }
        _ => ClientError::Refused {
            call,
            status: format!("{}: {}", status.code(), status.message()),
        },
    }
}

async fn connect(
    cfg: &SessionConfig,
    tls_cfg: ClientTlsConfig,
) -> Result<FederationClient<Channel>, ClientError> {
    let channel = Endpoint::from_shared(cfg.endpoint.clone())
        .map_err(|e| ClientError::Transport(format!("endpoint {}: {e}", cfg.endpoint)))?
        .tls_config(tls_cfg)
        .map_err(|e| ClientError::Tls(tls::error_chain(&e)))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .connect()
        .await
        .map_err(|e| match tls::connect_refusal_kind(&e) {
            RefusalKind::ServerCertificateRejected => ClientError::Tls(format!(
                "the coordinator's certificate was refused: {}",
                tls::error_chain(&e)
            )),
            _ => transport(tls::error_chain(&e)),
        })?;
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(cfg.max_message_bytes)
        .max_encoding_message_size(cfg.max_message_bytes))
}

/// Runs the session until the run is over. Reconnects on transport failures; returns TLS and
/// protocol refusals as errors.
pub async fn run(cfg: SessionConfig, app: ClientApp) -> Result<Outcome, ClientError> {
    let tls_cfg = tls::client_tls_config(&cfg.tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut app = app;
    if app.memory_budget_bytes() == 0 {
        app.set_memory_budget(cfg.memory_budget_bytes);
    }
    let app = Arc::new(Mutex::new(app));
    let pool =
        Arc::new(fedtiny_common::parallel::thread_pool(cfg.threads).map_err(ClientError::Core)?);
    let mut failures = 0u32;
    let mut tasks = 0u64;
    loop {
        let attempt = async {
            let client = connect(&cfg, tls_cfg.clone()).await?;
            serve_tasks(
                &cfg,
                client,
                app.clone(),
                pool.clone(),
                &mut tasks,
                &mut failures,
            )
            .await
        };
        match attempt.await {
            Ok(outcome) => return Ok(outcome),
            Err(ClientError::Transport(msg)) => {
                failures += 1;
                if cfg.max_reconnects > 0 && failures >= cfg.max_reconnects {
                    return Err(ClientError::Transport(format!(
                        "giving up after {failures} failed attempts: {msg}"
                    )));
                }
                let backoff = Duration::from_millis((200u64 << failures.min(6)).min(10_000));
                tracing::warn!(%msg, ?backoff, "connection lost; reconnecting");
                tokio::time::sleep(backoff).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_tasks(
    cfg: &SessionConfig,
    mut client: FederationClient<Channel>,
    app: Arc<Mutex<ClientApp>>,
    pool: Arc<rayon::ThreadPool>,
    tasks: &mut u64,
    failures: &mut u32,
) -> Result<Outcome, ClientError> {
    let samples = app.lock().map(|a| a.num_train_samples()).unwrap_or(0) as u64;
    let join = client
        .join(pb::JoinRequest {
            memory_budget_bytes: cfg.memory_budget_bytes,
            num_train_samples: samples,
            client_version: env!("CARGO_PKG_VERSION").into(),
        })
        .await
        .map_err(|s| refused("join", &s))?
        .into_inner();
    *failures = 0;
    tracing::info!(run = %join.run_id, "joined");
    let session = join.session_id;
    let limits = Limits::default();
    loop {
        let poll = client
            .poll_task(pb::PollRequest {
                session_id: session.clone(),
                wait_ms: join.poll_timeout_ms,
            })
            .await
            .map_err(|s| refused("poll", &s))?
            .into_inner();
        let header = match poll.reply {
            Some(poll_reply::Reply::Task(h)) => h,
            Some(poll_reply::Reply::Idle(_)) => continue,
            Some(poll_reply::Reply::RunOver(r)) => {
                tracing::info!(reason = %r.reason, "run over");
                let _ = client
                    .leave(pb::LeaveRequest {
                        session_id: session.clone(),
                        reason: "run over".into(),
                    })
                    .await;
                return Ok(Outcome::RunOver { tasks: *tasks });
            }
            None => return Err(ClientError::Wire("empty poll reply".into())),
        };
        // Fetch the rest of the payload.
        let mut payload = header.first_chunk.clone();
        while (payload.len() as u64) < header.payload_bytes {
            let c = client
                .fetch_chunk(pb::FetchChunkRequest {
                    session_id: session.clone(),
                    task_id: header.task_id.clone(),
                    offset: payload.len() as u64,
                    max_bytes: join.max_chunk_bytes,
                })
                .await
                .map_err(|s| refused("fetch_chunk", &s))?
                .into_inner();
            if c.data.is_empty() || c.offset != payload.len() as u64 {
                return Err(ClientError::Wire("coordinator sent a bad chunk".into()));
            }
            payload.extend_from_slice(&c.data);
        }
        if payload.len() as u64 != header.payload_bytes || crc32(&payload) != header.payload_crc32 {
            return Err(ClientError::Wire(
                "task payload failed its length or CRC check".into(),
            ));
        }
        // Compute in a blocking thread while heartbeats keep the session alive. The heartbeat
        // task stops with the task, and also if this session is dropped mid-task (aborted by
        // its owner): it must not keep a dead session alive.
        let hb = AbortOnDrop({
            let mut c = client.clone();
            let (session, task) = (session.clone(), header.task_id.clone());
            let every = Duration::from_millis(u64::from(join.heartbeat_interval_ms).max(100));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let r = c
                        .heartbeat(pb::HeartbeatRequest {
                            session_id: session.clone(),
                            busy_task_id: task.clone(),
                        })
                        .await;
                    if let Err(s) = r {
                        tracing::debug!("heartbeat failed: {s}");
                    }
                }
            })
        });
        let (app2, pool2, limits2) = (app.clone(), pool.clone(), limits);
        let outcome = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ClientError> {
            let mut app = app2
                .lock()
                .map_err(|_| ClientError::Wire("client state poisoned".into()))?;
            let task = convert::decode_task(&payload, app.masks(), &limits2)
                .map_err(|e| ClientError::Wire(e.to_string()))?;
            let app_ref: &mut ClientApp = &mut app;
            let result = pool2.install(|| app_ref.handle(&task))?;
            let masks = app.masks().cloned().unwrap_or_default();
            convert::encode_result(&result, &masks).map_err(|e| ClientError::Wire(e.to_string()))
        })
        .await
        .map_err(|e| ClientError::Wire(format!("task thread failed: {e}")));
        drop(hb);
        let outcome = outcome.and_then(|r| r);
        let submit = match outcome {
            Ok(bytes) => {
                let crc = crc32(&bytes);
                for (offset, data) in chunks(&bytes, join.max_chunk_bytes as usize) {
                    client
                        .upload_chunk(pb::UploadChunkRequest {
                            session_id: session.clone(),
                            task_id: header.task_id.clone(),
                            offset,
                            data: data.to_vec(),
                            payload_bytes: bytes.len() as u64,
                            payload_crc32: crc,
                        })
                        .await
                        .map_err(|s| refused("upload_chunk", &s))?;
                }
                pb::SubmitRequest {
                    session_id: session.clone(),
                    task_id: header.task_id.clone(),
                    payload_bytes: bytes.len() as u64,
                    payload_crc32: crc,
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!("task failed: {e}");
                pb::SubmitRequest {
                    session_id: session.clone(),
                    task_id: header.task_id.clone(),
                    payload_bytes: 0,
                    payload_crc32: 0,
                    error: Some(pb::TaskFailure {
                        message: e.to_string(),
                    }),
                }
            }
        };
        match client.submit_result(submit).await {
            Ok(_) => *tasks += 1,
            Err(s)
                if s.code() == tonic::Code::InvalidArgument
                    || s.code() == tonic::Code::NotFound =>
            {
                tracing::warn!("result refused: {}", s.message());
            }
            Err(s) => return Err(refused("submit_result", &s)),
        }
    }
}
