//! The dynamic-mask baselines end to end over real mutual-TLS gRPC on loopback: PruneFL (clients
//! upload the squared gradients of every pruned position) and FedDST (clients adjust their own
//! masks mid-training and upload them), each with one adjustment; and the SynFlow fixed mask.
//! Density is preserved, the mask changes at the adjustment, and the bytes show who uploads what.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_coordinator::config::{MaskRule, StrategyKind};
use fedtiny_coordinator::metrics::{RoundMetrics, RunSummary};
use fedtiny_coordinator::server::Start;
use support::*;

async fn run(kind: StrategyKind, rule: MaskRule) -> (Vec<RoundMetrics>, RunSummary) {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-0000", "client-0001", "client-0002"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 4, 3);
    cfg.federation.strategy.kind = kind;
    cfg.federation.mask.density = 0.05;
    cfg.federation.mask.rule = rule;
    cfg.federation.fedtiny.adjust_every = 2;
    cfg.federation.fedtiny.t_end = 3;
    cfg.federation.fedtiny.alpha = 0.2;
    let server = start_server(cfg, Start::Fresh).await;
    let clients = spawn_clients(server.addr, &pki, &ids, 3);
    let summary = server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap().unwrap();
    }
    (read_metrics(&server.run_dir), summary)
}

fn check_adjusted(m: &[RoundMetrics], summary: &RunSummary) {
    assert_eq!(
        m.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    for r in m {
        assert_eq!(r.participants, 3, "round {}: {:?}", r.round, r.failures);
        assert!((r.density - 0.05).abs() < 0.005, "density {}", r.density);
    }
    // Version 1 is the initial mask; the adjustment after round 2 makes version 2; none after.
    assert_eq!(m[0].mask_version, 1);
    assert_eq!(m[1].mask_version, 2);
    assert_eq!(m[3].mask_version, 2);
    assert_eq!(summary.strategy_state["adjustments"], 1);
    let acc = m[3].test_accuracy.unwrap();
    assert!(acc > 0.2, "accuracy {acc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prunefl_uploads_dense_importance_and_swaps_weights() {
    let (m, summary) = run(StrategyKind::Prunefl, MaskRule::Magnitude).await;
    check_adjusted(&m, &summary);
    // The adjustment round uploads an importance value for every pruned position (about 4 bytes
    // each, 95 % of the prunable weights): several times a normal round's upload.
    assert!(
        m[1].bytes_up > 3 * m[2].bytes_up,
        "adjustment round up {} vs normal {}",
        m[1].bytes_up,
        m[2].bytes_up
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feddst_clients_send_their_own_masks() {
    let (m, summary) = run(StrategyKind::Feddst, MaskRule::Random).await;
    check_adjusted(&m, &summary);
    // Own masks travel with the weights: the adjustment round's upload is larger than a normal
    // round's, but stays sparse (far below PruneFL's dense importance upload).
    assert!(m[1].bytes_up > m[2].bytes_up);
    assert!(m[1].bytes_up < 2 * m[2].bytes_up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synflow_masks_train_like_any_fixed_mask() {
    let (m, _) = run(StrategyKind::Fedavg, MaskRule::Synflow).await;
    assert_eq!(m.len(), 4);
    for r in &m {
        assert_eq!(r.participants, 3, "round {}: {:?}", r.round, r.failures);
        assert!((r.density - 0.05).abs() < 0.005, "density {}", r.density);
        assert_eq!(r.mask_version, 1);
    }
}
