//! gRPC over TLS with a certificate that can be replaced while serving.
//!
//! Certificates are renewed (cert-manager, an ACME client) long before a
//! restart is due, so `[server.tls]`'s files are read again on reload
//! (SIGHUP, or the poll that watches the config file) and every handshake
//! from then on uses the new ones; connections already open keep theirs. A
//! set of files that rustls refuses (a half-written file, a key that does
//! not match) is rejected with one log line and the one in force stays.
//!
//! tonic's own TLS settings are fixed once the server starts, so the
//! handshakes happen here: each accepted connection gets its own task,
//! bounded by [`HANDSHAKE_TIMEOUT`], and only finished handshakes reach the
//! server, so a slow or silent client holds up nobody else.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::{Stream, wrappers::ReceiverStream};

use crate::config::ServerTls;

/// How long a client may take over its TLS handshake; a stalled one must not
/// hold a connection slot for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Finished handshakes waiting for the server to take them.
const HANDED_OVER_BACKLOG: usize = 128;

/// Why a set of TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file that `[server.tls]` names could not be read.
    #[error("{key}: cannot read {path:?}: {source}")]
    File {
        /// The config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// rustls refused the certificate, the key or the client CA.
    #[error("server.tls: the certificate, key or client CA is not usable: {0}")]
    Unusable(String),
}

/// The files' contents, to tell a change from a poll that found none.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pems {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

/// The TLS config in force and where it comes from.
pub struct ReloadableTls {
    files: ServerTls,
    acceptor: ArcSwap<TlsAcceptor>,
    /// What the acceptor in force was made from.
    loaded: Mutex<Pems>,
}

impl std::fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key's bytes are a secret; the paths say enough.
        f.debug_struct("ReloadableTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableTls {
    /// Reads `files` and checks that rustls takes them: a key that does not
    /// parse or does not match the certificate fails here, before anything
    /// listens.
    pub fn load(files: &ServerTls) -> Result<Self, TlsError> {
        let pems = read(files)?;
        let acceptor = acceptor(&pems)?;
        Ok(Self {
            files: files.clone(),
            acceptor: ArcSwap::from_pointee(acceptor),
            loaded: Mutex::new(pems),
        })
    }

    /// Reads the files again and, if they changed and rustls takes them,
    /// puts them in force for every handshake from now on. `Ok(false)`: the
    /// files are as they were. On an error the config in force stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let pems = read(&self.files)?;
        // A poisoned lock only means a panic elsewhere mid-compare; the
        // bytes it holds are whole.
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *loaded == pems {
            return Ok(false);
        }
        let acceptor = acceptor(&pems)?;
        self.acceptor.store(Arc::new(acceptor));
        *loaded = pems;
        Ok(true)
    }

    /// Connections from `listener` with their TLS handshakes done, for
    /// `serve_with_incoming`. Ends when the receiving side is dropped.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + use<> {
        let (handed_over, receiver) = mpsc::channel(HANDED_OVER_BACKLOG);
        tokio::spawn(accept(listener, Arc::clone(self), handed_over));
        ReceiverStream::new(receiver)
    }
}

/// Accepts connections until the server stops taking them, and hands each
/// to a handshake task of its own.
async fn accept(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    handed_over: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = handed_over.closed() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(err) => {
                // Out of file descriptors, say: wait rather than spin, and
                // keep serving the connections already open.
                tracing::warn!(error = %err, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // An answer is one small frame; Nagle would hold it for the
        // client's delayed ACK (~40 ms).
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let acceptor = tls.acceptor.load_full();
        let handed_over = handed_over.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    // Fails only when the server has stopped taking them.
                    let _ = handed_over.send(Ok(stream)).await;
                }
                Ok(Err(err)) => tracing::debug!(error = %err, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            }
        });
    }
}

fn read(files: &ServerTls) -> Result<Pems, TlsError> {
    let read = |key: &'static str, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::File {
            key,
            path: path.to_owned(),
            source,
        })
    };
    Ok(Pems {
        cert: read("server.tls.cert", &files.cert)?,
        key: read("server.tls.key", &files.key)?,
        client_ca: match &files.client_ca {
            None => None,
            Some(path) => Some(read("server.tls.client_ca", path)?),
        },
    })
}

/// rustls's server config from PEM: HTTP/2 only (gRPC), and with a client
/// CA, mutual TLS: a client without a certificate it signed is refused.
fn acceptor(pems: &Pems) -> Result<TlsAcceptor, TlsError> {
    let unusable =
        |what: &str, err: &dyn std::fmt::Display| TlsError::Unusable(format!("{what}: {err}"));
    let certs = CertificateDer::pem_slice_iter(&pems.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| unusable("the certificate", &err))?;
    let key = PrivateKeyDer::from_pem_slice(&pems.key).map_err(|err| unusable("the key", &err))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| unusable("the protocol versions", &err))?;
    let builder = match &pems.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|err| unusable("the client CA", &err))?;
                roots
                    .add(cert)
                    .map_err(|err| unusable("the client CA", &err))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| unusable("the client CA", &err))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|err| unusable("the certificate and key", &err))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
