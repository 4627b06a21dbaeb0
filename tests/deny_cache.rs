//! The deny cache over the wire, against a real `redis-server`: once a
//! subject is far over its limit, its requests stop reaching Redis, and the
//! decisions stay exact: it is allowed again at the moment the store says.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::time::Duration;

use common::server::{Backend, StoreKind, TestServer};
use tokio::{
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tollgate::proto::{CheckLimitRequest, CheckLimitResponse};

const TOML: &str = r#"
[tiers]
names = ["free"]
default = "free"

[quotas]
period = "1h"

[quotas.kinds]
text = 1

[rules.hot]
window = "2s"
limit = 5

[rules.smooth]
# With 5 hits in the current fixed window, retry_after is between 0.2 and
# 1.2 windows: at least 1 s.
window = "5s"
limit = 5
algorithm = "sliding_counter"

[rules.lockout]
window = "1s"
limit = 2
block_for = "2s"
"#;

/// Denied requests sent while a subject is over its limit.
const FLOOD: u64 = 2000;

fn request(rule: &str, subject: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: rule.to_owned(),
        subject: subject.to_owned(),
        ..Default::default()
    }
}

async fn check(server: &TestServer, rule: &str, subject: &str) -> CheckLimitResponse {
    let response = server
        .check(request(rule, subject))
        .await
        .unwrap_or_else(|status| panic!("CheckLimit {rule}/{subject}: {status}"));
    assert!(!response.degraded, "{rule}/{subject}: {response:?}");
    response
}

/// `EVALSHA` calls Redis has served so far, from INFO commandstats.
fn evalsha_calls(backend: &Backend) -> u64 {
    let stats = backend.redis().cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("calls is a number"))
}

/// Sends up to `FLOOD` requests for one subject, 50 in flight, until
/// `deadline`, and asserts every one is denied; returns how many were sent
/// and how many of them reached Redis.
async fn flood(
    backend: &Backend,
    server: &TestServer,
    rule: &str,
    subject: &str,
    deadline: Instant,
) -> (u64, u64) {
    let before = evalsha_calls(backend);
    let mut tasks = JoinSet::new();
    for worker in 0..50 {
        let mut client = server.rate.clone();
        let (rule, subject) = (rule.to_owned(), subject.to_owned());
        tasks.spawn(async move {
            let mut sent = 0;
            for _ in (worker..FLOOD).step_by(50) {
                if Instant::now() >= deadline {
                    break;
                }
                let response = client
                    .check_limit(request(&rule, &subject))
                    .await
                    .expect("CheckLimit succeeds")
                    .into_inner();
                assert!(!response.allowed && !response.degraded, "{response:?}");
                sent += 1;
            }
            sent
        });
    }
    let mut sent = 0;
    while let Some(done) = tasks.join_next().await {
        sent += done.expect("a flooding task does not panic");
    }
    (sent, evalsha_calls(backend) - before)
}

fn retry_after(response: &CheckLimitResponse) -> Duration {
    let retry = response
        .retry_after
        .expect("tollgate always sends retry_after");
    Duration::new(retry.seconds as u64, retry.nanos as u32)
}

/// Fills `rule` for `subject`, floods it, and checks that it is allowed
/// again exactly when the first denial said: denied just before, allowed
/// just after.
async fn over_the_limit_then_allowed_on_time(rule: &str, limit: usize) {
    let backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_toml(TOML).await;
    for _ in 0..limit {
        assert!(check(&server, rule, "abuser").await.allowed);
    }
    let sent = Instant::now();
    let denied = check(&server, rule, "abuser").await;
    let received = Instant::now();
    assert!(!denied.allowed);
    let retry = retry_after(&denied);
    assert!(retry > Duration::ZERO, "{denied:?}");

    // Flood until shortly before the subject may fit again.
    let (sent_flood, reached_redis) =
        flood(&backend, &server, rule, "abuser", sent + retry / 2).await;
    assert!(sent_flood >= 200, "only {sent_flood} sent");
    assert!(
        reached_redis * 100 < sent_flood,
        "{reached_redis} of {sent_flood} denied requests reached Redis"
    );
    // Other subjects are untouched and still go to Redis.
    let before = evalsha_calls(&backend);
    assert!(check(&server, rule, "bystander").await.allowed);
    assert_eq!(evalsha_calls(&backend) - before, 1);

    // Redis made the denial between `sent` and `received`, so the subject
    // fits again at some moment in [sent + retry, received + retry].
    let margin = Duration::from_millis(30);
    if let Some(just_before) = (sent + retry).checked_sub(margin) {
        sleep_until(just_before).await;
        assert!(!check(&server, rule, "abuser").await.allowed);
    }
    sleep_until(received + retry + margin).await;
    let again = check(&server, rule, "abuser").await;
    assert!(again.allowed, "{again:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_log_denials_skip_redis_and_end_on_time() {
    over_the_limit_then_allowed_on_time("hot", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_counter_denials_skip_redis_and_end_on_time() {
    over_the_limit_then_allowed_on_time("smooth", 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_skips_redis_and_ends_on_time() {
    let backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_toml(TOML).await;
    for _ in 0..2 {
        assert!(check(&server, "lockout", "10.0.0.1").await.allowed);
    }
    let sent = Instant::now();
    let blocked = check(&server, "lockout", "10.0.0.1").await;
    let received = Instant::now();
    assert!(blocked.blocked && !blocked.allowed, "{blocked:?}");
    assert_eq!(retry_after(&blocked), Duration::from_secs(2));

    let (sent_flood, reached_redis) = flood(
        &backend,
        &server,
        "lockout",
        "10.0.0.1",
        sent + Duration::from_secs(1),
    )
    .await;
    assert!(sent_flood >= 200, "only {sent_flood} sent");
    assert!(
        reached_redis * 100 < sent_flood,
        "{reached_redis} of {sent_flood} blocked requests reached Redis"
    );
    // Past the window but inside the block: still blocked.
    sleep_until(sent + Duration::from_millis(1500)).await;
    assert!(check(&server, "lockout", "10.0.0.1").await.blocked);
    // The block (PX rounded up to whole ms) is over.
    sleep_until(received + Duration::from_millis(2030)).await;
    let again = check(&server, "lockout", "10.0.0.1").await;
    assert!(again.allowed && !again.blocked, "{again:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_instance_sees_the_same_decisions() {
    // Two instances share one Redis, each with its own cache: one of them
    // caching a denial never lets the other allow what Redis would deny, and
    // hits counted by the other keep the cached denial true.
    let backend = Backend::new(StoreKind::Redis);
    let first = backend.serve_toml(TOML).await;
    let second = backend.serve_toml(TOML).await;
    for _ in 0..5 {
        assert!(check(&first, "hot", "shared").await.allowed);
    }
    assert!(!check(&first, "hot", "shared").await.allowed);
    assert!(!check(&second, "hot", "shared").await.allowed);
    assert!(!check(&first, "hot", "shared").await.allowed);
    first.stop().await;
    second.stop().await;
}
