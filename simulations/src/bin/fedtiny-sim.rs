//! `fedtiny-sim`: run fedtiny on one machine.
//!
//! - `fedtiny-sim train [CONFIG]`: centralized training (embedded default: the `cnn` on the
//!   committed Fashion-MNIST sample), with a progress bar, per-epoch metrics and a run folder.
//! - `fedtiny-sim bench`: training throughput of the models (median samples/s), optionally over a
//!   density sweep (`--densities 1,0.1,0.01`) with speed-ups over dense.
//! - `fedtiny-sim data download --dir DIR`: fetch Fashion-MNIST, checksums verified.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fedtiny_common::models::Arch;
use fedtiny_common::optim::OptimizerConfig;
use fedtiny_simulations::bench::{self, BenchOptions};
use fedtiny_simulations::centralized::{self, EpochMetrics, Observer};
use fedtiny_simulations::config::{CentralizedConfig, DatasetKind, resolve_data_dir};
use fedtiny_simulations::datasets;
use fedtiny_simulations::federated::{self, SimConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "fedtiny-sim", version, about = "Run fedtiny on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Centralized training of one model on a whole dataset.
    Train(TrainArgs),
    /// Federated simulation: N clients on this machine (in process by default).
    Run(RunArgs),
    /// Compare methods × densities × seeds (FedTiny, its ablations and the baselines).
    Experiment {
        /// Experiment config; without it the embedded short comparison on the sample runs.
        config: Option<PathBuf>,
        /// Override the dataset directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override output.dir.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Continue in this existing experiment folder: finished runs are read back, the rest
        /// (or newly added methods, densities, seeds) run.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// With --resume: run nothing, write the report of the finished runs only.
        #[arg(long, requires = "resume")]
        report_only: bool,
    },
    /// Print the per-round metrics of a federated run folder.
    Report {
        /// The run folder (holds metrics.jsonl and summary.json).
        run_dir: PathBuf,
    },
    /// Training throughput of the models on synthetic batches.
    Bench(BenchArgs),
    /// Dataset utilities.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// TOML config; without it the embedded default (cnn on the committed sample) runs.
    config: Option<PathBuf>,
    /// Override model.arch (cnn, vgg11, resnet18).
    #[arg(long)]
    model: Option<Arch>,
    /// Override model.width.
    #[arg(long)]
    width: Option<f64>,
    /// Override data.dir.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Download the dataset into the data directory if it is missing.
    #[arg(long)]
    download: bool,
    /// Override train.epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override train.batch_size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override the optimizer's learning rate.
    #[arg(long)]
    lr: Option<f32>,
    /// Override seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override threads (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Override data.train_limit.
    #[arg(long)]
    train_limit: Option<usize>,
    /// Override output.dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override output.name.
    #[arg(long)]
    name: Option<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config; without it the embedded default (sparse FedAvg, cnn, committed sample) runs.
    config: Option<PathBuf>,
    /// Override the dataset directory (server test set and client data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override run.rounds.
    #[arg(long)]
    rounds: Option<u64>,
    /// Override mask.density.
    #[arg(long)]
    density: Option<f64>,
    /// Override run.seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Override clients.count (min_clients follows when it was equal).
    #[arg(long)]
    clients: Option<usize>,
    /// Override simulation.parallel_clients.
    #[arg(long)]
    parallel_clients: Option<usize>,
    /// Override simulation.threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Override output.dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override output.name.
    #[arg(long)]
    name: Option<String>,
    /// Print the resolved config and exit.
    #[arg(long)]
    print_config: bool,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Models to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "cnn,vgg11,resnet18")]
    models: Vec<Arch>,
    /// Width multiplier of vgg11 and resnet18 (the cnn always runs at width 1).
    #[arg(long, default_value_t = 0.25)]
    width: f64,
    /// Samples per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Kernel threads (0 = one per core).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Untimed warm-up steps per model.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed steps per repeat.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Repeats per model (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Densities of the prunable tensors to sweep (random layer-wise masks), comma-separated;
    /// density 1 (the dense reference for the speed-ups) is always measured.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    densities: Vec<f64>,
    /// Measure only the listed densities (no dense reference; speed-ups relative to the densest
    /// listed), so that the process's peak RSS, printed at the end, covers just those.
    #[arg(long)]
    only_listed: bool,
    /// Reference throughput to compare with, as model=samples_per_sec (repeatable), e.g. the
    /// PyTorch figure measured on the same machine.
    #[arg(long = "reference", value_parser = parse_reference)]
    references: Vec<(String, f64)>,
    /// Folder to write bench.json and bench.md into.
    #[arg(long, default_value = "runs/bench")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Download Fashion-MNIST from its canonical source, verifying MD5 checksums.
    Download {
        /// Target folder.
        #[arg(long)]
        dir: PathBuf,
        /// Another base URL serving the same four files (a mirror).
        #[arg(long)]
        base_url: Option<String>,
    },
}

fn parse_reference(s: &str) -> Result<(String, f64), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected model=samples_per_sec, got `{s}`"))?;
    let v: f64 = v.parse().map_err(|e| format!("`{v}`: {e}"))?;
    Ok((k.to_string(), v))
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
    let cli = Cli::parse();
    match cli.command {
        Command::Train(a) => train(a),
        Command::Run(a) => run_federated(a),
        Command::Experiment {
            config,
            data_dir,
            out,
            resume,
            report_only,
        } => run_experiment(config, data_dir, out, resume, report_only),
        Command::Report { run_dir } => {
            print_rounds(&run_dir.join("metrics.jsonl"))?;
            let summary = run_dir.join("summary.json");
            if let Ok(text) = std::fs::read_to_string(&summary) {
                let s: serde_json::Value = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", summary.display()))?;
                println!(
                    "final accuracy {}  density {}  rounds {}{}; results in {}",
                    s["final_test_accuracy"]
                        .as_f64()
                        .map_or("n/a".into(), |a| format!("{:.2}%", 100.0 * a)),
                    s["density"],
                    s["rounds"],
                    if s["interrupted"].as_bool() == Some(true) {
                        " (interrupted)"
                    } else {
                        ""
                    },
                    run_dir.display()
                );
            }
            Ok(())
        }
        Command::Bench(a) => run_bench(a),
        Command::Data(DataCommand::Download { dir, base_url }) => {
            let mut p = download_progress();
            use fedtiny_common::data::download::{
                FASHION_MNIST_BASE_URL, FASHION_MNIST_FILES, download,
            };
            let base = base_url.as_deref().unwrap_or(FASHION_MNIST_BASE_URL);
            let files = download(base, &FASHION_MNIST_FILES, &dir, &mut p)
                .context("downloading Fashion-MNIST")?;
            for f in files {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}

fn resolve_train_config(a: &TrainArgs) -> Result<CentralizedConfig> {
    let mut cfg = match &a.config {
        Some(p) => CentralizedConfig::from_file(p)?,
        None => CentralizedConfig::embedded_default()?,
    };
    if let Some(v) = a.model {
        cfg.model.arch = v;
    }
    if let Some(v) = a.width {
        cfg.model.width = v;
    }
    if let Some(v) = &a.data_dir {
        cfg.data.dir = v.clone();
    }
    if a.download {
        cfg.data.download = true;
    }
    if let Some(v) = a.epochs {
        cfg.train.epochs = v;
    }
    if let Some(v) = a.batch_size {
        cfg.train.batch_size = v;
    }
    if let Some(lr) = a.lr {
        match &mut cfg.train.optimizer {
            OptimizerConfig::Sgd { lr: l, .. } | OptimizerConfig::Adam { lr: l, .. } => *l = lr,
        }
    }
    if let Some(v) = a.seed {
        cfg.seed = v;
    }
    if let Some(v) = a.threads {
        cfg.threads = v;
    }
    if let Some(v) = a.train_limit {
        cfg.data.train_limit = Some(v);
    }
    if let Some(v) = &a.out {
        cfg.output.dir = v.clone();
    }
    if let Some(v) = &a.name {
        cfg.output.name = Some(v.clone());
    }
    cfg.validate()
        .context("invalid configuration after overrides")?;
    Ok(cfg)
}

struct Progress {
    bar: Option<ProgressBar>,
    epochs: usize,
}

impl Observer for Progress {
    fn epoch_start(&mut self, epoch: usize, samples: usize) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(samples as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} samples  {per_sec}  eta {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{}", self.epochs));
            self.bar = Some(bar);
        }
    }

    fn progress(&mut self, samples_done: usize) {
        if let Some(b) = &self.bar {
            b.set_position(samples_done as u64);
        }
    }

    fn epoch_end(&mut self, m: &EpochMetrics) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        println!(
            "epoch {:>3}/{}  train loss {:.4} acc {:.2}%  test loss {:.4} acc {:.2}%  {:.0} samples/s  lr {:.2e}",
            m.epoch,
            self.epochs,
            m.train_loss,
            100.0 * m.train_accuracy,
            m.test_loss,
            100.0 * m.test_accuracy,
            m.samples_per_sec,
            m.lr
        );
    }
}

fn download_progress() -> impl FnMut(&str, u64, Option<u64>) {
    let mut last = String::new();
    move |name: &str, done: u64, total: Option<u64>| {
        if name != last {
            eprintln!(
                "downloading {name} ({})",
                total.map_or("size unknown".into(), |t| format!("{t} bytes"))
            );
            last = name.to_string();
        }
        let _ = done;
    }
}

fn train(a: TrainArgs) -> Result<()> {
    let cfg = resolve_train_config(&a)?;
    if a.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let dir = resolve_data_dir(&cfg.data.dir);
    let mut p = download_progress();
    let splits = datasets::load(&cfg.data, &mut p)
        .with_context(|| format!("loading {:?} from {}", cfg.data.dataset, dir.display()))?;
    println!(
        "training {} (width {}) on {} train / {} test samples from {}, seed {}",
        cfg.model.arch,
        cfg.model.width,
        splits.train.len(),
        splits.test.len(),
        dir.display(),
        cfg.seed
    );
    let mut obs = Progress {
        bar: None,
        epochs: cfg.train.epochs,
    };
    let (run, s) = centralized::run(&cfg, &splits, &mut obs)?;
    println!(
        "final test accuracy {:.2}% (best {:.2}%), {:.0} samples/s median, {:.1} s training; results in {}",
        100.0 * s.final_test_accuracy,
        100.0 * s.best_test_accuracy,
        s.median_samples_per_sec,
        s.train_seconds,
        run.path().display()
    );
    Ok(())
}

fn run_bench(a: BenchArgs) -> Result<()> {
    if a.batch_size < 2 {
        bail!("--batch-size must be at least 2");
    }
    let mut rows = Vec::new();
    for arch in &a.models {
        let width = if *arch == Arch::Cnn { 1.0 } else { a.width };
        let opts = BenchOptions {
            archs: vec![*arch],
            width,
            input: DatasetKind::FashionMnist.shape().0,
            classes: 10,
            batch_size: a.batch_size,
            threads: a.threads,
            warmup_steps: a.warmup,
            steps: a.steps,
            repeats: a.repeats,
            seed: 1,
            optimizer: OptimizerConfig::default(),
            densities: a.densities.clone(),
            only_listed: a.only_listed,
        };
        eprintln!("measuring {arch} (width {width}) ...");
        rows.extend(bench::run(&opts, &mut |r| {
            eprintln!(
                "  {} w{} density {}: {:.0} samples/s (median of {}; min {:.0}, max {:.0}), {:.2}x dense",
                r.arch,
                r.width,
                r.density,
                r.samples_per_sec,
                r.repeats.len(),
                r.samples_per_sec_min,
                r.samples_per_sec_max,
                r.speedup
            );
        })?);
    }
    let md = bench::markdown(&rows, &a.references);
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let header = format!(
        "Training throughput, batch {}, {} threads, input 28x28x1, Adam; median of {} repeats of {} steps; \
         random layer-wise masks at each density, densities of a model measured round-robin; \
         speed-up over the same model at density 1 in this run.\n\n",
        a.batch_size, a.threads, a.repeats, a.steps
    );
    std::fs::write(a.out.join("bench.md"), format!("{header}{md}"))
        .with_context(|| format!("writing {}", a.out.display()))?;
    std::fs::write(a.out.join("bench.json"), serde_json::to_vec_pretty(&rows)?)
        .with_context(|| format!("writing {}", a.out.display()))?;
    print!("{header}{md}");
    if let Some(b) = fedtiny_common::cost::peak_rss_bytes() {
        println!(
            "\npeak RSS of this process: {:.1} MiB",
            b as f64 / f64::from(1 << 20)
        );
    }
    Ok(())
}

fn resolve_sim_config(a: &RunArgs) -> Result<SimConfig> {
    let mut cfg = match &a.config {
        Some(p) => SimConfig::from_file(p)?,
        None => SimConfig::embedded_default()?,
    };
    if let Some(d) = &a.data_dir {
        cfg.federation.eval.data_dir = d.clone();
        cfg.clients.data_dir = None;
    }
    if let Some(v) = a.rounds {
        cfg.federation.run.rounds = v;
    }
    if let Some(v) = a.density {
        cfg.federation.mask.density = v;
    }
    if let Some(v) = a.seed {
        cfg.federation.run.seed = v;
    }
    if let Some(v) = a.clients {
        if cfg.federation.run.min_clients == cfg.clients.count {
            cfg.federation.run.min_clients = v;
        }
        cfg.clients.count = v;
    }
    if let Some(v) = a.parallel_clients {
        cfg.simulation.parallel_clients = v;
    }
    if let Some(v) = a.threads {
        cfg.simulation.threads = v;
    }
    if let Some(v) = &a.out {
        cfg.federation.output.dir = v.clone();
    }
    if let Some(v) = &a.name {
        cfg.federation.output.name = Some(v.clone());
    }
    cfg.validate()
        .context("invalid configuration after overrides")?;
    Ok(cfg)
}

fn run_federated(a: RunArgs) -> Result<()> {
    let cfg = resolve_sim_config(&a)?;
    if a.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let (train, test) = federated::load_data(&cfg).context("loading data")?;
    let f = &cfg.federation;
    println!(
        "federated {} (width {}) at density {}: {} clients ({} per round), {} rounds, {} train / {} test samples, seed {}",
        f.model.arch,
        f.model.width,
        f.mask.density,
        cfg.clients.count,
        f.run.clients_per_round,
        f.run.rounds,
        train.len(),
        test.len(),
        f.run.seed
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (summary, dir) = runtime.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupt: finishing the checkpoint, then exiting");
                let _ = tx.send(true);
            }
        });
        federated::run_in_process(&cfg, train, test, rx).await
    })?;
    print_rounds(&dir.path().join("metrics.jsonl"))?;
    println!(
        "final accuracy {}  density {:.4}  bytes/client/round down {:.0} up {:.0}{}; results in {}",
        summary
            .final_test_accuracy
            .map_or("n/a".into(), |a| format!("{:.2}%", 100.0 * a)),
        summary.density,
        summary.mean_bytes_down_per_client,
        summary.mean_bytes_up_per_client,
        if summary.interrupted {
            " (interrupted)"
        } else {
            ""
        },
        dir.path().display()
    );
    Ok(())
}

/// Prints one line per round from a metrics file.
fn print_rounds(path: &std::path::Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    for line in text.lines() {
        let m: fedtiny_coordinator::metrics::RoundMetrics = serde_json::from_str(line)?;
        println!(
            "round {:>4}  accuracy {}  participants {}/{}  failures {}  down {} B  up {} B  {:.1} s",
            m.round,
            m.test_accuracy
                .map_or("   n/a ".into(), |a| format!("{:6.2}%", 100.0 * a)),
            m.participants,
            m.sampled,
            m.failures.len(),
            m.bytes_down,
            m.bytes_up,
            m.seconds
        );
    }
    Ok(())
}

fn run_experiment(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    out: Option<PathBuf>,
    resume: Option<PathBuf>,
    report_only: bool,
) -> Result<()> {
    use fedtiny_simulations::experiment::{self, DEFAULT_EXPERIMENT, ExperimentConfig};
    let (text, origin) = match &config {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_EXPERIMENT.to_string(),
            "<embedded experiment-sample.toml>".into(),
        ),
    };
    let mut cfg = ExperimentConfig::from_toml(&text, &origin)?;
    if let Some(d) = data_dir {
        cfg.base.federation.eval.data_dir = d;
        cfg.base.clients.data_dir = None;
    }
    if let Some(o) = out {
        cfg.base.federation.output.dir = o;
    }
    cfg.validate()
        .context("invalid configuration after overrides")?;
    let (train, test) = federated::load_data(&cfg.base).context("loading data")?;
    let runs = cfg.runs().len();
    println!(
        "experiment {}: {} runs ({} methods, densities {:?}, seeds {:?}), {} rounds each",
        cfg.experiment.name,
        runs,
        cfg.experiment.methods.len(),
        cfg.experiment.densities,
        cfg.experiment.seeds,
        cfg.base.federation.run.rounds
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let started = std::time::Instant::now();
    let (dir, _) = runtime.block_on(async {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupt: stopping after the current run's checkpoint");
                let _ = tx.send(true);
            }
        });
        experiment::run(
            &cfg,
            resume.as_deref(),
            report_only,
            train,
            test,
            rx,
            &mut |i, n, r, reused| {
                println!(
                    "[{i}/{n}] {} d={} seed {}: accuracy {:.2}%  ({})",
                    r.method.name(),
                    r.density,
                    r.seed,
                    100.0 * r.accuracy,
                    if reused {
                        "finished earlier, read back".to_string()
                    } else {
                        format!(
                            "{:.0} s, {:.0} s elapsed",
                            r.seconds,
                            started.elapsed().as_secs_f64()
                        )
                    }
                );
            },
        )
        .await
    })?;
    let table = std::fs::read_to_string(dir.path().join("results.md"))?;
    println!(
        "\n{table}\nresults, plots and run folders in {}",
        dir.path().display()
    );
    Ok(())
}
