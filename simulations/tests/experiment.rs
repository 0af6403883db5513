//! The experiment command end to end on the committed sample: a small sweep writes its table
//! (Markdown and CSV), records and plots; `--resume` reads finished runs back instead of
//! running them again and adds new methods; `--report-only` runs nothing.
#![allow(clippy::unwrap_used)]

use fedtiny_simulations::experiment::{
    self, DEFAULT_EXPERIMENT, ExperimentConfig, Method, RunRecord,
};
use fedtiny_simulations::federated;

fn small(out: &std::path::Path, methods: &[Method]) -> ExperimentConfig {
    let mut cfg = ExperimentConfig::from_toml(DEFAULT_EXPERIMENT, "embedded").unwrap();
    cfg.experiment.name = "tiny".into();
    cfg.experiment.methods = methods.to_vec();
    cfg.experiment.densities = vec![0.05];
    cfg.experiment.seeds = vec![3];
    let f = &mut cfg.base.federation;
    f.run.rounds = 3;
    f.run.clients_per_round = 2;
    f.run.min_clients = 4;
    f.run.quorum = 2;
    f.model.width = 0.25;
    f.training.max_steps = Some(2);
    f.fedtiny.candidates = 2;
    f.fedtiny.bn_passes = 1;
    f.fedtiny.adjust_every = 1;
    f.fedtiny.t_end = 2;
    f.eval.test_limit = Some(200);
    f.output.dir = out.to_path_buf();
    cfg.base.clients.count = 4;
    cfg.base.simulation.parallel_clients = 1;
    cfg.base.simulation.threads = 1;
    cfg
}

fn csv_rows(dir: &std::path::Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(dir.join("results.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// Runs (or resumes, or reports) `cfg` and returns its folder, records and, per run reported,
/// the method and whether it was read back instead of run.
async fn sweep(
    cfg: &ExperimentConfig,
    resume: Option<&std::path::Path>,
    report_only: bool,
) -> (std::path::PathBuf, Vec<RunRecord>, Vec<(Method, bool)>) {
    let (train, test) = federated::load_data(&cfg.base).unwrap();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let mut ran = Vec::new();
    let (dir, records) = experiment::run(
        cfg,
        resume,
        report_only,
        train,
        test,
        stop,
        &mut |_, _, r, reused| ran.push((r.method, reused)),
    )
    .await
    .unwrap();
    (dir.path().to_path_buf(), records, ran)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_writes_its_table_and_plots_and_resumes_without_rerunning() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small(
        tmp.path(),
        &[Method::Fedtiny, Method::FedavgDense, Method::Random],
    );
    let (dir, records, ran) = sweep(&cfg, None, false).await;
    assert_eq!(records.len(), 3);
    assert!(ran.iter().all(|(_, reused)| !reused));

    // The table: a header and one row per (method, density), with its accounting.
    let rows = csv_rows(&dir);
    let header = &rows[0];
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let row = |m: &str| rows.iter().find(|r| r[0] == m).unwrap();
    for m in ["fedtiny", "fedavg_dense", "random"] {
        let acc: f64 = row(m)[col("accuracy_mean")].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{m}: {acc}");
        let up: f64 = row(m)[col("bytes_up_per_round")].parse().unwrap();
        assert!(up > 0.0, "{m} uploads nothing");
    }
    let state = |m: &str| -> f64 { row(m)[col("model_state_vs_dense")].parse().unwrap() };
    let flops = |m: &str| -> f64 { row(m)[col("flops_vs_dense")].parse().unwrap() };
    assert_eq!(state("fedavg_dense"), 1.0);
    assert!(state("random") < 0.2, "{}", state("random"));
    assert!(state("fedtiny") < 0.2, "{}", state("fedtiny"));
    assert!(
        flops("random") < 0.5 * flops("fedavg_dense"),
        "{}",
        flops("random")
    );
    let up = |m: &str| -> f64 { row(m)[col("bytes_up_per_round")].parse().unwrap() };
    assert!(up("random") < 0.5 * up("fedavg_dense"));

    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert_eq!(md.lines().filter(|l| l.starts_with("| fed")).count(), 2);
    assert!(md.contains("Columns:"));
    let svg = std::fs::read_to_string(dir.join("accuracy-d0.05.svg")).unwrap();
    assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"));
    assert!(svg.contains("fedtiny") && svg.contains("random"));
    let saved: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("records.json")).unwrap()).unwrap();
    assert_eq!(saved.len(), 3);
    for r in &records {
        let run = std::path::Path::new(&r.run_dir);
        assert!(run.join("config.toml").is_file() && run.join("summary.json").is_file());
    }

    // Resume with one method more: the three finished runs are read back, only the new one runs.
    let more = small(
        tmp.path(),
        &[
            Method::Fedtiny,
            Method::FedavgDense,
            Method::Random,
            Method::Magnitude,
        ],
    );
    let (_, again, ran) = sweep(&more, Some(&dir), false).await;
    assert_eq!(again.len(), 4);
    assert_eq!(ran.iter().filter(|(_, reused)| *reused).count(), 3);
    assert_eq!(
        ran.iter().filter(|(_, reused)| !reused).collect::<Vec<_>>(),
        vec![&(Method::Magnitude, false)]
    );
    for (a, b) in records.iter().zip(&again) {
        assert_eq!(
            (a.method, a.accuracy, a.run_dir.clone()),
            (b.method, b.accuracy, b.run_dir.clone())
        );
    }
    assert_eq!(csv_rows(&dir).len(), 5);

    // Report only with a method never run: nothing runs, the table covers the finished runs.
    let unrun = small(
        tmp.path(),
        &[
            Method::Fedtiny,
            Method::FedavgDense,
            Method::Random,
            Method::Magnitude,
            Method::Snip,
        ],
    );
    let (_, reported, ran) = sweep(&unrun, Some(&dir), true).await;
    assert_eq!(reported.len(), 4);
    assert!(ran.iter().all(|(_, reused)| *reused));
    assert!(!dir.join("runs").join("snip-d0.05-s3").exists());

    // A resume with another base config is refused, not mixed into the sweep.
    let mut other = small(tmp.path(), &[Method::Fedtiny]);
    other.base.federation.run.rounds = 4;
    let (train, test) = federated::load_data(&other.base).unwrap();
    let (_tx, stop) = tokio::sync::watch::channel(false);
    let err = experiment::run(
        &other,
        Some(&dir),
        false,
        train,
        test,
        stop,
        &mut |_, _, _, _| {},
    )
    .await
    .err()
    .unwrap();
    assert!(err.to_string().contains("config"), "{err}");
}
