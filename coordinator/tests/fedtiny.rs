//! FedTiny end to end over real mutual-TLS gRPC on loopback: stage-0 pre-training, adaptive
//! BatchNorm selection among candidate masks over two client round trips, then rounds with a
//! prune-and-grow adjustment; density is preserved and the new mask travels once.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_coordinator::config::{Granularity, StrategyKind};
use fedtiny_coordinator::server::Start;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abns_then_progressive_pruning_over_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-0000", "client-0001", "client-0002"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 4, 3);
    cfg.federation.strategy.kind = StrategyKind::Fedtiny;
    cfg.federation.mask.density = 0.05;
    cfg.federation.fedtiny.candidates = 3;
    cfg.federation.fedtiny.bn_passes = 2;
    cfg.federation.fedtiny.adjust_every = 2;
    cfg.federation.fedtiny.t_end = 3;
    cfg.federation.fedtiny.alpha = 0.2;
    cfg.federation.fedtiny.granularity = Granularity::Entire;
    let spec = cfg.federation.model_spec().unwrap();
    let w0_bytes = 4 * fedtiny_common::models::Model::new(&spec, 0)
        .unwrap()
        .state_dict()
        .num_values() as u64;
    let server = start_server(cfg, Start::Fresh).await;
    let clients = spawn_clients(server.addr, &pki, &ids, 3);
    let summary = server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap().unwrap();
    }
    let m = read_metrics(&server.run_dir);
    // Round 0 is the bootstrap (two round trips to the 3 sampled clients), then 4 rounds.
    assert_eq!(
        m.iter().map(|r| r.round).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(m[0].participants, 3, "{:?}", m[0].failures);
    assert!(m[0].bytes_down > 0 && m[0].bytes_up > 0);
    // w0 travels once per client: stage 1c carries only the averaged statistics.
    assert!(
        m[0].bytes_down > 3 * w0_bytes && m[0].bytes_down < 3 * w0_bytes * 6 / 5,
        "selection sent {} B to 3 clients for a {w0_bytes} B w0",
        m[0].bytes_down
    );
    let state = &summary.strategy_state;
    assert_eq!(state["bootstrapped"], true);
    assert!(state["fallback"].is_null(), "{state}");
    let losses = state["candidate_losses"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    let selected = state["selected"].as_u64().unwrap() as usize;
    let best = losses
        .iter()
        .map(|l| l.as_f64().unwrap())
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0;
    assert_eq!(selected, best, "the selected candidate has the lowest loss");
    // Mask version 1 after selection; round 2 adjusts (version 2); round 4 is past T_end.
    assert_eq!(m[1].mask_version, 1);
    assert_eq!(
        m[2].mask_version, 2,
        "the adjustment after round 2 changes the mask"
    );
    assert_eq!(m[4].mask_version, 2);
    assert_eq!(state["adjustments"], 1);
    for r in &m[1..] {
        assert!((r.density - 0.05).abs() < 0.005, "density {}", r.density);
    }
    // The new mask travels once: round 3 (first with version 2) costs more down than round 4.
    assert!(
        m[3].bytes_down > m[4].bytes_down,
        "{} vs {}",
        m[3].bytes_down,
        m[4].bytes_down
    );
    let acc = m[4].test_accuracy.unwrap();
    assert!(acc > 0.3, "accuracy {acc}");
}
