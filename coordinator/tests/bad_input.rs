//! Malformed and oversized results over real mutual-TLS gRPC: two honest clients train, three raw
//! clients answer with results crafted at the protobuf level (wrong value count, wrong shape,
//! permuted shape, index out of range, NaN, Inf, an evaluation result for a training task, an
//! oversized upload). Each offender gets `InvalidArgument`, its failure is recorded for that
//! round in `metrics.jsonl`, the rounds complete with the honest quorum without waiting for the
//! deadline, the last round runs normally with everyone, and the global model stays sound.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;

use fedtiny_client::session::Outcome;
use fedtiny_coordinator::checkpoint;
use fedtiny_coordinator::server::Start;
use fedtiny_proto::chunk::crc32;
use fedtiny_proto::pb::{self, result_payload};
use fedtiny_proto::tls::ClientTlsFiles;
use support::*;
use tonic::Code;

const MAX_MESSAGE: usize = 256 << 10;
const CHUNK: usize = 64 << 10;
const MAX_PAYLOAD: usize = 4 << 20;
const DEADLINE_SECS: f64 = 30.0;

/// What a raw client does to its result.
#[derive(Clone, Copy, Debug)]
enum Sabotage {
    /// A masked tensor loses its last value.
    TruncatedValues,
    /// A dense tensor's shape claims one element more than its values.
    ShapeCount,
    /// A masked weight's dimensions reversed: same element count, wrong layout.
    ShapePermuted,
    /// A dense tensor sent as index + values with an index past its end.
    IndexOutOfRange,
    /// A NaN among a masked tensor's values.
    NaN,
    /// An infinity among a masked tensor's values.
    Inf,
    /// An evaluation result answering a training task.
    WrongKind,
    /// Too big: a chunk over `chunk_bytes`, a message over `max_message_bytes`, a result over
    /// `max_payload_bytes`.
    Oversize,
    /// A valid result (the model it received, weight 1).
    Honest,
}

fn first(r: &mut pb::TrainResult, encoding: pb::Encoding) -> &mut pb::Tensor {
    r.state
        .iter_mut()
        .find(|t| t.encoding == encoding as i32)
        .unwrap()
}

/// Applies `s` to an honest result message; returns what the refusal must mention.
fn tamper(p: &mut pb::ResultPayload, s: Sabotage) -> &'static str {
    let Some(result_payload::Result::Train(r)) = &mut p.result else {
        panic!("expected a training result")
    };
    match s {
        Sabotage::TruncatedValues => {
            let t = first(r, pb::Encoding::MaskOrder);
            let n = t.values.len();
            t.values.truncate(n - 4);
            "implies"
        }
        Sabotage::ShapeCount => {
            let t = first(r, pb::Encoding::Dense);
            *t.shape.last_mut().unwrap() += 1;
            "implies"
        }
        Sabotage::ShapePermuted => {
            let t = r
                .state
                .iter_mut()
                .find(|t| {
                    t.encoding == pb::Encoding::MaskOrder as i32
                        && t.shape.iter().rev().ne(t.shape.iter())
                })
                .unwrap();
            t.shape.reverse();
            "has shape"
        }
        Sabotage::IndexOutOfRange => {
            let t = first(r, pb::Encoding::Dense);
            let n: u64 = t.shape.iter().product();
            t.encoding = pb::Encoding::IndexValues as i32;
            t.indices = [0u32, n as u32]
                .iter()
                .flat_map(|i| i.to_le_bytes())
                .collect();
            t.values = [0.5f32, 0.5].iter().flat_map(|v| v.to_le_bytes()).collect();
            "out of range"
        }
        Sabotage::NaN => {
            let t = first(r, pb::Encoding::MaskOrder);
            t.values[..4].copy_from_slice(&f32::NAN.to_le_bytes());
            "non-finite"
        }
        Sabotage::Inf => {
            let t = first(r, pb::Encoding::MaskOrder);
            t.values[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            "non-finite"
        }
        Sabotage::WrongKind => {
            p.result = Some(result_payload::Result::Evaluate(pb::EvaluateResult {
                round: r.round,
                loss_sum: 1.0,
                correct: 1,
                count: 2,
            }));
            "expected a training result"
        }
        Sabotage::Oversize | Sabotage::Honest => unreachable!(),
    }
}

/// A raw client playing `plan[round - 1]` in each round.
async fn saboteur(addr: SocketAddr, tls: ClientTlsFiles, plan: Vec<Sabotage>) {
    let mut s = RawSession::join(addr, &tls).await;
    for &sabotage in &plan {
        let (h, task) = s.take_task().await.unwrap();
        let mut p = s.result_pb(&task, 1);
        // The hand encoder is prost's, byte for byte.
        let honest = pb_encode::result_payload(&p);
        assert_eq!(
            honest,
            fedtiny_proto::convert::encode_result(&fabricate(&task, 1), s.masks.as_ref().unwrap())
                .unwrap()
        );
        match sabotage {
            Sabotage::Honest => {
                assert!(s.deliver(&h.task_id, &honest).await.unwrap().accepted);
            }
            Sabotage::Oversize => oversize(&mut s, &h.task_id).await,
            _ => {
                let needle = tamper(&mut p, sabotage);
                let bytes = pb_encode::result_payload(&p);
                let st = s.deliver(&h.task_id, &bytes).await.unwrap_err();
                assert_eq!(st.code(), Code::InvalidArgument, "{sabotage:?}: {st:?}");
                assert!(st.message().contains(needle), "{sabotage:?}: {st:?}");
                // The task is gone: a second try is refused.
                let again = s.deliver(&h.task_id, &honest).await.unwrap_err();
                assert_eq!(again.code(), Code::NotFound, "{again:?}");
            }
        }
    }
    assert!(s.next_task().await.is_none());
}

async fn oversize(s: &mut RawSession, task_id: &str) {
    // A chunk bigger than `chunk_bytes` (but within a message): refused by the coordinator's own
    // check; the task stays open (the client may retry with proper chunks).
    let data = vec![7u8; CHUNK + 1];
    let st = s
        .upload_raw(task_id, 0, data.clone(), data.len() as u64, crc32(&data))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("exceeds the limit"), "{st:?}");

    // A message bigger than `max_message_bytes`: tonic refuses it before any handler runs.
    let data = vec![7u8; MAX_MESSAGE + 1];
    let st = s
        .upload_raw(task_id, 0, data.clone(), data.len() as u64, crc32(&data))
        .await
        .unwrap_err();
    println!("over the message limit: {:?}: {}", st.code(), st.message());
    assert_eq!(st.code(), Code::OutOfRange, "{st:?}");
    assert!(
        st.message().contains("decoded message length too large"),
        "{st:?}"
    );

    // A result announced bigger than `max_payload_bytes`: refused at its first chunk, and the
    // task fails at once (the round does not wait for its deadline).
    let data = vec![7u8; 1024];
    let st = s
        .upload_raw(task_id, 0, data, MAX_PAYLOAD as u64 + 1, 0)
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert!(st.message().contains("exceeds the limit"), "{st:?}");
    let st = s.submit(task_id, 1024, 0).await.unwrap_err();
    assert_eq!(st.code(), Code::NotFound, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_results_are_refused_and_the_rounds_go_on() {
    let _serial = SERIAL.lock().await;
    bounded(240, async {
        use Sabotage::*;
        let tmp = tempfile::tempdir().unwrap();
        let honest = ["client-0000", "client-0001"];
        let bad = ["bad-0", "bad-1", "bad-2"];
        let all: Vec<&str> = honest.iter().chain(&bad).copied().collect();
        let pki = make_pki(&tmp.path().join("pki"), &all);
        let mut cfg = serve_config(&pki, &tmp.path().join("runs"), 4, 5);
        cfg.federation.run.quorum = 2;
        cfg.federation.run.round_deadline_secs = DEADLINE_SECS;
        cfg.server.max_message_bytes = MAX_MESSAGE;
        cfg.server.chunk_bytes = CHUNK;
        cfg.server.max_payload_bytes = MAX_PAYLOAD;
        let server = start_server(cfg, Start::Fresh).await;
        let clients = spawn_clients(server.addr, &pki, &honest, 2);
        let plans = [
            vec![TruncatedValues, IndexOutOfRange, Oversize, Honest],
            vec![ShapeCount, NaN, WrongKind, Honest],
            vec![ShapePermuted, Inf, Honest, Honest],
        ];
        let saboteurs: Vec<_> = bad
            .iter()
            .zip(plans)
            .map(|(id, plan)| tokio::spawn(saboteur(server.addr, client_files(&pki, id), plan)))
            .collect();
        let summary = server.handle.await.unwrap().unwrap();
        for s in saboteurs {
            s.await.unwrap();
        }
        for c in clients {
            assert_eq!(c.await.unwrap().unwrap(), Outcome::RunOver { tasks: 4 });
        }

        let m = read_metrics(&server.run_dir);
        assert_eq!(m.len(), 4);
        let failed = |i: usize, who: &str, needle: &str| {
            let f = m[i].failures.iter().find(|(c, _)| c == who);
            let (_, why) = f.unwrap_or_else(|| panic!("round {}: no failure of {who}", i + 1));
            assert!(
                why.starts_with("invalid result") && why.contains(needle),
                "round {}: {who}: {why}",
                i + 1
            );
        };
        // Rounds 1 and 2: the three saboteurs fail, the two honest clients make the quorum.
        failed(0, "bad-0", "implies");
        failed(0, "bad-1", "implies");
        failed(0, "bad-2", "has shape");
        failed(1, "bad-0", "out of range");
        failed(1, "bad-1", "non-finite");
        failed(1, "bad-2", "non-finite");
        // Round 3: the oversized upload and the wrong kind fail; bad-2 takes part.
        failed(2, "bad-0", "exceeds the limit");
        failed(2, "bad-1", "expected a training result");
        for (i, (failures, participants)) in [(3, 2), (3, 2), (2, 3), (0, 5)].iter().enumerate() {
            let r = &m[i];
            assert_eq!(
                r.failures.len(),
                *failures,
                "round {}: {:?}",
                i + 1,
                r.failures
            );
            assert_eq!(r.participants, *participants, "round {}", i + 1);
            assert!(r.aggregated);
            // Refusals are immediate: no round waited for its deadline.
            assert!(
                r.seconds < DEADLINE_SECS / 2.0,
                "round {} took {} s",
                i + 1,
                r.seconds
            );
            assert!(r.test_loss.unwrap().is_finite());
            assert!(r.train_loss.unwrap().is_finite());
        }

        // The global model is sound: finite everywhere, and it learned.
        let model = checkpoint::load_model(&server.run_dir.join("final_model.bin")).unwrap();
        assert!(
            model
                .state
                .entries
                .values()
                .all(|e| e.values.iter().all(|v| v.is_finite()))
        );
        let first = m[0].test_accuracy.unwrap();
        let last = summary.final_test_accuracy.unwrap();
        println!("accuracy after round 1: {first:.3}, after round 4: {last:.3}");
        assert!(last > 0.4 && last >= first, "accuracy {first} -> {last}");
    })
    .await;
}
