//! The conformance suite: every behaviour tollgate promises, checked through
//! a real tonic client over a real socket.
//!
//! Each behaviour is written once as `async fn case(backend: Backend)` and
//! expanded by [`conformance!`] into `memory::case`, `redis::case` and
//! `cluster::case`, so the embedded store, the Redis store (a real
//! redis-server per test) and Redis Cluster (a real 3-master cluster per
//! test) can never disagree unnoticed. Time-based cases use real sleeps on windows of
//! one or two seconds; the Redis store keeps time by Redis's own clock.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::time::{Duration, Instant};

use common::server::{Backend, StoreKind, TestServer, shipped_config};
use tokio::{sync::Barrier, task::JoinSet, time::sleep_until};
use tollgate::proto::{
    CheckLimitRequest, CheckLimitResponse, ConversationUsage, GetUsageRequest,
    IncrementUsageRequest, IncrementUsageResponse, ListUsageRequest, UsageCounter,
};
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Expands each case into a test per store.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Memory)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Redis)).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Cluster)).await;
                }
            )*
        }
    };
}

conformance!(
    default_rules_allow_exactly_their_limit,
    tiers_resolve_and_premium_is_higher,
    sliding_log_slides_rather_than_resetting,
    auth_exceeded_blocks_the_subject,
    cost_spends_several_hits_or_none,
    dry_run_counts_nothing,
    sliding_counter_weighs_the_previous_window,
    quotas_allow_exactly_their_limit_per_kind,
    quota_amount_counts_several_or_none,
    premium_bypasses_quotas_but_is_still_counted,
    quota_counters_reset_one_period_after_the_first_message,
    get_usage_reports_every_kind,
    list_usage_lists_live_conversations_sorted,
    bad_input_is_invalid_argument_naming_the_field,
    crafted_ids_never_share_counters,
    health_and_reflection_are_served,
    concurrent_checks_allow_exactly_the_limit,
    concurrent_increments_allow_exactly_the_quota,
);

// ---- Helpers -----------------------------------------------------------------

const MINUTE: Duration = Duration::from_secs(60);

/// A test policy with short windows. Rules:
/// - `burst`: 4 per 2 s, the issue's sliding example;
/// - `lockout`: 3 per 1 s, then blocked for 2 s (longer than the window, so
///   that only the block can explain a denial once the window is empty);
/// - `plain`: 3 per minute;
/// - `smooth`: 4 per 1 s, sliding_counter;
/// - `one`, `two`: 1 per minute; `three`: 1 per minute, sliding_counter.
///
/// Quotas reset 2 s after a conversation's first message: text 3 (free) or
/// unlimited (premium), image 1.
const SHORT_TOML: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[rules.burst]
window = "2s"
limit = 4

[rules.lockout]
window = "1s"
limit = 3
block_for = "2s"

[rules.plain]
window = "1m"
limit = 3

[rules.smooth]
window = "1s"
limit = 4
algorithm = "sliding_counter"

[rules.one]
window = "1m"
limit = 1

[rules.two]
window = "1m"
limit = 1

[rules.three]
window = "1m"
limit = 1
algorithm = "sliding_counter"

[quotas]
period = "2s"

[quotas.kinds]
text = { free = 3, premium = "unlimited" }
image = 1
"#;

fn check_req(rule: &str, subject: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: rule.to_owned(),
        subject: subject.to_owned(),
        ..Default::default()
    }
}

fn incr_req(user_id: &str, character_id: &str, kind: &str) -> IncrementUsageRequest {
    IncrementUsageRequest {
        user_id: user_id.to_owned(),
        character_id: character_id.to_owned(),
        kind: kind.to_owned(),
        ..Default::default()
    }
}

fn get_req(user_id: &str, character_id: &str, tier: &str) -> GetUsageRequest {
    GetUsageRequest {
        user_id: user_id.to_owned(),
        character_id: character_id.to_owned(),
        tier: tier.to_owned(),
    }
}

fn list_req(user_id: &str, tier: &str) -> ListUsageRequest {
    ListUsageRequest {
        user_id: user_id.to_owned(),
        tier: tier.to_owned(),
    }
}

/// The call's answer, or a panic naming the call and the status.
fn ok<T>(result: Result<T, Status>, call: impl std::fmt::Debug) -> T {
    result.unwrap_or_else(|status| {
        panic!("{call:?} failed: {:?}: {}", status.code(), status.message())
    })
}

/// CheckLimit, which must succeed and be answered by the store: nothing in
/// this suite makes the store fail.
async fn check(server: &TestServer, request: CheckLimitRequest) -> CheckLimitResponse {
    let call = request.clone();
    let r = ok(server.check(request).await, &call);
    assert!(
        !r.degraded,
        "{call:?} was answered without the store: {r:?}"
    );
    r
}

/// IncrementUsage, which must succeed and be answered by the store.
async fn increment(server: &TestServer, request: IncrementUsageRequest) -> IncrementUsageResponse {
    let call = request.clone();
    let r = ok(server.increment(request).await, &call);
    assert!(
        !r.degraded,
        "{call:?} was answered without the store: {r:?}"
    );
    r
}

async fn get_usage(server: &TestServer, request: GetUsageRequest) -> Vec<UsageCounter> {
    let call = request.clone();
    ok(server.get_usage(request).await, call).counters
}

async fn list_usage(server: &TestServer, request: ListUsageRequest) -> Vec<ConversationUsage> {
    let call = request.clone();
    ok(server.list_usage(request).await, call).conversations
}

/// A wire duration as a std one; tollgate always sends them, zero included.
fn dur(duration: Option<prost_types::Duration>) -> Duration {
    let duration = duration.expect("tollgate sends every duration, zero included");
    Duration::try_from(duration).expect("tollgate never sends a negative duration")
}

fn counter<'a>(counters: &'a [UsageCounter], kind: &str) -> &'a UsageCounter {
    counters
        .iter()
        .find(|c| c.kind == kind)
        .unwrap_or_else(|| panic!("no {kind:?} counter in {counters:?}"))
}

/// Asserts `d` lies in `[low, high]`.
#[track_caller]
fn assert_between(d: Duration, low: Duration, high: Duration, what: &str) {
    assert!(
        low <= d && d <= high,
        "{what}: {d:?} is not within [{low:?}, {high:?}]"
    );
}

/// When a call took effect, known only to lie between sending it and
/// getting its answer.
#[derive(Debug, Clone, Copy)]
struct Moment {
    sent: Instant,
    answered: Instant,
}

async fn timed_check(
    server: &TestServer,
    request: CheckLimitRequest,
) -> (CheckLimitResponse, Moment) {
    let sent = Instant::now();
    let r = check(server, request).await;
    (
        r,
        Moment {
            sent,
            answered: Instant::now(),
        },
    )
}

async fn timed_increment(
    server: &TestServer,
    request: IncrementUsageRequest,
) -> (IncrementUsageResponse, Moment) {
    let sent = Instant::now();
    let r = increment(server, request).await;
    (
        r,
        Moment {
            sent,
            answered: Instant::now(),
        },
    )
}

/// Asserts that `left`, as reported by a call made at `now`, is the time
/// until `length` after `start`.
#[track_caller]
fn assert_left(left: Duration, start: Moment, length: Duration, now: Moment, what: &str) {
    // Redis rounds some times to whole milliseconds.
    let slack = Duration::from_millis(5);
    let low = (start.sent + length)
        .saturating_duration_since(now.answered)
        .saturating_sub(slack);
    let high = (start.answered + length).saturating_duration_since(now.sent) + slack;
    assert_between(left, low, high, what);
}

/// Asserts an allowed CheckLimit answer.
#[track_caller]
fn assert_allowed(r: &CheckLimitResponse, limit: u64, remaining: u64, what: &str) {
    assert!(r.allowed, "{what}: expected allowed, got {r:?}");
    assert_eq!(r.limit, limit, "{what}: limit in {r:?}");
    assert_eq!(r.remaining, remaining, "{what}: remaining in {r:?}");
    assert_eq!(
        dur(r.retry_after),
        Duration::ZERO,
        "{what}: retry_after when allowed"
    );
    assert!(!r.blocked, "{what}: not blocked: {r:?}");
    assert!(!r.degraded, "{what}: answered by the store: {r:?}");
}

/// Asserts a denied CheckLimit answer and returns its retry_after.
#[track_caller]
fn assert_denied(r: &CheckLimitResponse, remaining: u64, blocked: bool, what: &str) -> Duration {
    assert!(!r.allowed, "{what}: expected denied, got {r:?}");
    assert_eq!(r.remaining, remaining, "{what}: remaining in {r:?}");
    assert_eq!(r.blocked, blocked, "{what}: blocked in {r:?}");
    assert!(!r.degraded, "{what}: answered by the store: {r:?}");
    let retry = dur(r.retry_after);
    assert!(
        retry > Duration::ZERO,
        "{what}: retry_after > 0 when denied: {r:?}"
    );
    retry
}

/// Asserts INVALID_ARGUMENT whose message names `field` and mentions each
/// of `mentions`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    result: Result<T, Status>,
    field: &str,
    mentions: &[&str],
    what: &str,
) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    let message = status.message();
    assert!(
        message.contains(field),
        "{what}: the message {message:?} must name the field {field:?}"
    );
    for mention in mentions {
        assert!(
            message.contains(mention),
            "{what}: the message {message:?} must mention {mention:?}"
        );
    }
}

// ---- Rate limits -------------------------------------------------------------

/// The shipped config's rules: (rule, tier, limit, window, blocks).
const SHIPPED_RULES: &[(&str, &str, u64, Duration, bool)] = &[
    ("api", "free", 100, Duration::from_secs(15 * 60), false),
    ("api", "premium", 1000, Duration::from_secs(15 * 60), false),
    ("auth", "free", 5, Duration::from_secs(15 * 60), true),
    ("auth", "premium", 5, Duration::from_secs(15 * 60), true),
    ("messaging", "free", 10, MINUTE, false),
    ("messaging", "premium", 60, MINUTE, false),
    ("ai", "free", 20, Duration::from_secs(5 * 60), false),
    ("ai", "premium", 200, Duration::from_secs(5 * 60), false),
    ("uploads", "free", 20, Duration::from_secs(60 * 60), false),
    (
        "uploads",
        "premium",
        200,
        Duration::from_secs(60 * 60),
        false,
    ),
];

/// Each shipped rule, per tier, allows exactly its limit in single hits,
/// counting remaining down, and denies the next with a retry_after that is
/// when the first hit leaves the window.
async fn default_rules_allow_exactly_their_limit(backend: Backend) {
    let server = backend.serve_shipped().await;
    for &(rule, tier, limit, window, blocks) in SHIPPED_RULES {
        let subject = format!("user-{rule}-{tier}");
        let request = CheckLimitRequest {
            tier: tier.to_owned(),
            ..check_req(rule, &subject)
        };
        let start = Instant::now();
        for hit in 1..=limit {
            let r = check(&server, request.clone()).await;
            let what = format!("{rule}/{tier} hit {hit} of {limit}");
            assert_allowed(&r, limit, limit - hit, &what);
            // The newest hit leaves the window one window from now.
            assert_between(
                dur(r.reset_after),
                window - Duration::from_secs(2),
                window,
                &what,
            );
        }
        let r = check(&server, request.clone()).await;
        let what = format!("{rule}/{tier} hit {} of {limit}", limit + 1);
        let retry = assert_denied(&r, 0, blocks, &what);
        assert_eq!(r.limit, limit, "{what}: limit");
        if blocks {
            // auth locks the subject out for block_for = 15 min.
            let block = Duration::from_secs(15 * 60);
            assert_between(retry, block - Duration::from_secs(2), block, &what);
        } else {
            // The first hit leaves the window `window` after it was made.
            let earliest = window.saturating_sub(start.elapsed() + Duration::from_millis(50));
            assert_between(retry, earliest, window, &what);
        }
        assert_between(
            dur(r.reset_after),
            window - Duration::from_secs(2),
            window,
            &what,
        );
    }
}

/// Premium limits are strictly higher than free ones, an empty tier is the
/// default tier, the counter belongs to the subject whatever tier it calls
/// with, and an unknown tier is rejected listing the known tiers.
async fn tiers_resolve_and_premium_is_higher(backend: Backend) {
    let server = backend.serve_shipped().await;
    for rule in ["api", "messaging", "ai", "uploads"] {
        let probe = |tier: &str| CheckLimitRequest {
            tier: tier.to_owned(),
            dry_run: true,
            ..check_req(rule, "tier-probe")
        };
        let default = check(&server, probe("")).await;
        let free = check(&server, probe("free")).await;
        let premium = check(&server, probe("premium")).await;
        assert_eq!(default.limit, free.limit, "{rule}: the empty tier is free");
        assert!(
            premium.limit > free.limit,
            "{rule}: premium {} must exceed free {}",
            premium.limit,
            free.limit
        );
    }

    // One subject, one counter: the tier only picks the limit.
    let hit = |tier: &str| CheckLimitRequest {
        tier: tier.to_owned(),
        ..check_req("messaging", "tier-switcher")
    };
    assert_allowed(&check(&server, hit("")).await, 10, 9, "empty tier");
    assert_allowed(&check(&server, hit("free")).await, 10, 8, "free tier");
    assert_allowed(
        &check(&server, hit("premium")).await,
        60,
        57,
        "premium tier",
    );

    let gold = CheckLimitRequest {
        tier: "gold".to_owned(),
        ..check_req("messaging", "tier-switcher")
    };
    assert_invalid(
        server.check(gold).await,
        "tier",
        &["gold", "free", "premium"],
        "CheckLimit with an unknown tier",
    );
    // The rejected call counted nothing.
    assert_allowed(
        &check(&server, hit("free")).await,
        10,
        6,
        "after the unknown tier",
    );
}

/// The issue's example: 4 per 2 s; 2 hits at t = 0 and 2 at t = 1.5 s; a
/// fifth at 1.5 s is denied; at 2.2 s the first two have left, so two more
/// are allowed and a third is denied. A fixed window would allow all four
/// at 2.2 s.
async fn sliding_log_slides_rather_than_resetting(backend: Backend) {
    let server = backend.serve_toml(SHORT_TOML).await;
    let window = Duration::from_secs(2);
    let hit = || check_req("burst", "slider");
    let t0 = Instant::now();
    let (r, first) = timed_check(&server, hit()).await;
    assert_allowed(&r, 4, 3, "t=0 hit 1");
    assert_allowed(&check(&server, hit()).await, 4, 2, "t=0 hit 2");
    assert!(
        t0.elapsed() < Duration::from_millis(200),
        "the t=0 hits took {:?}; the timings below assume < 200 ms",
        t0.elapsed()
    );

    sleep_until((t0 + Duration::from_millis(1500)).into()).await;
    let (r, third) = timed_check(&server, hit()).await;
    assert_allowed(&r, 4, 1, "t=1.5 hit 1");
    let (r, fourth) = timed_check(&server, hit()).await;
    assert_allowed(&r, 4, 0, "t=1.5 hit 2");
    let (r, now) = timed_check(&server, hit()).await;
    let retry = assert_denied(&r, 0, false, "t=1.5 fifth hit");
    // The t=0 hits leave at t=2 s, the t=1.5 hits at t=3.5 s.
    assert_left(retry, first, window, now, "t=1.5 retry_after");
    assert_left(dur(r.reset_after), fourth, window, now, "t=1.5 reset_after");

    sleep_until((t0 + Duration::from_millis(2200)).into()).await;
    assert_allowed(&check(&server, hit()).await, 4, 1, "t=2.2 hit 1");
    assert_allowed(&check(&server, hit()).await, 4, 0, "t=2.2 hit 2");
    let (r, now) = timed_check(&server, hit()).await;
    let retry = assert_denied(&r, 0, false, "t=2.2 third hit");
    // One hit must leave for one more to fit: the oldest, from t=1.5 s.
    assert_left(retry, third, window, now, "t=2.2 retry_after");
}

/// Exceeding a rule with block_for locks the subject out: every attempt
/// during the block is denied with blocked = true and retry_after = the time
/// left; afterwards the subject is allowed again.
async fn auth_exceeded_blocks_the_subject(backend: Backend) {
    // The shipped auth rule: 5 per 15 min, then a 15 min block.
    let server = backend.serve_shipped().await;
    let block = Duration::from_secs(15 * 60);
    for hit in 1..=5 {
        let r = check(&server, check_req("auth", "mallory")).await;
        assert_allowed(&r, 5, 5 - hit, &format!("auth attempt {hit}"));
    }
    let (r, blocked_at) = timed_check(&server, check_req("auth", "mallory")).await;
    let retry = assert_denied(&r, 0, true, "auth attempt 6");
    assert_left(
        retry,
        blocked_at,
        block,
        blocked_at,
        "auth block retry_after",
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (r, now) = timed_check(&server, check_req("auth", "mallory")).await;
    let retry = assert_denied(&r, 0, true, "auth attempt 7, during the block");
    assert_left(
        retry,
        blocked_at,
        block,
        now,
        "the block counts down, not restarted",
    );
    let r = check(&server, check_req("auth", "alice")).await;
    assert_allowed(&r, 5, 4, "another subject");

    // A short rule to watch the block end: 3 per 1 s, blocked for 2 s.
    let server = backend.serve_toml(SHORT_TOML).await;
    let block = Duration::from_secs(2);
    let hit = || check_req("lockout", "mallory");
    let t0 = Instant::now();
    for n in 1..=3 {
        let r = check(&server, hit()).await;
        assert_allowed(&r, 3, 3 - n, &format!("lockout hit {n}"));
    }
    let (r, blocked_at) = timed_check(&server, hit()).await;
    let retry = assert_denied(&r, 0, true, "lockout hit 4");
    assert_left(retry, blocked_at, block, blocked_at, "lockout block");
    assert!(
        t0.elapsed() < Duration::from_millis(300),
        "the lockout hits took {:?}; the timings below assume < 300 ms",
        t0.elapsed()
    );

    // The window (1 s) is empty now; only the block denies.
    sleep_until((t0 + Duration::from_millis(1300)).into()).await;
    let (r, now) = timed_check(&server, hit()).await;
    let retry = assert_denied(&r, 0, true, "lockout at t=1.3, window empty, still blocked");
    assert_left(retry, blocked_at, block, now, "block left at t=1.3");

    sleep_until((blocked_at.answered + block + Duration::from_millis(50)).into()).await;
    let r = check(&server, hit()).await;
    assert_allowed(&r, 3, 2, "lockout after the block");
}

/// cost spends several hits at once; 0 means 1; a cost above what remains
/// is denied and counts nothing; a cost above the limit never fits.
async fn cost_spends_several_hits_or_none(backend: Backend) {
    let server = backend.serve_shipped().await;
    let hit = |cost: u32| CheckLimitRequest {
        cost,
        ..check_req("api", "spender")
    };
    assert_allowed(&check(&server, hit(0)).await, 100, 99, "cost 0 counts as 1");
    assert_allowed(&check(&server, hit(1)).await, 100, 98, "cost 1");
    assert_allowed(&check(&server, hit(97)).await, 100, 1, "cost 97");
    let r = check(&server, hit(2)).await;
    let retry = assert_denied(&r, 1, false, "cost 2 with 1 remaining");
    assert!(
        retry <= Duration::from_secs(15 * 60),
        "retry_after within the window: {retry:?}"
    );
    assert_allowed(
        &check(&server, hit(1)).await,
        100,
        0,
        "the denied cost 2 counted nothing",
    );

    let big = CheckLimitRequest {
        cost: 101,
        ..check_req("api", "greedy")
    };
    let r = check(&server, big).await;
    // It can never fit: both stores document retry_after = reset_after,
    // which is zero while the window is empty.
    assert!(
        !r.allowed && r.remaining == 100 && !r.blocked,
        "cost 101 over a limit of 100: {r:?}"
    );
    assert_eq!(r.retry_after, r.reset_after, "cost 101 never fits: {r:?}");
    let all = CheckLimitRequest {
        cost: 100,
        ..check_req("api", "greedy")
    };
    assert_allowed(
        &check(&server, all).await,
        100,
        0,
        "cost 100 after the denied 101",
    );
}

/// dry_run answers what would happen and counts nothing, allowed or denied,
/// and never starts a block; it still reports a block in force.
async fn dry_run_counts_nothing(backend: Backend) {
    let server = backend.serve_toml(SHORT_TOML).await;
    let dry = |rule: &str, cost: u32| CheckLimitRequest {
        cost,
        dry_run: true,
        ..check_req(rule, "dreamer")
    };
    let real = |rule: &str| check_req(rule, "dreamer");

    for n in 1..=3 {
        let r = check(&server, dry("plain", 1)).await;
        assert_allowed(&r, 3, 2, &format!("dry run {n}"));
        assert_eq!(
            dur(r.reset_after),
            Duration::ZERO,
            "dry run {n}: the window is still empty"
        );
    }
    assert_allowed(
        &check(&server, dry("plain", 3)).await,
        3,
        0,
        "dry run of cost 3",
    );
    assert_allowed(
        &check(&server, real("plain")).await,
        3,
        2,
        "real hit 1 after dry runs",
    );
    assert_allowed(&check(&server, real("plain")).await, 3, 1, "real hit 2");
    assert_allowed(&check(&server, real("plain")).await, 3, 0, "real hit 3");
    let r = check(&server, dry("plain", 1)).await;
    assert_denied(&r, 0, false, "dry run at the limit");

    // A dry run past the limit of a blocking rule starts no block.
    let t0 = Instant::now();
    for n in 1..=3 {
        assert_allowed(
            &check(&server, real("lockout")).await,
            3,
            3 - n,
            &format!("lockout hit {n}"),
        );
    }
    for n in 1..=2 {
        let r = check(&server, dry("lockout", 1)).await;
        assert_denied(&r, 0, false, &format!("lockout dry run {n} past the limit"));
    }
    sleep_until((t0 + Duration::from_millis(1200)).into()).await;
    assert_allowed(
        &check(&server, real("lockout")).await,
        3,
        2,
        "no block after the dry runs",
    );
    assert_allowed(
        &check(&server, real("lockout")).await,
        3,
        1,
        "lockout hit 2",
    );
    assert_allowed(
        &check(&server, real("lockout")).await,
        3,
        0,
        "lockout hit 3",
    );
    let r = check(&server, real("lockout")).await;
    assert_denied(&r, 0, true, "a real hit past the limit blocks");
    let r = check(&server, dry("lockout", 1)).await;
    assert_denied(&r, 0, true, "a dry run reports the block in force");
}

/// sliding_counter: the previous fixed window is weighted by how much of it
/// the sliding window still covers, so a full window keeps denying just past
/// the boundary and admits hits gradually.
async fn sliding_counter_weighs_the_previous_window(backend: Backend) {
    let server = backend.serve_toml(SHORT_TOML).await;
    let window = Duration::from_secs(1);
    // The four hits must land in one fixed window; if a boundary falls
    // between them, try again with another subject.
    for attempt in 0..3 {
        let subject = format!("smooth-{attempt}");
        let hit = || check_req("smooth", &subject);
        let mut elapsed = Vec::new();
        let mut moments = Vec::new();
        for n in 1..=4 {
            let (r, moment) = timed_check(&server, hit()).await;
            moments.push(moment);
            assert_allowed(&r, 4, 4 - n, &format!("smooth hit {n}"));
            // reset_after = 2 * window - elapsed, while the current window
            // holds hits: it tells where the fixed window boundary is.
            let reset = dur(r.reset_after);
            assert_between(
                reset,
                window,
                2 * window,
                &format!("smooth hit {n} reset_after"),
            );
            elapsed.push(2 * window - reset);
        }
        if elapsed[3] < elapsed[0] {
            continue;
        }
        // The next fixed window starts between these two instants.
        let to_boundary = window - elapsed[3];
        let boundary = Moment {
            sent: moments[3].sent + to_boundary,
            answered: moments[3].answered + to_boundary,
        };
        // Just past the boundary the four hits weigh 4 * (1 - elapsed /
        // window), so one more fits only once a quarter window has passed,
        // both now and just past the boundary.
        let quarter = window / 4;
        let (r, now) = timed_check(&server, hit()).await;
        let retry = assert_denied(&r, 0, false, "smooth hit 5");
        assert_left(retry, boundary, quarter, now, "smooth hit 5 retry_after");

        // 0.1 window past the boundary the estimate is 4 * 0.9 = 3.6: a
        // fixed window would allow, the sliding counter denies.
        sleep_until((boundary.answered + window / 10).into()).await;
        let (r, now) = timed_check(&server, hit()).await;
        let retry = assert_denied(&r, 0, false, "smooth just past the boundary");
        assert_left(
            retry,
            boundary,
            quarter,
            now,
            "smooth retry_after past the boundary",
        );

        // Half a window past the boundary the estimate is 2: two more fit.
        sleep_until((boundary.answered + window / 2).into()).await;
        assert_allowed(&check(&server, hit()).await, 4, 1, "smooth half way, hit 1");
        assert_allowed(&check(&server, hit()).await, 4, 0, "smooth half way, hit 2");
        assert_denied(
            &check(&server, hit()).await,
            0,
            false,
            "smooth half way, hit 3",
        );
        return;
    }
    panic!("three attempts each straddled a fixed window boundary");
}

// ---- Quotas ------------------------------------------------------------------

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Shipped quotas: 30 text, 5 audio, 5 image per free conversation; the next
/// is denied and counts nothing; kinds and conversations count apart.
async fn quotas_allow_exactly_their_limit_per_kind(backend: Backend) {
    let server = backend.serve_shipped().await;
    for (kind, limit) in [("text", 30), ("audio", 5), ("image", 5)] {
        for n in 1..=limit {
            let r = increment(&server, incr_req("ann", "luna", kind)).await;
            let what = format!("{kind} message {n} of {limit}");
            assert!(r.allowed && !r.unlimited && !r.degraded, "{what}: {r:?}");
            assert_eq!(
                (r.used, r.limit, r.remaining),
                (n, limit, limit - n),
                "{what}"
            );
            assert_between(
                dur(r.resets_after),
                DAY - Duration::from_secs(5),
                DAY,
                &what,
            );
        }
        let r = increment(&server, incr_req("ann", "luna", kind)).await;
        let what = format!("{kind} message {}", limit + 1);
        assert!(!r.allowed && !r.unlimited, "{what}: denied: {r:?}");
        assert_eq!((r.used, r.limit, r.remaining), (limit, limit, 0), "{what}");
        assert_between(
            dur(r.resets_after),
            DAY - Duration::from_secs(5),
            DAY,
            &what,
        );
    }
    let counters = get_usage(&server, get_req("ann", "luna", "")).await;
    for (kind, limit) in [("text", 30), ("audio", 5), ("image", 5)] {
        let c = counter(&counters, kind);
        assert_eq!(
            (c.used, c.limit, c.remaining),
            (limit, limit, 0),
            "{kind}: denied calls counted nothing"
        );
    }
    let r = increment(&server, incr_req("ann", "mars", "text")).await;
    assert!(r.allowed, "another conversation counts apart: {r:?}");
    assert_eq!((r.used, r.remaining), (1, 29), "another conversation");
    let r = increment(&server, incr_req("bob", "luna", "text")).await;
    assert!(r.allowed, "another user counts apart: {r:?}");
    assert_eq!((r.used, r.remaining), (1, 29), "another user");
}

/// amount counts several messages at once; 0 means 1; an amount past the
/// quota is denied whole and counts nothing.
async fn quota_amount_counts_several_or_none(backend: Backend) {
    let server = backend.serve_shipped().await;
    let msg = |amount: u32| IncrementUsageRequest {
        amount,
        ..incr_req("ann", "luna", "text")
    };
    let r = increment(&server, msg(0)).await;
    assert!(
        r.allowed && r.used == 1 && r.remaining == 29,
        "amount 0 counts 1: {r:?}"
    );
    let r = increment(&server, msg(10)).await;
    assert!(
        r.allowed && r.used == 11 && r.remaining == 19,
        "amount 10: {r:?}"
    );
    let r = increment(&server, msg(20)).await;
    assert!(
        !r.allowed && r.used == 11 && r.remaining == 19,
        "amount 20 past the quota: {r:?}"
    );
    let r = increment(&server, msg(19)).await;
    assert!(
        r.allowed && r.used == 30 && r.remaining == 0,
        "amount 19 fills the quota: {r:?}"
    );
    let r = increment(&server, msg(1)).await;
    assert!(!r.allowed && r.used == 30, "full: {r:?}");
}

/// Premium is unlimited: always allowed, still counted (so usage can be
/// shown), with limit = remaining = 0 and unlimited = true.
async fn premium_bypasses_quotas_but_is_still_counted(backend: Backend) {
    let server = backend.serve_shipped().await;
    let free = |amount: u32| IncrementUsageRequest {
        amount,
        ..incr_req("vip", "luna", "text")
    };
    let premium = |amount: u32| IncrementUsageRequest {
        tier: "premium".to_owned(),
        ..free(amount)
    };
    let r = increment(&server, free(30)).await;
    assert!(r.allowed && r.used == 30, "free fills the quota: {r:?}");
    assert!(
        !increment(&server, free(1)).await.allowed,
        "free is then denied"
    );

    let r = increment(&server, premium(1)).await;
    assert!(
        r.allowed && r.unlimited,
        "premium past the free quota: {r:?}"
    );
    assert_eq!(
        (r.used, r.limit, r.remaining),
        (31, 0, 0),
        "premium is counted: {r:?}"
    );
    assert_between(
        dur(r.resets_after),
        DAY - Duration::from_secs(5),
        DAY,
        "premium resets_after",
    );
    let r = increment(&server, premium(1000)).await;
    assert!(
        r.allowed && r.unlimited && r.used == 1031,
        "premium amount 1000: {r:?}"
    );

    let r = increment(&server, incr_req("vip2", "luna", "image")).await;
    assert!(
        r.allowed && !r.unlimited && r.used == 1,
        "free image: {r:?}"
    );

    let counters = get_usage(&server, get_req("vip", "luna", "premium")).await;
    let text = counter(&counters, "text");
    assert!(
        text.unlimited && text.used == 1031 && text.limit == 0 && text.remaining == 0,
        "premium GetUsage: {text:?}"
    );
    let counters = get_usage(&server, get_req("vip", "luna", "free")).await;
    let text = counter(&counters, "text");
    assert!(
        !text.unlimited && text.used == 1031 && text.limit == 30 && text.remaining == 0,
        "free GetUsage: {text:?}"
    );
    let r = increment(&server, free(1)).await;
    assert!(
        !r.allowed && r.used == 1031 && r.remaining == 0,
        "free after premium use: {r:?}"
    );
}

/// Counters reset one period after the conversation's first counted message
/// (rolling, not extended by later messages); expired conversations vanish
/// from GetUsage and ListUsage.
async fn quota_counters_reset_one_period_after_the_first_message(backend: Backend) {
    let server = backend.serve_toml(SHORT_TOML).await;
    let period = Duration::from_secs(2);
    let (r, first) = timed_increment(&server, incr_req("eve", "luna", "text")).await;
    assert!(
        r.allowed && r.used == 1 && r.remaining == 2,
        "first message: {r:?}"
    );
    assert_left(
        dur(r.resets_after),
        first,
        period,
        first,
        "first resets_after",
    );

    sleep_until((first.sent + Duration::from_millis(1000)).into()).await;
    let (r, now) = timed_increment(&server, incr_req("eve", "luna", "image")).await;
    assert!(r.allowed && r.used == 1, "image at t=1: {r:?}");
    assert_left(
        dur(r.resets_after),
        first,
        period,
        now,
        "not extended by later messages",
    );
    let sent = Instant::now();
    let counters = get_usage(&server, get_req("eve", "luna", "")).await;
    let now = Moment {
        sent,
        answered: Instant::now(),
    };
    for c in &counters {
        assert_left(
            dur(c.resets_after),
            first,
            period,
            now,
            "GetUsage resets_after at t=1",
        );
    }
    assert_eq!(counter(&counters, "text").used, 1, "text at t=1");
    let listed = list_usage(&server, list_req("eve", "")).await;
    assert_eq!(listed.len(), 1, "listed at t=1");

    sleep_until((first.answered + period + Duration::from_millis(50)).into()).await;
    let counters = get_usage(&server, get_req("eve", "luna", "")).await;
    for c in &counters {
        assert_eq!(
            (c.used, c.remaining),
            (0, c.limit),
            "reset after the period: {c:?}"
        );
        assert_eq!(
            dur(c.resets_after),
            Duration::ZERO,
            "no counters, no reset: {c:?}"
        );
    }
    assert!(
        list_usage(&server, list_req("eve", "")).await.is_empty(),
        "expired conversations are not listed"
    );
    let (r, again) = timed_increment(&server, incr_req("eve", "luna", "text")).await;
    assert!(r.allowed && r.used == 1, "counting starts again: {r:?}");
    assert_left(dur(r.resets_after), again, period, again, "a new period");
}

/// GetUsage reports every configured kind, sorted by name: a conversation
/// never used shows used = 0 and remaining = limit.
async fn get_usage_reports_every_kind(backend: Backend) {
    let server = backend.serve_shipped().await;
    let fresh = get_usage(&server, get_req("nobody", "luna", "")).await;
    let kinds: Vec<&str> = fresh.iter().map(|c| c.kind.as_str()).collect();
    assert_eq!(kinds, ["audio", "image", "text"], "every kind, sorted");
    for (c, limit) in fresh.iter().zip([5, 5, 30]) {
        assert_eq!(
            (c.used, c.limit, c.remaining, c.unlimited),
            (0, limit, limit, false),
            "never used: {c:?}"
        );
        assert_eq!(dur(c.resets_after), Duration::ZERO, "never used: {c:?}");
    }
    let premium = get_usage(&server, get_req("nobody", "luna", "premium")).await;
    for c in &premium {
        assert!(
            c.unlimited && c.used == 0 && c.limit == 0 && c.remaining == 0,
            "premium, never used: {c:?}"
        );
    }

    let three = IncrementUsageRequest {
        amount: 3,
        ..incr_req("ann", "luna", "text")
    };
    increment(&server, three).await;
    increment(&server, incr_req("ann", "luna", "audio")).await;
    let used = get_usage(&server, get_req("ann", "luna", "")).await;
    let summary: Vec<(&str, u64, u64, u64)> = used
        .iter()
        .map(|c| (c.kind.as_str(), c.used, c.limit, c.remaining))
        .collect();
    assert_eq!(
        summary,
        [("audio", 1, 5, 4), ("image", 0, 5, 5), ("text", 3, 30, 27)],
        "after use"
    );
    for c in &used {
        assert_between(
            dur(c.resets_after),
            DAY - Duration::from_secs(5),
            DAY,
            "after use",
        );
    }
    let other = get_usage(&server, get_req("ann", "mars", "")).await;
    assert!(
        other.iter().all(|c| c.used == 0),
        "another conversation is untouched: {other:?}"
    );
}

/// ListUsage lists one user's live conversations, sorted by character id,
/// and nothing for a user with none.
async fn list_usage_lists_live_conversations_sorted(backend: Backend) {
    let server = backend.serve_shipped().await;
    for (character, kind) in [
        ("zeta", "text"),
        ("alpha", "image"),
        ("Mid", "text"),
        ("émile", "audio"),
        ("alpha", "text"),
    ] {
        increment(&server, incr_req("lister", character, kind)).await;
    }
    increment(&server, incr_req("someone-else", "beta", "text")).await;

    let listed = list_usage(&server, list_req("lister", "")).await;
    let ids: Vec<&str> = listed.iter().map(|c| c.character_id.as_str()).collect();
    // Sorted bytewise: upper case before lower case, UTF-8 after ASCII.
    assert_eq!(
        ids,
        ["Mid", "alpha", "zeta", "émile"],
        "sorted by character id, no other user's"
    );
    let alpha = &listed[1].counters;
    let summary: Vec<(&str, u64, u64)> = alpha
        .iter()
        .map(|c| (c.kind.as_str(), c.used, c.remaining))
        .collect();
    assert_eq!(
        summary,
        [("audio", 0, 5), ("image", 1, 4), ("text", 1, 29)],
        "alpha's counters"
    );
    for conversation in &listed {
        assert_eq!(
            conversation.counters.len(),
            3,
            "every kind: {conversation:?}"
        );
    }

    let premium = list_usage(&server, list_req("lister", "premium")).await;
    assert_eq!(premium.len(), 4, "the tier only changes the limits shown");
    assert!(
        premium
            .iter()
            .flat_map(|c| &c.counters)
            .all(|c| c.unlimited),
        "premium shows unlimited: {premium:?}"
    );

    assert!(
        list_usage(&server, list_req("unknown-user", ""))
            .await
            .is_empty(),
        "an unknown user has no conversations"
    );
}

// ---- Bad input ---------------------------------------------------------------

/// Every bad input is INVALID_ARGUMENT naming the field; unknown rules,
/// tiers and kinds list the known ones. 256 bytes is the longest id.
async fn bad_input_is_invalid_argument_naming_the_field(backend: Backend) {
    let server = backend.serve_shipped().await;
    let longest = "x".repeat(256);
    let too_long = "x".repeat(257);
    // 128 two-byte characters: 256 bytes; 129 of them: 258 bytes.
    let longest_wide = "é".repeat(128);
    let too_long_wide = "é".repeat(129);
    let rules = ["ai", "api", "auth", "messaging", "uploads"];
    let tiers = ["free", "premium"];
    let kinds = ["audio", "image", "text"];

    // CheckLimit.
    for (subject, problem) in [
        ("", "empty"),
        (too_long.as_str(), "256"),
        (too_long_wide.as_str(), "256"),
    ] {
        let what = format!("CheckLimit subject of {} bytes", subject.len());
        assert_invalid(
            server.check(check_req("api", subject)).await,
            "subject",
            &[problem],
            &what,
        );
    }
    for rule in ["nope", ""] {
        let mut mentions = vec![format!("{rule:?}")];
        mentions.extend(rules.iter().map(|r| r.to_string()));
        let mentions: Vec<&str> = mentions.iter().map(String::as_str).collect();
        assert_invalid(
            server.check(check_req(rule, "s")).await,
            "rule",
            &mentions,
            &format!("CheckLimit rule {rule:?}"),
        );
    }
    let gold = CheckLimitRequest {
        tier: "gold".to_owned(),
        ..check_req("api", "s")
    };
    assert_invalid(
        server.check(gold).await,
        "tier",
        &tiers,
        "CheckLimit tier gold",
    );
    for subject in [&longest, &longest_wide] {
        let r = check(&server, check_req("api", subject)).await;
        assert!(r.allowed, "a 256-byte subject is fine: {r:?}");
    }

    // IncrementUsage.
    for (id, problem) in [
        ("", "empty"),
        (too_long.as_str(), "256"),
        (too_long_wide.as_str(), "256"),
    ] {
        let what = format!("IncrementUsage with an id of {} bytes", id.len());
        assert_invalid(
            server.increment(incr_req(id, "luna", "text")).await,
            "user_id",
            &[problem],
            &what,
        );
        assert_invalid(
            server.increment(incr_req("ann", id, "text")).await,
            "character_id",
            &[problem],
            &what,
        );
    }
    for kind in ["video", ""] {
        let mut mentions = vec![format!("{kind:?}")];
        mentions.extend(kinds.iter().map(|k| k.to_string()));
        let mentions: Vec<&str> = mentions.iter().map(String::as_str).collect();
        assert_invalid(
            server.increment(incr_req("ann", "luna", kind)).await,
            "kind",
            &mentions,
            &format!("IncrementUsage kind {kind:?}"),
        );
    }
    let gold = IncrementUsageRequest {
        tier: "gold".to_owned(),
        ..incr_req("ann", "luna", "text")
    };
    assert_invalid(
        server.increment(gold).await,
        "tier",
        &tiers,
        "IncrementUsage tier gold",
    );
    for id in [&longest, &longest_wide] {
        let r = increment(&server, incr_req(id, id, "text")).await;
        assert!(r.allowed && r.used == 1, "256-byte ids are fine: {r:?}");
    }

    // GetUsage.
    for (id, problem) in [("", "empty"), (too_long.as_str(), "256")] {
        let what = format!("GetUsage with an id of {} bytes", id.len());
        assert_invalid(
            server.get_usage(get_req(id, "luna", "")).await,
            "user_id",
            &[problem],
            &what,
        );
        assert_invalid(
            server.get_usage(get_req("ann", id, "")).await,
            "character_id",
            &[problem],
            &what,
        );
    }
    assert_invalid(
        server.get_usage(get_req("ann", "luna", "gold")).await,
        "tier",
        &tiers,
        "GetUsage tier gold",
    );
    let counters = get_usage(&server, get_req(&longest, &longest, "")).await;
    assert_eq!(
        counter(&counters, "text").used,
        1,
        "GetUsage with 256-byte ids"
    );

    // ListUsage.
    for (id, problem) in [("", "empty"), (too_long.as_str(), "256")] {
        let what = format!("ListUsage with a user_id of {} bytes", id.len());
        assert_invalid(
            server.list_usage(list_req(id, "")).await,
            "user_id",
            &[problem],
            &what,
        );
    }
    assert_invalid(
        server.list_usage(list_req("ann", "gold")).await,
        "tier",
        &tiers,
        "ListUsage tier gold",
    );
    let listed = list_usage(&server, list_req(&longest_wide, "")).await;
    assert_eq!(listed.len(), 1, "ListUsage with a 256-byte user_id");
    assert_eq!(
        listed[0].character_id, longest_wide,
        "the character id comes back intact"
    );

    // Rejected calls counted nothing.
    let r = check(&server, check_req("api", "s")).await;
    assert_eq!(
        r.remaining, 99,
        "the rejected CheckLimits on subject s counted nothing"
    );
    let counters = get_usage(&server, get_req("ann", "luna", "")).await;
    assert!(
        counters.iter().all(|c| c.used == 0),
        "the rejected increments counted nothing: {counters:?}"
    );
}

// ---- Crafted ids ---------------------------------------------------------------

/// Subjects made to look like key separators, hash tags, encodings of each
/// other or other rules' keys.
const CRAFTED_SUBJECTS: &[&str] = &[
    "a:b",
    "a%3Ab",
    "a%3ab",
    "a",
    "b",
    "a%",
    "a%25",
    "%",
    "%3A",
    ":",
    "::",
    "x}:{rl:one:y",
    "x",
    "y",
    "x}",
    "{rl:one:y}",
    "one:y",
    "y}:log",
    "y}:ctr",
    "{u1}",
    "u1",
    "{u1",
    "u1}",
    "{}",
    "}{",
    "u1:c:luna",
    "luna",
    " ",
    "\u{0}",
    "é",
    "%C3%A9",
];

/// Crafted ids never reach each other's counters: every (rule, subject)
/// gets its own counter, and every (user, character) its own conversation.
async fn crafted_ids_never_share_counters(backend: Backend) {
    // A long quota period: both passes must fall in one period.
    let server = backend
        .serve_toml(&SHORT_TOML.replace(r#"period = "2s""#, r#"period = "1h""#))
        .await;
    // Limit 1 each: if two pairs shared a counter, the second pair's first
    // hit would be denied.
    for pass in ["first", "second"] {
        for rule in ["one", "two", "three"] {
            for subject in CRAFTED_SUBJECTS {
                let r = check(&server, check_req(rule, subject)).await;
                let what = format!("{pass} hit of rule {rule} by {subject:?}");
                if pass == "first" {
                    assert_allowed(&r, 1, 0, &what);
                } else {
                    assert_denied(&r, 0, false, &what);
                }
            }
        }
    }

    let users = [
        "u1",
        "{u1}",
        "{u1",
        "u1}",
        "u1:c:luna",
        "u1:c",
        "u1}:c:{luna",
        "a:b",
        "a%3Ab",
        "u1:idx",
        "u1}:idx",
    ];
    let characters = ["luna", "c:luna", "{luna}", ":", "x", "idx", "luna:text"];
    // image = 1 per conversation.
    for pass in ["first", "second"] {
        for user in users {
            for character in characters {
                let r = increment(&server, incr_req(user, character, "image")).await;
                let what = format!("{pass} image of ({user:?}, {character:?})");
                assert_eq!(r.used, 1, "{what}: {r:?}");
                assert_eq!(r.allowed, pass == "first", "{what}: {r:?}");
            }
        }
    }
    let mut sorted = characters.to_vec();
    sorted.sort_unstable();
    for user in users {
        let listed = list_usage(&server, list_req(user, "")).await;
        let ids: Vec<&str> = listed.iter().map(|c| c.character_id.as_str()).collect();
        assert_eq!(ids, sorted, "{user:?} lists exactly its own conversations");
        for conversation in &listed {
            let image = counter(&conversation.counters, "image");
            let text = counter(&conversation.counters, "text");
            assert_eq!(
                (image.used, text.used),
                (1, 0),
                "{user:?}: {conversation:?}"
            );
        }
    }
}

// ---- Health and reflection -------------------------------------------------------

/// The health service reports SERVING for the server and both services, and
/// reflection (v1 and v1alpha) lists tollgate's services and Envoy's.
async fn health_and_reflection_are_served(backend: Backend) {
    let server = backend.serve_shipped().await;
    for service in ["", "tollgate.v1.RateLimiter", "tollgate.v1.UsageQuota"] {
        let (status, _) = server
            .await_health(service, ServingStatus::Serving, Duration::from_secs(3))
            .await;
        assert_eq!(status, ServingStatus::Serving, "health of {service:?}");
    }
    let (v1, v1alpha) = server.reflected_services().await;
    for listed in [&v1, &v1alpha] {
        for service in [
            "tollgate.v1.RateLimiter",
            "tollgate.v1.UsageQuota",
            "envoy.service.ratelimit.v3.RateLimitService",
            "grpc.health.v1.Health",
        ] {
            assert!(
                listed.iter().any(|s| s == service),
                "reflection lists {service}: {listed:?}"
            );
        }
    }
    server.stop().await;
}

// ---- Concurrency ---------------------------------------------------------------------

/// Simultaneous calls: two tollgate instances sharing one Redis, or one
/// instance on the memory store.
const CALLS: usize = 200;

async fn instances(backend: &Backend) -> Vec<TestServer> {
    let count = match backend.kind() {
        StoreKind::Memory => 1,
        StoreKind::Redis | StoreKind::Cluster => 2,
    };
    let mut config = shipped_config();
    // These cases pin atomicity, not latency: 200 calls at once on a debug
    // build, beside the rest of the suite, can take longer than the shipped
    // 250 ms, and a timed-out call gets a degraded (fail-open) answer.
    config.settings.store.timeout = Duration::from_secs(5);
    let mut servers = Vec::new();
    for _ in 0..count {
        servers.push(backend.serve(&config).await);
    }
    servers
}

/// 200 simultaneous CheckLimit calls on one subject of the shipped 10 per
/// minute messaging rule allow exactly 10, each seeing a distinct remaining.
async fn concurrent_checks_allow_exactly_the_limit(backend: Backend) {
    let servers = instances(&backend).await;
    let barrier = std::sync::Arc::new(Barrier::new(CALLS));
    let mut calls = JoinSet::new();
    for i in 0..CALLS {
        let mut client = servers[i % servers.len()].rate.clone();
        let barrier = barrier.clone();
        calls.spawn(async move {
            barrier.wait().await;
            client
                .check_limit(check_req("messaging", "crowd"))
                .await
                .map(|r| r.into_inner())
        });
    }
    let started = Instant::now();
    let mut remaining = Vec::new();
    let mut denied = 0;
    while let Some(joined) = calls.join_next().await {
        let r = ok(
            joined.expect("a call task does not panic"),
            "concurrent CheckLimit",
        );
        assert!(!r.degraded, "answered by the store under load: {r:?}");
        if r.allowed {
            remaining.push(r.remaining);
        } else {
            assert_eq!(r.remaining, 0, "denied: {r:?}");
            denied += 1;
        }
    }
    eprintln!(
        "{CALLS} CheckLimit calls on {} instance(s) took {:?}",
        servers.len(),
        started.elapsed()
    );
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..10).collect::<Vec<u64>>(),
        "exactly 10 allowed, each counted once"
    );
    assert_eq!(denied, CALLS - 10, "the rest denied");
    for server in &servers {
        let r = check(server, check_req("messaging", "crowd")).await;
        assert_denied(&r, 0, false, "after the crowd");
    }
}

/// 200 simultaneous text increments on one free conversation allow exactly
/// 30, each seeing a distinct used count, and leave used at 30.
async fn concurrent_increments_allow_exactly_the_quota(backend: Backend) {
    let servers = instances(&backend).await;
    let barrier = std::sync::Arc::new(Barrier::new(CALLS));
    let mut calls = JoinSet::new();
    for i in 0..CALLS {
        let mut client = servers[i % servers.len()].quota.clone();
        let barrier = barrier.clone();
        calls.spawn(async move {
            barrier.wait().await;
            client
                .increment_usage(incr_req("crowd", "luna", "text"))
                .await
                .map(|r| r.into_inner())
        });
    }
    let started = Instant::now();
    let mut used = Vec::new();
    let mut denied = 0;
    while let Some(joined) = calls.join_next().await {
        let r = ok(
            joined.expect("a call task does not panic"),
            "concurrent IncrementUsage",
        );
        assert!(!r.degraded, "answered by the store under load: {r:?}");
        if r.allowed {
            used.push(r.used);
        } else {
            assert_eq!(r.used, 30, "denied at the edge: {r:?}");
            denied += 1;
        }
    }
    eprintln!(
        "{CALLS} IncrementUsage calls on {} instance(s) took {:?}",
        servers.len(),
        started.elapsed()
    );
    used.sort_unstable();
    assert_eq!(
        used,
        (1..=30).collect::<Vec<u64>>(),
        "exactly 30 allowed, each counted once"
    );
    assert_eq!(denied, CALLS - 30, "the rest denied");
    for server in &servers {
        let counters = get_usage(server, get_req("crowd", "luna", "")).await;
        assert_eq!(counter(&counters, "text").used, 30, "used ends at 30");
    }
}

// ---- RateLimit headers and shadow rules (issue 11, parts 4 and 5) -----------

/// CheckLimit's `ratelimit_policy` and `ratelimit`, read back with an RFC
/// 8941 parser, and shadow rules, on every store.
mod headers_and_shadow {
    use super::*;
    use common::ratelimit_headers;

    conformance!(
        ratelimit_values_parse_back_as_the_draft_writes_them,
        ratelimit_values_follow_the_window_to_a_denial,
        shadow_rules_allow_and_say_shadowed,
        a_shadow_denial_counts_nothing,
        a_shadow_block_is_allowed_and_still_blocks_the_window,
    );

    /// - `api`: 100 (free) or 1000 (premium) per 15 minutes;
    /// - `frac`: 2 per 2.5 s (a window that is not whole seconds);
    /// - `watch`: 2 per minute, shadow;
    /// - `budget`: 3 per minute, shadow, spent with costs;
    /// - `trap`: 1 per 2 s, then blocked for 1 minute, shadow.
    const TOML: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[rules.api]
window = "15m"
limit = { free = 100, premium = 1000 }

[rules.frac]
window = "2500ms"
limit = 2

[rules.watch]
window = "1m"
limit = 2
shadow = true

[rules.budget]
window = "1m"
limit = 3
shadow = true

[rules.trap]
window = "2s"
limit = 1
block_for = "1m"
shadow = true

[quotas.kinds]
text = 3
"#;

    /// Whole seconds, rounded up, as the `t` parameter counts them.
    fn ceil_secs(d: Duration) -> i64 {
        let secs = i64::try_from(d.as_secs()).expect("a test duration fits");
        secs + i64::from(d.subsec_nanos() > 0)
    }

    /// Checks both header values of `r` against its own fields.
    #[track_caller]
    fn assert_values(r: &CheckLimitResponse, rule: &str, w: i64) {
        let limit = i64::try_from(r.limit).expect("a test limit fits");
        assert_eq!(
            ratelimit_headers::policy(&r.ratelimit_policy),
            (rule.to_owned(), limit, w),
            "{r:?}"
        );
        let remaining = i64::try_from(r.remaining).expect("a test figure fits");
        assert_eq!(
            ratelimit_headers::ratelimit(&r.ratelimit),
            (rule.to_owned(), remaining, ceil_secs(dur(r.reset_after))),
            "{r:?}"
        );
    }

    fn cost_req(rule: &str, subject: &str, cost: u32) -> CheckLimitRequest {
        CheckLimitRequest {
            cost,
            ..check_req(rule, subject)
        }
    }

    /// The `tollgate_decisions_total` sample of `rule` for the free tier.
    fn decisions(server: &TestServer, rule: &str, outcome: &str) -> u64 {
        let prefix = format!(
            r#"tollgate_decisions_total{{rule="{rule}",tier="free",outcome="{outcome}"}} "#
        );
        server
            .metrics
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().expect("a counter is a number"))
    }

    async fn ratelimit_values_parse_back_as_the_draft_writes_them(backend: Backend) {
        let server = backend.serve_toml(TOML).await;
        let r = check(&server, check_req("api", "ann")).await;
        assert!(r.allowed);
        // The exact strings, so that callers may compare them.
        assert_eq!(r.ratelimit_policy, r#""api";q=100;w=900"#);
        assert_eq!(r.ratelimit, r#""api";r=99;t=900"#, "{r:?}");
        assert_values(&r, "api", 900);

        let premium = check(
            &server,
            CheckLimitRequest {
                tier: "premium".to_owned(),
                ..check_req("api", "bob")
            },
        )
        .await;
        assert_eq!(premium.ratelimit_policy, r#""api";q=1000;w=900"#);
        assert_values(&premium, "api", 900);

        // 2.5 s is written as 3: rounded up.
        let frac = check(&server, check_req("frac", "ann")).await;
        assert_values(&frac, "frac", 3);
        assert_eq!(
            ratelimit_headers::ratelimit(&frac.ratelimit).2,
            3,
            "{frac:?}"
        );

        // A dry run's values are those of its answer too.
        let dry = check(
            &server,
            CheckLimitRequest {
                dry_run: true,
                ..check_req("api", "ann")
            },
        )
        .await;
        assert_eq!(dry.remaining, 98, "what would be left after the hit");
        assert_values(&dry, "api", 900);
    }

    async fn ratelimit_values_follow_the_window_to_a_denial(backend: Backend) {
        let server = backend.serve_toml(TOML).await;
        for remaining in [1, 0] {
            let r = check(&server, check_req("frac", "cy")).await;
            assert!(r.allowed && r.remaining == remaining, "{r:?}");
            assert_values(&r, "frac", 3);
        }
        // Denied, twice: the second from the deny cache, with the same values.
        for _ in 0..2 {
            let denied = check(&server, check_req("frac", "cy")).await;
            assert!(!denied.allowed && !denied.shadowed, "{denied:?}");
            assert_values(&denied, "frac", 3);
            let (_, r, t) = ratelimit_headers::ratelimit(&denied.ratelimit);
            assert_eq!(r, 0);
            assert!(
                (1..=3).contains(&t),
                "t within the 2.5 s window: {denied:?}"
            );
            // An HTTP service's Retry-After, from retry_after.
            assert!(dur(denied.retry_after) > Duration::ZERO, "{denied:?}");
        }
    }

    async fn shadow_rules_allow_and_say_shadowed(backend: Backend) {
        let server = backend.serve_toml(TOML).await;
        for remaining in [1, 0] {
            let r = check(&server, check_req("watch", "dee")).await;
            assert!(r.allowed && !r.shadowed, "{r:?}");
            assert_eq!(r.remaining, remaining);
        }
        // Would-be denials, the later ones answered by the deny cache: all
        // allowed, shadowed, with the store's figures.
        for _ in 0..3 {
            let r = check(&server, check_req("watch", "dee")).await;
            assert!(r.allowed && r.shadowed && !r.blocked, "{r:?}");
            assert_eq!(r.remaining, 0, "{r:?}");
            assert_between(
                dur(r.retry_after),
                Duration::from_millis(1),
                MINUTE,
                "retry_after",
            );
            assert_values(&r, "watch", 60);
        }
        // Another subject is not shadowed.
        assert!(!check(&server, check_req("watch", "eve")).await.shadowed);
        assert_eq!(decisions(&server, "watch", "shadow_denied"), 3);
        assert_eq!(decisions(&server, "watch", "allowed"), 3);
        assert_eq!(decisions(&server, "watch", "denied"), 0);
    }

    async fn a_shadow_denial_counts_nothing(backend: Backend) {
        let server = backend.serve_toml(TOML).await;
        let first = check(&server, cost_req("budget", "fay", 2)).await;
        assert!(
            first.allowed && !first.shadowed && first.remaining == 1,
            "{first:?}"
        );
        // 2 more do not fit in 3: a would-be denial, which counts nothing,
        // as an enforced denial counts nothing.
        let over = check(&server, cost_req("budget", "fay", 2)).await;
        assert!(over.allowed && over.shadowed, "{over:?}");
        assert_eq!(over.remaining, 1, "nothing counted: {over:?}");
        // So one more fits, exactly.
        let last = check(&server, cost_req("budget", "fay", 1)).await;
        assert!(
            last.allowed && !last.shadowed && last.remaining == 0,
            "{last:?}"
        );
        let after = check(&server, cost_req("budget", "fay", 1)).await;
        assert!(after.allowed && after.shadowed, "{after:?}");
    }

    async fn a_shadow_block_is_allowed_and_still_blocks_the_window(backend: Backend) {
        let server = backend.serve_toml(TOML).await;
        assert!(!check(&server, check_req("trap", "gus")).await.shadowed);
        // Over the limit: an enforced rule would start a 1-minute block.
        for _ in 0..3 {
            let r = check(&server, check_req("trap", "gus")).await;
            assert!(r.allowed && r.shadowed && r.blocked, "{r:?}");
            assert!(
                dur(r.retry_after) > Duration::from_secs(50),
                "the block's: {r:?}"
            );
        }
        assert_eq!(decisions(&server, "trap", "shadow_denied"), 3);
        assert_eq!(decisions(&server, "trap", "blocked"), 0);
    }
}
