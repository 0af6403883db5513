//! `fedtiny-coordinator`: serve a federated run over mutual-TLS gRPC, or write certificates.
//!
//! - `fedtiny-coordinator serve --config run.toml [--resume RUN_DIR]`
//! - `fedtiny-coordinator certs --out DIR --clients 10 [--server-names localhost,127.0.0.1]`

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fedtiny_coordinator::config::ServeConfig;
use fedtiny_coordinator::server::{self, Start};
use fedtiny_proto::pki::{self, Validity};

#[derive(Parser)]
#[command(
    name = "fedtiny-coordinator",
    version,
    about = "The fedtiny coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a run from a TOML config (mutual TLS required).
    Serve {
        /// The config file.
        #[arg(long)]
        config: PathBuf,
        /// Continue the run in this folder from its checkpoint.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Override server.listen.
        #[arg(long)]
        listen: Option<String>,
        /// Override run.rounds.
        #[arg(long)]
        rounds: Option<u64>,
        /// Override eval.data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override output.dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Override output.name.
        #[arg(long)]
        name: Option<String>,
        /// Take the TLS files from a folder written by `certs` (server.pem, server.key, ca.pem).
        #[arg(long)]
        tls_dir: Option<PathBuf>,
    },
    /// Write a CA, a server certificate and client certificates as PEM files.
    Certs {
        /// Target folder (must not already hold certificates).
        #[arg(long)]
        out: PathBuf,
        /// Number of client certificates (named client-0000, client-0001, ...).
        #[arg(long, default_value_t = 0)]
        clients: usize,
        /// Explicit client ids (comma-separated), in addition to --clients.
        #[arg(long, value_delimiter = ',')]
        client_ids: Vec<String>,
        /// DNS names and IP addresses of the server certificate.
        #[arg(long, value_delimiter = ',', default_value = "localhost,127.0.0.1")]
        server_names: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

fn main() -> Result<()> {
    // Before anything allocates: freed buffers stay with the process for the next step.
    fedtiny_common::heap::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    fedtiny_proto::tls::install_crypto_provider();
    match Cli::parse().command {
        Command::Certs {
            out,
            clients,
            client_ids,
            server_names,
            days,
        } => {
            let mut ids: Vec<String> = (0..clients).map(|i| format!("client-{i:04}")).collect();
            ids.extend(client_ids);
            if ids.is_empty() {
                bail!("no clients: pass --clients N or --client-ids a,b");
            }
            let validity = Validity::days(days);
            let ca = pki::generate_ca("fedtiny CA", validity).context("generating the CA")?;
            let bundle = pki::write_bundle(&out, &ca, &server_names, &ids, validity)
                .with_context(|| format!("writing certificates to {}", out.display()))?;
            println!(
                "wrote CA {}, server {} and {} client certificates under {}",
                bundle.ca_cert.display(),
                bundle.server_cert.display(),
                bundle.clients.len(),
                bundle.dir.display()
            );
            Ok(())
        }
        Command::Serve {
            config,
            resume,
            listen,
            rounds,
            data_dir,
            out,
            name,
            tls_dir,
        } => {
            let mut cfg = ServeConfig::from_file(&config)?;
            if let Some(v) = listen {
                cfg.server.listen = v;
            }
            if let Some(v) = rounds {
                cfg.federation.run.rounds = v;
            }
            if let Some(v) = data_dir {
                cfg.federation.eval.data_dir = v;
            }
            if let Some(v) = out {
                cfg.federation.output.dir = v;
            }
            if let Some(v) = name {
                cfg.federation.output.name = Some(v);
            }
            if let Some(d) = tls_dir {
                cfg.tls.cert = d.join("server.pem");
                cfg.tls.key = d.join("server.key");
                cfg.tls.client_ca = d.join("ca.pem");
            }
            cfg.validate()
                .context("invalid configuration after overrides")?;
            let data =
                server::load_server_data(&cfg.federation).context("loading the server's data")?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            let summary = runtime.block_on(async move {
                let (tx, rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    shutdown_signal().await;
                    tracing::warn!("shutdown requested: stopping after a checkpoint");
                    let _ = tx.send(true);
                });
                let start = match resume {
                    Some(dir) => Start::Resume(dir),
                    None => Start::Fresh,
                };
                server::serve(cfg, start, data, rx, |addr, dir| {
                    println!("listening on {addr}; run folder {}", dir.display());
                })
                .await
            })?;
            println!(
                "{} after {} rounds: final accuracy {}; results in {}",
                if summary.interrupted {
                    "stopped"
                } else {
                    "done"
                },
                summary.rounds,
                summary
                    .final_test_accuracy
                    .map_or("n/a".into(), |a| format!("{:.2}%", 100.0 * a)),
                summary.run_dir
            );
            Ok(())
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
