//! Shared set-up of the coordinator's integration tests: certificates generated at test time,
//! a real server on an OS-chosen loopback port, real clients over mutual TLS.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtiny_client::session::{self, Outcome, SessionConfig};
use fedtiny_client::{ClientApp, ClientError, LocalData};
use fedtiny_common::data::{DatasetKind, Partitioner};
use fedtiny_coordinator::config::ServeConfig;
use fedtiny_coordinator::metrics::RunSummary;
use fedtiny_coordinator::server::{self, Start};
use fedtiny_proto::pb::federation_client::FederationClient;
use fedtiny_proto::pki::{self, Validity};
use fedtiny_proto::tls::{ClientTlsFiles, client_tls_config};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// The committed Fashion-MNIST sample.
pub fn sample_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/fashion-mnist-sample")
}

/// A CA with a server certificate and client certificates, on disk.
pub struct Pki {
    pub dir: PathBuf,
    pub bundle: pki::Bundle,
    pub ca: pki::CertificateAuthority,
}

pub fn make_pki(dir: &Path, clients: &[&str]) -> Pki {
    fedtiny_proto::tls::install_crypto_provider();
    let ca = pki::generate_ca("test CA", Validity::days(2)).unwrap();
    let ids: Vec<String> = clients.iter().map(|s| s.to_string()).collect();
    let bundle = pki::write_bundle(
        dir,
        &ca,
        &["localhost".into(), "127.0.0.1".into()],
        &ids,
        Validity::days(2),
    )
    .unwrap();
    Pki {
        dir: dir.to_path_buf(),
        bundle,
        ca,
    }
}

/// A server config for tests: the cnn at width 0.5 on the sample, 3 clients, density 0.1.
pub fn serve_config(pki: &Pki, out: &Path, rounds: u64, clients: usize) -> ServeConfig {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
heartbeat_interval_ms = 200
poll_timeout_ms = 1000

[tls]
cert = "{cert}"
key = "{key}"
client_ca = "{ca}"

[run]
seed = 7
rounds = {rounds}
clients_per_round = {clients}
min_clients = {clients}
quorum = {quorum}
round_deadline_secs = 60
join_timeout_secs = 60
checkpoint_every = 1

[model]
arch = "cnn"
width = 0.5
dataset = "fashion_mnist"

[training]
epochs = 1
batch_size = 32

[training.optimizer]
kind = "adam"
lr = 0.002

[mask]
density = 0.1

[eval]
data_dir = "{data}"
test_limit = 500

[output]
dir = "{out}"
name = "run"
"#,
        cert = pki.bundle.server_cert.display(),
        key = pki.bundle.server_key.display(),
        ca = pki.bundle.ca_cert.display(),
        data = sample_dir().display(),
        out = out.display(),
        quorum = clients.saturating_sub(1).max(1),
    );
    ServeConfig::from_toml(&text, "test").unwrap()
}

/// A running coordinator.
pub struct Server {
    pub addr: SocketAddr,
    pub run_dir: PathBuf,
    pub stop: watch::Sender<bool>,
    pub handle: JoinHandle<fedtiny_coordinator::Result<RunSummary>>,
}

pub async fn start_server(cfg: ServeConfig, start: Start) -> Server {
    let data = server::load_server_data(&cfg.federation).unwrap();
    let (stop, rx) = watch::channel(false);
    let (tx, ready) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let mut tx = Some(tx);
        server::serve(cfg, start, data, rx, move |addr, dir| {
            if let Some(tx) = tx.take() {
                let _ = tx.send((addr, dir.to_path_buf()));
            }
        })
        .await
    });
    let (addr, run_dir) = ready.await.unwrap();
    Server {
        addr,
        run_dir,
        stop,
        handle,
    }
}

/// The client's share of the sample (Dirichlet 0.5 over `of` clients, seeded like the run).
pub fn local_data(index: usize, of: usize) -> LocalData {
    local_data_with_shots(index, of, 5)
}

/// The client's share when the server keeps `n_shots` per class (stage 0).
pub fn local_data_with_shots(index: usize, of: usize, n_shots: usize) -> LocalData {
    let splits = DatasetKind::FashionMnist.load(&sample_dir()).unwrap();
    let train = Arc::new(splits.train);
    let mut parts = fedtiny_common::data::split::client_partitions(
        train.labels(),
        train.classes(),
        &Partitioner::Dirichlet { alpha: 0.5 },
        of,
        n_shots,
        7,
    )
    .unwrap();
    LocalData {
        train,
        train_indices: std::mem::take(&mut parts[index]),
        test: None,
        normalization: DatasetKind::FashionMnist.normalization(),
    }
}

pub fn client_files(pki: &Pki, id: &str) -> ClientTlsFiles {
    pki.bundle.client_tls_files(id, "localhost").unwrap()
}

pub fn session_config(addr: SocketAddr, tls: ClientTlsFiles) -> SessionConfig {
    SessionConfig {
        endpoint: format!("https://localhost:{}", addr.port()),
        tls,
        memory_budget_bytes: 0,
        max_message_bytes: 4 << 20,
        max_reconnects: 3,
        threads: 1,
    }
}

/// A real client session in a task.
pub fn spawn_client(
    addr: SocketAddr,
    tls: ClientTlsFiles,
    data: LocalData,
) -> JoinHandle<Result<Outcome, ClientError>> {
    tokio::spawn(session::run(
        session_config(addr, tls),
        ClientApp::new(data),
    ))
}

/// One client session per id, client `i` holding partition `i` of `of` of the sample.
pub fn spawn_clients(
    addr: SocketAddr,
    pki: &Pki,
    ids: &[&str],
    of: usize,
) -> Vec<JoinHandle<Result<Outcome, ClientError>>> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| spawn_client(addr, client_files(pki, id), local_data(i, of)))
        .collect()
}

/// A raw gRPC client with a given identity, for protocol-level tests.
pub async fn raw_client(addr: SocketAddr, tls: &ClientTlsFiles) -> FederationClient<Channel> {
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(client_tls_config(tls).unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    FederationClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub fn read_metrics(run_dir: &Path) -> Vec<fedtiny_coordinator::metrics::RoundMetrics> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Robustness helpers: time bounds, extra identities, raw protocol sessions, crafted payloads.
// ---------------------------------------------------------------------------------------------

use std::future::Future;
use std::time::Duration;

use fedtiny_common::mask::MaskSet;
use fedtiny_common::task::{Task, TaskResult, TrainResult};
use fedtiny_proto::chunk::{chunks, crc32};
use fedtiny_proto::pb;

/// Serialises the tests of one binary that are sensitive to CPU contention (deadlines, timing):
/// each holds the guard for its whole body.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `fut`, failing the test if it takes longer than `secs` seconds.
pub async fn bounded<T>(secs: u64, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(v) => v,
        Err(_) => panic!("the test exceeded its time bound of {secs} s"),
    }
}

/// Writes a certificate and key (and uses `ca` as the CA the client trusts) under `dir`.
pub fn write_identity(dir: &Path, name: &str, pem: &pki::Pem, ca: &Path) -> ClientTlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pem.cert).unwrap();
    std::fs::write(&key, &pem.key).unwrap();
    ClientTlsFiles {
        ca: ca.to_path_buf(),
        cert,
        key,
        server_name: "localhost".into(),
    }
}

/// Rounds completed so far (complete lines of `metrics.jsonl`).
pub fn rounds_recorded(run_dir: &Path) -> usize {
    std::fs::read(run_dir.join("metrics.jsonl"))
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .unwrap_or(0)
}

/// Waits until `n` rounds are recorded in `metrics.jsonl`.
pub async fn wait_for_rounds(run_dir: &Path, n: usize) {
    while rounds_recorded(run_dir) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client driven call by call, for protocol-level tests.
pub struct RawSession {
    pub client: FederationClient<Channel>,
    pub session_id: String,
    pub join: pb::JoinReply,
    /// The masks this session received last.
    pub masks: Option<MaskSet>,
}

impl RawSession {
    /// Connects and joins.
    pub async fn join(addr: SocketAddr, tls: &ClientTlsFiles) -> Self {
        let mut client = raw_client(addr, tls).await;
        let join = client
            .join(pb::JoinRequest {
                memory_budget_bytes: 0,
                num_train_samples: 1,
                client_version: "raw".into(),
            })
            .await
            .unwrap()
            .into_inner();
        RawSession {
            client,
            session_id: join.session_id.clone(),
            join,
            masks: None,
        }
    }

    /// Long-polls until a task arrives (`None` when the run is over).
    pub async fn next_task(&mut self) -> Option<pb::TaskHeader> {
        loop {
            let r = self
                .client
                .poll_task(pb::PollRequest {
                    session_id: self.session_id.clone(),
                    wait_ms: self.join.poll_timeout_ms,
                })
                .await
                .unwrap()
                .into_inner();
            match r.reply {
                Some(pb::poll_reply::Reply::Task(h)) => return Some(h),
                Some(pb::poll_reply::Reply::Idle(_)) => continue,
                Some(pb::poll_reply::Reply::RunOver(_)) => return None,
                None => panic!("empty poll reply"),
            }
        }
    }

    /// Downloads the whole payload of a task and checks its length and CRC.
    pub async fn fetch(&mut self, h: &pb::TaskHeader) -> Vec<u8> {
        let mut payload = h.first_chunk.clone();
        while (payload.len() as u64) < h.payload_bytes {
            let c = self
                .client
                .fetch_chunk(pb::FetchChunkRequest {
                    session_id: self.session_id.clone(),
                    task_id: h.task_id.clone(),
                    offset: payload.len() as u64,
                    max_bytes: self.join.max_chunk_bytes,
                })
                .await
                .unwrap()
                .into_inner();
            assert!(!c.data.is_empty());
            payload.extend_from_slice(&c.data);
        }
        assert_eq!(payload.len() as u64, h.payload_bytes);
        assert_eq!(crc32(&payload), h.payload_crc32);
        payload
    }

    /// Decodes a payload, adopting the masks it carries.
    pub fn decode(&mut self, payload: &[u8]) -> Task {
        let task = fedtiny_proto::convert::decode_task(
            payload,
            self.masks.as_ref(),
            &fedtiny_common::codec::Limits::default(),
        )
        .unwrap();
        if let Task::Train(t) = &task
            && let Some(m) = &t.model.masks
        {
            self.masks = Some(m.clone());
        }
        task
    }

    /// Polls, fetches and decodes the next task.
    pub async fn take_task(&mut self) -> Option<(pb::TaskHeader, Task)> {
        let h = self.next_task().await?;
        let payload = self.fetch(&h).await;
        let task = self.decode(&payload);
        Some((h, task))
    }

    /// One raw upload call.
    pub async fn upload_raw(
        &mut self,
        task_id: &str,
        offset: u64,
        data: Vec<u8>,
        payload_bytes: u64,
        payload_crc32: u32,
    ) -> Result<pb::UploadAck, tonic::Status> {
        self.client
            .upload_chunk(pb::UploadChunkRequest {
                session_id: self.session_id.clone(),
                task_id: task_id.into(),
                offset,
                data,
                payload_bytes,
                payload_crc32,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Uploads `bytes` in chunks and submits them.
    pub async fn deliver(
        &mut self,
        task_id: &str,
        bytes: &[u8],
    ) -> Result<pb::SubmitReply, tonic::Status> {
        let crc = crc32(bytes);
        let max = self.join.max_chunk_bytes as usize;
        for (offset, data) in chunks(bytes, max) {
            self.upload_raw(task_id, offset, data.to_vec(), bytes.len() as u64, crc)
                .await?;
        }
        self.submit(task_id, bytes.len() as u64, crc).await
    }

    /// One raw submit call.
    pub async fn submit(
        &mut self,
        task_id: &str,
        payload_bytes: u64,
        payload_crc32: u32,
    ) -> Result<pb::SubmitReply, tonic::Status> {
        self.client
            .submit_result(pb::SubmitRequest {
                session_id: self.session_id.clone(),
                task_id: task_id.into(),
                payload_bytes,
                payload_crc32,
                error: None,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// A heartbeat of this session.
    pub async fn heartbeat(&mut self) -> Result<pb::HeartbeatReply, tonic::Status> {
        self.client
            .heartbeat(pb::HeartbeatRequest {
                session_id: self.session_id.clone(),
                busy_task_id: String::new(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The pb form of a plausible result for `task`: the received model unchanged, with
    /// `num_samples` samples, in mask order against the task's masks.
    pub fn result_pb(&self, task: &Task, num_samples: usize) -> pb::ResultPayload {
        let masks = self.masks.clone().unwrap_or_default();
        fedtiny_proto::convert::result_to_pb(&fabricate(task, num_samples), &masks).unwrap()
    }
}

/// A plausible training result for `task`: the model it received, unchanged.
pub fn fabricate(task: &Task, num_samples: usize) -> TaskResult {
    let Task::Train(t) = task else {
        panic!("expected a training task")
    };
    TaskResult::Train(TrainResult {
        round: t.round,
        mask_version: t.model.mask_version,
        num_samples,
        state: t.model.state.clone(),
        train_loss: 2.0,
        train_accuracy: 0.1,
        seconds: 0.01,
        peak_rss_bytes: None,
        topk: Vec::new(),
        masks: Vec::new(),
    })
}

/// A raw client that answers every task with [`fabricate`]d results (weight `num_samples`)
/// until the run is over; returns the tasks it completed.
pub fn spawn_raw_honest(
    addr: SocketAddr,
    tls: ClientTlsFiles,
    num_samples: usize,
) -> JoinHandle<u64> {
    tokio::spawn(async move {
        let mut s = RawSession::join(addr, &tls).await;
        let mut done = 0;
        while let Some((h, task)) = s.take_task().await {
            let bytes = pb_encode::result_payload(&s.result_pb(&task, num_samples));
            s.deliver(&h.task_id, &bytes).await.unwrap();
            done += 1;
        }
        done
    })
}

/// A minimal protobuf encoder for `pb::ResultPayload`, byte-identical to prost's output (checked
/// by [`pb_encode::result_payload`]'s callers against `convert::encode_result`), so tests can
/// re-encode messages they tampered with. (The coordinator's tests have no direct dependency
/// on prost.)
pub mod pb_encode {
    use fedtiny_proto::pb;

    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        if v != 0 {
            key(out, field, 0);
            varint(out, v);
        }
    }

    fn int32(out: &mut Vec<u8>, field: u32, v: i32) {
        if v != 0 {
            key(out, field, 0);
            varint(out, i64::from(v) as u64);
        }
    }

    fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        if v.to_bits() != 0 {
            key(out, field, 1);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        if !b.is_empty() {
            key(out, field, 2);
            varint(out, b.len() as u64);
            out.extend_from_slice(b);
        }
    }

    fn message(out: &mut Vec<u8>, field: u32, body: &[u8]) {
        key(out, field, 2);
        varint(out, body.len() as u64);
        out.extend_from_slice(body);
    }

    fn tensor(t: &pb::Tensor) -> Vec<u8> {
        let mut o = Vec::new();
        bytes(&mut o, 1, t.name.as_bytes());
        int32(&mut o, 2, t.role);
        uint(&mut o, 3, u64::from(t.prunable));
        if !t.shape.is_empty() {
            let mut packed = Vec::new();
            for &d in &t.shape {
                varint(&mut packed, d);
            }
            message(&mut o, 4, &packed);
        }
        int32(&mut o, 5, t.encoding);
        bytes(&mut o, 6, &t.values);
        bytes(&mut o, 7, &t.bitmap);
        bytes(&mut o, 8, &t.indices);
        o
    }

    /// Serialises a `ResultPayload` as prost would.
    pub fn result_payload(p: &pb::ResultPayload) -> Vec<u8> {
        let mut out = Vec::new();
        match &p.result {
            Some(pb::result_payload::Result::Train(r)) => {
                let mut o = Vec::new();
                uint(&mut o, 1, r.round);
                uint(&mut o, 2, r.mask_version);
                uint(&mut o, 3, r.num_samples);
                for t in &r.state {
                    message(&mut o, 4, &tensor(t));
                }
                double(&mut o, 5, r.train_loss);
                double(&mut o, 6, r.train_accuracy);
                double(&mut o, 7, r.seconds);
                if let Some(v) = r.peak_rss_bytes {
                    key(&mut o, 8, 0);
                    varint(&mut o, v);
                }
                for t in &r.topk {
                    message(&mut o, 9, &tensor(t));
                }
                message(&mut out, 1, &o);
            }
            Some(pb::result_payload::Result::Evaluate(r)) => {
                let mut o = Vec::new();
                uint(&mut o, 1, r.round);
                double(&mut o, 2, r.loss_sum);
                uint(&mut o, 3, r.correct);
                uint(&mut o, 4, r.count);
                message(&mut out, 2, &o);
            }
            Some(_) => unimplemented!("only train and evaluate results are encoded here"),
            None => {}
        }
        out
    }
}
