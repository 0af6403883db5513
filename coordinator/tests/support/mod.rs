//! Shared set-up of the coordinator's integration tests: certificates generated at test time,
//! a real server on an OS-chosen loopback port, real clients over mutual TLS.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtiny_client::session::{self, Outcome, SessionConfig};
use fedtiny_client::{ClientApp, ClientError, LocalData};
use fedtiny_common::data::{DatasetKind, Partitioner};
use fedtiny_common::rng;
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
    let test = server::load_test_set(&cfg.federation).unwrap();
    let (stop, rx) = watch::channel(false);
    let (tx, ready) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let mut tx = Some(tx);
        server::serve(cfg, start, test, rx, move |addr, dir| {
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
    let splits = DatasetKind::FashionMnist.load(&sample_dir()).unwrap();
    let train = Arc::new(splits.train);
    let mut r = rng::derived(7, "partition", 0);
    let mut parts = Partitioner::Dirichlet { alpha: 0.5 }
        .split(train.labels(), train.classes(), of, &mut r)
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
