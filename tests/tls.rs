//! gRPC over TLS and mutual TLS, with throwaway certificates made at run
//! time; certificates replaced while serving (in process, and through the
//! binary on SIGHUP); the request size limit; `[server.tls]` config errors;
//! and `tollgate health` over TLS.
//!
//! Servers run in-process on loopback ports, configured the way `tollgate
//! serve` configures them: [`ServeOptions::from_settings`] on a loaded config.

// The helpers' `pub` items are for the test crates that use them, not for
// export.
#[allow(unreachable_pub)]
mod common;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use common::{
    binary::Tollgate,
    certs::{self, CertFiles, Pki},
    server::{Backend, StoreKind},
};
use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{RateLimitRequest, rate_limit_service_client::RateLimitServiceClient},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tollgate::{
    config::{self, Config, Overrides},
    limiter::Limiter,
    proto::{CheckLimitRequest, CheckLimitResponse, rate_limiter_client::RateLimiterClient},
    server::{self, DEFAULT_MAX_REQUEST_BYTES, ServeOptions, ServerError},
    store::memory::MemoryStore,
    tls::{ReloadableTls, TlsError},
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

/// Bounds every connect and call, so that a hung handshake fails the test.
const DEADLINE: Duration = Duration::from_secs(5);

/// The shipped config's text, which every config here builds on.
fn shipped_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
    std::fs::read_to_string(path).expect("config/tollgate.toml ships with the crate")
}

/// The shipped config with this `[server.tls]` table.
fn config_with_tls(tls_table: &str) -> Config {
    let text = format!("{}\n[server.tls]\n{tls_table}\n", shipped_text());
    config::load_str(&text, "test").expect("the test's TLS config is valid")
}

/// TOML for a path (no escapes needed in temporary paths, but quoted safely).
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// `cert` and `key` for the server; `client_ca` when given.
fn tls_table(server: &CertFiles, client_ca: Option<&Path>) -> String {
    let mut table = format!(
        "cert = {}\nkey = {}\n",
        toml_path(&server.cert),
        toml_path(&server.key)
    );
    if let Some(ca) = client_ca {
        table.push_str(&format!("client_ca = {}\n", toml_path(ca)));
    }
    table
}

/// A tollgate on a loopback port with the memory store, served as `config`
/// says; stopped when dropped.
struct Served {
    addr: SocketAddr,
    /// The TLS files in force, to reload.
    tls: Option<Arc<ReloadableTls>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl Served {
    async fn start(config: &Config) -> Self {
        let options = ServeOptions::from_settings(&config.settings)
            .expect("the PEM files the config names are readable");
        let tls = options.tls.clone();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let limiter = Arc::new(Limiter::new(
            MemoryStore::new(),
            Arc::new(config.policy.clone()),
        ));
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run_with(
            limiter,
            listener,
            async {
                let _ = stop.await;
            },
            options,
        ));
        Self {
            addr,
            tls,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Stops the server and asserts it stopped cleanly.
    async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let task = self.task.take().expect("a running server has a task");
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("the server stops in time")
            .expect("the server task does not panic")
            .expect("the server stops without error");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Trusts `ca`; presents `identity` when given.
fn client_tls(ca: &Path, identity: Option<&CertFiles>) -> ClientTlsConfig {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(certs::read(ca)));
    match identity {
        Some(files) => tls.identity(Identity::from_pem(
            certs::read(&files.cert),
            certs::read(&files.key),
        )),
        None => tls,
    }
}

fn request(subject: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: "api".to_owned(),
        subject: subject.to_owned(),
        tier: String::new(),
        cost: 1,
        ..CheckLimitRequest::default()
    }
}

/// Connects to `url` (with `tls`, if any) and calls CheckLimit once; any
/// failure, of the connect, the handshake or the call, as text.
async fn check_limit(
    url: String,
    tls: Option<ClientTlsConfig>,
) -> Result<CheckLimitResponse, String> {
    let attempt = async {
        let mut endpoint = Channel::from_shared(url.clone())
            .map_err(|err| err.to_string())?
            .connect_timeout(DEADLINE);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|err| err.to_string())?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("connect: {err:?}"))?;
        RateLimiterClient::new(channel)
            .check_limit(request("tls-test"))
            .await
            .map(|response| response.into_inner())
            .map_err(|status| format!("call: {status:?}"))
    };
    tokio::time::timeout(DEADLINE, attempt)
        .await
        .unwrap_or_else(|_| panic!("{url}: neither an answer nor a refusal within {DEADLINE:?}"))
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

fn http(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

// ---- (a) TLS ------------------------------------------------------------

#[tokio::test]
async fn tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext() {
    let pki = Pki::new();
    let served = Served::start(&config_with_tls(&tls_table(&pki.server, None))).await;

    // By IP address and by name: the certificate holds both.
    for url in [
        https(served.addr),
        format!("https://localhost:{}", served.addr.port()),
    ] {
        let response = check_limit(url.clone(), Some(client_tls(&pki.ca, None)))
            .await
            .unwrap_or_else(|err| panic!("{url}: {err}"));
        assert!(response.allowed, "{response:?}");
        assert_eq!(response.limit, 100, "{response:?}");
    }

    let plaintext = check_limit(http(served.addr), None).await;
    assert!(plaintext.is_err(), "plaintext was served: {plaintext:?}");

    // A client that trusts another CA refuses the server.
    let distrust = check_limit(https(served.addr), Some(client_tls(&pki.other_ca, None))).await;
    assert!(
        distrust
            .as_ref()
            .is_err_and(|e| e.contains("UnknownIssuer")),
        "{distrust:?}"
    );

    // Refusals leave the server serving.
    check_limit(https(served.addr), Some(client_tls(&pki.ca, None)))
        .await
        .expect("still serving after refusals");
    served.stop().await;
}

// ---- Certificates replaced while serving --------------------------------

/// Copies `from`'s certificate and key over the files `to` names, as a
/// certificate renewal does.
fn install(from: &CertFiles, to: &CertFiles) {
    for (source, target) in [(&from.cert, &to.cert), (&from.key, &to.key)] {
        std::fs::copy(source, target).expect("copy a PEM file");
    }
}

/// Files of the server's own, in `dir`, holding `pki.server` to begin with.
fn live_files(dir: &Path, pki: &Pki) -> CertFiles {
    let live = CertFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    install(&pki.server, &live);
    live
}

#[tokio::test]
async fn a_renewed_certificate_serves_new_connections_and_a_broken_one_is_refused() {
    let (old, new) = (Pki::new(), Pki::new());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let live = live_files(dir.path(), &old);
    let served = Served::start(&config_with_tls(&tls_table(&live, None))).await;
    let tls = served.tls.clone().expect("the server serves TLS");
    let trusting = |pki: &Pki| Some(client_tls(&pki.ca, None));

    check_limit(https(served.addr), trusting(&old))
        .await
        .expect("the first certificate serves");
    // A connection opened now, and kept, is not cut by the renewal.
    let kept = Channel::from_shared(https(served.addr))
        .expect("a valid URL")
        .tls_config(client_tls(&old.ca, None))
        .expect("a valid TLS config")
        .connect()
        .await
        .expect("a connection under the first certificate");
    assert!(
        !tls.reload().expect("unchanged files reload"),
        "nothing changed yet"
    );

    install(&new.server, &live);
    assert!(
        tls.reload().expect("the renewed files load"),
        "the files changed"
    );
    check_limit(https(served.addr), trusting(&new))
        .await
        .expect("new connections get the renewed certificate");
    let old_trust = check_limit(https(served.addr), trusting(&old)).await;
    // Both test CAs have the same name: the old trust finds the issuer by
    // name, and the signature fails.
    assert!(
        old_trust
            .as_ref()
            .is_err_and(|e| e.contains("InvalidCertificate")),
        "the first certificate is gone: {old_trust:?}"
    );
    RateLimiterClient::new(kept)
        .check_limit(request("kept"))
        .await
        .expect("the connection opened before the renewal still serves");

    // A half-written key: refused, and the renewed certificate stays.
    std::fs::write(&live.key, "-----BEGIN PRIVATE KEY-----\ntrunc").expect("write");
    let refused = tls.reload().expect_err("a broken key is refused");
    assert!(matches!(refused, TlsError::Unusable(_)), "{refused:?}");
    assert!(
        refused
            .to_string()
            .starts_with("server.tls: the certificate, key or client CA is not usable: the key"),
        "{refused}"
    );
    check_limit(https(served.addr), trusting(&new))
        .await
        .expect("still serving the renewed certificate");
    served.stop().await;
}

/// The binary re-reads `[server.tls]` on SIGHUP: after a renewal, a client
/// that trusts only the new CA is served, and the log says so.
#[tokio::test]
async fn the_binary_takes_a_renewed_certificate_on_sighup() {
    let (old, new) = (Pki::new(), Pki::new());
    let dir = tempfile::tempdir().expect("a temporary directory");
    let live = live_files(dir.path(), &old);
    let listen = common::redis_server::free_port();
    let config = format!(
        "{}\n[server.tls]\n{}",
        shipped_text().replacen(
            "listen = \"127.0.0.1:50051\"",
            &format!("listen = \"127.0.0.1:{listen}\""),
            1
        ),
        tls_table(&live, None)
    );
    let config_path = dir.path().join("tollgate.toml");
    std::fs::write(&config_path, config).expect("write the config");
    let mut tollgate = Tollgate::spawn(
        &["serve", "--config", &config_path.display().to_string()],
        &[],
    );
    let url = format!("https://127.0.0.1:{listen}");
    let served_under = |pki: &Pki| check_limit(url.clone(), Some(client_tls(&pki.ca, None)));

    let deadline = tokio::time::Instant::now() + DEADLINE;
    while served_under(&old).await.is_err() {
        assert!(tollgate.exited().is_none(), "{}", tollgate.output());
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served: {}",
            tollgate.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    install(&new.server, &live);
    tollgate.signal("-HUP");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while let Err(err) = served_under(&new).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the renewed certificate was not taken: {err}\n{}",
            tollgate.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served_under(&old).await.is_err(),
        "the first certificate is gone"
    );
    tollgate.stop(DEADLINE);
    let output = tollgate.output();
    assert!(output.contains("TLS files reloaded"), "{output}");
    assert!(!output.contains("PRIVATE KEY"), "a key leaked: {output}");
}

// ---- (b) mutual TLS -------------------------------------------------------

#[tokio::test]
async fn mutual_tls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let pki = Pki::new();
    let config = config_with_tls(&tls_table(&pki.server, Some(&pki.ca)));
    let served = Served::start(&config).await;

    let admitted = check_limit(
        https(served.addr),
        Some(client_tls(&pki.ca, Some(&pki.client))),
    )
    .await
    .expect("a client with a certificate from the client CA is served");
    assert!(admitted.allowed, "{admitted:?}");

    let anonymous = check_limit(https(served.addr), Some(client_tls(&pki.ca, None))).await;
    // rustls's alerts say why: no certificate, or one from an unknown CA.
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRequired")),
        "a client without a certificate was served: {anonymous:?}"
    );

    let stranger = check_limit(
        https(served.addr),
        Some(client_tls(&pki.ca, Some(&pki.other_client))),
    )
    .await;
    assert!(
        stranger.as_ref().is_err_and(|e| e.contains("UnknownCA")),
        "a client with a certificate from an unrelated CA was served: {stranger:?}"
    );

    let plaintext = check_limit(http(served.addr), None).await;
    assert!(plaintext.is_err(), "{plaintext:?}");

    // The refused handshakes did not stop the server.
    let again = check_limit(
        https(served.addr),
        Some(client_tls(&pki.ca, Some(&pki.client))),
    )
    .await
    .expect("still serving after refusals");
    assert_eq!(again.remaining, admitted.remaining - 1, "{again:?}");
    served.stop().await;
}

// ---- (c) request size -------------------------------------------------------

#[tokio::test]
async fn an_oversized_request_is_resource_exhausted_and_the_server_keeps_serving() {
    let backend = Backend::new(StoreKind::Memory);
    let server = backend.serve_shipped().await;
    let huge = "x".repeat(1024 * 1024);

    let status = server
        .check(request(&huge))
        .await
        .expect_err("a 1 MiB CheckLimit is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        status.message(),
        format!("the request is larger than {DEFAULT_MAX_REQUEST_BYTES} bytes")
    );

    // The Envoy door has the same limit.
    let mut envoy = RateLimitServiceClient::connect(http(server.addr))
        .await
        .expect("connect the Envoy client");
    let status = envoy
        .should_rate_limit(RateLimitRequest {
            domain: "tollgate".to_owned(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "user_id".to_owned(),
                    value: huge.clone(),
                }],
                ..RateLimitDescriptor::default()
            }],
            hits_addend: 1,
        })
        .await
        .expect_err("a 1 MiB ShouldRateLimit is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // The same connection still serves; so do the limits of what fits.
    let response = server
        .check(request("after-the-big-one"))
        .await
        .expect("a normal request after the refusal is served");
    assert!(response.allowed, "{response:?}");
    let status = server
        .check(request(&"y".repeat(300)))
        .await
        .expect_err("a subject over 256 bytes but under the size limit");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    server.stop().await;
}

// ---- (d) config errors --------------------------------------------------------

/// Loads `text` from a file, as `tollgate serve` does; the file's path and
/// the error message, or the config.
fn load_text(text: &str) -> (String, Result<Config, String>) {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("a temporary config file");
    std::io::Write::write_all(&mut file, text.as_bytes()).expect("write the config");
    let path = file.path().display().to_string();
    let loaded = config::load_file(file.path(), &Overrides::default()).map_err(|e| e.to_string());
    (path, loaded)
}

#[test]
fn tls_config_errors_name_the_file_and_the_key() {
    let pki = Pki::new();
    let cert = toml_path(&pki.server.cert);
    let key = toml_path(&pki.server.key);
    let with_tls = |table: String| format!("{}\n[server.tls]\n{table}\n", shipped_text());
    let with_store = |url: &str, tls_ca: &str| {
        shipped_text().replacen(
            "url = \"memory://\"",
            &format!("url = \"{url}\"\ntls_ca = {tls_ca}"),
            1,
        )
    };
    let with_store_client = |url: &str, cert: Option<&str>, key: Option<&str>| {
        let mut table = format!("url = \"{url}\"");
        if let Some(cert) = cert {
            table.push_str(&format!("\ntls_cert = {cert}"));
        }
        if let Some(key) = key {
            table.push_str(&format!("\ntls_key = {key}"));
        }
        shipped_text().replacen("url = \"memory://\"", &table, 1)
    };
    let missing = "No such file or directory";
    let cases: Vec<(String, &str, String)> = vec![
        (
            with_tls(format!("cert = {cert}")),
            "server.tls.key",
            "required with server.tls.cert: the certificate's private key (PEM)".to_owned(),
        ),
        (
            with_tls(format!("key = {key}")),
            "server.tls.cert",
            "required in [server.tls]: the server's certificate chain (PEM)".to_owned(),
        ),
        (
            with_tls(format!("cert = {cert}\nkey = \"/nope.pem\"")),
            "server.tls.key",
            format!("cannot read \"/nope.pem\": {missing}"),
        ),
        (
            with_tls(format!("cert = \"/nope.pem\"\nkey = {key}")),
            "server.tls.cert",
            format!("cannot read \"/nope.pem\": {missing}"),
        ),
        (
            with_tls(format!(
                "cert = {cert}\nkey = {key}\nclient_ca = \"/nope-ca.pem\""
            )),
            "server.tls.client_ca",
            format!("cannot read \"/nope-ca.pem\": {missing}"),
        ),
        (
            // The key where the certificate belongs.
            with_tls(format!("cert = {key}\nkey = {key}")),
            "server.tls.cert",
            format!("{key} does not hold a PEM certificate (-----BEGIN CERTIFICATE-----)"),
        ),
        (
            with_tls(format!("cert = {cert}\nkey = {cert}")),
            "server.tls.key",
            format!("{cert} does not hold a PEM private key (-----BEGIN PRIVATE KEY-----)"),
        ),
        (
            with_tls(format!(
                "cert = {cert}\nkey = {key}\nclient_certificate = {cert}"
            )),
            "server.tls.client_certificate",
            "unknown key; expected one of `cert`, `key`, `client_ca`".to_owned(),
        ),
        (
            with_store("redis://127.0.0.1:6379/0", &cert),
            "store.tls_ca",
            "applies only to a TLS store URL (rediss:// or rediss-cluster://)".to_owned(),
        ),
        (
            with_store("rediss://127.0.0.1:6379/0", "\"/nope.pem\""),
            "store.tls_ca",
            format!("cannot read \"/nope.pem\": {missing}"),
        ),
        (
            with_store_client("rediss://127.0.0.1:6379/0", Some(&cert), None),
            "store.tls_key",
            "required with store.tls_cert: the certificate's private key".to_owned(),
        ),
        (
            with_store_client("rediss://127.0.0.1:6379/0", None, Some(&key)),
            "store.tls_cert",
            "required with store.tls_key: the key's certificate".to_owned(),
        ),
        (
            with_store_client("redis://127.0.0.1:6379/0", Some(&cert), Some(&key)),
            "store.tls_cert",
            "applies only to a TLS store URL (rediss:// or rediss-cluster://)".to_owned(),
        ),
        (
            // The certificate where the key belongs.
            with_store_client("rediss://127.0.0.1:6379/0", Some(&cert), Some(&cert)),
            "store.tls_key",
            format!("{cert} does not hold a PEM private key (-----BEGIN PRIVATE KEY-----)"),
        ),
    ];
    for (text, key_name, problem) in cases {
        let (path, loaded) = load_text(&text);
        let err = loaded
            .err()
            .unwrap_or_else(|| panic!("loaded, but broken: {key_name}: {problem}"));
        assert_eq!(err, format!("{path}: {key_name}: {problem}"));
    }
}

#[test]
fn a_valid_tls_table_loads_into_settings() {
    let pki = Pki::new();
    let config = config_with_tls(&tls_table(&pki.server, Some(&pki.ca)));
    let tls = config.settings.tls.expect("[server.tls] loads");
    assert_eq!(tls.cert, pki.server.cert);
    assert_eq!(tls.key, pki.server.key);
    assert_eq!(tls.client_ca.as_deref(), Some(pki.ca.as_path()));
    // The shipped config serves plaintext.
    let shipped = config::load_str(&shipped_text(), "shipped").expect("the shipped config loads");
    assert_eq!(shipped.settings.tls, None);
}

#[test]
fn a_key_that_does_not_match_the_certificate_stops_start_up() {
    let pki = Pki::new();
    let mismatched = CertFiles {
        cert: pki.server.cert.clone(),
        key: pki.client.key.clone(),
    };
    // Both are PEM of the right kind, so the config loads; rustls refuses
    // the pair before anything listens.
    let config = config_with_tls(&tls_table(&mismatched, None));
    let err = ServeOptions::from_settings(&config.settings)
        .expect_err("a key that does not match the certificate");
    let message = err.to_string();
    assert!(
        message.starts_with("server.tls: the certificate, key or client CA is not usable: "),
        "{message}"
    );
    assert!(message.contains("KeyMismatch"), "says why: {message}");
}

// ---- tollgate health over TLS -------------------------------------------------

/// Runs `tollgate health` with `args` and the environment variables `env`
/// (no others that start with `TOLLGATE_`); its success and output.
async fn health_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    command
        .arg("health")
        .args(args)
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("tollgate health ends within its deadline")
        .expect("tollgate health runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// Runs `tollgate health` with `args` alone.
async fn health(args: &[&str]) -> (bool, String) {
    health_with_env(args, &[]).await
}

#[tokio::test]
async fn health_checks_a_mutual_tls_server_with_ca_cert_and_key() {
    let pki = Pki::new();
    let served = Served::start(&config_with_tls(&tls_table(&pki.server, Some(&pki.ca)))).await;
    let path = |p: &Path| p.display().to_string();
    let (ca, cert, key) = (path(&pki.ca), path(&pki.client.cert), path(&pki.client.key));

    // `--ca` turns an http:// address into https://.
    let (ok, out) = health(&[
        "--addr",
        &http(served.addr),
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
    ])
    .await;
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "SERVING");

    // A certificate issued for a name checked at an address, by --domain.
    let (ok, out) = health(&[
        "--addr",
        &https(served.addr),
        "--ca",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "--domain",
        "localhost",
    ])
    .await;
    assert!(ok, "{out}");

    // The same from the environment, as a container's fixed HEALTHCHECK
    // (`--addr http://127.0.0.1:50051`) gets them.
    let (ok, out) = health_with_env(
        &["--addr", &http(served.addr)],
        &[
            ("TOLLGATE_HEALTH_CA", &ca),
            ("TOLLGATE_HEALTH_CERT", &cert),
            ("TOLLGATE_HEALTH_KEY", &key),
            ("TOLLGATE_HEALTH_DOMAIN", "localhost"),
        ],
    )
    .await;
    assert!(ok, "{out}");

    // No client certificate: refused, exit 1, one line.
    let (ok, out) = health(&["--addr", &https(served.addr), "--ca", &ca]).await;
    assert!(!ok, "{out}");
    assert!(out.starts_with("tollgate: "), "{out}");
    assert_eq!(out.trim().lines().count(), 1, "{out}");

    // Plaintext against a TLS server fails too.
    let (ok, out) = health(&["--addr", &http(served.addr)]).await;
    assert!(!ok, "{out}");

    // --cert without --key is a usage error.
    let (ok, out) = health(&["--addr", &https(served.addr), "--cert", &cert]).await;
    assert!(!ok && out.contains("--key"), "{out}");
    served.stop().await;
}
