//! Centralized training on the committed Fashion-MNIST sample: it learns, it writes its run
//! folder, and its saved config replays the run exactly.
#![allow(clippy::unwrap_used)]

use fedtiny_simulations::centralized::{self, Quiet};
use fedtiny_simulations::config::CentralizedConfig;
use fedtiny_simulations::datasets;

fn quick_config(out: &std::path::Path) -> CentralizedConfig {
    let mut cfg = CentralizedConfig::embedded_default().unwrap();
    cfg.train.epochs = 2;
    cfg.threads = 1;
    cfg.output.dir = out.to_path_buf();
    cfg.output.name = Some("t".into());
    cfg
}

#[test]
fn learns_on_the_sample_and_writes_a_replayable_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = quick_config(tmp.path());
    let splits = datasets::load(&cfg.data, &mut |_, _, _| {}).unwrap();
    assert_eq!((splits.train.len(), splits.test.len()), (4000, 1000));
    let (dir, summary) = centralized::run(&cfg, &splits, &mut Quiet).unwrap();
    // 10 classes: chance is 10 %. Two epochs on 4,000 images reach far above it.
    assert!(
        summary.final_test_accuracy > 0.70,
        "accuracy {}",
        summary.final_test_accuracy
    );
    for f in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 2);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(first["epoch"], 1);

    // Replay from the saved config: identical accuracy (single-threaded, same seed).
    let mut saved = CentralizedConfig::from_file(&dir.path().join("config.toml")).unwrap();
    assert_eq!(saved.seed, cfg.seed);
    saved.output.name = Some("replay".into());
    let (_, again) = centralized::run(&saved, &splits, &mut Quiet).unwrap();
    assert_eq!(again.final_test_accuracy, summary.final_test_accuracy);
    assert_eq!(again.final_test_loss, summary.final_test_loss);
}

#[test]
fn a_missing_data_directory_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = quick_config(tmp.path());
    cfg.data.dir = tmp.path().join("nowhere");
    let err = datasets::load(&cfg.data, &mut |_, _, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("nowhere"), "{err}");
}
