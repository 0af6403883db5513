//! The in-process simulation and a gRPC run over real mutual TLS reach the same final model,
//! bit for bit, with the same seed and config (single-threaded kernels, same client names and
//! data partition).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fedtiny_client::session::{self, SessionConfig};
use fedtiny_client::{ClientApp, LocalData};
use fedtiny_coordinator::checkpoint;
use fedtiny_coordinator::config::ServeConfig;
use fedtiny_coordinator::engine::FINAL_MODEL_FILE;
use fedtiny_coordinator::server::{self, Start};
use fedtiny_proto::pki::{self, Validity};
use fedtiny_simulations::federated::{self, SimConfig, client_name};

fn sim_config(out: &std::path::Path) -> SimConfig {
    let mut cfg = SimConfig::embedded_default().unwrap();
    cfg.federation.run.rounds = 2;
    cfg.federation.run.clients_per_round = 3;
    cfg.federation.run.min_clients = 4;
    cfg.federation.run.quorum = 3;
    cfg.federation.model.width = 0.5;
    cfg.federation.training.epochs = 1;
    cfg.federation.eval.test_limit = Some(300);
    cfg.clients.count = 4;
    cfg.simulation.parallel_clients = 1;
    cfg.simulation.threads = 1;
    cfg.federation.output.dir = out.to_path_buf();
    cfg.federation.output.name = Some("sim".into());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_and_grpc_runs_end_with_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let sim = sim_config(&tmp.path().join("sim"));
    let (train, test) = federated::load_data(&sim).unwrap();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let (summary, dir) = federated::run_in_process(&sim, train.clone(), test.clone(), stop)
        .await
        .unwrap();
    assert_eq!(summary.rounds, 2);
    let in_process = checkpoint::load_model(&dir.path().join(FINAL_MODEL_FILE)).unwrap();

    // The same run served over gRPC, with one real client session per simulated client.
    fedtiny_proto::tls::install_crypto_provider();
    let ids: Vec<String> = (0..sim.clients.count).map(client_name).collect();
    let ca = pki::generate_ca("test CA", Validity::days(1)).unwrap();
    let bundle = pki::write_bundle(
        &tmp.path().join("pki"),
        &ca,
        &["localhost".into()],
        &ids,
        Validity::days(1),
    )
    .unwrap();
    let mut fed = sim.federation.clone();
    fed.output.dir = tmp.path().join("grpc");
    fed.output.name = Some("grpc".into());
    let serve_cfg = ServeConfig {
        server: toml::from_str("listen = \"127.0.0.1:0\"\nheartbeat_interval_ms = 200").unwrap(),
        tls: toml::from_str(&format!(
            "cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"",
            bundle.server_cert.display(),
            bundle.server_key.display(),
            bundle.ca_cert.display()
        ))
        .unwrap(),
        federation: fed,
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let data = server::ServerData {
        test,
        server_set: server::server_set(&sim.federation, train.clone()),
    };
    let serve = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        server::serve(serve_cfg, Start::Fresh, data, rx, move |addr, dir| {
            if let Some(t) = addr_tx.take() {
                let _ = t.send((addr, dir.to_path_buf()));
            }
        })
        .await
    });
    let (addr, grpc_dir) = addr_rx.await.unwrap();
    let parts = federated::partition(&sim, &train).unwrap();
    let norm = sim.federation.model.dataset.normalization();
    let mut clients = Vec::new();
    for (i, idx) in parts.into_iter().enumerate() {
        let app = ClientApp::new(LocalData {
            train: Arc::clone(&train),
            train_indices: idx,
            test: None,
            normalization: norm.clone(),
        });
        let cfg = SessionConfig {
            endpoint: format!("https://localhost:{}", addr.port()),
            tls: bundle.client_tls_files(&ids[i], "localhost").unwrap(),
            memory_budget_bytes: 0,
            max_message_bytes: 4 << 20,
            max_reconnects: 3,
            threads: 1,
        };
        clients.push(tokio::spawn(session::run(cfg, app)));
    }
    let grpc_summary = serve.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap().unwrap();
    }
    assert_eq!(grpc_summary.rounds, 2);
    let over_grpc = checkpoint::load_model(&grpc_dir.join(FINAL_MODEL_FILE)).unwrap();
    assert_eq!(over_grpc.masks, in_process.masks);
    assert_eq!(
        over_grpc.state, in_process.state,
        "same seed and config must give the same model in process and over gRPC"
    );
    assert_eq!(
        grpc_summary.final_test_accuracy,
        summary.final_test_accuracy
    );
    // Both transports account the same payload bytes.
    assert_eq!(grpc_summary.total_bytes_up, summary.total_bytes_up);
    assert_eq!(grpc_summary.total_bytes_down, summary.total_bytes_down);
}
