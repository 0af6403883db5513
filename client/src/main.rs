//! `fedtiny-client`: an edge client. Connects to a coordinator with its certificate, trains on
//! its own data, and sends sparse updates until the coordinator says the run is over.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fedtiny_client::session::{self, Outcome, SessionConfig};
use fedtiny_client::{ClientApp, LocalData};
use fedtiny_common::data::{DatasetKind, Partitioner};
use fedtiny_proto::tls::ClientTlsFiles;

#[derive(Parser)]
#[command(name = "fedtiny-client", version, about = "A fedtiny edge client")]
struct Args {
    /// The coordinator, e.g. https://127.0.0.1:7443.
    #[arg(long)]
    coordinator: String,
    /// CA certificate that signed the coordinator's certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This client's certificate (PEM); its common name is the client's identity.
    #[arg(long)]
    cert: PathBuf,
    /// This client's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The name to verify the coordinator's certificate against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Directory of the local dataset.
    #[arg(long)]
    data_dir: PathBuf,
    /// Which dataset format the directory holds.
    #[arg(long, default_value = "fashion-mnist", value_parser = parse_kind)]
    dataset: DatasetKind,
    /// Use only partition K of the training split (simulations: every client process loads the
    /// same files and keeps its own share).
    #[arg(long, requires = "of")]
    partition: Option<usize>,
    /// Number of partitions.
    #[arg(long)]
    of: Option<usize>,
    /// Dirichlet concentration of the label skew (omit for an IID split).
    #[arg(long)]
    alpha: Option<f64>,
    /// Seed of the partition (the run's seed, so all clients agree).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Images per class the coordinator keeps as its stage-0 server set (the run's
    /// `stage0.n_shots`): they are removed before partitioning, so no client holds them.
    #[arg(long, default_value_t = 5)]
    reserve_shots: usize,
    /// Kernel threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Memory budget to declare, in MiB (0 = none). The coordinator sends only training tasks
    /// whose predicted peak fits (lowering the batch size where its config allows), and the
    /// client refuses any that would not.
    #[arg(long, default_value_t = 0)]
    memory_budget_mib: u64,
    /// Keep freed memory with the process from one training step to the next (glibc's
    /// allocator; see `fedtiny_common::heap`): fewer page faults, faster steps on larger models
    /// (`resnet18` width ¼ at d = 0.01: +16 to +28 % in the simulator's bench), at the cost of
    /// up to 32 MiB more resident memory. Off by default: a client's resident memory is what
    /// its budget is about.
    #[arg(long)]
    keep_freed_memory: bool,
    /// Largest gRPC message, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Give up after this many failed connection attempts in a row (0 = never).
    #[arg(long, default_value_t = 20)]
    max_reconnects: u32,
}

fn parse_kind(s: &str) -> Result<DatasetKind, String> {
    match s {
        "fashion-mnist" | "fashion_mnist" => Ok(DatasetKind::FashionMnist),
        "cifar10" | "cifar-10" => Ok(DatasetKind::Cifar10),
        other => Err(format!(
            "unknown dataset `{other}` (fashion-mnist or cifar10)"
        )),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    fedtiny_proto::tls::install_crypto_provider();
    let a = Args::parse();
    if a.keep_freed_memory && !fedtiny_common::heap::keep_freed_memory() {
        tracing::warn!(
            "--keep-freed-memory: not applied (the allocator is not glibc's, or the \
             environment tunes it)"
        );
    }
    let splits = a
        .dataset
        .load(&a.data_dir)
        .with_context(|| format!("loading data from {}", a.data_dir.display()))?;
    let train = Arc::new(splits.train);
    let indices = match (a.partition, a.of) {
        (Some(k), Some(n)) => {
            if k >= n {
                bail!("--partition {k} must be below --of {n}");
            }
            let p = match a.alpha {
                Some(alpha) => Partitioner::Dirichlet { alpha },
                None => Partitioner::Iid,
            };
            let mut parts = fedtiny_common::data::split::client_partitions(
                train.labels(),
                train.classes(),
                &p,
                n,
                a.reserve_shots,
                a.seed,
            )
            .context("partitioning the training split")?;
            std::mem::take(&mut parts[k])
        }
        _ => (0..train.len()).collect(),
    };
    tracing::info!(samples = indices.len(), "local training data");
    let memory_budget_bytes = a
        .memory_budget_mib
        .checked_mul(1 << 20)
        .context("--memory-budget-mib is too large")?;
    let app = ClientApp::new(LocalData {
        train,
        train_indices: indices,
        test: None,
        normalization: a.dataset.normalization(),
    })
    .with_memory_budget(memory_budget_bytes);
    let cfg = SessionConfig {
        endpoint: a.coordinator.clone(),
        tls: ClientTlsFiles {
            ca: a.ca,
            cert: a.cert,
            key: a.key,
            server_name: a.server_name,
        },
        memory_budget_bytes,
        max_message_bytes: a.max_message_bytes,
        max_reconnects: a.max_reconnects,
        threads: a.threads,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    match runtime.block_on(session::run(cfg, app)) {
        Ok(Outcome::RunOver { tasks }) => {
            println!("the coordinator says the run is over; {tasks} tasks done in this session");
            Ok(())
        }
        Err(e) => Err(e).with_context(|| format!("session with {}", a.coordinator)),
    }
}
