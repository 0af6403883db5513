//! Client faults over real mutual-TLS gRPC: a client killed while it trains, a client that takes
//! a task and never answers, a client that restarts mid-round. Rounds close at their deadline
//! (or as soon as the failure is known) with the remaining quorum, the failure is recorded, idle
//! clients waiting through a long round are not mistaken for dead ones, and a client that comes
//! back with the same certificate rejoins and takes part in a later round.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use fedtiny_client::session::Outcome;
use fedtiny_coordinator::server::Start;
use support::*;

const DEADLINE_SECS: f64 = 4.0;

/// The first test's round deadline and local epochs: the victim must still be training 0.4 s
/// into round 2 (one epoch over a client's share of the sample trains in about 0.3 s on the
/// project machine), and the survivors must finish well before the deadline.
const KILL_DEADLINE_SECS: f64 = 10.0;
const KILL_EPOCHS: usize = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_while_training_times_out_and_rejoins() {
    let _serial = SERIAL.lock().await;
    bounded(180, async {
        let tmp = tempfile::tempdir().unwrap();
        let ids = ["client-0000", "client-0001", "client-0002"];
        let pki = make_pki(&tmp.path().join("pki"), &ids);
        let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 4, 3);
        cfg.federation.run.round_deadline_secs = KILL_DEADLINE_SECS;
        cfg.federation.training.epochs = KILL_EPOCHS;
        // As with the defaults (20 s polls, 2 s × 5 heartbeats), a long-poll outlasts the
        // heartbeat allowance (1 s here): idle clients must still count as alive.
        cfg.server.poll_timeout_ms = 3_000;
        let server = start_server(cfg, Start::Fresh).await;
        let mut clients = spawn_clients(server.addr, &pki, &ids, 3);
        let victim = clients.pop().unwrap();

        // Round 1 runs with everyone; round 2 starts at once; kill the victim while it trains.
        wait_for_rounds(&server.run_dir, 1).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        victim.abort();
        assert!(victim.await.unwrap_err().is_cancelled());

        // Once round 2 is over, the client comes back: same certificate, a fresh process (no
        // masks held).
        wait_for_rounds(&server.run_dir, 2).await;
        let back = spawn_client(server.addr, client_files(&pki, ids[2]), local_data(2, 3));

        let summary = server.handle.await.unwrap().unwrap();
        for c in clients {
            // The idle survivors were never dropped while waiting out round 2's deadline.
            assert_eq!(c.await.unwrap().unwrap(), Outcome::RunOver { tasks: 4 });
        }
        // (A session counts the tasks it answered, failures included: the metrics below show
        // that it took part.)
        match back.await.unwrap() {
            Ok(Outcome::RunOver { tasks }) => assert!(tasks >= 1, "no task reached the client"),
            other => panic!("the returning client ended with {other:?}"),
        }

        let m = read_metrics(&server.run_dir);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].participants, 3);
        assert!(m[0].failures.is_empty(), "{:?}", m[0].failures);
        // Round 2: closed at its deadline with the quorum, the victim timed out.
        assert_eq!(m[1].participants, 2);
        assert!(m[1].aggregated);
        assert_eq!(
            m[1].failures,
            vec![(ids[2].to_string(), "deadline passed".to_string())]
        );
        assert!(
            m[1].seconds >= KILL_DEADLINE_SECS && m[1].seconds < KILL_DEADLINE_SECS + 10.0,
            "round 2 took {} s",
            m[1].seconds
        );
        // Round 3: the dead session was dropped (silent), so nobody waits for it again; the
        // returning client may or may not have joined in time to be sampled.
        assert!(m[2].failures.is_empty(), "{:?}", m[2].failures);
        assert!(m[2].participants >= 2);
        // Round 4: everyone, the returning client included.
        assert_eq!((m[3].sampled, m[3].participants), (3, 3));
        assert!(m[3].failures.is_empty(), "{:?}", m[3].failures);
        assert!(summary.final_test_accuracy.unwrap() > 0.4);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_times_out_and_a_restart_mid_round_is_a_disconnect() {
    let _serial = SERIAL.lock().await;
    bounded(120, async {
        let tmp = tempfile::tempdir().unwrap();
        let ids = ["client-a", "client-b", "client-x"];
        let pki = make_pki(&tmp.path().join("pki"), &ids);
        let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 3, 3);
        cfg.federation.run.round_deadline_secs = DEADLINE_SECS;
        let server = start_server(cfg, Start::Fresh).await;
        let a = spawn_raw_honest(server.addr, client_files(&pki, ids[0]), 10);
        let b = spawn_raw_honest(server.addr, client_files(&pki, ids[1]), 10);

        // X takes its round-1 task and hangs: it keeps its connection and heartbeats (alive),
        // but never answers.
        let x_files = client_files(&pki, ids[2]);
        let mut x = RawSession::join(server.addr, &x_files).await;
        let beating = {
            let mut hb = x.client.clone();
            let session = x.session_id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = hb
                        .heartbeat(fedtiny_proto::pb::HeartbeatRequest {
                            session_id: session.clone(),
                            busy_task_id: String::new(),
                        })
                        .await;
                }
            })
        };
        let (h1, _) = x.take_task().await.unwrap();
        assert_eq!(h1.round, 1);

        // Round 2: X, still alive, is sampled again (until then its poll still shows the
        // round-1 task); it restarts instead of answering: a new session with the same
        // certificate.
        wait_for_rounds(&server.run_dir, 1).await;
        loop {
            let h = x.next_task().await.unwrap();
            if h.round == 2 {
                break;
            }
            assert_eq!(h.task_id, h1.task_id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        beating.abort();
        let mut x2 = RawSession::join(server.addr, &x_files).await;

        // Round 3: the new session takes part.
        let (h3, t3) = x2.take_task().await.unwrap();
        assert_eq!(h3.round, 3);
        let bytes = pb_encode::result_payload(&x2.result_pb(&t3, 10));
        assert!(x2.deliver(&h3.task_id, &bytes).await.unwrap().accepted);
        assert!(x2.next_task().await.is_none());

        server.handle.await.unwrap().unwrap();
        assert_eq!(a.await.unwrap(), 3);
        assert_eq!(b.await.unwrap(), 3);
        let m = read_metrics(&server.run_dir);
        assert_eq!(m.len(), 3);
        // Round 1 waited for its deadline, then closed with A and B.
        assert_eq!(
            m[0].failures,
            vec![("client-x".to_string(), "deadline passed".to_string())]
        );
        assert_eq!(m[0].participants, 2);
        assert!(
            m[0].seconds >= DEADLINE_SECS,
            "round 1 took {} s",
            m[0].seconds
        );
        // Round 2 closed as soon as X restarted, without waiting for the deadline.
        assert_eq!(m[1].failures.len(), 1, "{:?}", m[1].failures);
        let (who, why) = &m[1].failures[0];
        assert_eq!(who, "client-x");
        assert!(why.starts_with("disconnected"), "{why}");
        assert_eq!(m[1].participants, 2);
        assert!(
            m[1].seconds < DEADLINE_SECS,
            "round 2 took {} s",
            m[1].seconds
        );
        // Round 3: everyone.
        assert_eq!(m[2].participants, 3);
        assert!(m[2].failures.is_empty(), "{:?}", m[2].failures);
    })
    .await;
}
