//! # Mutual TLS for the coordinator and its clients
//!
//! Builds tonic's [`ServerTlsConfig`] and [`ClientTlsConfig`] from PEM files (or PEM strings,
//! for tests and embedding) and recovers a client's identity from its certificate.
//!
//! Decisions:
//!
//! - **Client authentication is mandatory.** The server verifies every client certificate
//!   against the client CA and refuses the connection when a client presents none, or one that
//!   does not chain to that CA, is expired or not yet valid, or lacks the `clientAuth` extended
//!   key usage. There is no optional mode.
//! - **The client verifies the server** against the CA given to it (only that CA: no system
//!   roots), and checks the server certificate's SANs against `server_name`, which is used for
//!   verification (and SNI) whatever host or address the endpoint URI names. The server
//!   certificate must carry the `serverAuth` usage.
//! - **Everything is checked up front.** tonic only stores PEM bytes and reports problems when
//!   the server starts or the channel connects, with little context. The functions here parse
//!   every file first and fail with a [`TlsError`] that names the file and the problem: missing
//!   file, not PEM, no certificate, no key, several keys, key not matching the certificate, CA
//!   file that is not a CA, certificate made for the other side (wrong extended key usage),
//!   invalid server name. They do **not** reject expired certificates: expiry is the peer's
//!   business, and an expired certificate is refused in the handshake.
//! - **Crypto provider.** rustls needs a process-wide provider when more than one is compiled
//!   in; [`install_crypto_provider`] installs *ring* (idempotently) and both config builders call
//!   it, so a server never panics at start-up for want of one.
//! - **Handshake timeout.** Both configs bound the TLS handshake to [`HANDSHAKE_TIMEOUT`], so a
//!   peer that stalls mid-handshake cannot hold a connection slot for ever.
//! - **Identity.** A client's id is the subject common name of its certificate
//!   ([`client_id_from_certs`], [`client_id_from_request`]), checked against the client-id
//!   charset; when the certificate also carries fedtiny's URI SAN
//!   (`urn:fedtiny:client:<id>`, see [`crate::pki`]) the two must agree. Only certificates that
//!   the TLS layer has verified reach these functions, so the id is authenticated.
//!
//! ## How a refused peer sees the failure
//!
//! With TLS 1.3 the client finishes its side of the handshake before the server has checked the
//! client certificate. So a client that the server refuses **connects successfully**
//! ([`tonic::transport::Endpoint::connect`] returns a channel) and its **first call** fails.
//! Over loopback (tonic 0.14, rustls 0.23) the call fails with code `Unknown`, message
//! `"transport error"`, and the server's TLS alert in the source chain:
//!
//! | client presents                 | source chain ends with                          |
//! |---------------------------------|-------------------------------------------------|
//! | no certificate                  | `received fatal alert: CertificateRequired`     |
//! | certificate from another CA     | `received fatal alert: UnknownCA`               |
//! | expired / not yet valid         | `received fatal alert: CertificateExpired`      |
//!
//! If the alert is lost (the server closed the connection first), the call fails with
//! `Unavailable` or `Cancelled` and no reason. It is never `Unauthenticated`: that code is for a
//! handler that rejects a verified certificate ([`authenticate`]).
//!
//! A client that refuses the *server* fails in `connect` itself, with a transport error whose
//! chain reads `invalid peer certificate: UnknownIssuer` (another CA),
//! `invalid peer certificate: certificate not valid for name "localhost"; ...` (SAN mismatch),
//! `invalid peer certificate: certificate expired: ...`, or
//! `invalid peer certificate: certificate does not allow extended key usage for server
//! authentication, ...` (a client certificate used by a server).
//!
//! [`call_refusal_kind`], [`connect_refusal_kind`] and [`error_chain`] turn these into a
//! [`RefusalKind`] and a readable message.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{PemObject as _, SectionKind};
use rustls::pki_types::{
    PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer, ServerName,
};
use rustls::sign::CertifiedKey;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

pub use rustls::pki_types::CertificateDer;

use crate::pki::{CLIENT_URI_PREFIX, InvalidClientId, Pem, validate_client_id};

/// The longest a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The label used in errors for PEM given as a string rather than read from a file.
const IN_MEMORY: &str = "in-memory PEM";

/// Installs rustls's *ring* crypto provider as the process default, unless a provider is
/// already installed (then does nothing). Safe to call any number of times, from any thread.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Another thread may win the race: "already installed" is fine either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Errors from building TLS configurations or reading identities from certificates.
///
/// `what` names the role of the input ("server certificate", "client CA", ...) and `origin`
/// where it came from (a file path, or "in-memory PEM").
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file does not exist.
    #[error("{what} file {} does not exist", path.display())]
    MissingFile {
        /// The role of the file.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A file exists but cannot be read.
    #[error("cannot read {what} file {}: {source}", path.display())]
    Read {
        /// The role of the file.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The input has no PEM section at all, or a malformed one.
    #[error("{what} ({origin}) is not PEM: {reason}")]
    NotPem {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The input is PEM but holds no `CERTIFICATE` section.
    #[error("{what} ({origin}) contains no certificate (no -----BEGIN CERTIFICATE----- section)")]
    NoCertificate {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
    },
    /// The input is PEM but holds no private key section.
    #[error(
        "{what} ({origin}) contains no private key (expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)"
    )]
    NoPrivateKey {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
    },
    /// The input holds more than one private key.
    #[error("{what} ({origin}) contains {count} private keys; expected exactly one")]
    MultiplePrivateKeys {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
        /// How many keys were found.
        count: usize,
    },
    /// A certificate section does not hold a valid X.509 certificate.
    #[error("{what} ({origin}) holds an invalid certificate: {reason}")]
    InvalidCertificate {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The private key cannot be used (unsupported algorithm, corrupt encoding, ...).
    #[error("{what} ({origin}) is not a usable private key: {reason}")]
    InvalidPrivateKey {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// The private key is not the key of the certificate.
    #[error("the private key ({key}) does not match the certificate ({cert})")]
    KeyMismatch {
        /// Where the certificate came from.
        cert: String,
        /// Where the key came from.
        key: String,
    },
    /// A file given as a CA holds a certificate that is not a CA certificate.
    #[error(
        "{what} ({origin}) is not a CA certificate (basicConstraints cA is not set); pass the CA's certificate (ca.pem), not a leaf"
    )]
    NotACa {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
    },
    /// A certificate is not meant for this side of the connection.
    #[error(
        "{what} ({origin}) cannot be used as a {side} certificate: its extended key usage lacks {usage}"
    )]
    WrongKeyUsage {
        /// The role of the input.
        what: &'static str,
        /// Where it came from.
        origin: String,
        /// "server" or "client".
        side: &'static str,
        /// The missing usage: "serverAuth" or "clientAuth".
        usage: &'static str,
    },
    /// The name a client expects in the server certificate is not a valid DNS name or IP
    /// address.
    #[error("invalid server name {name:?}: not a DNS name or an IP address")]
    InvalidServerName {
        /// The offending name.
        name: String,
    },
    /// No certificate was presented (or the connection is not over TLS).
    #[error("no client certificate: the connection is not authenticated by mutual TLS")]
    NoPeerCertificate,
    /// The certificate's subject has no common name.
    #[error("the client certificate's subject has no common name")]
    MissingCommonName,
    /// The certificate's subject has several common names.
    #[error("the client certificate's subject has {count} common names; expected one")]
    MultipleCommonNames {
        /// How many there are.
        count: usize,
    },
    /// The common name is not a valid client id.
    #[error("the client certificate's common name: {0}")]
    InvalidClientId(#[from] InvalidClientId),
    /// The common name and the fedtiny URI SAN name different clients.
    #[error("the client certificate's common name {common_name:?} disagrees with its SAN {uri:?}")]
    IdentityMismatch {
        /// The subject common name.
        common_name: String,
        /// The `urn:fedtiny:client:` URI SAN.
        uri: String,
    },
}

/// The coordinator's TLS files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server certificate (PEM; may be followed by intermediates).
    pub cert: PathBuf,
    /// The server private key (PEM).
    pub key: PathBuf,
    /// The CA certificate(s) (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// A client's TLS files and the name it expects in the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// The CA certificate(s) (PEM) that the server certificate must chain to.
    pub ca: PathBuf,
    /// The client certificate (PEM).
    pub cert: PathBuf,
    /// The client private key (PEM).
    pub key: PathBuf,
    /// The DNS name or IP address the server certificate must be valid for (e.g. "localhost").
    pub server_name: String,
}

/// PEM input with a description of where it came from, for error messages.
struct Source<'a> {
    what: &'static str,
    origin: String,
    bytes: Cow<'a, [u8]>,
}

impl<'a> Source<'a> {
    fn file(what: &'static str, path: &Path) -> Result<Self, TlsError> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                TlsError::MissingFile {
                    what,
                    path: path.to_owned(),
                }
            } else {
                TlsError::Read {
                    what,
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        Ok(Self {
            what,
            origin: path.display().to_string(),
            bytes: Cow::Owned(bytes),
        })
    }

    fn memory(what: &'static str, pem: &'a str) -> Self {
        Self {
            what,
            origin: IN_MEMORY.to_owned(),
            bytes: Cow::Borrowed(pem.as_bytes()),
        }
    }

    /// Every PEM section, in order.
    fn sections(&self) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
        let not_pem = |reason: String| TlsError::NotPem {
            what: self.what,
            origin: self.origin.clone(),
            reason,
        };
        let sections = <(SectionKind, Vec<u8>)>::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| not_pem(e.to_string()))?;
        if sections.is_empty() {
            return Err(not_pem(
                "no PEM section found (expected -----BEGIN ...----- lines)".to_owned(),
            ));
        }
        Ok(sections)
    }

    /// The certificates, each checked to parse as X.509.
    fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs: Vec<CertificateDer<'static>> = self
            .sections()?
            .into_iter()
            .filter(|(kind, _)| *kind == SectionKind::Certificate)
            .map(|(_, der)| CertificateDer::from(der))
            .collect();
        if certs.is_empty() {
            return Err(TlsError::NoCertificate {
                what: self.what,
                origin: self.origin.clone(),
            });
        }
        for cert in &certs {
            self.parse(cert)?;
        }
        Ok(certs)
    }

    fn parse<'c>(&self, cert: &'c CertificateDer<'_>) -> Result<X509Certificate<'c>, TlsError> {
        parse_certificate(cert).map_err(|reason| TlsError::InvalidCertificate {
            what: self.what,
            origin: self.origin.clone(),
            reason,
        })
    }

    /// The one private key.
    fn private_key(&self) -> Result<PrivateKeyDer<'static>, TlsError> {
        let mut keys: Vec<PrivateKeyDer<'static>> = self
            .sections()?
            .into_iter()
            .filter_map(|(kind, der)| match kind {
                SectionKind::PrivateKey => Some(PrivatePkcs8KeyDer::from(der).into()),
                SectionKind::RsaPrivateKey => Some(PrivatePkcs1KeyDer::from(der).into()),
                SectionKind::EcPrivateKey => Some(PrivateSec1KeyDer::from(der).into()),
                _ => None,
            })
            .collect();
        match keys.len() {
            0 => Err(TlsError::NoPrivateKey {
                what: self.what,
                origin: self.origin.clone(),
            }),
            1 => Ok(keys.remove(0)),
            count => Err(TlsError::MultiplePrivateKeys {
                what: self.what,
                origin: self.origin.clone(),
                count,
            }),
        }
    }
}

fn parse_certificate<'c>(cert: &'c CertificateDer<'_>) -> Result<X509Certificate<'c>, String> {
    match x509_parser::parse_x509_certificate(cert) {
        Ok((rest, _)) if !rest.is_empty() => Err("trailing bytes after the certificate".to_owned()),
        Ok((_, parsed)) => Ok(parsed),
        Err(e) => Err(e.to_string()),
    }
}

/// Which side a leaf certificate is for.
#[derive(Clone, Copy)]
enum Side {
    Server,
    Client,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }

    fn usage(self) -> &'static str {
        match self {
            Side::Server => "serverAuth",
            Side::Client => "clientAuth",
        }
    }
}

/// Checks a certificate chain and its key: both parse, the key is the leaf's key, and the leaf
/// may be used on `side`.
fn check_identity(cert: &Source<'_>, key: &Source<'_>, side: Side) -> Result<(), TlsError> {
    let chain = cert.certificates()?;
    let key_der = key.private_key()?;
    if let Some(leaf) = chain.first() {
        let parsed = cert.parse(leaf)?;
        let usage = parsed
            .extended_key_usage()
            .map_err(|e| TlsError::InvalidCertificate {
                what: cert.what,
                origin: cert.origin.clone(),
                reason: format!("bad extended key usage extension: {e}"),
            })?;
        if let Some(usage) = usage {
            let eku = usage.value;
            let allowed = eku.any
                || match side {
                    Side::Server => eku.server_auth,
                    Side::Client => eku.client_auth,
                };
            if !allowed {
                return Err(TlsError::WrongKeyUsage {
                    what: cert.what,
                    origin: cert.origin.clone(),
                    side: side.name(),
                    usage: side.usage(),
                });
            }
        }
        if let Side::Client = side {
            // A client learns now, not from a refused call, that its certificate names no
            // valid fedtiny client.
            client_id_from_certs(std::slice::from_ref(leaf))?;
        }
    }
    let provider = rustls::crypto::ring::default_provider();
    match CertifiedKey::from_der(chain, key_der, &provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(TlsError::KeyMismatch {
            cert: cert.origin.clone(),
            key: key.origin.clone(),
        }),
        Err(e) => Err(TlsError::InvalidPrivateKey {
            what: key.what,
            origin: key.origin.clone(),
            reason: e.to_string(),
        }),
    }
}

/// Checks a CA bundle: at least one certificate, each a CA usable as a trust anchor.
fn check_ca(ca: &Source<'_>) -> Result<(), TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca.certificates()? {
        if !ca.parse(&cert)?.is_ca() {
            return Err(TlsError::NotACa {
                what: ca.what,
                origin: ca.origin.clone(),
            });
        }
        roots.add(cert).map_err(|e| TlsError::InvalidCertificate {
            what: ca.what,
            origin: ca.origin.clone(),
            reason: format!("not usable as a trust anchor: {e}"),
        })?;
    }
    Ok(())
}

fn build_server(
    cert: &Source<'_>,
    key: &Source<'_>,
    client_ca: &Source<'_>,
) -> Result<ServerTlsConfig, TlsError> {
    install_crypto_provider();
    check_identity(cert, key, Side::Server)?;
    check_ca(client_ca)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(&cert.bytes, &key.bytes))
        .client_ca_root(Certificate::from_pem(&client_ca.bytes))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

fn build_client(
    ca: &Source<'_>,
    cert: &Source<'_>,
    key: &Source<'_>,
    server_name: &str,
) -> Result<ClientTlsConfig, TlsError> {
    install_crypto_provider();
    ServerName::try_from(server_name).map_err(|_| TlsError::InvalidServerName {
        name: server_name.to_owned(),
    })?;
    check_ca(ca)?;
    check_identity(cert, key, Side::Client)?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.bytes))
        .identity(Identity::from_pem(&cert.bytes, &key.bytes))
        .domain_name(server_name)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// The coordinator's TLS configuration: presents `files.cert`/`files.key` and **requires** every
/// client to present a certificate that chains to `files.client_ca`.
///
/// Every file is read and checked first (see the module docs); also installs the crypto
/// provider ([`install_crypto_provider`]).
pub fn server_tls_config(files: &ServerTlsFiles) -> Result<ServerTlsConfig, TlsError> {
    build_server(
        &Source::file("server certificate", &files.cert)?,
        &Source::file("server private key", &files.key)?,
        &Source::file("client CA", &files.client_ca)?,
    )
}

/// [`server_tls_config`] from PEM strings: the server's certificate and key, and the CA
/// certificate(s) that client certificates must chain to.
pub fn server_tls_config_from_pem(
    identity: &Pem,
    client_ca_pem: &str,
) -> Result<ServerTlsConfig, TlsError> {
    build_server(
        &Source::memory("server certificate", &identity.cert),
        &Source::memory("server private key", &identity.key),
        &Source::memory("client CA", client_ca_pem),
    )
}

/// A client's TLS configuration: trusts only `files.ca`, expects the server certificate to be
/// valid for `files.server_name`, and presents `files.cert`/`files.key`.
///
/// Every file is read and checked first (see the module docs); also installs the crypto
/// provider ([`install_crypto_provider`]).
pub fn client_tls_config(files: &ClientTlsFiles) -> Result<ClientTlsConfig, TlsError> {
    build_client(
        &Source::file("CA", &files.ca)?,
        &Source::file("client certificate", &files.cert)?,
        &Source::file("client private key", &files.key)?,
        &files.server_name,
    )
}

/// [`client_tls_config`] from PEM strings: the CA certificate(s) to trust, the client's
/// certificate and key, and the name the server certificate must be valid for.
pub fn client_tls_config_from_pem(
    ca_pem: &str,
    identity: &Pem,
    server_name: &str,
) -> Result<ClientTlsConfig, TlsError> {
    build_client(
        &Source::memory("CA", ca_pem),
        &Source::memory("client certificate", &identity.cert),
        &Source::memory("client private key", &identity.key),
        server_name,
    )
}

/// The client id named by a verified client certificate chain (leaf first, as tonic's
/// [`tonic::Request::peer_certs`] returns it): the leaf's subject common name, which must be a
/// valid client id ([`validate_client_id`]) and, when the leaf carries a `urn:fedtiny:client:`
/// URI SAN, must equal the id in it.
pub fn client_id_from_certs(certs: &[CertificateDer<'_>]) -> Result<String, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    let invalid = |reason: String| TlsError::InvalidCertificate {
        what: "client certificate",
        origin: "peer".to_owned(),
        reason,
    };
    let cert = parse_certificate(leaf).map_err(invalid)?;
    let names: Vec<_> = cert.subject().iter_common_name().collect();
    let common_name = match names.as_slice() {
        [] => return Err(TlsError::MissingCommonName),
        [name] => name
            .as_str()
            .map_err(|e| invalid(format!("unreadable common name: {e}")))?,
        more => return Err(TlsError::MultipleCommonNames { count: more.len() }),
    };
    validate_client_id(common_name)?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| invalid(format!("bad subject alternative name extension: {e}")))?;
    for name in sans.iter().flat_map(|san| &san.value.general_names) {
        if let GeneralName::URI(uri) = name
            && let Some(id) = uri.strip_prefix(CLIENT_URI_PREFIX)
            && id != common_name
        {
            return Err(TlsError::IdentityMismatch {
                common_name: common_name.to_owned(),
                uri: (*uri).to_owned(),
            });
        }
    }
    Ok(common_name.to_owned())
}

/// The id of the client that sent `request`, from the certificate it presented in the mutual
/// TLS handshake (see [`client_id_from_certs`]). [`TlsError::NoPeerCertificate`] when the
/// request did not arrive over a TLS connection with a client certificate.
pub fn client_id_from_request<T>(request: &tonic::Request<T>) -> Result<String, TlsError> {
    let certs = request.peer_certs().ok_or(TlsError::NoPeerCertificate)?;
    client_id_from_certs(&certs)
}

/// [`client_id_from_request`] for use in handlers and interceptors: any failure becomes an
/// `Unauthenticated` status carrying the reason.
pub fn authenticate<T>(request: &tonic::Request<T>) -> Result<String, tonic::Status> {
    client_id_from_request(request).map_err(|e| tonic::Status::unauthenticated(e.to_string()))
}

/// Why a call or a connection attempt failed, as far as TLS can tell (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// This client rejected the server's certificate (unknown issuer, name not in its SANs,
    /// expired, not a server certificate). Seen on the client, from `connect`.
    ServerCertificateRejected,
    /// The server refused this client's certificate and said so with a TLS alert
    /// (`CertificateRequired`, `UnknownCA`, `CertificateExpired`, ...). Seen on the client, from
    /// its first call.
    ClientCertificateRejected,
    /// The connection failed or was dropped without a TLS reason reaching this side: a server
    /// that refused the client but whose alert was lost, a server that is down, a network
    /// failure.
    ConnectionFailed,
    /// Anything else: an application-level status, a deadline, ...
    Other,
}

impl fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RefusalKind::ServerCertificateRejected => "the server's certificate was rejected",
            RefusalKind::ClientCertificateRejected => {
                "the server rejected the client's certificate"
            }
            RefusalKind::ConnectionFailed => "the connection failed",
            RefusalKind::Other => "not a connection failure",
        })
    }
}

/// The messages of `err` and of every error in its source chain, joined by ": " (tonic's
/// transport errors keep the useful part, e.g. the TLS alert, in the chain).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = e.source();
    }
    parts.join(": ")
}

/// Classifies the failure of a call (see [`RefusalKind`]).
pub fn call_refusal_kind(status: &tonic::Status) -> RefusalKind {
    let chain = error_chain(status);
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown => {
            classify_transport(&chain, status.code() != tonic::Code::Unknown)
        }
        _ => RefusalKind::Other,
    }
}

/// Classifies a failed [`tonic::transport::Endpoint::connect`] (see [`RefusalKind`]).
pub fn connect_refusal_kind(err: &tonic::transport::Error) -> RefusalKind {
    classify_transport(&error_chain(err), true)
}

fn classify_transport(chain: &str, transport: bool) -> RefusalKind {
    if chain.contains("invalid peer certificate") {
        RefusalKind::ServerCertificateRejected
    } else if chain.contains("received fatal alert") {
        RefusalKind::ClientCertificateRejected
    } else if transport || chain.contains("transport error") {
        RefusalKind::ConnectionFailed
    } else {
        RefusalKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
