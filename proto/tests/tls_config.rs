//! Certificate generation, the files `write_bundle` writes, and the typed errors of the TLS
//! configuration builders and of client-identity extraction. No network.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use fedtiny_proto::pki::{self, CertificateAuthority, Pem, PkiError, Validity};
use fedtiny_proto::tls::{self, CertificateDer, ClientTlsFiles, ServerTlsFiles, TlsError};
use rustls::pki_types::pem::PemObject as _;
use x509_parser::extensions::GeneralName;

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn ca() -> CertificateAuthority {
    tls::install_crypto_provider();
    pki::generate_ca("fedtiny test CA", Validity::days(1)).unwrap()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

// ---------------------------------------------------------------- pki

#[test]
fn ca_certificate_is_a_constrained_ca() {
    let ca = ca();
    let der = der(ca.cert_pem());
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
    let cn: Vec<_> = cert.subject().iter_common_name().collect();
    assert_eq!(cn.len(), 1);
    assert_eq!(cn[0].as_str().unwrap(), "fedtiny test CA");
    assert_eq!(ca.common_name(), "fedtiny test CA");
    assert!(ca.pem().key.contains("BEGIN PRIVATE KEY"));
    assert!(!format!("{ca:?}").contains("PRIVATE"));
    assert!(!format!("{:?}", ca.pem()).contains("PRIVATE"));
}

#[test]
fn server_certificate_has_dns_and_ip_sans_and_server_auth() {
    let ca = ca();
    let pem = ca
        .server_cert(
            &names(&["localhost", "127.0.0.1", "::1"]),
            Validity::days(1),
        )
        .unwrap();
    let der = der(&pem.cert);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert!(sans.contains(&GeneralName::DNSName("localhost")));
    assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
    let mut v6 = [0u8; 16];
    v6[15] = 1;
    assert!(sans.contains(&GeneralName::IPAddress(&v6)));
    assert_eq!(sans.len(), 3);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert!(!cert.is_ca());
}

#[test]
fn client_certificate_has_cn_uri_san_and_client_auth() {
    let ca = ca();
    let pem = ca.client_cert("edge_07.b-x", Validity::days(1)).unwrap();
    let der = der(&pem.cert);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn: Vec<_> = cert.subject().iter_common_name().collect();
    assert_eq!(cn[0].as_str().unwrap(), "edge_07.b-x");
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(
        sans,
        &vec![GeneralName::URI("urn:fedtiny:client:edge_07.b-x")]
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert_eq!(
        tls::client_id_from_certs(std::slice::from_ref(&der)).unwrap(),
        "edge_07.b-x"
    );
}

#[test]
fn validity_is_written_into_certificates() {
    let ca = ca();
    let validity = Validity::days(30);
    let pem = ca.client_cert("edge", validity).unwrap();
    let der = der(&pem.cert);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let nb = cert.validity().not_before.to_datetime();
    let na = cert.validity().not_after.to_datetime();
    assert!((nb - validity.not_before).abs() < time::Duration::seconds(1));
    assert!((na - validity.not_after).abs() < time::Duration::seconds(1));
    assert!(validity.contains(time::OffsetDateTime::now_utc()));
    assert!(!Validity::expired().contains(time::OffsetDateTime::now_utc()));
    assert!(!Validity::not_yet_valid().contains(time::OffsetDateTime::now_utc()));

    // Huge requests are capped (no overflow panic) and still encodable.
    let longest = Validity::days(u32::MAX);
    assert!(longest.not_after < time::OffsetDateTime::now_utc() + time::Duration::days(36_600));
    ca.client_cert("edge", longest).unwrap();
}

#[test]
fn invalid_client_ids_are_typed_errors() {
    let ca = ca();
    let too_long = "a".repeat(65);
    for id in [
        "",
        "a b",
        "a/b",
        "..",
        ".",
        "é",
        "a\u{0}b",
        "x:y",
        too_long.as_str(),
    ] {
        match ca.client_cert(id, Validity::days(1)) {
            Err(PkiError::InvalidClientId(e)) => assert_eq!(e.id, id),
            other => panic!("{id:?}: expected InvalidClientId, got {other:?}"),
        }
    }
    let longest = "a".repeat(64);
    for id in ["a", "A-Z_0.9", longest.as_str(), "...", ".hidden"] {
        ca.client_cert(id, Validity::days(1)).unwrap();
    }
}

#[test]
fn invalid_server_names_and_validities_are_typed_errors() {
    let ca = ca();
    assert!(matches!(
        ca.server_cert(&[], Validity::days(1)),
        Err(PkiError::NoServerNames)
    ));
    for name in ["", "bad name", "under_score..x", "-x.example"] {
        match ca.server_cert(&names(&["localhost", name]), Validity::days(1)) {
            Err(PkiError::InvalidServerName { name: n }) => assert_eq!(n, name),
            other => panic!("{name:?}: expected InvalidServerName, got {other:?}"),
        }
    }
    let backwards = Validity {
        not_before: Validity::days(1).not_after,
        not_after: Validity::days(1).not_before,
    };
    assert!(matches!(
        ca.client_cert("edge", backwards),
        Err(PkiError::InvalidValidity { .. })
    ));
    assert!(matches!(
        pki::generate_ca("x", backwards),
        Err(PkiError::InvalidValidity { .. })
    ));
    assert!(matches!(
        pki::generate_ca("", Validity::days(1)),
        Err(PkiError::EmptyCommonName)
    ));
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn write_bundle_writes_the_documented_layout() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("certs");
    let bundle = pki::write_bundle(
        &root,
        &ca,
        &names(&["localhost", "127.0.0.1"]),
        &names(&["c1", "c2"]),
        Validity::days(1),
    )
    .unwrap();
    assert_eq!(bundle.dir, root);
    assert_eq!(bundle.ca_cert, root.join("ca.pem"));
    assert_eq!(bundle.ca_key, root.join("ca.key"));
    assert_eq!(bundle.server_cert, root.join("server.pem"));
    assert_eq!(bundle.server_key, root.join("server.key"));
    assert_eq!(bundle.clients.len(), 2);
    assert_eq!(bundle.clients[1].id, "c2");
    assert_eq!(bundle.clients[1].cert, root.join("clients/c2.pem"));
    assert_eq!(bundle.clients[1].key, root.join("clients/c2.key"));
    assert_eq!(
        std::fs::read_to_string(&bundle.ca_cert).unwrap(),
        ca.cert_pem()
    );
    #[cfg(unix)]
    {
        for key in [&bundle.ca_key, &bundle.server_key, &bundle.clients[0].key] {
            assert_eq!(mode(key), 0o600, "{}", key.display());
        }
        for cert in [
            &bundle.ca_cert,
            &bundle.server_cert,
            &bundle.clients[0].cert,
        ] {
            assert_eq!(mode(cert), 0o644, "{}", cert.display());
        }
    }
    let mut listing: Vec<String> = walk(&root)
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    listing.sort();
    assert_eq!(
        listing,
        [
            "ca.key",
            "ca.pem",
            "clients/c1.key",
            "clients/c1.pem",
            "clients/c2.key",
            "clients/c2.pem",
            "server.key",
            "server.pem"
        ]
    );

    // The files make valid configurations for both sides.
    tls::server_tls_config(&bundle.server_tls_files()).unwrap();
    tls::client_tls_config(&bundle.client_tls_files("c1", "localhost").unwrap()).unwrap();
    assert!(bundle.client_tls_files("nobody", "localhost").is_none());

    // Never overwrites, and checks before writing anything.
    let again = pki::write_bundle(
        &root,
        &ca,
        &names(&["localhost"]),
        &names(&["c3"]),
        Validity::days(1),
    );
    match again {
        Err(PkiError::AlreadyExists { path }) => assert_eq!(path, root.join("ca.pem")),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert!(!root.join("clients/c3.pem").exists());
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn write_bundle_rejects_bad_ids_before_writing() {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("certs");
    let dup = pki::write_bundle(
        &root,
        &ca,
        &names(&["localhost"]),
        &names(&["a", "b", "a"]),
        Validity::days(1),
    );
    assert!(matches!(dup, Err(PkiError::DuplicateClientId(id)) if id == "a"));
    let bad = pki::write_bundle(
        &root,
        &ca,
        &names(&["localhost"]),
        &names(&["ok", "../escape"]),
        Validity::days(1),
    );
    assert!(matches!(bad, Err(PkiError::InvalidClientId(_))));
    assert!(!root.exists());
}

#[test]
fn ca_round_trips_through_pem_and_rejects_mismatched_keys() {
    let ca = ca();
    let loaded = CertificateAuthority::from_pem(ca.pem()).unwrap();
    assert_eq!(loaded.common_name(), ca.common_name());
    assert_eq!(loaded.cert_pem(), ca.cert_pem());

    let other = pki::generate_ca("other", Validity::days(1)).unwrap();
    let mixed = Pem {
        cert: ca.pem().cert.clone(),
        key: other.pem().key.clone(),
    };
    let err = CertificateAuthority::from_pem(&mixed).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    let leaf = ca.client_cert("edge", Validity::days(1)).unwrap();
    let err = CertificateAuthority::from_pem(&leaf).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let err =
        CertificateAuthority::from_files(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
            .unwrap_err();
    assert!(
        matches!(&err, PkiError::Io { path, .. } if path.ends_with("ca.pem")),
        "{err}"
    );
}

// ---------------------------------------------------------------- tls configuration errors

struct Files {
    dir: tempfile::TempDir,
    server: ServerTlsFiles,
    client: ClientTlsFiles,
}

/// A valid server and client file set, with extra files to swap in.
fn files() -> (Files, CertificateAuthority) {
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let bundle = pki::write_bundle(
        dir.path(),
        &ca,
        &names(&["localhost"]),
        &names(&["edge"]),
        Validity::days(1),
    )
    .unwrap();
    let files = Files {
        server: bundle.server_tls_files(),
        client: bundle.client_tls_files("edge", "localhost").unwrap(),
        dir,
    };
    (files, ca)
}

fn write(files: &Files, name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path = files.dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn valid_files_give_configs() {
    let (f, _) = files();
    tls::server_tls_config(&f.server).unwrap();
    tls::client_tls_config(&f.client).unwrap();
}

#[test]
fn missing_file_is_named() {
    let (f, _) = files();
    let mut server = f.server.clone();
    server.key = f.dir.path().join("nope.key");
    match tls::server_tls_config(&server) {
        Err(e @ TlsError::MissingFile { .. }) => {
            assert!(e.to_string().contains("nope.key"), "{e}");
            assert!(e.to_string().contains("server private key"), "{e}");
        }
        other => panic!("expected MissingFile, got {other:?}"),
    }
    let mut client = f.client.clone();
    client.ca = f.dir.path().join("absent-ca.pem");
    assert!(matches!(
        tls::client_tls_config(&client),
        Err(TlsError::MissingFile { what: "CA", .. })
    ));
}

#[test]
fn non_pem_files_are_typed_errors() {
    let (f, _) = files();
    let garbage = write(
        &f,
        "garbage.pem",
        b"\x30\x82\x01\x0a this is DER-ish garbage",
    );
    let mut server = f.server.clone();
    server.cert = garbage.clone();
    match tls::server_tls_config(&server) {
        Err(e @ TlsError::NotPem { .. }) => assert!(e.to_string().contains("garbage.pem"), "{e}"),
        other => panic!("expected NotPem, got {other:?}"),
    }
    let broken = write(
        &f,
        "broken.pem",
        b"-----BEGIN CERTIFICATE-----\nMIIB!!!notbase64\n-----END CERTIFICATE-----\n",
    );
    server.cert = broken;
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::NotPem { .. })
    ));
    let truncated = write(&f, "truncated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
    server.cert = truncated;
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::NotPem { .. })
    ));
    let not_x509 = write(
        &f,
        "notx509.pem",
        b"-----BEGIN CERTIFICATE-----\nAAECAwQF\n-----END CERTIFICATE-----\n",
    );
    server.cert = not_x509;
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::InvalidCertificate { .. })
    ));
}

#[test]
fn swapped_cert_and_key_files_are_typed_errors() {
    let (f, _) = files();
    let mut server = f.server.clone();
    server.cert = f.server.key.clone();
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::NoCertificate {
            what: "server certificate",
            ..
        })
    ));
    let mut server = f.server.clone();
    server.key = f.server.cert.clone();
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::NoPrivateKey {
            what: "server private key",
            ..
        })
    ));
    let two_keys = std::fs::read_to_string(&f.server.key).unwrap().repeat(2);
    let mut server = f.server.clone();
    server.key = write(&f, "two.key", two_keys.as_bytes());
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::MultiplePrivateKeys { count: 2, .. })
    ));
}

#[test]
fn key_not_matching_certificate_is_a_typed_error() {
    let (f, _) = files();
    let mut server = f.server.clone();
    server.key = f.client.key.clone();
    match tls::server_tls_config(&server) {
        Err(e @ TlsError::KeyMismatch { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("edge.key") && text.contains("server.pem"),
                "{text}"
            );
        }
        other => panic!("expected KeyMismatch, got {other:?}"),
    }
    let mut client = f.client.clone();
    client.key = f.server.key.clone();
    assert!(matches!(
        tls::client_tls_config(&client),
        Err(TlsError::KeyMismatch { .. })
    ));
}

#[test]
fn leaf_given_as_ca_is_a_typed_error() {
    let (f, _) = files();
    let mut server = f.server.clone();
    server.client_ca = f.client.cert.clone();
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::NotACa {
            what: "client CA",
            ..
        })
    ));
    let mut client = f.client.clone();
    client.ca = f.server.cert.clone();
    assert!(matches!(
        tls::client_tls_config(&client),
        Err(TlsError::NotACa { what: "CA", .. })
    ));
}

#[test]
fn certificates_for_the_wrong_side_are_typed_errors() {
    let (f, _) = files();
    let server = ServerTlsFiles {
        cert: f.client.cert.clone(),
        key: f.client.key.clone(),
        client_ca: f.server.client_ca.clone(),
    };
    assert!(matches!(
        tls::server_tls_config(&server),
        Err(TlsError::WrongKeyUsage {
            side: "server",
            usage: "serverAuth",
            ..
        })
    ));
    let client = ClientTlsFiles {
        cert: f.server.cert.clone(),
        key: f.server.key.clone(),
        ..f.client.clone()
    };
    assert!(matches!(
        tls::client_tls_config(&client),
        Err(TlsError::WrongKeyUsage {
            side: "client",
            usage: "clientAuth",
            ..
        })
    ));
}

#[test]
fn invalid_server_name_is_a_typed_error() {
    let (f, _) = files();
    let client = ClientTlsFiles {
        server_name: "not a host".to_owned(),
        ..f.client.clone()
    };
    assert!(matches!(
        tls::client_tls_config(&client),
        Err(TlsError::InvalidServerName { .. })
    ));
}

#[test]
fn from_pem_variants_report_in_memory_origin() {
    let ca = ca();
    let server = ca
        .server_cert(&names(&["localhost"]), Validity::days(1))
        .unwrap();
    let client = ca.client_cert("edge", Validity::days(1)).unwrap();
    tls::server_tls_config_from_pem(&server, ca.cert_pem()).unwrap();
    tls::client_tls_config_from_pem(ca.cert_pem(), &client, "localhost").unwrap();
    let swapped = Pem {
        cert: server.cert.clone(),
        key: client.key.clone(),
    };
    let err = tls::server_tls_config_from_pem(&swapped, ca.cert_pem()).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }));
    assert!(err.to_string().contains("in-memory PEM"), "{err}");
    // Expired certificates are accepted at configuration time: the peer refuses them.
    let expired = ca.client_cert("edge", Validity::expired()).unwrap();
    tls::client_tls_config_from_pem(ca.cert_pem(), &expired, "localhost").unwrap();
}

// ---------------------------------------------------------------- client identity

fn leaf_with(
    ca_key: &rcgen::KeyPair,
    ca_params: &rcgen::CertificateParams,
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> CertificateDer<'static> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    edit(&mut params);
    let key = rcgen::KeyPair::generate().unwrap();
    let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
    params.signed_by(&key, &issuer).unwrap().der().clone()
}

#[test]
fn client_id_extraction_errors_are_typed() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);

    assert!(matches!(
        tls::client_id_from_certs(&[]),
        Err(TlsError::NoPeerCertificate)
    ));

    let no_cn = leaf_with(&ca_key, &ca_params, |_| {});
    assert!(matches!(
        tls::client_id_from_certs(&[no_cn]),
        Err(TlsError::MissingCommonName)
    ));

    // rcgen keeps one value per attribute type: add the second CN under the same OID as a
    // "custom" type.
    let two_cn = leaf_with(&ca_key, &ca_params, |p| {
        p.distinguished_name.push(rcgen::DnType::CommonName, "a");
        p.distinguished_name
            .push(rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]), "b");
    });
    assert!(matches!(
        tls::client_id_from_certs(&[two_cn]),
        Err(TlsError::MultipleCommonNames { count: 2 })
    ));

    let bad_cn = leaf_with(&ca_key, &ca_params, |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "edge 01/../x");
    });
    assert!(matches!(
        tls::client_id_from_certs(&[bad_cn]),
        Err(TlsError::InvalidClientId(_))
    ));

    let mismatch = leaf_with(&ca_key, &ca_params, |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "urn:fedtiny:client:bob".try_into().unwrap(),
        )];
    });
    assert!(matches!(
        tls::client_id_from_certs(&[mismatch]),
        Err(TlsError::IdentityMismatch { .. })
    ));

    // A certificate without fedtiny's URI SAN is identified by its CN alone.
    let cn_only = leaf_with(&ca_key, &ca_params, |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "carol");
    });
    assert_eq!(tls::client_id_from_certs(&[cn_only]).unwrap(), "carol");

    let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
    assert!(matches!(
        tls::client_id_from_certs(&[garbage]),
        Err(TlsError::InvalidCertificate { .. })
    ));
}

#[test]
fn client_id_from_request_without_tls_is_no_peer_certificate() {
    let request = tonic::Request::new(());
    assert!(matches!(
        tls::client_id_from_request(&request),
        Err(TlsError::NoPeerCertificate)
    ));
    let status = tls::authenticate(&request).unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
}

#[test]
fn install_crypto_provider_is_idempotent() {
    tls::install_crypto_provider();
    tls::install_crypto_provider();
    assert!(rustls::crypto::CryptoProvider::get_default().is_some());
}
