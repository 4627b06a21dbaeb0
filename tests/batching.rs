//! Batched decisions equal sequential ones.
//!
//! When decisions queue for a Redis connection, tollgate sends them as one
//! `decide_batch.lua` call that must decide each exactly as if it had been
//! sent alone, one after another. Two properties, each against the memory
//! store's answers to the same calls made one at a time:
//!
//! - store level: random sequences of checks (several subjects and rules,
//!   costs past the limit, dry runs, lock-outs, repeated request ids) cut
//!   into batches at random points, each batch sent as one script call
//!   ([`RedisStore::check_limit_batch`]), on one server and on a cluster;
//! - over the wire: subjects calling concurrently through a real tonic
//!   client, each subject's calls in order (CheckLimit, and CheckLimits
//!   groups, which a batch carries as one entry each), so the batches mix
//!   subjects in whatever interleaving the scheduler makes; the first
//!   round (24 calls, more than a lane keeps in flight) is sent while
//!   Redis is stopped (SIGSTOP), so that some must queue and go as a
//!   batch, which the batch-size metric then shows.
//!
//! Windows and lock-outs are an hour long, so time plays no part within a
//! sequence; the times in the answers (retry_after, reset_after) may differ
//! between the stores by the moments the calls were made, and are compared
//! within a tolerance.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::{sync::atomic::AtomicU64, sync::atomic::Ordering, time::Duration};

use common::{
    cluster::RedisCluster,
    property::live_runner,
    redis_server::RedisServer,
    server::{Backend, StoreKind, TestServer, test_config},
};
use proptest::{prelude::*, test_runner::TestCaseError};
use tokio::task::JoinSet;
use tollgate::{
    keys::KeyBuilder,
    proto::{CheckLimitRequest, CheckLimitResponse, CheckLimitsRequest},
    rules::Algorithm,
    store::{
        LimitCheck, LimitDecision, Once, Store,
        memory::MemoryStore,
        redis::{DEFAULT_MAX_BATCH, RedisOptions, RedisStore},
    },
};

const HOUR: Duration = Duration::from_secs(3600);

/// The rules of the store-level sequences: name, algorithm, limit, lock-out.
const RULES: [(&str, Algorithm, u64, bool); 4] = [
    ("log", Algorithm::SlidingLog, 5, false),
    ("counter", Algorithm::SlidingCounter, 7, false),
    ("auth", Algorithm::SlidingLog, 3, true),
    ("auth_counter", Algorithm::SlidingCounter, 3, true),
];

/// One generated call.
#[derive(Debug, Clone)]
struct Call {
    rule: usize,
    subject: usize,
    /// 1..=4, or the rule's limit + 1 (never fits) when 0.
    cost: u64,
    dry_run: bool,
    /// A request id from a small pool, so that retries happen.
    request_id: Option<u8>,
    /// Whether a new batch starts at this call.
    cut: bool,
}

fn calls(max: usize) -> impl Strategy<Value = Vec<Call>> {
    let call = (
        0..RULES.len(),
        0..3usize,
        prop_oneof![9 => 1..=4u64, 1 => Just(0u64)],
        prop::bool::weighted(0.15),
        prop_oneof![3 => Just(None), 2 => (0..4u8).prop_map(Some)],
        prop::bool::weighted(0.3),
    )
        .prop_map(|(rule, subject, cost, dry_run, request_id, cut)| Call {
            rule,
            subject,
            cost,
            dry_run,
            request_id,
            cut,
        });
    prop::collection::vec(call, 1..max)
}

/// The store-level check of `call`, for subjects named after `case`.
fn check<'a>(call: &Call, subject: &'a str) -> LimitCheck<'a> {
    let (rule, algorithm, limit, locks_out) = RULES[call.rule];
    LimitCheck {
        rule,
        subject,
        algorithm,
        limit,
        window: HOUR,
        block_for: locks_out.then_some(HOUR),
        cost: if call.cost == 0 { limit + 1 } else { call.cost },
        dry_run: call.dry_run,
    }
}

/// Whether two answers are the same but for when they were made. A sliding
/// counter's times are left out: they run to the end of its fixed window,
/// and the memory store's windows start from its own clock's epoch.
fn same(algorithm: Algorithm, redis: &Once<LimitDecision>, memory: &Once<LimitDecision>) -> bool {
    let near = |a: Duration, b: Duration| a.abs_diff(b) <= Duration::from_secs(5);
    let times_agree = algorithm == Algorithm::SlidingCounter
        || (near(redis.decision.retry_after, memory.decision.retry_after)
            && near(redis.decision.reset_after, memory.decision.reset_after));
    redis.replayed == memory.replayed
        && redis.decision.allowed == memory.decision.allowed
        && redis.decision.remaining == memory.decision.remaining
        && redis.decision.blocked == memory.decision.blocked
        && times_agree
}

/// Sequences at the store level, against one Redis store.
struct StoreFixture {
    redis: RedisStore,
    memory: MemoryStore,
    /// Each sequence gets subjects of its own.
    sequence: AtomicU64,
}

impl StoreFixture {
    async fn run(&self, calls: &[Call]) -> Result<(), TestCaseError> {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let subjects: Vec<String> = (0..3).map(|s| format!("seq{sequence}-s{s}")).collect();
        let ids: Vec<String> = (0..4).map(|id| format!("id-{id}")).collect();
        let checks: Vec<(LimitCheck<'_>, Option<&str>)> = calls
            .iter()
            .map(|call| {
                (
                    check(call, &subjects[call.subject]),
                    call.request_id.map(|id| ids[usize::from(id)].as_str()),
                )
            })
            .collect();

        let mut batched = Vec::with_capacity(checks.len());
        let mut start = 0;
        for end in 1..=checks.len() {
            if end == checks.len() || calls[end].cut {
                batched.extend(self.redis.check_limit_batch(&checks[start..end]).await);
                start = end;
            }
        }
        for (i, ((check, request_id), batched)) in checks.iter().zip(batched).enumerate() {
            let alone = match request_id {
                Some(id) => self.memory.check_limit_once(check, id).await,
                None => self.memory.check_limit(check).await.map(|decision| Once {
                    decision,
                    replayed: false,
                }),
            }
            .map_err(|err| TestCaseError::fail(format!("memory store: {err}")))?;
            let batched = batched
                .map_err(|err| TestCaseError::fail(format!("call {i}: Redis batch: {err}")))?;
            prop_assert!(
                same(check.algorithm, &batched, &alone),
                "call {i} ({:?}) answered {:?} batched, {:?} one at a time",
                calls[i],
                batched,
                alone
            );
        }
        Ok(())
    }
}

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: "batch:".to_owned(),
        timeout: Duration::from_secs(5),
        pool_size: 1,
        max_batch: DEFAULT_MAX_BATCH,
    }
}

/// A runtime and a Redis store connected on it, for the store-level tests.
fn store_on(url: String) -> (tokio::runtime::Runtime, RedisStore) {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let redis = runtime
        .block_on(RedisStore::connect(&options(url)))
        .expect("the store connects");
    (runtime, redis)
}

fn check_sequences(url: String, cases: u32) {
    let (runtime, redis) = store_on(url);
    let fixture = StoreFixture {
        redis,
        memory: MemoryStore::new(),
        sequence: AtomicU64::new(0),
    };
    let result = live_runner(cases).run(&calls(48), |calls| runtime.block_on(fixture.run(&calls)));
    if let Err(err) = result {
        panic!("{err}");
    }
}

#[test]
fn batched_decisions_equal_sequential_ones_on_redis() {
    let server = RedisServer::start();
    check_sequences(server.url(), 128);
}

/// Every decision of one script call is made at one instant, that of the
/// call (lua/at_once.lua): the counted calls of a log share one time, and a
/// sliding counter's decisions one reset_after, to the microsecond. Each
/// decision alone would read a later TIME: forty of them take Redis far
/// more than a microsecond.
#[test]
fn a_batch_decides_at_one_instant() {
    let server = RedisServer::start();
    let (runtime, redis) = store_on(server.url());
    let check = |rule, algorithm| LimitCheck {
        rule,
        subject: "instant",
        algorithm,
        limit: 1_000,
        window: HOUR,
        block_for: None,
        cost: 1,
        dry_run: false,
    };
    let checks: Vec<(LimitCheck<'_>, Option<&str>)> = (0..40)
        .map(|i| match i % 2 {
            0 => (check("log", Algorithm::SlidingLog), None),
            _ => (check("counter", Algorithm::SlidingCounter), None),
        })
        .collect();
    let answers = runtime.block_on(redis.check_limit_batch(&checks));

    let mut counter_resets = Vec::new();
    for (i, answer) in answers.into_iter().enumerate() {
        let once = answer.unwrap_or_else(|err| panic!("decision {i}: {err}"));
        assert!(once.decision.allowed, "decision {i}: {once:?}");
        if i % 2 == 1 {
            counter_resets.push(once.decision.reset_after);
        }
    }
    counter_resets.dedup();
    assert_eq!(counter_resets.len(), 1, "{counter_resets:?}");

    let log = KeyBuilder::new("batch:").limit("log", Algorithm::SlidingLog, "instant");
    let members = server.cli(&["ZRANGE", &log.counter, "1", "-1"]);
    let mut times: Vec<&str> = members
        .lines()
        .map(|member| member.split(':').next().unwrap_or(member))
        .collect();
    assert_eq!(times.len(), 20, "{members}");
    times.dedup();
    assert_eq!(times.len(), 1, "{members}");
}

#[test]
fn batched_decisions_equal_sequential_ones_on_a_cluster() {
    let cluster = RedisCluster::start(0);
    check_sequences(cluster.url(), 32);
}

// ---- Over the wire ------------------------------------------------------------

const POLICY: &str = r#"
[store]
timeout = "10s"

[tiers]
names = ["free"]
default = "free"

[rules.api]
window = "1h"
limit = 6

[rules.tokens]
window = "1h"
limit = 20
algorithm = "sliding_counter"

[rules.auth]
window = "1h"
limit = 3
block_for = "1h"

[quotas]
period = "24h"

[quotas.kinds]
text = 10
"#;

const WIRE_RULES: [&str; 3] = ["api", "tokens", "auth"];
/// The CheckLimits groups a step can make: indexes into `WIRE_RULES`.
const WIRE_GROUPS: [&[usize]; 3] = [&[0, 1], &[2, 0], &[1, 2, 0]];
const SUBJECTS: usize = 24;

/// One subject's calls: (what, cost, request id), where `what` below
/// `WIRE_RULES.len()` is a CheckLimit of that rule and the rest are the
/// groups of `WIRE_GROUPS`.
type Script = Vec<(usize, u32, Option<u8>)>;

fn scripts() -> impl Strategy<Value = Vec<Script>> {
    let call = (
        0..WIRE_RULES.len() + WIRE_GROUPS.len(),
        1..=3u32,
        prop::option::weighted(0.3, 0..3u8),
    );
    prop::collection::vec(prop::collection::vec(call, 4..10), SUBJECTS)
}

/// What a call answered, but for times: allowed, then each check's
/// remaining, blocked and replayed (one check for a CheckLimit).
type Answer = (bool, Vec<(u64, bool, bool)>);

/// Every subject's calls, subjects concurrently, each subject's calls in
/// order; round 0 (every subject's first call) only once all of them
/// are in flight, when `hold` says to hold it.
async fn run_all(
    server: &TestServer,
    run: u64,
    scripts: &[Script],
    hold: Option<&RedisServer>,
) -> Vec<Vec<Answer>> {
    let subject = |s: usize| format!("run{run}-s{s}");
    let mut first: Vec<Option<Answer>> = vec![None; scripts.len()];
    if let Some(redis) = hold {
        redis.pause();
        let mut round = JoinSet::new();
        for (s, script) in scripts.iter().enumerate() {
            let server = ServerHandle {
                rate: server.rate.clone(),
            };
            let name = subject(s);
            let step = script[0];
            round.spawn(async move { (s, server.call(&name, &step).await) });
        }
        // Every call is in flight (the first sixteen sent to the stopped
        // Redis, the rest queued behind them) before Redis runs again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while server.metrics.requests_in_flight() < i64::try_from(scripts.len()).unwrap_or(i64::MAX)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        redis.resume();
        while let Some(done) = round.join_next().await {
            let (s, answer) = done.expect("a call task completes");
            first[s] = Some(answer);
        }
    }
    let mut subjects = JoinSet::new();
    for (s, script) in scripts.iter().enumerate() {
        let server = ServerHandle {
            rate: server.rate.clone(),
        };
        let name = subject(s);
        let script = script.clone();
        let mut done = first[s].take();
        subjects.spawn(async move {
            let mut answers = Vec::with_capacity(script.len());
            for (i, step) in script.iter().enumerate() {
                match (i, done.take()) {
                    (0, Some(answer)) => answers.push(answer),
                    _ => answers.push(server.call(&name, step).await),
                }
            }
            (s, answers)
        });
    }
    let mut answers = vec![Vec::new(); scripts.len()];
    while let Some(done) = subjects.join_next().await {
        let (s, subject_answers) = done.expect("a subject's task completes");
        answers[s] = subject_answers;
    }
    answers
}

/// A client of one server, to move into a task.
struct ServerHandle {
    rate: tollgate::proto::rate_limiter_client::RateLimiterClient<tonic::transport::Channel>,
}

impl ServerHandle {
    async fn call(&self, subject: &str, step: &(usize, u32, Option<u8>)) -> Answer {
        let (what, cost, request_id) = *step;
        let check = |rule: usize| CheckLimitRequest {
            rule: WIRE_RULES[rule].to_owned(),
            subject: subject.to_owned(),
            cost,
            ..CheckLimitRequest::default()
        };
        let result = |response: &CheckLimitResponse| {
            (response.remaining, response.blocked, response.replayed)
        };
        let Some(group) = what.checked_sub(WIRE_RULES.len()) else {
            let response = self
                .rate
                .clone()
                .check_limit(CheckLimitRequest {
                    request_id: request_id.map(|id| format!("id-{id}")).unwrap_or_default(),
                    ..check(what)
                })
                .await
                .expect("CheckLimit answers")
                .into_inner();
            return (response.allowed, vec![result(&response)]);
        };
        let response = self
            .rate
            .clone()
            .check_limits(CheckLimitsRequest {
                checks: WIRE_GROUPS[group].iter().map(|&rule| check(rule)).collect(),
                request_id: request_id
                    .map(|id| format!("group-{id}"))
                    .unwrap_or_default(),
            })
            .await
            .expect("CheckLimits answers")
            .into_inner();
        (
            response.allowed,
            response.results.iter().map(result).collect(),
        )
    }
}

/// Decisions and script calls the batch-size histogram has counted.
fn batch_counts(server: &TestServer) -> (f64, f64) {
    let text = server.metrics.encode();
    let read = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        read("tollgate_store_batch_size_sum "),
        read("tollgate_store_batch_size_count "),
    )
}

#[test]
fn concurrent_callers_get_sequential_answers_over_the_wire() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let config = test_config(POLICY);
    let redis_backend = Backend::new(StoreKind::Redis);
    let memory_backend = Backend::new(StoreKind::Memory);
    let (redis, memory) = runtime.block_on(async {
        (
            redis_backend.serve(&config).await,
            memory_backend.serve(&config).await,
        )
    });
    let runs = AtomicU64::new(0);
    let result = live_runner(12).run(&scripts(), |scripts| {
        runtime.block_on(async {
            let run = runs.fetch_add(1, Ordering::Relaxed);
            let (decisions_before, calls_before) = batch_counts(&redis);
            let batched = run_all(&redis, run, &scripts, Some(redis_backend.redis())).await;
            let (decisions_after, calls_after) = batch_counts(&redis);
            let alone = run_all(&memory, run, &scripts, None).await;
            for (s, (batched, alone)) in batched.iter().zip(&alone).enumerate() {
                prop_assert_eq!(batched, alone, "subject {} ({:?})", s, &scripts[s]);
            }
            // Round 0 queued behind the stopped Redis: at least one script
            // call carried more than one decision.
            prop_assert!(
                decisions_after - decisions_before > calls_after - calls_before,
                "no batch of two or more: {} decisions in {} script calls",
                decisions_after - decisions_before,
                calls_after - calls_before
            );
            Ok(())
        })
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
