//! Mutual TLS over loopback: a real tonic server and client, certificates generated at test time,
//! OS-assigned ports. The server runs a one-method test service, `fedtiny.test.WhoAmI/Get`, that
//! answers with the client id it read from the client's certificate, so a successful call proves
//! both the handshake and the identity extraction.
//!
//! Every test is bounded by a timeout, and every server stops by itself (when its test drops the
//! shutdown handle, or after `SERVER_LIFETIME` at the latest).

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use fedtiny_proto::pki::{self, CertificateAuthority, Pem, Validity};
use fedtiny_proto::tls::{self, RefusalKind};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

const TEST_TIMEOUT: Duration = Duration::from_secs(20);
const SERVER_LIFETIME: Duration = Duration::from_secs(30);
const METHOD: &str = "/fedtiny.test.WhoAmI/Get";

/// The test service: `Get(google.protobuf.Empty) -> google.protobuf.StringValue` returning the
/// caller's id as read from its certificate (or `Unauthenticated`).
#[derive(Clone)]
struct WhoAmI;

impl tonic::server::NamedService for WhoAmI {
    const NAME: &'static str = "fedtiny.test.WhoAmI";
}

struct GetMethod;

impl tonic::server::UnaryService<()> for GetMethod {
    type Response = String;
    type Future = BoxFuture<Response<String>, Status>;

    fn call(&mut self, request: Request<()>) -> Self::Future {
        let id = tls::authenticate(&request);
        Box::pin(async move { id.map(Response::new) })
    }
}

impl<B> Service<http::Request<B>> for WhoAmI
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == METHOD {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::<String, ()>::default());
                Ok(grpc.unary(GetMethod, request).await)
            })
        } else {
            Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) })
        }
    }
}

/// A running test server; dropping it shuts the server down.
struct TestServer {
    addr: SocketAddr,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start_server(config: ServerTlsConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config(config)
        .unwrap()
        .add_service(WhoAmI);
    tokio::spawn(async move {
        let signal = async move {
            let _ = tokio::time::timeout(SERVER_LIFETIME, stop).await;
        };
        router
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                signal,
            )
            .await
            .unwrap();
    });
    TestServer {
        addr,
        _shutdown: shutdown,
    }
}

/// How a client's attempt ended.
#[derive(Debug)]
enum Outcome {
    /// The call succeeded; the server saw this client id.
    Ok(String),
    /// `Endpoint::connect` failed.
    ConnectFailed(tonic::transport::Error),
    /// Connected, but the call failed.
    CallFailed(Status),
}

async fn who_am_i(addr: SocketAddr, host: &str, config: ClientTlsConfig) -> Outcome {
    let endpoint = Endpoint::from_shared(format!("https://{host}:{}", addr.port()))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .tls_config(config)
        .unwrap();
    let channel: Channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => return Outcome::ConnectFailed(e),
    };
    let mut grpc = tonic::client::Grpc::new(channel);
    if let Err(e) = grpc.ready().await {
        return Outcome::CallFailed(Status::unknown(format!("not ready: {e}")));
    }
    let path = http::uri::PathAndQuery::from_static(METHOD);
    match grpc
        .unary(Request::new(()), path, ProstCodec::<(), String>::default())
        .await
    {
        Ok(response) => Outcome::Ok(response.into_inner()),
        Err(status) => Outcome::CallFailed(status),
    }
}

/// A CA with a server certificate for localhost and 127.0.0.1.
struct Pki {
    ca: CertificateAuthority,
    server: Pem,
}

fn pki() -> Pki {
    tls::install_crypto_provider();
    let ca = pki::generate_ca("fedtiny test CA", Validity::days(1)).unwrap();
    let server = ca
        .server_cert(
            &["localhost".to_owned(), "127.0.0.1".to_owned()],
            Validity::days(1),
        )
        .unwrap();
    Pki { ca, server }
}

async fn serve(pki: &Pki) -> TestServer {
    start_server(tls::server_tls_config_from_pem(&pki.server, pki.ca.cert_pem()).unwrap()).await
}

/// Asserts that the server refused the client (with `alert`, when the alert reached the client),
/// and returns how the client saw it.
fn assert_refused_by_server(outcome: Outcome, alert: &str) -> String {
    match outcome {
        Outcome::Ok(id) => panic!("the server accepted the client as {id:?}"),
        // Normally the first call fails with the server's alert; if the alert is lost the
        // client only sees the connection fail, which is still a refusal.
        Outcome::ConnectFailed(e) => {
            let kind = tls::connect_refusal_kind(&e);
            assert!(
                matches!(
                    kind,
                    RefusalKind::ClientCertificateRejected | RefusalKind::ConnectionFailed
                ),
                "{kind:?}: {}",
                tls::error_chain(&e)
            );
            if kind == RefusalKind::ClientCertificateRejected {
                assert!(
                    tls::error_chain(&e).contains(alert),
                    "{}",
                    tls::error_chain(&e)
                );
            }
            format!("connect failed ({kind:?}): {}", tls::error_chain(&e))
        }
        Outcome::CallFailed(status) => {
            assert_ne!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
            let kind = tls::call_refusal_kind(&status);
            assert!(
                matches!(
                    kind,
                    RefusalKind::ClientCertificateRejected | RefusalKind::ConnectionFailed
                ),
                "{kind:?}: {status:?}"
            );
            if kind == RefusalKind::ClientCertificateRejected {
                let chain = tls::error_chain(&status);
                assert!(chain.contains(alert), "{chain}");
            }
            format!(
                "call failed ({kind:?}, {:?}): {}",
                status.code(),
                tls::error_chain(&status)
            )
        }
    }
}

/// Asserts that the client refused the server's certificate for a reason containing `reason`,
/// and returns how it saw it.
fn assert_server_rejected(outcome: Outcome, reason: &str) -> String {
    let (kind, text) = match outcome {
        Outcome::Ok(id) => panic!("the client accepted the server (called as {id:?})"),
        Outcome::ConnectFailed(e) => (
            tls::connect_refusal_kind(&e),
            format!("connect failed: {}", tls::error_chain(&e)),
        ),
        Outcome::CallFailed(status) => (
            tls::call_refusal_kind(&status),
            format!(
                "call failed: {:?}: {}",
                status.code(),
                tls::error_chain(&status)
            ),
        ),
    };
    assert_eq!(kind, RefusalKind::ServerCertificateRejected, "{text}");
    assert!(text.contains(reason), "expected {reason:?} in {text}");
    text
}

async fn bounded<F: std::future::Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn valid_client_connects_and_server_reads_its_id() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "localhost").unwrap();
        match who_am_i(server.addr, "localhost", config).await {
            Outcome::Ok(id) => assert_eq!(id, "edge-01"),
            other => panic!("valid client failed: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn valid_client_connects_by_ip_address() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let client = pki.ca.client_cert("edge_02.a", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "127.0.0.1").unwrap();
        match who_am_i(server.addr, "127.0.0.1", config).await {
            Outcome::Ok(id) => assert_eq!(id, "edge_02.a"),
            other => panic!("valid client failed: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn bundle_files_work_end_to_end_and_a_reloaded_ca_issues_more_clients() {
    bounded(async {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("fedtiny bundle CA", Validity::days(1)).unwrap();
        let bundle = pki::write_bundle(
            dir.path(),
            &ca,
            &["localhost".to_owned()],
            &["alpha".to_owned(), "beta".to_owned()],
            Validity::days(1),
        )
        .unwrap();
        let server =
            start_server(tls::server_tls_config(&bundle.server_tls_files()).unwrap()).await;
        for id in ["alpha", "beta"] {
            let files = bundle.client_tls_files(id, "localhost").unwrap();
            let config = tls::client_tls_config(&files).unwrap();
            match who_am_i(server.addr, "localhost", config).await {
                Outcome::Ok(seen) => assert_eq!(seen, id),
                other => panic!("bundle client {id} failed: {other:?}"),
            }
        }

        // The coordinator can load the CA back from disk later and add a client.
        let reloaded = CertificateAuthority::from_files(&bundle.ca_cert, &bundle.ca_key).unwrap();
        let gamma = reloaded.client_cert("gamma", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(reloaded.cert_pem(), &gamma, "localhost").unwrap();
        match who_am_i(server.addr, "localhost", config).await {
            Outcome::Ok(seen) => assert_eq!(seen, "gamma"),
            other => panic!("client of the reloaded CA failed: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(pki.ca.cert_pem()))
            .domain_name("localhost");
        let seen = assert_refused_by_server(
            who_am_i(server.addr, "localhost", config).await,
            "CertificateRequired",
        );
        eprintln!("no client certificate -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let rogue_ca = pki::generate_ca("rogue CA", Validity::days(1)).unwrap();
        let rogue = rogue_ca.client_cert("edge-01", Validity::days(1)).unwrap();
        // The rogue client trusts the real CA, so it accepts the server; the server must not
        // accept it.
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &rogue, "localhost").unwrap();
        let seen = assert_refused_by_server(
            who_am_i(server.addr, "localhost", config).await,
            "UnknownCA",
        );
        eprintln!("client certificate from another CA -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_with_expired_certificate_is_refused() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let expired = pki.ca.client_cert("edge-01", Validity::expired()).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &expired, "localhost").unwrap();
        let seen = assert_refused_by_server(
            who_am_i(server.addr, "localhost", config).await,
            "CertificateExpired",
        );
        eprintln!("expired client certificate -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_with_not_yet_valid_certificate_is_refused() {
    bounded(async {
        let pki = pki();
        let server = serve(&pki).await;
        let early = pki
            .ca
            .client_cert("edge-01", Validity::not_yet_valid())
            .unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &early, "localhost").unwrap();
        let seen = assert_refused_by_server(
            who_am_i(server.addr, "localhost", config).await,
            "CertificateExpired",
        );
        eprintln!("not-yet-valid client certificate -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_signed_by_another_ca() {
    bounded(async {
        let pki = pki();
        let rogue_ca = pki::generate_ca("rogue CA", Validity::days(1)).unwrap();
        let rogue_server = rogue_ca
            .server_cert(&["localhost".to_owned()], Validity::days(1))
            .unwrap();
        // The rogue server would even accept our client.
        let server = start_server(
            tls::server_tls_config_from_pem(&rogue_server, pki.ca.cert_pem()).unwrap(),
        )
        .await;
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "localhost").unwrap();
        let seen = assert_server_rejected(
            who_am_i(server.addr, "localhost", config).await,
            "UnknownIssuer",
        );
        eprintln!("server certificate from another CA -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_refuses_server_certificate_without_the_expected_name() {
    bounded(async {
        let pki = pki();
        let wrong_name = pki
            .ca
            .server_cert(&["coordinator.example".to_owned()], Validity::days(1))
            .unwrap();
        let server =
            start_server(tls::server_tls_config_from_pem(&wrong_name, pki.ca.cert_pem()).unwrap())
                .await;
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "localhost").unwrap();
        let seen = assert_server_rejected(
            who_am_i(server.addr, "localhost", config).await,
            "certificate not valid for name \"localhost\"",
        );
        eprintln!("server certificate without the name -> {seen}");

        // An IP address is matched against IP SANs only, not DNS SANs.
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "127.0.0.1").unwrap();
        let seen = assert_server_rejected(
            who_am_i(server.addr, "127.0.0.1", config).await,
            "certificate not valid for name \"127.0.0.1\"",
        );
        eprintln!("server certificate without the IP SAN -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn client_refuses_expired_server_certificate() {
    bounded(async {
        let pki = pki();
        let expired = pki
            .ca
            .server_cert(&["localhost".to_owned()], Validity::expired())
            .unwrap();
        let server =
            start_server(tls::server_tls_config_from_pem(&expired, pki.ca.cert_pem()).unwrap())
                .await;
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "localhost").unwrap();
        let seen = assert_server_rejected(
            who_am_i(server.addr, "localhost", config).await,
            "certificate expired",
        );
        eprintln!("expired server certificate -> {seen}");
    })
    .await;
}

#[tokio::test]
async fn a_client_certificate_cannot_pose_as_the_server() {
    bounded(async {
        let pki = pki();
        // A certificate with only clientAuth, but whose SANs would not matter anyway: build the
        // server config by hand, bypassing the up-front checks that would reject it.
        let impostor = pki.ca.client_cert("localhost", Validity::days(1)).unwrap();
        let config = ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &impostor.cert,
                &impostor.key,
            ))
            .client_ca_root(Certificate::from_pem(pki.ca.cert_pem()));
        let server = start_server(config).await;
        let client = pki.ca.client_cert("edge-01", Validity::days(1)).unwrap();
        let config =
            tls::client_tls_config_from_pem(pki.ca.cert_pem(), &client, "localhost").unwrap();
        let seen = assert_server_rejected(
            who_am_i(server.addr, "localhost", config).await,
            "extended key usage for server authentication",
        );
        eprintln!("client certificate used by a server -> {seen}");
    })
    .await;
}
