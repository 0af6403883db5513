//! Serving a run over gRPC: TLS set-up, the listener, the round engine, and graceful shutdown.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedtiny_common::data::Dataset;
use fedtiny_proto::pb::federation_server::FederationServer;
use fedtiny_proto::tls::{ServerTlsFiles, server_tls_config};
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::checkpoint;
use crate::config::{FederatedConfig, ServeConfig};
use crate::engine::{CHECKPOINT_FILE, RoundEngine};
use crate::error::{CoordinatorError, Result};
use crate::evaluate::Evaluator;
use crate::hub::{GrpcPool, Hub};
use crate::metrics::RunSummary;
use crate::run_dir::RunDir;
use crate::service::FederationService;
use crate::stage0::ServerSet;
use crate::strategy;

/// File in the run folder holding the address the server listens on.
pub const ADDRESS_FILE: &str = "listen_addr";

/// The data the coordinator holds: its test set, and the stage-0 server set (drawn from the
/// training split, which no client is given).
#[derive(Clone)]
pub struct ServerData {
    /// Held-out evaluation data.
    pub test: Arc<Dataset>,
    /// The stage-0 server set, when `stage0.n_shots > 0`.
    pub server_set: Option<ServerSet>,
}

/// Loads the server's data from `eval.data_dir`.
pub fn load_server_data(cfg: &FederatedConfig) -> Result<ServerData> {
    let splits = cfg
        .model
        .dataset
        .load(&cfg.eval.data_dir)
        .map_err(fedtiny_common::Error::from)?;
    let train = Arc::new(splits.train);
    Ok(ServerData {
        test: Arc::new(splits.test),
        server_set: server_set(cfg, train),
    })
}

/// The stage-0 server set of a run drawn from `train` (None when `stage0.n_shots` is 0).
pub fn server_set(cfg: &FederatedConfig, train: Arc<Dataset>) -> Option<ServerSet> {
    (cfg.stage0.n_shots > 0).then(|| {
        let (indices, _) = crate::stage0::server_split(
            train.labels(),
            train.classes(),
            cfg.stage0.n_shots,
            cfg.run.seed,
        );
        ServerSet {
            data: train,
            indices,
            normalization: cfg.model.dataset.normalization(),
        }
    })
}

/// Loads the server's test set.
pub fn load_test_set(cfg: &FederatedConfig) -> Result<Arc<Dataset>> {
    Ok(load_server_data(cfg)?.test)
}

/// How a run starts.
pub enum Start {
    /// A new run folder under `output.dir`.
    Fresh,
    /// Continue the run in this folder from its checkpoint.
    Resume(PathBuf),
}

/// Serves a run to completion (or until `stop` turns true): binds, reports the address (also
/// written to `<run>/listen_addr`), drives the rounds, then tells clients the run is over.
/// `on_listening` receives the bound address and the run folder.
pub async fn serve(
    cfg: ServeConfig,
    start: Start,
    data: ServerData,
    stop: watch::Receiver<bool>,
    on_listening: impl FnOnce(SocketAddr, &Path),
) -> Result<RunSummary> {
    cfg.validate()?;
    let fed = cfg.federation.clone();
    let config_toml = cfg.to_toml()?;
    let evaluator = Evaluator::new(
        data.test.clone(),
        fed.eval.test_limit,
        fed.model.dataset.normalization(),
        fed.eval.batch_size,
    );
    let mut engine = match start {
        Start::Fresh => {
            let name = fed.output.name.clone().unwrap_or_else(|| {
                format!(
                    "serve-{}-d{}-s{}",
                    fed.model.arch, fed.mask.density, fed.run.seed
                )
            });
            let run = RunDir::create(&fed.output.dir, &name)?;
            RoundEngine::new(
                fed.clone(),
                config_toml,
                strategy::build(&fed, data.server_set.clone()),
                evaluator,
                run,
            )?
        }
        Start::Resume(dir) => {
            let ckpt = checkpoint::load(&dir.join(CHECKPOINT_FILE))?;
            tracing::info!(rounds_done = ckpt.rounds_done, dir = %dir.display(), "resuming");
            let run = RunDir::create_existing(&dir);
            RoundEngine::resume(
                fed.clone(),
                config_toml,
                strategy::build(&fed, data.server_set.clone()),
                evaluator,
                run,
                ckpt,
            )?
        }
    };

    let tls = server_tls_config(&ServerTlsFiles {
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        client_ca: cfg.tls.client_ca.clone(),
    })
    .map_err(|e| CoordinatorError::Server(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(&cfg.server.listen)
        .await
        .map_err(|e| CoordinatorError::Server(format!("binding {}: {e}", cfg.server.listen)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CoordinatorError::Server(e.to_string()))?;
    engine
        .run_dir()
        .write(ADDRESS_FILE, addr.to_string().as_bytes())?;
    on_listening(addr, engine.run_dir().path());
    tracing::info!(%addr, run = %engine.run_dir().path().display(), "listening");

    let run_id = engine.run_dir().path().display().to_string();
    let hub = Hub::new(cfg.server.clone(), run_id);
    let max = cfg.server.max_message_bytes;
    let service = FederationServer::new(FederationService::new(hub.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let (server_stop_tx, mut server_stop_rx) = watch::channel(false);
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| CoordinatorError::Server(e.to_string()))?
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            let _ = server_stop_rx.changed().await;
        });
    let server = tokio::spawn(server);

    let pool = Arc::new(GrpcPool::new(hub.clone()));
    let outcome = engine.run(pool, stop).await;
    // Tell clients the run is over (their next poll or heartbeat says so), give them a moment
    // to hear it, then stop serving.
    hub.finish();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = server_stop_tx.send(true);
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("server ended with an error: {e}"),
        Err(e) => tracing::warn!("server task failed: {e}"),
    }
    outcome
}
