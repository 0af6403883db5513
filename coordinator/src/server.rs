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
use crate::strategy::{FedAvg, Strategy};

/// File in the run folder holding the address the server listens on.
pub const ADDRESS_FILE: &str = "listen_addr";

/// The strategy a config names.
pub fn strategy(cfg: &FederatedConfig) -> Box<dyn Strategy> {
    Box::new(FedAvg::new(
        cfg.run.seed,
        cfg.mask.density,
        cfg.mask.rule,
        cfg.training.clone(),
    ))
}

/// Loads the server's test set.
pub fn load_test_set(cfg: &FederatedConfig) -> Result<Arc<Dataset>> {
    let splits = cfg
        .model
        .dataset
        .load(&cfg.eval.data_dir)
        .map_err(fedtiny_common::Error::from)?;
    Ok(Arc::new(splits.test))
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
    test: Arc<Dataset>,
    stop: watch::Receiver<bool>,
    on_listening: impl FnOnce(SocketAddr, &Path),
) -> Result<RunSummary> {
    cfg.validate()?;
    let fed = cfg.federation.clone();
    let config_toml = cfg.to_toml()?;
    let evaluator = Evaluator::new(
        test,
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
            RoundEngine::new(fed.clone(), config_toml, strategy(&fed), evaluator, run)?
        }
        Start::Resume(dir) => {
            let ckpt = checkpoint::load(&dir.join(CHECKPOINT_FILE))?;
            tracing::info!(rounds_done = ckpt.rounds_done, dir = %dir.display(), "resuming");
            let run = RunDir::create_existing(&dir);
            RoundEngine::resume(
                fed.clone(),
                config_toml,
                strategy(&fed),
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
