//! A coordinator and three clients over real mutual-TLS gRPC on loopback: three rounds of sparse
//! FedAvg at density 0.1; accuracy rises and bytes are accounted.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_client::session::Outcome;
use fedtiny_coordinator::server::Start;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clients_three_rounds_over_mtls() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-0000", "client-0001", "client-0002"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let cfg = serve_config(&pki, &tmp.path().join("runs"), 3, 3);
    let server = start_server(cfg, Start::Fresh).await;
    let clients = spawn_clients(server.addr, &pki, &ids, 3);
    let summary = server.handle.await.unwrap().unwrap();
    for c in clients {
        match c.await.unwrap() {
            Ok(Outcome::RunOver { tasks }) => assert_eq!(tasks, 3),
            other => panic!("client ended with {other:?}"),
        }
    }
    let m = read_metrics(&server.run_dir);
    assert_eq!(m.len(), 3);
    assert!(
        m.iter()
            .all(|r| r.participants == 3 && r.failures.is_empty())
    );
    let first = m[0].test_accuracy.unwrap();
    let last = m[2].test_accuracy.unwrap();
    assert!(last > first, "accuracy {first} -> {last}");
    assert!(last > 0.4, "accuracy after 3 rounds: {last}");
    assert!((summary.density - 0.1).abs() < 0.01);
    // Bytes: every round moves the model both ways; the first also carries the masks down.
    for r in &m {
        assert!(r.bytes_up > 0 && r.bytes_down > 0);
    }
    assert!(
        m[0].bytes_down > m[1].bytes_down,
        "masks travel only in the first round"
    );
    let (p, dense) = (
        summary.prunable_weights as f64,
        summary.dense_elements as f64,
    );
    let budget = 4.0 * 0.1 * p + 4.0 * dense;
    let per_client_up = m[1].bytes_up as f64 / 3.0;
    assert!(
        per_client_up <= 1.1 * budget,
        "{per_client_up} > 1.1 × {budget}"
    );
    assert!(server.run_dir.join("final_model.bin").is_file());
    assert!(server.run_dir.join("summary.json").is_file());
}
