//! Wire efficiency over real mutual-TLS gRPC: at density d, once the masks have travelled, a
//! client's task and its result each cost at most 1.1 × (4·d·P + 4·dense) bytes, where P is the
//! number of prunable weights and `dense` the number of other state elements (from
//! `summary.json`). Run with `--nocapture` to see the measured numbers.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_client::session::Outcome;
use fedtiny_coordinator::metrics::RunSummary;
use fedtiny_coordinator::server::Start;
use support::*;

async fn measure(density: f64) {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-0000", "client-0001"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 3, 2);
    cfg.federation.mask.density = density;
    cfg.federation.eval.test_limit = Some(200);
    let server = start_server(cfg, Start::Fresh).await;
    let clients = spawn_clients(server.addr, &pki, &ids, 2);
    server.handle.await.unwrap().unwrap();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), Outcome::RunOver { tasks: 3 });
    }
    let summary: RunSummary = serde_json::from_str(
        &std::fs::read_to_string(server.run_dir.join("summary.json")).unwrap(),
    )
    .unwrap();
    let m = read_metrics(&server.run_dir);
    assert_eq!(m.len(), 3);
    assert!(
        m.iter()
            .all(|r| r.participants == 2 && r.failures.is_empty())
    );
    let (p, dense) = (
        summary.prunable_weights as f64,
        summary.dense_elements as f64,
    );
    let budget = 4.0 * density * p + 4.0 * dense;
    println!(
        "d = {density}: P = {p}, dense = {dense}, achieved density {:.4}, budget 4dP + 4·dense = {budget:.0} B",
        summary.density
    );
    println!(
        "  round 1 (masks travel): {:.0} B down, {:.0} B up per client",
        m[0].bytes_down as f64 / 2.0,
        m[0].bytes_up as f64 / 2.0
    );
    // Masks travel in round 1 only: later rounds keep the version and every client holds it.
    assert!(m[0].bytes_down > m[1].bytes_down);
    for r in &m[1..] {
        assert_eq!(r.mask_version, m[0].mask_version);
        let n = r.participants as f64;
        let (down, up) = (r.bytes_down as f64 / n, r.bytes_up as f64 / n);
        println!(
            "  round {}: {down:.0} B down ({:.3} × budget), {up:.0} B up ({:.3} × budget), {:.0} B both ways",
            r.round,
            down / budget,
            up / budget,
            down + up
        );
        assert!(down <= 1.1 * budget, "down {down} > 1.1 × {budget}");
        assert!(up <= 1.1 * budget, "up {up} > 1.1 × {budget}");
    }
    println!(
        "  summary: {:.0} B down, {:.0} B up per client per steady round",
        summary.mean_bytes_down_per_client, summary.mean_bytes_up_per_client
    );
    assert!(summary.mean_bytes_down_per_client <= 1.1 * budget);
    assert!(summary.mean_bytes_up_per_client <= 1.1 * budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_bytes_per_client_at_density_0_1() {
    let _serial = SERIAL.lock().await;
    bounded(120, measure(0.1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_bytes_per_client_at_density_0_01() {
    let _serial = SERIAL.lock().await;
    bounded(120, measure(0.01)).await;
}
