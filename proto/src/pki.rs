//! # Certificates for mutual TLS: a private CA, a server certificate, client certificates
//!
//! fedtiny's coordinator and clients authenticate each other with certificates issued by one
//! private certificate authority (CA) that the operator creates with the coordinator's `certs`
//! subcommand ([`write_bundle`]). Everything is generated with `rcgen`; nothing here touches the
//! network.
//!
//! Decisions:
//!
//! - **Keys** are ECDSA P-256 with SHA-256 signatures (rcgen's default): small, fast and
//!   supported by every rustls provider. Private keys are written as PKCS#8 PEM
//!   (`-----BEGIN PRIVATE KEY-----`).
//! - **The CA** has `basicConstraints cA=TRUE, pathlen:0` (it can only sign leaves), key usages
//!   `keyCertSign`, `cRLSign`, `digitalSignature`, and a subject of exactly one common name.
//! - **The server certificate** has the `serverAuth` extended key usage and one subject
//!   alternative name per entry of `names`: an IP-address SAN when the entry parses as an IPv4 or
//!   IPv6 address, a DNS SAN otherwise (checked to be a syntactically valid DNS name). Its common
//!   name is the first entry, for human readers only: TLS clients match SANs, never the CN.
//! - **A client certificate** has the `clientAuth` extended key usage, subject common name = the
//!   client id, and one SAN of type **URI**: `urn:fedtiny:client:<id>` ([`CLIENT_URI_PREFIX`]).
//!   A URI rather than a DNS SAN because a client id is not a host name (ids may contain `_`,
//!   which is not valid in DNS names, and a DNS SAN would let a client certificate pass for a
//!   server name). The coordinator reads the id from the CN
//!   ([`crate::tls::client_id_from_certs`]) and checks that the URI SAN, when present, agrees.
//! - **Client ids** are restricted to `[A-Za-z0-9._-]{1,64}` ([`validate_client_id`]) so that they
//!   are safe as file names (`clients/<id>.pem`), in logs and in metrics labels.
//! - **Validity** is explicit ([`Validity`]). [`Validity::days`] back-dates `not_before` by one
//!   hour to tolerate clock skew between the coordinator and edge devices. Leaf validities are
//!   not clamped to the CA's: a chain verifies only while every certificate in it is valid.
//! - **Serial numbers** are rcgen's default: derived from a hash of the subject public key, so
//!   unique because every certificate gets a fresh key.
//! - [`write_bundle`] never overwrites: if any of the files it would write already exists it
//!   fails before writing anything. Private keys are created with mode `0600` (on Unix),
//!   certificates with `0644`.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, DnsName};
use time::{Duration, OffsetDateTime};

/// The prefix of the URI subject alternative name carried by every client certificate:
/// `urn:fedtiny:client:<id>`.
pub const CLIENT_URI_PREFIX: &str = "urn:fedtiny:client:";

/// The longest client id accepted, in bytes (= characters, since ids are ASCII).
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// How far [`Validity::days`] back-dates `not_before`, to tolerate clock skew.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::hours(1);

/// The longest validity [`Validity::days`] gives: 100 years.
pub const MAX_VALIDITY_DAYS: u32 = 36_525;

/// A certificate and its private key, both PEM-encoded.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem {
    /// The certificate (`-----BEGIN CERTIFICATE-----`), possibly followed by more certificates
    /// of its chain.
    pub cert: String,
    /// The private key (`-----BEGIN PRIVATE KEY-----`, PKCS#8).
    pub key: String,
}

impl fmt::Debug for Pem {
    /// Shows the certificate but never the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("cert", &self.cert)
            .field("key", &"[elided]")
            .finish()
    }
}

/// A client id that is not of the form `[A-Za-z0-9._-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid client id {id:?}: {reason} (expected 1 to 64 characters from [A-Za-z0-9._-])")]
pub struct InvalidClientId {
    /// The offending id.
    pub id: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that `id` is a valid client id: 1 to [`MAX_CLIENT_ID_LEN`] characters, each an ASCII
/// letter, digit, `.`, `_` or `-`. `.` and `..` are refused too, since ids become file names.
pub fn validate_client_id(id: &str) -> Result<(), InvalidClientId> {
    let fail = |reason| {
        Err(InvalidClientId {
            id: id.to_owned(),
            reason,
        })
    };
    if id.is_empty() {
        return fail("empty");
    }
    if id.len() > MAX_CLIENT_ID_LEN {
        return fail("longer than 64 characters");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return fail("contains a character outside [A-Za-z0-9._-]");
    }
    if id == "." || id == ".." {
        return fail("is a special path component");
    }
    Ok(())
}

/// Errors from generating, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A client id is not of the allowed form.
    #[error(transparent)]
    InvalidClientId(#[from] InvalidClientId),
    /// The same client id was given twice.
    #[error("client id {0:?} is listed more than once")]
    DuplicateClientId(String),
    /// A server name is neither an IP address nor a valid DNS name.
    #[error("invalid server name {name:?}: not an IP address and not a valid DNS name")]
    InvalidServerName {
        /// The offending name.
        name: String,
    },
    /// A server certificate was requested for no names at all.
    #[error("a server certificate needs at least one DNS name or IP address")]
    NoServerNames,
    /// A CA common name is empty.
    #[error("the CA common name must not be empty")]
    EmptyCommonName,
    /// `not_after` is not later than `not_before`.
    #[error(
        "invalid validity: not_after ({not_after}) is not later than not_before ({not_before})"
    )]
    InvalidValidity {
        /// Start of the requested validity.
        not_before: OffsetDateTime,
        /// End of the requested validity.
        not_after: OffsetDateTime,
    },
    /// rcgen failed to generate a key or sign a certificate.
    #[error("could not generate {what}: {source}")]
    Generate {
        /// What was being generated.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// An existing CA (see [`CertificateAuthority::from_pem`]) could not be loaded.
    #[error("cannot load the CA from {origin}: {reason}")]
    LoadCa {
        /// Where the CA came from (a file path, or "in-memory PEM").
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot write", "cannot create directory", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// [`write_bundle`] refuses to overwrite an existing file.
    #[error("refusing to overwrite existing file {}", path.display())]
    AlreadyExists {
        /// The file that exists.
        path: PathBuf,
    },
}

/// The period during which a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// The certificate is not valid before this instant.
    pub not_before: OffsetDateTime,
    /// The certificate is not valid after this instant.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from one hour ago (clock-skew allowance) until `days` days from now (at most
    /// [`MAX_VALIDITY_DAYS`]).
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - CLOCK_SKEW_ALLOWANCE,
            not_after: now + Duration::days(i64::from(days.min(MAX_VALIDITY_DAYS))),
        }
    }

    /// A validity that ended yesterday (from two days ago to one day ago): certificates made
    /// with it are refused by every peer. For tests.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(2),
            not_after: now - Duration::days(1),
        }
    }

    /// A validity that starts tomorrow: certificates made with it are not yet valid. For tests.
    pub fn not_yet_valid() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now + Duration::days(1),
            not_after: now + Duration::days(2),
        }
    }

    /// Whether `instant` lies within this validity (bounds included).
    pub fn contains(&self, instant: OffsetDateTime) -> bool {
        self.not_before <= instant && instant <= self.not_after
    }

    fn check(&self) -> Result<(), PkiError> {
        if self.not_after <= self.not_before {
            return Err(PkiError::InvalidValidity {
                not_before: self.not_before,
                not_after: self.not_after,
            });
        }
        Ok(())
    }
}

/// A private certificate authority that signs the server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
    common_name: String,
}

impl fmt::Debug for CertificateAuthority {
    /// Shows the common name only, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("common_name", &self.common_name)
            .finish_non_exhaustive()
    }
}

/// The parameters of a CA certificate: everything that is reproduced when a CA is loaded back.
fn ca_params(common_name: &str, validity: Validity) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params
}

fn generate_key(what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::Generate {
        what: format!("a key pair for {what}"),
        source,
    })
}

/// Creates a new self-signed CA with a fresh key.
pub fn generate_ca(
    common_name: &str,
    validity: Validity,
) -> Result<CertificateAuthority, PkiError> {
    if common_name.is_empty() {
        return Err(PkiError::EmptyCommonName);
    }
    validity.check()?;
    let params = ca_params(common_name, validity);
    let key = generate_key("the CA")?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| PkiError::Generate {
            what: "the CA certificate".to_owned(),
            source,
        })?;
    let pem = Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    };
    Ok(CertificateAuthority {
        issuer: Issuer::new(params, key),
        pem,
        common_name: common_name.to_owned(),
    })
}

impl CertificateAuthority {
    /// Loads a CA previously made by [`generate_ca`] (for example `ca.pem` and `ca.key` from
    /// [`write_bundle`]), so that more leaves can be issued later.
    ///
    /// Only CAs whose subject is a single common name (as [`generate_ca`] makes them) can be
    /// loaded; the key must match the certificate.
    pub fn from_pem(pem: &Pem) -> Result<Self, PkiError> {
        Self::load(pem, "in-memory PEM")
    }

    /// Loads a CA from its certificate and key files (see [`CertificateAuthority::from_pem`]).
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| PkiError::Io {
                action: "cannot read",
                path: path.to_owned(),
                source,
            })
        };
        let pem = Pem {
            cert: read(cert)?,
            key: read(key)?,
        };
        Self::load(&pem, &format!("{} and {}", cert.display(), key.display()))
    }

    fn load(pem: &Pem, origin: &str) -> Result<Self, PkiError> {
        let fail = |reason: String| PkiError::LoadCa {
            origin: origin.to_owned(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(pem.cert.as_bytes())
            .map_err(|e| fail(format!("no PEM certificate found ({e})")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| fail(format!("not a valid X.509 certificate ({e})")))?;
        if !cert.is_ca() {
            return Err(fail("the certificate is not a CA certificate".to_owned()));
        }
        let mut names = cert.subject().iter_common_name();
        let common_name = match (names.next(), names.next()) {
            (Some(cn), None) => cn
                .as_str()
                .map_err(|e| fail(format!("unreadable common name ({e})")))?
                .to_owned(),
            _ => {
                return Err(fail(
                    "the subject must have exactly one common name".to_owned(),
                ));
            }
        };
        let validity = Validity {
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        };
        let key = KeyPair::from_pem(&pem.key)
            .map_err(|e| fail(format!("cannot parse the private key ({e})")))?;
        if key.subject_public_key_info() != cert.public_key().raw {
            return Err(fail(
                "the private key does not match the certificate".to_owned(),
            ));
        }
        let params = ca_params(&common_name, validity);
        // Leaves name their issuer by the CA's subject bytes: make sure the rebuilt parameters
        // reproduce them exactly, or the leaves would not chain to this CA.
        let probe = params
            .self_signed(&key)
            .map_err(|e| fail(format!("cannot re-sign with the key ({e})")))?;
        let (_, probe) = x509_parser::parse_x509_certificate(probe.der())
            .map_err(|e| fail(format!("cannot parse the rebuilt certificate ({e})")))?;
        if probe.subject().as_raw() != cert.subject().as_raw() {
            return Err(fail(
                "the subject is not a single UTF-8 common name, as generate_ca makes it".to_owned(),
            ));
        }
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem: pem.clone(),
            common_name,
        })
    }

    /// The CA's certificate and private key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// The CA's certificate (PEM): what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.pem.cert
    }

    /// The CA's common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        what: &str,
    ) -> Result<Pem, PkiError> {
        validity.check()?;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = generate_key(what)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate {
                what: what.to_owned(),
                source,
            })?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Issues a server certificate (`serverAuth`) valid for `names`: each entry is an IP address
    /// (IP SAN) or a DNS name (DNS SAN), e.g. `["localhost", "127.0.0.1"]`.
    pub fn server_cert(&self, names: &[String], validity: Validity) -> Result<Pem, PkiError> {
        let first = names.first().ok_or(PkiError::NoServerNames)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, first.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.subject_alt_names = names
            .iter()
            .map(|name| server_san(name))
            .collect::<Result<_, _>>()?;
        self.sign_leaf(params, validity, "the server certificate")
    }

    /// Issues a client certificate (`clientAuth`) whose subject CN is `client_id` and which
    /// carries the URI SAN `urn:fedtiny:client:<client_id>`. The id must satisfy
    /// [`validate_client_id`].
    pub fn client_cert(&self, client_id: &str, validity: Validity) -> Result<Pem, PkiError> {
        validate_client_id(client_id)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, client_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let uri = format!("{CLIENT_URI_PREFIX}{client_id}");
        let uri = uri.try_into().map_err(|source| PkiError::Generate {
            what: format!("the URI SAN of client {client_id:?}"),
            source,
        })?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        self.sign_leaf(
            params,
            validity,
            &format!("the certificate of client {client_id:?}"),
        )
    }
}

fn server_san(name: &str) -> Result<SanType, PkiError> {
    let invalid = || PkiError::InvalidServerName {
        name: name.to_owned(),
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    DnsName::try_from(name).map_err(|_| invalid())?;
    Ok(SanType::DnsName(name.try_into().map_err(|_| invalid())?))
}

/// The paths of one client's certificate and key in a [`Bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    /// The client id (the certificate's common name).
    pub id: String,
    /// `clients/<id>.pem`.
    pub cert: PathBuf,
    /// `clients/<id>.key` (mode 0600).
    pub key: PathBuf,
}

/// The files written by [`write_bundle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// `ca.pem`: the CA certificate, trusted by both sides.
    pub ca_cert: PathBuf,
    /// `ca.key` (mode 0600): the CA private key; keep it off the coordinator if you can.
    pub ca_key: PathBuf,
    /// `server.pem`: the coordinator's certificate.
    pub server_cert: PathBuf,
    /// `server.key` (mode 0600): the coordinator's private key.
    pub server_key: PathBuf,
    /// One entry per client id, in the order given.
    pub clients: Vec<ClientFiles>,
}

impl Bundle {
    /// The coordinator's TLS files: its certificate and key, and `ca.pem` to verify clients.
    pub fn server_tls_files(&self) -> crate::tls::ServerTlsFiles {
        crate::tls::ServerTlsFiles {
            cert: self.server_cert.clone(),
            key: self.server_key.clone(),
            client_ca: self.ca_cert.clone(),
        }
    }

    /// A client's TLS files, for connecting to the coordinator as `server_name`; `None` when
    /// the bundle has no client `id`.
    pub fn client_tls_files(
        &self,
        id: &str,
        server_name: &str,
    ) -> Option<crate::tls::ClientTlsFiles> {
        self.clients
            .iter()
            .find(|c| c.id == id)
            .map(|c| crate::tls::ClientTlsFiles {
                ca: self.ca_cert.clone(),
                cert: c.cert.clone(),
                key: c.key.clone(),
                server_name: server_name.to_owned(),
            })
    }
}

/// Issues a server certificate for `server_names` and one client certificate per id with `ca`,
/// and writes everything to `dir` (created if missing):
///
/// ```text
/// dir/ca.pem            CA certificate            0644
/// dir/ca.key            CA private key            0600
/// dir/server.pem        server certificate        0644
/// dir/server.key        server private key        0600
/// dir/clients/<id>.pem  client certificate        0644
/// dir/clients/<id>.key  client private key        0600
/// ```
///
/// All inputs are validated and all certificates generated before anything is written, and
/// nothing is written if any of these files already exists ([`PkiError::AlreadyExists`]).
pub fn write_bundle(
    dir: &Path,
    ca: &CertificateAuthority,
    server_names: &[String],
    client_ids: &[String],
    validity: Validity,
) -> Result<Bundle, PkiError> {
    for (i, id) in client_ids.iter().enumerate() {
        validate_client_id(id)?;
        if client_ids[..i].contains(id) {
            return Err(PkiError::DuplicateClientId(id.clone()));
        }
    }
    let server = ca.server_cert(server_names, validity)?;
    let clients = client_ids
        .iter()
        .map(|id| ca.client_cert(id, validity))
        .collect::<Result<Vec<_>, _>>()?;

    let clients_dir = dir.join("clients");
    let bundle = Bundle {
        dir: dir.to_owned(),
        ca_cert: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        clients: client_ids
            .iter()
            .map(|id| ClientFiles {
                id: id.clone(),
                cert: clients_dir.join(format!("{id}.pem")),
                key: clients_dir.join(format!("{id}.key")),
            })
            .collect(),
    };

    let mut files: Vec<(&Path, &str, bool)> = vec![
        (&bundle.ca_cert, &ca.pem.cert, false),
        (&bundle.ca_key, &ca.pem.key, true),
        (&bundle.server_cert, &server.cert, false),
        (&bundle.server_key, &server.key, true),
    ];
    for (paths, pem) in bundle.clients.iter().zip(&clients) {
        files.push((&paths.cert, &pem.cert, false));
        files.push((&paths.key, &pem.key, true));
    }
    if let Some((path, _, _)) = files.iter().find(|(path, _, _)| path.exists()) {
        return Err(PkiError::AlreadyExists {
            path: path.to_path_buf(),
        });
    }
    fs::create_dir_all(&clients_dir).map_err(|source| PkiError::Io {
        action: "cannot create directory",
        path: clients_dir.clone(),
        source,
    })?;
    for (path, contents, secret) in files {
        write_new_file(path, contents, secret)?;
    }
    Ok(bundle)
}

/// Creates `path` (which must not exist) with `contents`; mode 0600 when `secret`, else 0644.
fn write_new_file(path: &Path, contents: &str, secret: bool) -> Result<(), PkiError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            PkiError::Io {
                action: "cannot create",
                path: path.to_owned(),
                source,
            }
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| PkiError::Io {
            action: "cannot write",
            path: path.to_owned(),
            source,
        })
}
