//! Redis with a password and over TLS (`rediss://`), against real
//! `redis-server` processes: the service works through either, a wrong
//! password or an untrusted certificate fails start-up cleanly, and the
//! password appears in no error, no `Debug` output and no log line, even at
//! `RUST_LOG=trace`.
//!
//! A server that wants client certificates takes tollgate's
//! (`store.tls_cert`, `store.tls_key`) and refuses none or a foreign one.
//!
//! The last test runs the whole `tollgate` binary as an operator would: gRPC
//! over mutual TLS in front, `rediss://` with a password and a client
//! certificate behind, checked by `tollgate health` over TLS.

// The helpers' `pub` items are for the test crates that use them, not for
// export.
#[allow(unreachable_pub)]
mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::{
    binary::Tollgate,
    certs::{self, Pki},
    redis_server::{RedisServer, free_port},
    server::{TestServer, shipped_config},
};
use tollgate::{
    proto::{CheckLimitRequest, rate_limiter_client::RateLimiterClient},
    store::redis::{RedisOptions, RedisStore, RedisTls},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const PASSWORD: &str = "s3cret";
/// Long enough for a debug build to start, short enough to fail fast.
const DEADLINE: Duration = Duration::from_secs(5);

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: "auth:".to_owned(),
        // Generous: a TLS handshake in a debug build on a busy machine.
        timeout: Duration::from_secs(2),
        pool_size: 2,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    }
}

/// [`options`] for a connection that must fail: the pool keeps retrying a
/// refused connection until the timeout, so a short one keeps the test quick.
fn failing(url: String) -> RedisOptions {
    RedisOptions {
        timeout: Duration::from_millis(300),
        ..options(url)
    }
}

/// A redis-server that wants [`PASSWORD`] (for the `default` user), and
/// whose cli calls give it.
fn password_server() -> RedisServer {
    RedisServer::start_with(
        &["--requirepass", PASSWORD],
        &["-a", PASSWORD, "--no-auth-warning"],
    )
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

/// A TLS-only redis-server that wants [`PASSWORD`] and a client
/// certificate `pki.ca` signed (`tls-auth-clients yes`).
fn mutual_tls_server(pki: &Pki) -> RedisServer {
    RedisServer::start_mutual_tls(
        &pki.server.cert,
        &pki.server.key,
        &pki.ca,
        (&pki.client.cert, &pki.client.key),
        &["--requirepass", PASSWORD],
    )
}

/// Serves the shipped policy on `store` and asserts a CheckLimit counts.
async fn assert_serves(store: RedisStore, subject: &str) {
    let server = TestServer::start(store, &shipped_config()).await;
    let response = server
        .check(request(subject))
        .await
        .expect("CheckLimit answers through the store");
    assert!(response.allowed, "{response:?}");
    assert_eq!(response.remaining, 99, "{response:?}");
    server.stop().await;
}

#[tokio::test]
async fn password_urls_with_and_without_a_user_work_through_the_service() {
    let redis = password_server();
    // A second user with its own password, for the user:password form.
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "app", "on", ">app-pw", "~*", "+@all"]),
        "OK"
    );
    let port = redis.port();
    for (url, subject) in [
        (format!("redis://:{PASSWORD}@127.0.0.1:{port}/0"), "no-user"),
        (
            format!("redis://default:{PASSWORD}@127.0.0.1:{port}/0"),
            "default-user",
        ),
        (format!("redis://app:app-pw@127.0.0.1:{port}/0"), "app-user"),
    ] {
        let options = options(url);
        let store = RedisStore::connect(&options)
            .await
            .unwrap_or_else(|err| panic!("{options:?}: {err}"));
        let printed = format!("{options:?} {store:?}");
        assert!(
            !printed.contains(PASSWORD) && !printed.contains("app-pw"),
            "{printed}"
        );
        assert_serves(store, subject).await;
    }
    // The decisions reached this Redis: one key per subject's window.
    let keys = redis.cli(&["KEYS", "auth:*"]);
    for subject in ["no-user", "default-user", "app-user"] {
        assert!(keys.contains(subject), "{keys}");
    }
}

#[tokio::test]
async fn a_wrong_or_missing_password_fails_cleanly_and_names_no_password() {
    let redis = password_server();
    let port = redis.port();
    for url in [
        format!("redis://:wrong-pw@127.0.0.1:{port}/0"),
        format!("redis://app:wrong-pw@127.0.0.1:{port}/0"),
        format!("redis://127.0.0.1:{port}/0"),
    ] {
        let started = Instant::now();
        let err = RedisStore::connect(&failing(url.clone()))
            .await
            .expect_err("a wrong password is refused");
        let printed = format!("{err} {err:?}");
        assert!(!printed.contains("wrong-pw"), "{printed}");
        assert!(printed.contains("Authentication"), "says why: {printed}");
        assert!(printed.contains(&format!("127.0.0.1:{port}")), "{printed}");
        assert!(
            started.elapsed() < DEADLINE,
            "{url}: {:?}",
            started.elapsed()
        );
    }
}

// ---- rediss:// ------------------------------------------------------------

#[tokio::test]
async fn rediss_with_the_ca_from_store_tls_ca_works_and_an_untrusted_server_is_refused() {
    let pki = Pki::new();
    let redis = RedisServer::start_tls(
        &pki.server.cert,
        &pki.server.key,
        &pki.ca,
        &["--requirepass", PASSWORD],
    );
    let port = redis.port();
    let ca = certs::read(&pki.ca);

    for (host, subject) in [("127.0.0.1", "by-address"), ("localhost", "by-name")] {
        let url = format!("rediss://:{PASSWORD}@{host}:{port}/0");
        let store = RedisStore::connect_with_ca(&options(url), Some(&ca))
            .await
            .unwrap_or_else(|err| panic!("rediss to {host}: {err}"));
        assert!(!format!("{store:?}").contains(PASSWORD));
        assert_serves(store, subject).await;
    }

    // The system's roots do not know the test CA; another CA is no better.
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{port}/0");
    for ca in [None, Some(certs::read(&pki.other_ca))] {
        let err = RedisStore::connect_with_ca(&failing(url.clone()), ca.as_deref())
            .await
            .expect_err("a server certificate from an untrusted CA is refused");
        let printed = format!("{err} {err:?}");
        assert!(!printed.contains(PASSWORD), "{printed}");
        assert!(printed.contains(&format!("127.0.0.1:{port}")), "{printed}");
        assert!(
            printed.contains("invalid peer certificate"),
            "says why: {printed}"
        );
    }

    // Plaintext to a TLS-only port fails too, within the timeout.
    let started = Instant::now();
    let err = RedisStore::connect(&failing(format!("redis://:{PASSWORD}@127.0.0.1:{port}/0")))
        .await
        .expect_err("plaintext to a TLS port fails");
    assert!(!format!("{err} {err:?}").contains(PASSWORD), "{err}");
    assert!(started.elapsed() < DEADLINE);
}

/// A server that wants client certificates (`tls-auth-clients yes`):
/// tollgate connects with `store.tls_cert` and `store.tls_key`, and without
/// a certificate, or with one from a CA the server does not trust, start-up
/// fails cleanly, within the timeout, the password masked.
#[tokio::test]
async fn rediss_with_a_client_certificate_works_and_without_one_is_refused() {
    let pki = Pki::new();
    let redis = mutual_tls_server(&pki);
    let url = format!("rediss://:{PASSWORD}@127.0.0.1:{}/0", redis.port());
    let ca = certs::read(&pki.ca);
    let identity =
        |files: &certs::CertFiles| Some((certs::read(&files.cert), certs::read(&files.key)));

    let tls = RedisTls {
        ca: Some(ca.clone()),
        client: identity(&pki.client),
    };
    assert!(
        !format!("{tls:?}").contains("BEGIN"),
        "Debug never shows key material: {tls:?}"
    );
    let store = RedisStore::connect_with_tls(&options(url.clone()), &tls)
        .await
        .unwrap_or_else(|err| panic!("rediss with a client certificate: {err}"));
    assert_serves(store, "with-a-client-certificate").await;

    // rustls reports the server's alert, which says why.
    for (what, client, why) in [
        ("no client certificate", None, "CertificateRequired"),
        (
            "a client certificate from another CA",
            identity(&pki.other_client),
            "UnknownCA",
        ),
    ] {
        let tls = RedisTls {
            ca: Some(ca.clone()),
            client,
        };
        let started = Instant::now();
        let err = RedisStore::connect_with_tls(&failing(url.clone()), &tls)
            .await
            .expect_err(what);
        let printed = format!("{err} {err:?}");
        println!("{what}: {printed}");
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: {:?}",
            started.elapsed()
        );
        assert!(!printed.contains(PASSWORD), "{what}: {printed}");
        assert!(
            printed.contains(&format!("127.0.0.1:{}", redis.port())),
            "{what}: {printed}"
        );
        assert!(printed.contains(why), "{what}: says why: {printed}");
    }
}

// ---- The binary ---------------------------------------------------------------

#[test]
fn the_binary_fails_start_up_on_a_wrong_password_without_printing_it() {
    let redis = password_server();
    let url = format!("redis://:wrong-pw@127.0.0.1:{}/0", redis.port());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut tollgate = Tollgate::spawn(&["serve", "--store", &url, "--listen", &listen], &[]);
    assert!(!tollgate.wait(DEADLINE), "start-up must fail");
    let output = tollgate.output();
    assert!(
        !output.contains("wrong-pw"),
        "the password leaked: {output}"
    );
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tollgate: cannot use the store: ") && last.contains(":***@"),
        "{output}"
    );
    assert!(!output.contains("panicked"), "{output}");
}

/// Calls CheckLimit over mutual TLS once the server accepts, retrying until
/// [`DEADLINE`].
async fn check_over_mtls(port: u16, pki: &Pki, tollgate: &mut Tollgate) -> (bool, u64) {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(certs::read(&pki.ca)))
        .identity(Identity::from_pem(
            certs::read(&pki.client.cert),
            certs::read(&pki.client.key),
        ));
    let deadline = Instant::now() + DEADLINE;
    let channel = loop {
        let endpoint = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("a valid URL")
            .tls_config(tls.clone())
            .expect("a valid TLS config");
        match endpoint.connect().await {
            Ok(channel) => break channel,
            Err(err) => {
                if let Some(status) = tollgate.exited() {
                    panic!("tollgate exited ({status}): {}", tollgate.output());
                }
                assert!(Instant::now() < deadline, "nothing serves on {port}: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let response = RateLimiterClient::new(channel)
        .check_limit(request("binary"))
        .await
        .expect("CheckLimit answers")
        .into_inner();
    (response.allowed, response.remaining)
}

#[tokio::test]
async fn the_binary_serves_mutual_tls_on_rediss_with_a_password_and_never_logs_it() {
    let pki = Pki::new();
    // Mutual TLS behind too: Redis wants tollgate's client certificate.
    let redis = mutual_tls_server(&pki);
    let port = free_port();
    let path = |p: &Path| format!("{:?}", p.display().to_string());
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"

[server.tls]
cert = {cert}
key = {key}
client_ca = {ca}

[store]
url = "rediss://:{PASSWORD}@localhost:{redis_port}/0"
tls_ca = {ca}
tls_cert = {client_cert}
tls_key = {client_key}
timeout = "2s"

[log]
level = "trace"

[tiers]
names = ["free"]

[rules.api]
window = "1m"
limit = 10

[quotas.kinds]
text = 5
"#,
        cert = path(&pki.server.cert),
        key = path(&pki.server.key),
        ca = path(&pki.ca),
        client_cert = path(&pki.client.cert),
        client_key = path(&pki.client.key),
        redis_port = redis.port(),
    );
    let config_path = pki.dir().join("tollgate.toml");
    std::fs::write(&config_path, config).expect("write the config");
    let config_arg = config_path.display().to_string();

    let mut tollgate = Tollgate::spawn(&["serve", "--config", &config_arg], &[]);
    assert_eq!(check_over_mtls(port, &pki, &mut tollgate).await, (true, 9));

    // The container health check, over mutual TLS.
    let health = tokio::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["health", "--addr", &format!("https://127.0.0.1:{port}")])
        .args(["--ca", &pki.ca.display().to_string()])
        .args(["--cert", &pki.client.cert.display().to_string()])
        .args(["--key", &pki.client.key.display().to_string()])
        .output()
        .await
        .expect("tollgate health runs");
    assert!(health.status.success(), "{health:?}");
    assert_eq!(String::from_utf8_lossy(&health.stdout).trim(), "SERVING");

    tollgate.stop(DEADLINE);

    let output = tollgate.output();
    assert!(!output.contains(PASSWORD), "the password leaked:\n{output}");
    assert!(!output.contains("PRIVATE KEY"), "a key leaked:\n{output}");
    // The log did say where the store is, masked.
    assert!(output.contains(":***@localhost"), "{output}");
}
