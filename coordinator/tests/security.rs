//! Security of the federated runtime over real mutual TLS on loopback:
//!
//! - the coordinator refuses clients with no certificate, a certificate from another CA, or an
//!   expired certificate, and the client sees a TLS refusal (not a generic transport error);
//! - a client refuses a coordinator whose certificate its CA did not sign;
//! - one client cannot act on another's session or task, and the victim's task is unaffected;
//! - a result for the wrong round or the wrong mask version is refused with `InvalidArgument`
//!   and recorded as a failure of the round.
#![allow(clippy::unwrap_used)]

mod support;

use fedtiny_client::session::{self, Outcome};
use fedtiny_client::{ClientApp, ClientError};
use fedtiny_common::task::TaskResult;
use fedtiny_coordinator::server::Start;
use fedtiny_proto::pb;
use fedtiny_proto::pb::federation_client::FederationClient;
use fedtiny_proto::pki::{self, Validity};
use fedtiny_proto::tls::{self, RefusalKind};
use support::*;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Attempts before a test gives up waiting for a refusal's TLS alert. Over loopback about one
/// refusal in three loses its alert (the server's close resets the connection before the client
/// reads it): the client then sees `Cancelled: connection closed` or `Unknown: ... broken pipe`.
const TRIES: u32 = 10;

/// Runs a session with `tls` and returns how it ended. It may retry a refusal whose alert was
/// lost, as it would a transport failure.
async fn session_outcome(
    addr: std::net::SocketAddr,
    tls: fedtiny_proto::tls::ClientTlsFiles,
) -> Result<Outcome, ClientError> {
    let mut cfg = session_config(addr, tls);
    cfg.max_reconnects = TRIES;
    session::run(cfg, ClientApp::new(local_data(0, 1))).await
}

/// Calls Join over fresh connections configured by `tls` until the server's alert reaches the
/// client, and returns the error chain that carries it. Every attempt must be refused by the
/// TLS layer: the channel connects (TLS 1.3: the client's side of the handshake completes
/// first), the call fails, and the failure is a TLS refusal or, when the alert was lost, a
/// connection failure; never an application status (which would mean a handler ran).
async fn refused_with_alert(url: &str, tls: impl Fn() -> ClientTlsConfig) -> String {
    for _ in 0..TRIES {
        let channel = Endpoint::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = FederationClient::new(channel)
            .join(pb::JoinRequest::default())
            .await
            .unwrap_err();
        match tls::call_refusal_kind(&status) {
            RefusalKind::ClientCertificateRejected => return tls::error_chain(&status),
            RefusalKind::ConnectionFailed => {}
            other => panic!("not refused by TLS: {other:?}: {status:?}"),
        }
    }
    panic!("no TLS alert reached the client in {TRIES} attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_certificates_on_either_side() {
    bounded(120, async {
        let tmp = tempfile::tempdir().unwrap();
        let pki = make_pki(&tmp.path().join("pki"), &["client-good"]);
        let cfg = serve_config(&pki, &tmp.path().join("runs"), 1, 1);
        let server = start_server(cfg, Start::Fresh).await;
        let url = format!("https://localhost:{}", server.addr.port());
        let rogue_dir = tmp.path().join("rogue");
        let other_ca = pki::generate_ca("another CA", Validity::days(2)).unwrap();
        std::fs::create_dir_all(&rogue_dir).unwrap();
        let other_ca_pem = rogue_dir.join("other-ca.pem");
        std::fs::write(&other_ca_pem, other_ca.cert_pem()).unwrap();

        // 1. No client certificate: the first call fails with the server's
        //    `CertificateRequired` alert.
        let ca_pem = std::fs::read(&pki.bundle.ca_cert).unwrap();
        let chain = refused_with_alert(&url, || {
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .domain_name("localhost")
        })
        .await;
        assert!(chain.contains("CertificateRequired"), "{chain}");

        // 2. A certificate signed by another CA: `UnknownCA`; the session reports a TLS refusal.
        let rogue = write_identity(
            &rogue_dir,
            "client-rogue",
            &other_ca
                .client_cert("client-rogue", Validity::days(2))
                .unwrap(),
            &pki.bundle.ca_cert,
        );
        let rogue_tls = tls::client_tls_config(&rogue).unwrap();
        let chain = refused_with_alert(&url, || rogue_tls.clone()).await;
        assert!(chain.contains("UnknownCA"), "{chain}");
        match session_outcome(server.addr, rogue).await {
            Err(ClientError::Tls(m)) => {
                assert!(m.contains("refused this client's certificate"), "{m}");
                assert!(m.contains("UnknownCA"), "{m}");
            }
            other => panic!("a client of another CA got {other:?}"),
        }

        // 3. An expired certificate from the right CA: `CertificateExpired`.
        let expired = write_identity(
            &rogue_dir,
            "client-expired",
            &pki.ca
                .client_cert("client-expired", Validity::expired())
                .unwrap(),
            &pki.bundle.ca_cert,
        );
        let expired_tls = tls::client_tls_config(&expired).unwrap();
        let chain = refused_with_alert(&url, || expired_tls.clone()).await;
        assert!(chain.contains("CertificateExpired"), "{chain}");
        match session_outcome(server.addr, expired).await {
            Err(ClientError::Tls(m)) => assert!(m.contains("CertificateExpired"), "{m}"),
            other => panic!("an expired client got {other:?}"),
        }

        // 4. A valid client that trusts another CA refuses the coordinator, in `connect`.
        let mut distrustful = client_files(&pki, "client-good");
        distrustful.ca = other_ca_pem;
        let err = Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(tls::client_tls_config(&distrustful).unwrap())
            .unwrap()
            .connect()
            .await
            .unwrap_err();
        assert_eq!(
            tls::connect_refusal_kind(&err),
            RefusalKind::ServerCertificateRejected
        );
        assert!(tls::error_chain(&err).contains("UnknownIssuer"));
        match session_outcome(server.addr, distrustful).await {
            Err(ClientError::Tls(m)) => {
                assert!(m.contains("coordinator's certificate was refused"), "{m}");
                assert!(m.contains("UnknownIssuer"), "{m}");
            }
            other => panic!("a client distrusting the coordinator got {other:?}"),
        }

        // The coordinator is still serving: the good client runs the round, alone.
        let good = session_outcome(server.addr, client_files(&pki, "client-good")).await;
        assert_eq!(good.unwrap(), Outcome::RunOver { tasks: 1 });
        server.handle.await.unwrap().unwrap();
        let m = read_metrics(&server.run_dir);
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].sampled, m[0].participants), (1, 1));
        assert!(m[0].failures.is_empty(), "{:?}", m[0].failures);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_act_for_another() {
    bounded(120, async {
        let tmp = tempfile::tempdir().unwrap();
        let pki = make_pki(&tmp.path().join("pki"), &["client-a", "client-b"]);
        let cfg = serve_config(&pki, &tmp.path().join("runs"), 1, 2);
        let server = start_server(cfg, Start::Fresh).await;
        let mut a = RawSession::join(server.addr, &client_files(&pki, "client-a")).await;
        let mut b = RawSession::join(server.addr, &client_files(&pki, "client-b")).await;
        let (ha, task_a) = a.take_task().await.unwrap();
        let (hb, task_b) = b.take_task().await.unwrap();
        assert_ne!(ha.task_id, hb.task_id);

        // B, authenticated as itself, names A's session: the session is unknown *for B*.
        let a_session = a.session_id.clone();
        let expect = |r: Result<(), tonic::Status>, code: Code, what: &str| {
            let s = r.expect_err(what);
            assert_eq!(s.code(), code, "{what}: {s:?}");
        };
        let mut c = b.client.clone();
        let r = c
            .poll_task(pb::PollRequest {
                session_id: a_session.clone(),
                wait_ms: 10,
            })
            .await;
        expect(r.map(drop), Code::FailedPrecondition, "poll as A");
        let r = c
            .fetch_chunk(pb::FetchChunkRequest {
                session_id: a_session.clone(),
                task_id: ha.task_id.clone(),
                offset: 0,
                max_bytes: 1024,
            })
            .await;
        expect(
            r.map(drop),
            Code::FailedPrecondition,
            "fetch with A's session",
        );
        let r = c
            .upload_chunk(pb::UploadChunkRequest {
                session_id: a_session.clone(),
                task_id: ha.task_id.clone(),
                offset: 0,
                data: vec![1, 2, 3],
                payload_bytes: 3,
                payload_crc32: 0,
            })
            .await;
        expect(
            r.map(drop),
            Code::FailedPrecondition,
            "upload with A's session",
        );
        let r = c
            .submit_result(pb::SubmitRequest {
                session_id: a_session.clone(),
                task_id: ha.task_id.clone(),
                payload_bytes: 0,
                payload_crc32: 0,
                error: Some(pb::TaskFailure {
                    message: "forged".into(),
                }),
            })
            .await;
        expect(
            r.map(drop),
            Code::FailedPrecondition,
            "submit with A's session",
        );
        let r = c
            .heartbeat(pb::HeartbeatRequest {
                session_id: a_session.clone(),
                busy_task_id: ha.task_id.clone(),
            })
            .await;
        expect(r.map(drop), Code::FailedPrecondition, "heartbeat as A");
        let r = c
            .leave(pb::LeaveRequest {
                session_id: a_session.clone(),
                reason: "forged".into(),
            })
            .await;
        expect(r.map(drop), Code::FailedPrecondition, "leave as A");

        // B with its own session names A's task: no such task *for B*.
        let r = c
            .fetch_chunk(pb::FetchChunkRequest {
                session_id: b.session_id.clone(),
                task_id: ha.task_id.clone(),
                offset: 0,
                max_bytes: 1024,
            })
            .await;
        expect(r.map(drop), Code::NotFound, "fetch A's task");
        let forged = pb_encode::result_payload(&b.result_pb(&task_a, 1_000_000));
        let r = b
            .upload_raw(
                &ha.task_id,
                0,
                forged.clone(),
                forged.len() as u64,
                fedtiny_proto::chunk::crc32(&forged),
            )
            .await;
        expect(r.map(drop), Code::NotFound, "upload to A's task");
        let r = b
            .submit(
                &ha.task_id,
                forged.len() as u64,
                fedtiny_proto::chunk::crc32(&forged),
            )
            .await;
        expect(r.map(drop), Code::NotFound, "submit A's task");

        // A's session and task are intact: A fetches its payload again and delivers.
        a.heartbeat().await.unwrap();
        let again = a.fetch(&ha).await;
        assert_eq!(again.len() as u64, ha.payload_bytes);
        let ra = pb_encode::result_payload(&a.result_pb(&task_a, 10));
        assert!(a.deliver(&ha.task_id, &ra).await.unwrap().accepted);
        let rb = pb_encode::result_payload(&b.result_pb(&task_b, 10));
        assert!(b.deliver(&hb.task_id, &rb).await.unwrap().accepted);
        assert!(a.next_task().await.is_none());
        server.handle.await.unwrap().unwrap();
        let m = read_metrics(&server.run_dir);
        assert_eq!((m[0].sampled, m[0].participants), (2, 2));
        assert!(m[0].failures.is_empty(), "{:?}", m[0].failures);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_for_the_wrong_round_or_mask_version_are_refused() {
    bounded(120, async {
        let tmp = tempfile::tempdir().unwrap();
        let pki = make_pki(&tmp.path().join("pki"), &["client-a", "client-b"]);
        let cfg = serve_config(&pki, &tmp.path().join("runs"), 3, 2);
        let server = start_server(cfg, Start::Fresh).await;
        let mut a = RawSession::join(server.addr, &client_files(&pki, "client-a")).await;
        let mut b = RawSession::join(server.addr, &client_files(&pki, "client-b")).await;

        // Tampers with a fabricated result and encodes it as the real client would (the masks
        // of the tampered version travel in the encoder, so the state stays in mask order).
        fn encode(
            s: &RawSession,
            task: &fedtiny_common::task::Task,
            round: Option<u64>,
            version: Option<u64>,
        ) -> Vec<u8> {
            let mut r = fabricate(task, 10);
            let mut masks = s.masks.clone().unwrap_or_default();
            if let TaskResult::Train(t) = &mut r {
                if let Some(round) = round {
                    t.round = round;
                }
                if let Some(v) = version {
                    t.mask_version = v;
                    masks.version = v;
                }
            }
            fedtiny_proto::convert::encode_result(&r, &masks).unwrap()
        }
        fn refused(r: Result<pb::SubmitReply, tonic::Status>, needle: &str) {
            let s = r.expect_err("a tampered result was accepted");
            assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
            assert!(s.message().contains(needle), "{s:?}");
        }

        // Round 1: A answers for round 2; B answers correctly.
        let (ha, ta) = a.take_task().await.unwrap();
        let (hb, tb) = b.take_task().await.unwrap();
        assert_eq!((ha.round, hb.round), (1, 1));
        refused(
            a.deliver(&ha.task_id, &encode(&a, &ta, Some(2), None))
                .await,
            "round 2",
        );
        assert!(
            b.deliver(&hb.task_id, &encode(&b, &tb, None, None))
                .await
                .unwrap()
                .accepted
        );

        // Round 2: A answers for a mask version it was not given; B replays round 1.
        let (ha, ta) = a.take_task().await.unwrap();
        let (hb, tb) = b.take_task().await.unwrap();
        assert_eq!((ha.round, hb.round), (2, 2));
        let version = a.masks.as_ref().unwrap().version;
        refused(
            a.deliver(&ha.task_id, &encode(&a, &ta, None, Some(version + 1)))
                .await,
            "mask version",
        );
        refused(
            b.deliver(&hb.task_id, &encode(&b, &tb, Some(1), None))
                .await,
            "round 1",
        );

        // Round 3: both answer correctly, and are accepted.
        let (ha, ta) = a.take_task().await.unwrap();
        let (hb, tb) = b.take_task().await.unwrap();
        assert!(
            a.deliver(&ha.task_id, &encode(&a, &ta, None, None))
                .await
                .unwrap()
                .accepted
        );
        assert!(
            b.deliver(&hb.task_id, &encode(&b, &tb, None, None))
                .await
                .unwrap()
                .accepted
        );
        assert!(a.next_task().await.is_none());

        server.handle.await.unwrap().unwrap();
        let m = read_metrics(&server.run_dir);
        assert_eq!(m.len(), 3);
        let failed = |i: usize| -> Vec<(String, String)> { m[i].failures.clone() };
        // Round 1: A refused, B aggregated (quorum 1).
        assert!(m[0].aggregated && m[0].participants == 1);
        assert_eq!(failed(0).len(), 1);
        assert_eq!(failed(0)[0].0, "client-a");
        assert!(
            failed(0)[0].1.starts_with("invalid result"),
            "{:?}",
            failed(0)
        );
        // Round 2: both refused: no quorum, the model is unchanged.
        assert!(!m[1].aggregated && m[1].participants == 0);
        let f1 = failed(1);
        assert_eq!(f1.len(), 2, "{f1:?}");
        assert!(
            f1.iter()
                .any(|(c, r)| c == "client-a" && r.contains("mask version"))
        );
        assert!(
            f1.iter()
                .any(|(c, r)| c == "client-b" && r.contains("round 1"))
        );
        // Round 3: back to normal.
        assert!(m[2].aggregated && m[2].participants == 2 && m[2].failures.is_empty());
    })
    .await;
}
