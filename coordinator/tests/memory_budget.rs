//! Memory budgets over real mutual-TLS gRPC on loopback.
//!
//! - A client that declares a budget below the smallest training task is never sampled, and
//!   every round records why; a client that declares none but enforces a small budget itself
//!   refuses its task with the predicted peak and its budget in the reason; the others train.
//! - With `memory.min_batch_size` set, a client whose budget cannot hold the configured batch
//!   is sent a halved one that fits, and trains with it.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_client::ClientApp;
use fedtiny_client::session::{self, Outcome};
use fedtiny_common::cost::{CLIENT_STORAGE, TrainFootprint};
use fedtiny_coordinator::server::Start;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_over_budget_are_excluded_or_refuse_with_the_reason_while_others_train() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-a", "client-b", "client-liar", "client-tiny"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 2, 4);
    cfg.federation.run.quorum = 2;
    let tiny_budget: u64 = 1 << 20;
    let server = start_server(cfg, Start::Fresh).await;
    let a = spawn_client(server.addr, client_files(&pki, ids[0]), local_data(0, 4));
    let b = spawn_client(server.addr, client_files(&pki, ids[1]), local_data(1, 4));
    // Declares no budget, but refuses anything above 1 MiB itself.
    let liar = tokio::spawn(session::run(
        session_config(server.addr, client_files(&pki, ids[2])),
        ClientApp::new(local_data(2, 4)).with_memory_budget(tiny_budget),
    ));
    // Declares 1 MiB: less than the model state alone.
    let mut tiny_cfg = session_config(server.addr, client_files(&pki, ids[3]));
    tiny_cfg.memory_budget_bytes = tiny_budget;
    let tiny = tokio::spawn(session::run(tiny_cfg, ClientApp::new(local_data(3, 4))));

    let summary = server.handle.await.unwrap().unwrap();
    assert_eq!(summary.rounds, 2);
    for c in [a, b] {
        assert_eq!(c.await.unwrap().unwrap(), Outcome::RunOver { tasks: 2 });
    }
    // The liar answered both tasks, with its refusal; the tiny client never got one.
    assert_eq!(liar.await.unwrap().unwrap(), Outcome::RunOver { tasks: 2 });
    assert_eq!(tiny.await.unwrap().unwrap(), Outcome::RunOver { tasks: 0 });

    let m = read_metrics(&server.run_dir);
    assert_eq!(m.len(), 2);
    for r in &m {
        assert_eq!(r.sampled, 3, "round {}", r.round);
        assert_eq!(r.participants, 2, "round {}", r.round);
        assert!(r.aggregated);
        assert!(r.memory_refused.is_empty() && r.batch_lowered.is_empty());
        // Excluded from sampling, with the predicted peak and the budget in the reason.
        assert_eq!(r.memory_excluded.len(), 1, "{:?}", r.memory_excluded);
        let (who, why) = &r.memory_excluded[0];
        assert_eq!(who, "client-tiny");
        assert!(
            why.contains("memory budget 1.0 MiB (1048576 B) is below the predicted peak")
                && why.contains("at batch size 32"),
            "{why}"
        );
        // The liar's own refusal came back through the failure path.
        assert_eq!(r.failures.len(), 1, "{:?}", r.failures);
        let (who, why) = &r.failures[0];
        assert_eq!(who, "client-liar");
        assert!(
            why.contains("memory budget exceeded: the task needs an estimated")
                && why.contains("at batch size 32")
                && why.contains("above this client's budget of 1.0 MiB (1048576 B)"),
            "{why}"
        );
        assert!(r.client_peak_rss_bytes.is_some_and(|b| b > 0));
    }
    assert!(summary.process_peak_rss_bytes.is_some_and(|b| b > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_size_is_halved_until_the_task_fits_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = ["client-0000", "client-0001", "client-0002"];
    let pki = make_pki(&tmp.path().join("pki"), &ids);
    let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 2, 3);
    cfg.federation.memory.min_batch_size = Some(4);
    // Room for a batch of 8 but not 16: 32 → 16 → 8.
    let f = TrainFootprint::of_spec(
        &cfg.federation.model_spec().unwrap(),
        None,
        &cfg.federation.training.optimizer,
        CLIENT_STORAGE,
    )
    .unwrap();
    let budget = (f.peak_bytes(8) + f.peak_bytes(16)) / 2;
    let server = start_server(cfg, Start::Fresh).await;
    let mut clients: Vec<_> = ids[..2]
        .iter()
        .enumerate()
        .map(|(i, id)| spawn_client(server.addr, client_files(&pki, id), local_data(i, 3)))
        .collect();
    // The small client enforces the same budget it declares.
    let mut small = session_config(server.addr, client_files(&pki, ids[2]));
    small.memory_budget_bytes = budget;
    clients.push(tokio::spawn(session::run(
        small,
        ClientApp::new(local_data(2, 3)),
    )));

    server.handle.await.unwrap().unwrap();
    for c in clients {
        assert_eq!(c.await.unwrap().unwrap(), Outcome::RunOver { tasks: 2 });
    }
    let m = read_metrics(&server.run_dir);
    assert_eq!(m.len(), 2);
    for r in &m {
        assert_eq!(r.batch_lowered, vec![("client-0002".to_string(), 8)]);
        assert!(r.memory_excluded.is_empty() && r.memory_refused.is_empty());
        // It trained at batch 8: its own check (the same prediction) accepted the task.
        assert!(r.failures.is_empty(), "{:?}", r.failures);
        assert_eq!(r.participants, 3);
    }
}
