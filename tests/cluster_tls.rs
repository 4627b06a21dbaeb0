//! `rediss-cluster://`: tollgate on a real 3-master Redis Cluster whose
//! nodes speak TLS only (to clients and on the cluster bus) and want a
//! password.
//!
//! - [`decisions_over_tls_are_exact_and_reach_every_master`] serves the
//!   shipped policy through the store, trusting the test CA, and checks the
//!   answers over gRPC and the counters on the masters.
//! - [`an_untrusted_cluster_or_a_wrong_password_fails_cleanly_and_names_no_password`]
//!   connects with the system's roots, another CA, a wrong password and
//!   plaintext.
//! - [`a_cluster_that_wants_client_certificates_takes_tollgates`] presents
//!   `store.tls_cert` and `store.tls_key` to nodes that ask for them.
//! - [`the_binary_takes_store_tls_ca_for_a_cluster_and_never_prints_the_password`]
//!   runs `tollgate serve` as an operator would, at `RUST_LOG=trace`.
//!
//! Every test starts its own cluster and certificates; all traffic stays on
//! 127.0.0.1.

// The helpers' `pub` items are for their sibling modules and the test
// crates that use them, not for export.
#[allow(unreachable_pub)]
mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use common::{
    binary::Tollgate,
    certs::{self, Pki},
    cluster::RedisCluster,
    redis_server::free_port,
    server::{KEY_PREFIX, TestServer, shipped_config},
};
use tokio::task::JoinSet;
use tollgate::{
    keys::KeyBuilder,
    proto::{CheckLimitRequest, CheckLimitResponse, rate_limiter_client::RateLimiterClient},
    rules::Algorithm,
    store::{
        breaker::CircuitBreaker,
        deny_cache::DenyCache,
        redis::{RedisOptions, RedisStore, RedisTls},
    },
};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;

const PASSWORD: &str = "s3cret-cluster-pw";
/// The shipped `auth` rule: 5 attempts per 15 min, then a 15 min block.
const AUTH_LIMIT: u64 = 5;
/// Bounds every wait for a start-up, a connection or an exit: long enough
/// for a debug build on a busy machine, short enough to fail fast.
const DEADLINE: Duration = Duration::from_secs(10);

/// A cluster of TLS-only nodes that want [`PASSWORD`], with certificates
/// for 127.0.0.1 signed by `pki.ca`.
fn tls_cluster(pki: &Pki) -> RedisCluster {
    RedisCluster::start_tls(pki, 0, Some(PASSWORD))
}

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: KEY_PREFIX.to_owned(),
        // Generous: TLS handshakes with three nodes in a debug build.
        timeout: Duration::from_secs(2),
        pool_size: 1,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    }
}

fn auth_request(subject: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: "auth".to_owned(),
        subject: subject.to_owned(),
        tier: String::new(),
        cost: 1,
        ..CheckLimitRequest::default()
    }
}

/// Sends `auth` checks for `subject` one after another until the first
/// denial (at most `AUTH_LIMIT + 1`), and returns every answer.
async fn check_until_denied(
    mut client: RateLimiterClient<Channel>,
    subject: String,
) -> Vec<CheckLimitResponse> {
    let mut answers = Vec::new();
    for _ in 0..=AUTH_LIMIT {
        let answer = client
            .check_limit(auth_request(&subject))
            .await
            .unwrap_or_else(|status| panic!("CheckLimit for {subject}: {status}"))
            .into_inner();
        let denied = !answer.allowed;
        answers.push(answer);
        if denied {
            break;
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decisions_over_tls_are_exact_and_reach_every_master() {
    let pki = Pki::new();
    let cluster = tls_cluster(&pki);
    let options = options(cluster.url());
    let store = RedisStore::connect_with_ca(&options, Some(&certs::read(&pki.ca)))
        .await
        .unwrap_or_else(|err| panic!("rediss-cluster with the test CA: {err}"));
    let printed = format!("{options:?} {store:?}");
    assert!(!printed.contains(PASSWORD), "{printed}");
    // As `tollgate serve` builds it.
    let config = shipped_config();
    let store = DenyCache::new(CircuitBreaker::new(store, config.settings.store.breaker));
    let server = TestServer::start(store, &config).await;

    // Health PINGs every master, over TLS.
    let (health, _) = server
        .await_health("", ServingStatus::Serving, DEADLINE)
        .await;
    assert_eq!(health, ServingStatus::Serving);

    // Thirty subjects at once, each until its first denial.
    let subjects: Vec<String> = (0..30).map(|i| format!("10.0.0.{i}")).collect();
    let mut tasks = JoinSet::new();
    for subject in &subjects {
        tasks.spawn(check_until_denied(server.rate.clone(), subject.clone()));
    }
    let mut answered = 0;
    while let Some(answers) = tasks.join_next().await {
        let answers = answers.expect("a subject's checks do not panic");
        // Allowed exactly AUTH_LIMIT times, counting down, then blocked;
        // every answer from the store, none degraded.
        let summary: Vec<(bool, u64, bool, bool)> = answers
            .iter()
            .map(|a| (a.allowed, a.remaining, a.blocked, a.degraded))
            .collect();
        let mut expected: Vec<(bool, u64, bool, bool)> = (1..=AUTH_LIMIT)
            .map(|hit| (true, AUTH_LIMIT - hit, false, false))
            .collect();
        expected.push((false, 0, true, false));
        assert_eq!(summary, expected, "{answers:?}");
        answered += 1;
    }
    assert_eq!(answered, subjects.len());

    // Twenty concurrent attempts on one fresh subject: exactly the limit.
    let mut tasks = JoinSet::new();
    for _ in 0..20 {
        let mut client = server.rate.clone();
        tasks.spawn(async move {
            let answer = client
                .check_limit(auth_request("10.0.1.1"))
                .await
                .expect("CheckLimit answers")
                .into_inner();
            assert!(!answer.degraded, "{answer:?}");
            answer.allowed
        });
    }
    let allowed = tasks
        .join_all()
        .await
        .into_iter()
        .filter(|&allowed| allowed)
        .count();
    assert_eq!(allowed, usize::try_from(AUTH_LIMIT).expect("a small limit"));

    // Each subject's log (5 hits and its base member) and block key live on the master that
    // owns their hash tag's slot, and the subjects cover every master.
    let keys = KeyBuilder::new(KEY_PREFIX);
    let mut owners = BTreeSet::new();
    for subject in subjects.iter().map(String::as_str).chain(["10.0.1.1"]) {
        let limit_keys = keys.limit("auth", Algorithm::SlidingLog, subject);
        let owner = cluster.owner_of(cluster.key_slot(&limit_keys.counter));
        assert_eq!(
            cluster.cli_int(owner, &["ZCARD", &limit_keys.counter]),
            6,
            "{subject} on :{owner}"
        );
        assert_eq!(
            cluster.cli_int(owner, &["EXISTS", &limit_keys.block]),
            1,
            "{subject} on :{owner}"
        );
        owners.insert(owner);
    }
    let per_master: BTreeMap<u16, i64> = cluster
        .masters()
        .iter()
        .map(|master| (master.port, cluster.cli_int(master.port, &["DBSIZE"])))
        .collect();
    println!("keys per master (31 subjects x 2 keys): {per_master:?}");
    assert_eq!(owners.len(), 3, "{per_master:?}");
    assert_eq!(per_master.values().sum::<i64>(), 31 * 2, "{per_master:?}");
    assert!(per_master.values().all(|&keys| keys > 0), "{per_master:?}");

    server.stop().await;
}

/// Nodes that want client certificates (`tls-auth-clients yes`) take
/// tollgate's (`store.tls_cert`, `store.tls_key`) on every master, and
/// refuse a client without one.
#[tokio::test]
async fn a_cluster_that_wants_client_certificates_takes_tollgates() {
    let pki = Pki::new();
    let cluster = RedisCluster::start_mutual_tls(&pki, 0, Some(PASSWORD));
    let ca = certs::read(&pki.ca);
    let tls = RedisTls {
        ca: Some(ca.clone()),
        client: Some((certs::read(&pki.client.cert), certs::read(&pki.client.key))),
    };
    let store = RedisStore::connect_with_tls(&options(cluster.url()), &tls)
        .await
        .unwrap_or_else(|err| panic!("a client certificate the nodes trust: {err}"));
    // Connecting loaded the scripts on every master; a decision on each
    // master's slots shows the certificate works on every connection.
    let server = TestServer::start(store, &shipped_config()).await;
    let mut masters_hit = BTreeSet::new();
    for subject in (0..).map(|i| format!("mtls-{i}")).take(64) {
        let response = server
            .check(auth_request(&subject))
            .await
            .unwrap_or_else(|status| panic!("CheckLimit for {subject}: {status:?}"));
        assert!(
            response.allowed && !response.degraded,
            "{subject}: {response:?}"
        );
        let key = KeyBuilder::new(KEY_PREFIX).limit("auth", Algorithm::SlidingLog, &subject);
        masters_hit.insert(cluster.owner_of(cluster.key_slot(&key.counter)));
        if masters_hit.len() == 3 {
            break;
        }
    }
    assert_eq!(masters_hit.len(), 3, "decisions on every master");

    let started = Instant::now();
    let err = RedisStore::connect_with_tls(
        &options(cluster.url()),
        &RedisTls {
            ca: Some(ca),
            client: None,
        },
    )
    .await
    .expect_err("nodes that want a client certificate refuse a client without one");
    let printed = format!("{err} {err:?}");
    println!("no client certificate: {printed}");
    assert!(!printed.contains(PASSWORD), "{printed}");
    assert!(
        printed.contains("CertificateRequired"),
        "says why: {printed}"
    );
    assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
}

#[tokio::test]
async fn an_untrusted_cluster_or_a_wrong_password_fails_cleanly_and_names_no_password() {
    let pki = Pki::new();
    let cluster = tls_cluster(&pki);
    let url = cluster.url();
    let seeds = cluster.seeds();
    let first_seed = seeds.split(',').next().expect("three seeds");

    // The system's roots do not know the test CA; another CA is no better.
    for (what, ca) in [
        ("system roots", None),
        ("another CA", Some(certs::read(&pki.other_ca))),
    ] {
        let started = Instant::now();
        let err = RedisStore::connect_with_ca(&options(url.clone()), ca.as_deref())
            .await
            .expect_err("a cluster with certificates from an untrusted CA is refused");
        let printed = format!("{err} {err:?}");
        println!("{what}: {printed}");
        assert!(!printed.contains(PASSWORD), "{what}: {printed}");
        assert!(
            printed.contains(":***@"),
            "{what}: names the URL: {printed}"
        );
        assert!(printed.contains(first_seed), "{what}: {printed}");
        assert!(
            printed.contains("invalid peer certificate"),
            "{what}: says why: {printed}"
        );
        assert!(
            started.elapsed() < DEADLINE,
            "{what}: {:?}",
            started.elapsed()
        );
    }

    // The right CA and a wrong password.
    let ca = certs::read(&pki.ca);
    let started = Instant::now();
    let err = RedisStore::connect_with_ca(
        &options(format!("rediss-cluster://:wrong-pw@{seeds}")),
        Some(&ca),
    )
    .await
    .expect_err("a wrong password is refused");
    let printed = format!("{err} {err:?}");
    println!("wrong password: {printed}");
    assert!(!printed.contains("wrong-pw"), "{printed}");
    assert!(printed.contains(":***@"), "{printed}");
    assert!(
        printed.contains("authentication failed"),
        "says why: {printed}"
    );
    assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());

    // Plaintext to TLS-only nodes fails too, within the timeout.
    let started = Instant::now();
    let err = RedisStore::connect(&options(format!("redis-cluster://:{PASSWORD}@{seeds}")))
        .await
        .expect_err("plaintext to TLS ports fails");
    let printed = format!("{err} {err:?}");
    println!("plaintext: {printed}");
    assert!(!printed.contains(PASSWORD), "{printed}");
    assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_node_whose_certificate_lacks_its_announced_address_stops_start_up() {
    // The nodes' certificates name localhost only. The seed is dialled as
    // localhost and passes, but the slot map announces every node by IP,
    // which the certificates do not hold.
    let pki = Pki::new();
    let cluster = RedisCluster::start_tls_serving(&pki, &pki.localhost_only, 0, Some(PASSWORD));
    let seed = cluster.masters()[0].port;
    let url = format!("rediss-cluster://:{PASSWORD}@localhost:{seed}");
    let started = Instant::now();
    let err = RedisStore::connect_with_ca(&options(url), Some(&certs::read(&pki.ca)))
        .await
        .expect_err("nodes that cannot be verified at their addresses stop start-up");
    let printed = format!("{err} {err:?}");
    println!("{printed}");
    assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
    assert!(!printed.contains(PASSWORD), "{printed}");
    assert!(
        printed.contains(&format!(
            "Redis Cluster at rediss-cluster://:***@localhost:{seed}: not every node answered"
        )),
        "{printed}"
    );
    assert!(
        printed
            .contains("every node's certificate must be valid for the address the node announces"),
        "{printed}"
    );
}

// ---- The binary ---------------------------------------------------------------

/// `tollgate serve` with the shipped config, `store_url` and `listen` from
/// the command line, and `env` added.
fn serve(store_url: &str, listen: &str, env: &[(&str, &str)]) -> Tollgate {
    Tollgate::spawn(&["serve", "--store", store_url, "--listen", listen], env)
}

#[tokio::test]
async fn the_binary_takes_store_tls_ca_for_a_cluster_and_never_prints_the_password() {
    let pki = Pki::new();
    let cluster = tls_cluster(&pki);
    let url = cluster.url();
    let ca = pki.ca.display().to_string();
    let timeout = ("TOLLGATE_STORE__TIMEOUT", "2s");

    // Without store.tls_ca the system's roots apply: start-up fails with one
    // line, the password masked.
    let listen = format!("127.0.0.1:{}", free_port());
    let mut tollgate = serve(&url, &listen, &[timeout]);
    assert!(!tollgate.wait(DEADLINE), "start-up must fail");
    let output = tollgate.output();
    assert!(!output.contains(PASSWORD), "the password leaked:\n{output}");
    let last = output.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("tollgate: cannot use the store: ") && last.contains(":***@"),
        "{output}"
    );
    assert!(last.contains("invalid peer certificate"), "{last}");
    assert!(!output.contains("panicked"), "{output}");

    // With store.tls_ca (from the environment) it serves.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut tollgate = serve(
        &url,
        &listen,
        &[timeout, ("TOLLGATE_STORE__TLS_CA", ca.as_str())],
    );
    let deadline = Instant::now() + DEADLINE;
    let channel = loop {
        let endpoint = Channel::from_shared(format!("http://{listen}")).expect("a valid URL");
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
    let answers = check_until_denied(RateLimiterClient::new(channel), "10.9.9.9".to_owned()).await;
    let allowed: Vec<u64> = answers
        .iter()
        .filter(|a| a.allowed && !a.degraded)
        .map(|a| a.remaining)
        .collect();
    assert_eq!(allowed, [4, 3, 2, 1, 0], "{answers:?}");
    let last = answers.last().expect("at least one answer");
    assert!(!last.allowed && last.blocked && !last.degraded, "{last:?}");

    tollgate.stop(DEADLINE);
    let output = tollgate.output();
    assert!(!output.contains(PASSWORD), "the password leaked:\n{output}");
    // The log did say where the store is, masked.
    assert!(output.contains(":***@127.0.0.1"), "{output}");
}
