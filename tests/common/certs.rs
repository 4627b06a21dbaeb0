//! Throwaway certificates, made at run time with rcgen and written as PEM
//! files to a temporary directory that lives as long as the [`Pki`].

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// Two unrelated CAs and the certificates they signed.
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA that tollgate's server and client certificates chain to.
    pub ca: PathBuf,
    /// A server certificate for 127.0.0.1 and localhost, signed by `ca`.
    pub server: CertFiles,
    /// A server certificate for the name localhost only (no IP address),
    /// signed by `ca`.
    pub localhost_only: CertFiles,
    /// A client certificate, signed by `ca`.
    pub client: CertFiles,
    /// A CA that nothing here trusts.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca`.
    pub other_client: CertFiles,
}

impl Pki {
    /// Makes every key and certificate afresh.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory for certificates");
        let (ca, ca_issuer) = make_ca(dir.path(), "ca", "tollgate test CA");
        let (other_ca, other_issuer) = make_ca(dir.path(), "other-ca", "unrelated test CA");
        let server = make_leaf(
            dir.path(),
            "server",
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca_issuer,
        );
        let localhost_only = make_leaf(
            dir.path(),
            "localhost-only",
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca_issuer,
        );
        let client = make_leaf(
            dir.path(),
            "client",
            &["client.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca_issuer,
        );
        let other_client = make_leaf(
            dir.path(),
            "other-client",
            &["client.test"],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_issuer,
        );
        Self {
            dir,
            ca,
            server,
            localhost_only,
            client,
            other_ca,
            other_client,
        }
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Reads a PEM file the [`Pki`] wrote.
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

fn make_ca(dir: &Path, name: &str, common_name: &str) -> (PathBuf, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("no names are valid");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("rcgen generates a key");
    let cert = params.self_signed(&key).expect("rcgen self-signs a CA");
    let path = dir.join(format!("{name}.pem"));
    write(&path, &cert.pem());
    (path, Issuer::new(params, key))
}

fn make_leaf(
    dir: &Path,
    name: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'_, KeyPair>,
) -> CertFiles {
    let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
    let mut params = CertificateParams::new(names).expect("valid subject names");
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("rcgen generates a key");
    let cert = params
        .signed_by(&key, issuer)
        .expect("rcgen signs a leaf certificate");
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    write(&files.cert, &cert.pem());
    write(&files.key, &key.serialize_pem());
    files
}

fn write(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap_or_else(|err| panic!("write {}: {err}", path.display()));
}
