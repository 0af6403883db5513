//! Resume: stop the coordinator after round 2 of 4, resume from its checkpoint, finish; the
//! final model equals an uninterrupted run's (same seed, single-threaded clients). A truncated or
//! corrupt checkpoint is refused with a clear error before anything runs.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use fedtiny_coordinator::checkpoint;
use fedtiny_coordinator::engine::{CHECKPOINT_FILE, FINAL_MODEL_FILE};
use fedtiny_coordinator::server::Start;
use support::*;

const IDS: [&str; 3] = ["client-0000", "client-0001", "client-0002"];

async fn run_clients(pki: &Pki, addr: std::net::SocketAddr) -> Vec<tokio::task::JoinHandle<()>> {
    IDS.iter()
        .enumerate()
        .map(|(i, id)| {
            let h = spawn_client(addr, client_files(pki, id), local_data(i, 3));
            tokio::spawn(async move {
                // Clients end when the coordinator says the run is over (or stops).
                let _ = h.await;
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_after_round_two_resume_and_match_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(&tmp.path().join("pki"), &IDS);

    // Uninterrupted reference.
    let mut cfg = serve_config(&pki, &tmp.path().join("a"), 4, 3);
    cfg.federation.run.quorum = 3;
    let server = start_server(cfg.clone(), Start::Fresh).await;
    let clients = run_clients(&pki, server.addr).await;
    let full = server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(full.rounds, 4);
    let reference = checkpoint::load_model(&server.run_dir.join(FINAL_MODEL_FILE)).unwrap();

    // Interrupted after round 2 (the stop signal arrives once two rounds are recorded).
    cfg.federation.output.dir = tmp.path().join("b");
    let server = start_server(cfg.clone(), Start::Fresh).await;
    let clients = run_clients(&pki, server.addr).await;
    let metrics = server.run_dir.join("metrics.jsonl");
    loop {
        let done = std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
        if done >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop.send(true).unwrap();
    let partial = server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert!(partial.interrupted);
    let ckpt = checkpoint::load(&server.run_dir.join(CHECKPOINT_FILE)).unwrap();
    assert!(
        (2..4).contains(&ckpt.rounds_done),
        "stopped after {} rounds",
        ckpt.rounds_done
    );

    // Resume in the same folder and finish.
    let run_dir = server.run_dir.clone();
    let server = start_server(cfg.clone(), Start::Resume(run_dir.clone())).await;
    let clients = run_clients(&pki, server.addr).await;
    let resumed = server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(resumed.rounds, 4);
    assert!(!resumed.interrupted);
    assert_eq!(read_metrics(&run_dir).len(), 4, "each round recorded once");
    let model = checkpoint::load_model(&run_dir.join(FINAL_MODEL_FILE)).unwrap();
    assert_eq!(model.masks, reference.masks);
    assert_eq!(
        model.state, reference.state,
        "the resumed run must end with the uninterrupted run's model, bit for bit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_checkpoints_are_refused_before_anything_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(&tmp.path().join("pki"), &IDS);
    let cfg = serve_config(&pki, &tmp.path().join("runs"), 2, 3);
    // A real checkpoint to damage: one round, then stop.
    let mut one = cfg.clone();
    one.federation.run.rounds = 1;
    let server = start_server(one, Start::Fresh).await;
    let clients = run_clients(&pki, server.addr).await;
    server.handle.await.unwrap().unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let path = server.run_dir.join(CHECKPOINT_FILE);
    let good = std::fs::read(&path).unwrap();
    let data = fedtiny_coordinator::server::load_server_data(&cfg.federation).unwrap();
    for (what, bytes) in [
        ("truncated", good[..good.len() / 3].to_vec()),
        ("corrupt", {
            let mut b = good.clone();
            let i = b.len() - 100;
            b[i] ^= 0xff;
            b
        }),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let err = fedtiny_coordinator::server::serve(
            cfg.clone(),
            Start::Resume(server.run_dir.clone()),
            data.clone(),
            rx,
            |_, _| panic!("a damaged checkpoint must not start a server"),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("checkpoint"), "{what}: {err}");
        assert!(
            err.contains("truncated") || err.contains("CRC"),
            "{what}: {err}"
        );
    }
    // A checkpoint from a run with another config is refused too.
    std::fs::write(&path, &good).unwrap();
    let mut other = cfg.clone();
    other.federation.run.seed = 8;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = fedtiny_coordinator::server::serve(
        other,
        Start::Resume(server.run_dir.clone()),
        data,
        rx,
        |_, _| panic!("a foreign checkpoint must not start a server"),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("different config"), "{err}");
}
