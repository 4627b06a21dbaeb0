//! Redis failures, through a real tonic client over a real socket: Redis
//! restarted (scripts and data gone, so EVALSHA meets NOSCRIPT), SCRIPT
//! FLUSH, and Redis killed. tollgate must recover by itself, never hang and
//! never panic. While Redis is gone, CheckLimit and IncrementUsage answer by
//! the rule's (or quotas') `on_store_error`, marked degraded, and GetUsage
//! and ListUsage answer UNAVAILABLE, all within the store timeout; the health
//! service reports NOT_SERVING.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::{
    future::Future,
    time::{Duration, Instant},
};

use common::server::{Backend, StoreKind, TestServer};
use tollgate::{
    proto::{
        CheckLimitRequest, CheckLimitResponse, GetUsageRequest, IncrementUsageRequest,
        IncrementUsageResponse, ListUsageRequest,
    },
    server::HEALTH_PROBE_INTERVAL,
};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Rules of both algorithms and a quota, so that every script is exercised;
/// `strict` fails closed. The breaker opens after 5 failures for 500 ms.
const TOML: &str = r#"
[store]
timeout = "250ms"
breaker_failures = 5
breaker_cool_down = "500ms"

[tiers]
names = ["free"]

[rules.log]
window = "1m"
limit = 5

[rules.ctr]
window = "1m"
limit = 5
algorithm = "sliding_counter"

[rules.strict]
window = "1m"
limit = 5
on_store_error = "deny"

[quotas]
period = "1h"

[quotas.kinds]
text = 3
"#;

/// Slack over the store timeout for a failing call to come back: the gRPC
/// round trip and scheduling on a loaded test machine.
const MARGIN: Duration = Duration::from_millis(750);

/// How long tollgate may take to answer normally again once Redis is back.
const RECOVERY: Duration = Duration::from_secs(3);

fn check_req(rule: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: rule.to_owned(),
        subject: "victim".to_owned(),
        ..Default::default()
    }
}

fn incr_req() -> IncrementUsageRequest {
    IncrementUsageRequest {
        user_id: "victim".to_owned(),
        character_id: "luna".to_owned(),
        kind: "text".to_owned(),
        ..Default::default()
    }
}

fn get_req() -> GetUsageRequest {
    GetUsageRequest {
        user_id: "victim".to_owned(),
        character_id: "luna".to_owned(),
        tier: String::new(),
    }
}

fn list_req() -> ListUsageRequest {
    ListUsageRequest {
        user_id: "victim".to_owned(),
        tier: String::new(),
    }
}

/// Runs `call`, asserting it answers within the store timeout plus margin.
async fn bounded<T>(
    server: &TestServer,
    what: &str,
    call: impl Future<Output = Result<T, Status>>,
) -> (Result<T, Status>, Duration) {
    let start = Instant::now();
    let bound = server.store_timeout + MARGIN;
    let result = tokio::time::timeout(bound, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung past {bound:?}"));
    (result, start.elapsed())
}

/// An answer that may have been given without the store.
trait Answer {
    fn degraded(&self) -> bool;
}

impl Answer for CheckLimitResponse {
    fn degraded(&self) -> bool {
        self.degraded
    }
}

impl Answer for IncrementUsageResponse {
    fn degraded(&self) -> bool {
        self.degraded
    }
}

impl Answer for tollgate::proto::ListUsageResponse {
    fn degraded(&self) -> bool {
        false
    }
}

impl Answer for tollgate::proto::GetUsageResponse {
    fn degraded(&self) -> bool {
        false
    }
}

/// Retries `call` until the store answers it (not degraded, no error), for
/// at most [`RECOVERY`] after `since`; every attempt must answer in time and
/// every error must be UNAVAILABLE. Returns the answer and how many attempts
/// were not answered by the store.
async fn until_recovered<T, F, Fut>(
    server: &TestServer,
    what: &str,
    since: Instant,
    call: F,
) -> (T, u32)
where
    T: Answer + std::fmt::Debug,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut failed = 0;
    loop {
        match bounded(server, what, call()).await.0 {
            Ok(answer) if !answer.degraded() => return (answer, failed),
            Ok(degraded) => eprintln!("{what}: degraded: {degraded:?}"),
            Err(status) => {
                assert_eq!(
                    status.code(),
                    Code::Unavailable,
                    "{what}: a failure while Redis comes back is UNAVAILABLE: {status:?}"
                );
            }
        }
        failed += 1;
        assert!(
            since.elapsed() < RECOVERY,
            "{what}: not answered by the store {RECOVERY:?} after Redis came back ({failed} attempts)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts two hits on each rule and two text messages, as a baseline.
async fn warm_up(server: &TestServer) {
    for n in 1..=2u64 {
        for rule in ["log", "ctr", "strict"] {
            let r = server
                .check(check_req(rule))
                .await
                .expect("CheckLimit answers while Redis is up");
            assert!(
                r.allowed && !r.degraded && r.remaining == 5 - n,
                "{rule} hit {n}: {r:?}"
            );
        }
        let r = server
            .increment(incr_req())
            .await
            .expect("IncrementUsage answers while Redis is up");
        assert!(
            r.allowed && !r.degraded && r.used == n,
            "text message {n}: {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_redis_is_recovered_by_itself() {
    let mut backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_toml(TOML).await;
    warm_up(&server).await;

    // A fresh redis-server on the same port: no data and no scripts, so the
    // pool's connections are dead and EVALSHA meets NOSCRIPT.
    backend.redis_mut().restart();
    let back = Instant::now();

    for rule in ["log", "ctr", "strict"] {
        let what = format!("CheckLimit {rule} after the restart");
        let (r, failed) =
            until_recovered(&server, &what, back, || server.check(check_req(rule))).await;
        eprintln!("{what}: answered after {failed} unanswered attempts");
        assert!(
            r.allowed && r.remaining == 4,
            "{what}: the data is gone, so the first hit leaves 4: {r:?}"
        );
    }
    let what = "IncrementUsage after the restart";
    let (r, failed) = until_recovered(&server, what, back, || server.increment(incr_req())).await;
    eprintln!("{what}: answered after {failed} unanswered attempts");
    assert!(
        r.allowed && r.used == 1,
        "{what}: a fresh conversation: {r:?}"
    );
    let what = "ListUsage after the restart";
    let (listed, _) = until_recovered(&server, what, back, || server.list_usage(list_req())).await;
    let ids: Vec<&str> = listed
        .conversations
        .iter()
        .map(|c| c.character_id.as_str())
        .collect();
    assert_eq!(ids, ["luna"], "{what}");

    // Recovered: every call is now answered by the store at once.
    for rule in ["log", "ctr", "strict"] {
        let (r, _) = bounded(&server, "CheckLimit", server.check(check_req(rule))).await;
        let r = r.expect("CheckLimit succeeds once recovered");
        assert!(
            r.allowed && !r.degraded && r.remaining == 3,
            "{rule} counts on: {r:?}"
        );
    }
    let (r, _) = bounded(&server, "IncrementUsage", server.increment(incr_req())).await;
    let r = r.expect("IncrementUsage succeeds once recovered");
    assert!(
        r.allowed && !r.degraded && r.used == 2,
        "text counts on: {r:?}"
    );
    let (usage, _) = bounded(&server, "GetUsage", server.get_usage(get_req())).await;
    let usage = usage.expect("GetUsage succeeds once recovered");
    assert_eq!(
        usage.counters[0].used, 2,
        "GetUsage after the restart: {usage:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn script_flush_is_recovered_at_once() {
    let backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_toml(TOML).await;
    warm_up(&server).await;
    let listed = server
        .list_usage(list_req())
        .await
        .expect("ListUsage answers while Redis is up");
    assert_eq!(
        listed.conversations.len(),
        1,
        "one conversation before the flush"
    );

    assert_eq!(backend.redis().cli(&["SCRIPT", "FLUSH"]), "OK");

    // The connections are alive; only the scripts are gone. The very next
    // call of each kind must be answered by the store, the data intact.
    for rule in ["log", "ctr", "strict"] {
        let (r, _) = bounded(&server, "CheckLimit", server.check(check_req(rule))).await;
        let r = r.expect("CheckLimit succeeds right after SCRIPT FLUSH");
        assert!(
            r.allowed && !r.degraded && r.remaining == 2,
            "{rule} counts on after the flush: {r:?}"
        );
    }
    let (r, _) = bounded(&server, "IncrementUsage", server.increment(incr_req())).await;
    let r = r.expect("IncrementUsage succeeds right after SCRIPT FLUSH");
    assert!(
        r.allowed && !r.degraded && r.used == 3,
        "text counts on after the flush: {r:?}"
    );
    assert_eq!(backend.redis().cli(&["SCRIPT", "FLUSH"]), "OK");
    let (listed, _) = bounded(&server, "ListUsage", server.list_usage(list_req())).await;
    let listed = listed.expect("ListUsage succeeds right after SCRIPT FLUSH");
    assert_eq!(listed.conversations.len(), 1, "ListUsage after the flush");
    assert_eq!(listed.conversations[0].counters[0].used, 3, "{listed:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_redis_degrades_within_the_timeout() {
    let mut backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_toml(TOML).await;
    warm_up(&server).await;
    let (status, _) = server
        .await_health("", ServingStatus::Serving, Duration::from_secs(3))
        .await;
    assert_eq!(status, ServingStatus::Serving, "healthy while Redis is up");

    backend.redis_mut().kill();

    // Several rounds: the first call may find a dead pooled connection, the
    // next fail to connect, and later ones meet the open breaker; none may
    // hang, each is answered by the failure policy.
    for round in 1..=4 {
        for (rule, allowed) in [("log", true), ("ctr", true), ("strict", false)] {
            let what = format!("CheckLimit {rule}, Redis killed, round {round}");
            let (r, took) = bounded(&server, &what, server.check(check_req(rule))).await;
            let r = r.unwrap_or_else(|status| panic!("{what}: degrades, not {status:?}"));
            eprintln!("{what}: {r:?} after {took:?}");
            assert!(r.degraded, "{what}: marked degraded: {r:?}");
            assert_eq!(r.allowed, allowed, "{what}: on_store_error: {r:?}");
            if !allowed {
                assert!(
                    r.retry_after.is_some_and(|d| d.seconds > 0 || d.nanos > 0),
                    "{what}: a degraded denial asks to retry later: {r:?}"
                );
            }
        }
        let what = format!("IncrementUsage, Redis killed, round {round}");
        let (r, _) = bounded(&server, &what, server.increment(incr_req())).await;
        let r = r.unwrap_or_else(|status| panic!("{what}: degrades, not {status:?}"));
        assert!(r.degraded && r.allowed, "{what}: quotas fail open: {r:?}");
        for (what, result) in [
            (
                format!("GetUsage, Redis killed, round {round}"),
                bounded(&server, "GetUsage", server.get_usage(get_req()))
                    .await
                    .0
                    .map(|_| ()),
            ),
            (
                format!("ListUsage, Redis killed, round {round}"),
                bounded(&server, "ListUsage", server.list_usage(list_req()))
                    .await
                    .0
                    .map(|_| ()),
            ),
        ] {
            let status = result.expect_err(&what);
            assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
            assert!(!status.message().is_empty(), "{what}: a clear message");
        }
    }

    let within = HEALTH_PROBE_INTERVAL + server.store_timeout + Duration::from_secs(2);
    for service in ["", "tollgate.v1.RateLimiter", "tollgate.v1.UsageQuota"] {
        let (status, _) = server
            .await_health(service, ServingStatus::NotServing, within)
            .await;
        assert_eq!(
            status,
            ServingStatus::NotServing,
            "health of {service:?} with Redis killed"
        );
    }

    // Redis comes back (empty): normal answers and health return by
    // themselves.
    backend.redis_mut().restart();
    let back = Instant::now();
    let (r, failed) = until_recovered(&server, "CheckLimit after Redis came back", back, || {
        server.check(check_req("log"))
    })
    .await;
    eprintln!(
        "CheckLimit answered by the store {:?} after Redis came back ({failed} attempts)",
        back.elapsed()
    );
    assert!(
        r.allowed && r.remaining == 4,
        "counting starts afresh: {r:?}"
    );
    let (status, _) = server
        .await_health(
            "",
            ServingStatus::Serving,
            RECOVERY.saturating_sub(back.elapsed()),
        )
        .await;
    assert_eq!(
        status,
        ServingStatus::Serving,
        "healthy again within {RECOVERY:?} of Redis's return"
    );
    server.stop().await;
}
