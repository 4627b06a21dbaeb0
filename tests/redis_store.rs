//! The Redis store against a real `redis-server`: each Lua script's
//! documented behaviour (the worked examples in `lua/*.lua`), real-time
//! sliding windows, lock-outs, script and connection recovery, and
//! atomicity under concurrency.
//!
//! Every test starts its own server, so tests share no keys. The behaviour
//! both stores share is pinned again by the gRPC conformance suite; this file
//! is about the scripts and the connection handling.

// The helpers' `pub` items are for their sibling modules and the test
// crates that use them, not for export.
#[allow(unreachable_pub)]
mod common;

use std::time::Duration;

use common::redis_server::{RedisServer, assert_unreachable_and_masked, free_port};
use tokio::{
    task::JoinSet,
    time::{Instant, sleep, sleep_until},
};
use tollgate::{
    keys::KeyBuilder,
    rules::Algorithm,
    store::{
        LimitCheck, LimitDecision, LimitSettle, Store, StoreError, UsageIncrement,
        redis::{RedisOptions, RedisStore},
    },
};

const PREFIX: &str = "t:";
const RULE: &str = "api";
const ALGORITHMS: [Algorithm; 2] = [Algorithm::SlidingLog, Algorithm::SlidingCounter];

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: PREFIX.to_owned(),
        timeout: Duration::from_secs(1),
        pool_size: 4,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    }
}

async fn connect(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&options(server.url()))
        .await
        .expect("the store connects to a running redis-server")
}

/// One hit of `RULE` for `subject`, no block, not a dry run.
fn check(algorithm: Algorithm, subject: &str, limit: u64, window: Duration) -> LimitCheck<'_> {
    LimitCheck {
        rule: RULE,
        subject,
        algorithm,
        limit,
        window,
        block_for: None,
        cost: 1,
        dry_run: false,
    }
}

async fn decide(store: &RedisStore, check: &LimitCheck<'_>) -> LimitDecision {
    store.check_limit(check).await.expect("check_limit answers")
}

#[track_caller]
fn assert_near(actual: Duration, expected: Duration, tolerance: Duration) {
    let gap = actual.abs_diff(expected);
    assert!(
        gap <= tolerance,
        "{actual:?} is not within {tolerance:?} of {expected:?}"
    );
}

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Redis's clock, in microseconds.
fn redis_now_us(server: &RedisServer) -> u64 {
    let time = server.cli(&["TIME"]);
    let mut parts = time.lines().map(|part| part.trim().parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(secs)), Some(Ok(micros))) => secs * 1_000_000 + micros,
        _ => panic!("TIME answered {time:?}"),
    }
}

/// Waits, on Redis's clock, until at least `room_us` are left before the
/// next multiple of `period_us` (the end of a window or of a stretch): if
/// fewer are left, sleeps until just past it. With `room_us = period_us` it
/// waits for the next one.
async fn clear_of_boundary(server: &RedisServer, period_us: u64, room_us: u64) {
    let left = period_us - redis_now_us(server) % period_us;
    if left < room_us {
        sleep(Duration::from_micros(left + 50_000)).await;
    }
}

/// A key's time to live; it must have one.
fn pttl(server: &RedisServer, key: &str) -> Duration {
    let millis = cli_int(server, &["PTTL", key]);
    Duration::from_millis(
        u64::try_from(millis).unwrap_or_else(|_| panic!("{key}: PTTL {millis}, no expiry")),
    )
}

fn cli_int(server: &RedisServer, args: &[&str]) -> i64 {
    let reply = server.cli(args);
    reply
        .parse()
        .unwrap_or_else(|_| panic!("{args:?} answered {reply:?}, not an integer"))
}

// ---- sliding_log.lua --------------------------------------------------

/// The worked example of `lua/sliding_log.lua`, on Redis's real clock.
#[tokio::test]
async fn sliding_log_slides_in_real_time() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let one = check(Algorithm::SlidingLog, "alice", 4, ms(2000));
    let two = LimitCheck { cost: 2, ..one };
    let tolerance = ms(150);

    let start = Instant::now();
    assert!(decide(&store, &two).await.allowed);
    sleep_until(start + ms(1500)).await;
    let decision = decide(&store, &two).await;
    assert!(decision.allowed);
    assert_eq!(decision.remaining, 0);
    let fifth = decide(&store, &one).await;
    assert!(!fifth.allowed && !fifth.blocked);
    assert_eq!(fifth.remaining, 0);
    // The t = 0 entries leave at 2 s, the newest at 3.5 s.
    assert_near(fifth.retry_after, ms(500), tolerance);
    assert_near(fifth.reset_after, ms(2000), tolerance);

    sleep_until(start + ms(2200)).await;
    let decision = decide(&store, &one).await;
    assert_eq!((decision.allowed, decision.remaining), (true, 1));
    assert_eq!(decision.reset_after, ms(2000));
    let decision = decide(&store, &one).await;
    assert_eq!((decision.allowed, decision.remaining), (true, 0));
    let denied = decide(&store, &one).await;
    assert!(!denied.allowed);
    // The t = 1.5 s entries leave at 3.5 s.
    assert_near(denied.retry_after, ms(1300), tolerance);
    assert_near(denied.reset_after, ms(2000), tolerance);
}

#[tokio::test]
async fn sliding_log_counts_cost_and_expires_with_its_window() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let base = check(Algorithm::SlidingLog, "bob", 5, ms(10_000));
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, "bob");

    let decision = decide(&store, &LimitCheck { cost: 3, ..base }).await;
    assert_eq!(
        decision,
        LimitDecision {
            allowed: true,
            remaining: 2,
            retry_after: Duration::ZERO,
            reset_after: ms(10_000),
            blocked: false,
        }
    );
    // One member for the call, whatever its cost, scored by the running
    // total of hits.
    assert_eq!(log_calls(&server, &keys.counter), vec![3]);
    // At least one window after the call, at most an eighth more (see
    // Expiry in lua/sliding_log.lua).
    let pttl = cli_int(&server, &["PTTL", &keys.counter]);
    assert!((9_500..=11_250).contains(&pttl), "PTTL {pttl}");

    // Denied: nothing counted, remaining unchanged; the first call must
    // leave before 3 more fit.
    let denied = decide(&store, &LimitCheck { cost: 3, ..base }).await;
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 2);
    assert_near(denied.retry_after, ms(10_000), ms(200));
    assert_eq!(log_calls(&server, &keys.counter), vec![3]);

    // More than the limit can never fit: retry when the log is empty.
    let never = decide(&store, &LimitCheck { cost: 6, ..base }).await;
    assert!(!never.allowed);
    assert_eq!(never.retry_after, never.reset_after);

    let last = decide(&store, &LimitCheck { cost: 2, ..base }).await;
    assert_eq!((last.allowed, last.remaining), (true, 0));
    assert_eq!(log_calls(&server, &keys.counter), vec![3, 5]);
}

/// A log outlives its newest call by a window, with one PEXPIRE per
/// stretch of window / 8 rather than one per call; a newest member written
/// by an older tollgate (no "+": it set a shorter expiry) is refreshed.
#[tokio::test]
async fn a_log_is_kept_a_window_with_one_expiry_per_stretch() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let window_ms = 800_000;
    let stretch_us = window_ms * 1_000 / 8;
    let long = check(Algorithm::SlidingLog, "steady", 1_000, ms(window_ms));
    let log = KeyBuilder::new(PREFIX)
        .limit(RULE, Algorithm::SlidingLog, "steady")
        .counter;
    let kept_a_window = |at_least_ms: u64| {
        let pttl = cli_int(&server, &["PTTL", &log]);
        let most = i64::try_from(window_ms + stretch_us / 1_000).expect("small");
        assert!(
            pttl >= i64::try_from(at_least_ms).expect("small") && pttl <= most,
            "PTTL {pttl}"
        );
    };
    // Far from the end of a 100 s stretch, so the calls below share one.
    clear_of_boundary(&server, stretch_us, 10_000_000).await;

    server.cli(&["CONFIG", "RESETSTAT"]);
    for _ in 0..20 {
        assert!(decide(&store, &long).await.allowed);
    }
    assert_eq!(command_calls(&server, "pexpire"), 1, "one per stretch");
    kept_a_window(window_ms - 1_000);

    // An older tollgate's call: a member without "+", and its own expiry.
    let newest = server.cli(&["ZRANGE", &log, "-1", "-1", "WITHSCORES"]);
    let total: u64 = newest
        .lines()
        .nth(1)
        .and_then(|score| score.trim().parse().ok())
        .unwrap_or_else(|| panic!("newest member {newest:?}"));
    let old_member = format!("{}:{total}", redis_now_us(&server));
    let score = (total + 1).to_string();
    server.cli(&["ZADD", &log, &score, &old_member]);
    server.cli(&["PEXPIRE", &log, "1000"]);
    assert!(decide(&store, &long).await.allowed);
    // Ours above, and the next call's.
    assert_eq!(command_calls(&server, "pexpire"), 3, "refreshed after it");
    kept_a_window(window_ms - 1_000);
    assert!(decide(&store, &long).await.allowed);
    assert_eq!(command_calls(&server, "pexpire"), 3);

    // A short window: the first call of the next stretch moves the expiry.
    let short_ms = 8_000;
    let short = check(Algorithm::SlidingLog, "brisk", 1_000, ms(short_ms));
    assert!(decide(&store, &short).await.allowed);
    let short_stretch_us = short_ms * 1_000 / 8;
    clear_of_boundary(&server, short_stretch_us, short_stretch_us).await;
    server.cli(&["CONFIG", "RESETSTAT"]);
    assert!(decide(&store, &short).await.allowed);
    assert_eq!(command_calls(&server, "pexpire"), 1, "a new stretch");
    let brisk = KeyBuilder::new(PREFIX)
        .limit(RULE, Algorithm::SlidingLog, "brisk")
        .counter;
    let pttl = cli_int(&server, &["PTTL", &brisk]);
    assert!((7_900..=9_000).contains(&pttl), "PTTL {pttl}");
}

/// A sliding counter's hash expires when the window after the one it
/// counts in ends (then its hits count nothing), set once per window rather
/// than on every call.
#[tokio::test]
async fn a_counter_expires_with_the_window_after_its_own() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let window_us = 800_000_000;
    let long = check(
        Algorithm::SlidingCounter,
        "steady",
        1_000,
        ms(window_us / 1_000),
    );
    let counter = KeyBuilder::new(PREFIX)
        .limit(RULE, Algorithm::SlidingCounter, "steady")
        .counter;
    // Far from the end of an 800 s window, so the calls below share one.
    clear_of_boundary(&server, window_us, 10_000_000).await;

    server.cli(&["CONFIG", "RESETSTAT"]);
    let mut last = None;
    for _ in 0..20 {
        let decision = decide(&store, &long).await;
        assert!(decision.allowed);
        last = Some(decision);
    }
    assert_eq!(command_calls(&server, "pexpire"), 1, "one per window");
    // It lives as long as the answer says its hits count.
    let reset_after = last.expect("decided").reset_after;
    assert_near(pttl(&server, &counter), reset_after, ms(1_000));
    assert!(reset_after > ms(window_us / 1_000), "{reset_after:?}");

    // A short window: the first call of the next window moves the expiry.
    let short_us = 2_000_000;
    let short = check(
        Algorithm::SlidingCounter,
        "brisk",
        1_000,
        ms(short_us / 1_000),
    );
    assert!(decide(&store, &short).await.allowed);
    clear_of_boundary(&server, short_us, short_us).await;
    server.cli(&["CONFIG", "RESETSTAT"]);
    let next = decide(&store, &short).await;
    assert!(next.allowed);
    assert_eq!(command_calls(&server, "pexpire"), 1, "a new window");
    let brisk = KeyBuilder::new(PREFIX)
        .limit(RULE, Algorithm::SlidingCounter, "brisk")
        .counter;
    assert_near(pttl(&server, &brisk), next.reset_after, ms(100));
}

/// The running totals of a sliding log's members, oldest first: one member
/// per counted call, each scored by the hits counted up to and including it.
fn log_calls(server: &RedisServer, key: &str) -> Vec<u64> {
    // Rank 0 is the base member (see lua/sliding_log.lua), not a call.
    let reply = server.cli(&["ZRANGE", key, "1", "-1", "WITHSCORES"]);
    reply
        .lines()
        .skip(1)
        .step_by(2)
        .map(|score| score.trim().parse().expect("an integer score"))
        .collect()
}

/// One call with a huge cost is one member and one step of work, not a
/// member per hit: the call that used to stall Redis for seconds.
#[tokio::test]
async fn a_huge_cost_is_one_entry_and_bounded_work() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let budget = check(Algorithm::SlidingLog, "tokens", 2_000_000, ms(60_000));
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, "tokens");

    let first = decide(
        &store,
        &LimitCheck {
            cost: 1_000_000,
            ..budget
        },
    )
    .await;
    assert_eq!((first.allowed, first.remaining), (true, 1_000_000));
    let second = decide(
        &store,
        &LimitCheck {
            cost: 999_999,
            ..budget
        },
    )
    .await;
    assert_eq!((second.allowed, second.remaining), (true, 1));
    let denied = decide(&store, &LimitCheck { cost: 2, ..budget }).await;
    assert_eq!((denied.allowed, denied.remaining), (false, 1));
    assert_eq!(
        log_calls(&server, &keys.counter),
        vec![1_000_000, 1_999_999]
    );
    // A few hundred bytes, not the 240 MB of a member per hit.
    let bytes = cli_int(&server, &["MEMORY", "USAGE", &keys.counter]);
    assert!(bytes < 1024, "MEMORY USAGE {bytes}");
    // The work, counted in commands rather than timed: one ZADD of one
    // member per counted call (a member per hit took a thousand ZADDs of
    // a thousand members each for this cost), plus the base member the
    // first call adds to a new log.
    let stats = server.cli(&["INFO", "commandstats"]);
    let zadd = stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_zadd:calls="))
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no ZADD stats in {stats}"));
    assert_eq!(zadd, "3", "{stats}");
}

/// retry_after is for the request's own cost: the call that holds the
/// cost-th hit to leave decides it (the script header's worked example).
#[tokio::test]
async fn a_larger_cost_waits_for_a_later_call() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let window = ms(2_000);
    let rule = check(Algorithm::SlidingLog, "costs", 4, window);
    // Each call's Redis time lies between the local instants around it (one
    // machine, one clock rate), so every retry_after has exact bounds
    // however slowly this machine runs.
    let (first, _) = timed(&store, &LimitCheck { cost: 2, ..rule }).await;
    sleep_until(first.0 + ms(500)).await;
    let (second, _) = timed(&store, &LimitCheck { cost: 2, ..rule }).await;

    let (at, one) = timed(&store, &rule).await;
    assert!(!one.allowed);
    assert_left_between(one.retry_after, first, at, window);
    let (at, two) = timed(&store, &LimitCheck { cost: 2, ..rule }).await;
    assert_left_between(two.retry_after, first, at, window);
    // The third-oldest hit is in the second call: it waits for that one.
    let (at, three) = timed(&store, &LimitCheck { cost: 3, ..rule }).await;
    assert!(!three.allowed);
    assert_left_between(three.retry_after, second, at, window);
}

/// The local instants just before and just after a call.
type Span = (Instant, Instant);

async fn timed(store: &RedisStore, check: &LimitCheck<'_>) -> (Span, LimitDecision) {
    let before = Instant::now();
    let decision = decide(store, check).await;
    ((before, Instant::now()), decision)
}

/// `retry_after`, answered during `asked`, is when a call made during
/// `counted` leaves a window of `window` (1 ms of rounding either way).
fn assert_left_between(retry_after: Duration, counted: Span, asked: Span, window: Duration) {
    let earliest = (counted.0 + window).saturating_duration_since(asked.1);
    let latest = (counted.1 + window).saturating_duration_since(asked.0);
    assert!(
        earliest.saturating_sub(ms(1)) <= retry_after && retry_after <= latest + ms(1),
        "retry_after {retry_after:?} is not within [{earliest:?}, {latest:?}]"
    );
}

/// The calls that leave the window are trimmed by the next call, a batch
/// at a time, however many there are.
#[tokio::test]
async fn many_calls_leave_the_window_together() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    // A window long enough for 100 calls on a slow machine.
    let rule = check(Algorithm::SlidingLog, "many", 1_000, ms(2_000));
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, "many");
    for _ in 0..100 {
        assert!(decide(&store, &rule).await.allowed);
    }
    assert_eq!(log_calls(&server, &keys.counter).len(), 100);
    sleep(ms(2_100)).await;
    let after = decide(&store, &LimitCheck { cost: 7, ..rule }).await;
    assert_eq!((after.allowed, after.remaining), (true, 993));
    // Trimmed, or expired with its window (the expiry may run up to an
    // eighth of a window longer): either way only the new call is left.
    assert_eq!(log_calls(&server, &keys.counter).len(), 1);
}

// ---- sliding_counter.lua ----------------------------------------------

/// The worked example of `lua/sliding_counter.lua`, from a seeded hash. The
/// test cannot choose Redis's clock, so it reads the time into the window
/// and checks the documented formulas at that point.
#[tokio::test]
async fn sliding_counter_weights_the_previous_window() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let window_us: u64 = 60_000_000;
    // Not so close to the window's end that the seeded hash goes stale.
    clear_of_boundary(&server, window_us, 2_000_000).await;
    let now = redis_now_us(&server);
    let w = now / window_us;
    let elapsed = (now % window_us) as f64;
    let window = window_us as f64;
    let seed = |subject: &str, index: u64, cur: u64, prev: u64| {
        let key = KeyBuilder::new(PREFIX)
            .limit(RULE, Algorithm::SlidingCounter, subject)
            .counter;
        let (index, cur, prev) = (index.to_string(), cur.to_string(), prev.to_string());
        server.cli(&["HSET", &key, "w", &index, "c", &cur, "p", &prev]);
    };
    let base = check(
        Algorithm::SlidingCounter,
        "s",
        10,
        Duration::from_micros(window_us),
    );
    let tolerance = ms(100);

    // {w, c = 2, p = 6}: estimate = 6 * (window - elapsed) / window + 2.
    seed("s", w, 2, 6);
    let estimate = 6.0 * (window - elapsed) / window + 2.0;
    let allowed = decide(&store, &base).await;
    assert!(allowed.allowed);
    // The estimate only falls as time passes, by 0.1 a second here.
    let remaining = (10.0 - estimate - 1.0).floor() as u64;
    assert!(
        (remaining..=remaining + 1).contains(&allowed.remaining),
        "{allowed:?}"
    );
    assert_near(
        allowed.reset_after,
        Duration::from_micros(2 * window_us) - Duration::from_micros(now % window_us),
        tolerance,
    );
    // c is now 3; a cost of 4 fits once 6 * (window - e) / window <= 3.
    let estimate = 6.0 * (window - elapsed) / window + 3.0;
    let four = decide(&store, &LimitCheck { cost: 4, ..base }).await;
    if estimate + 4.0 > 10.05 {
        assert!(!four.allowed, "{four:?}");
        let fits_at = window - 3.0 * window / 6.0;
        assert_near(
            four.retry_after,
            Duration::from_micros((fits_at - elapsed) as u64),
            tolerance,
        );
    } else if estimate + 4.0 < 9.95 {
        assert!(four.allowed, "{four:?}");
    }

    // c alone leaves no room for the cost: wait for the next window, where
    // c = 8 becomes p and decays to 7.
    seed("full", w, 8, 0);
    let full = LimitCheck {
        subject: "full",
        cost: 3,
        ..base
    };
    let denied = decide(&store, &full).await;
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 2);
    assert_near(
        denied.retry_after,
        Duration::from_micros((2.0 * window - elapsed - 7.0 * window / 8.0) as u64),
        tolerance,
    );
    assert_near(
        denied.reset_after,
        Duration::from_micros((2.0 * window - elapsed) as u64),
        tolerance,
    );

    // The previous window's count moves to p; an older one is forgotten.
    seed("shift", w - 1, 6, 9);
    let shifted = decide(
        &store,
        &LimitCheck {
            subject: "shift",
            ..base
        },
    )
    .await;
    let estimate = 6.0 * (window - elapsed) / window;
    let remaining = (10.0 - estimate - 1.0).floor() as u64;
    assert!((remaining..=remaining + 1).contains(&shifted.remaining));
    seed("stale", w - 2, 10, 10);
    let stale = decide(
        &store,
        &LimitCheck {
            subject: "stale",
            ..base
        },
    )
    .await;
    assert_eq!((stale.allowed, stale.remaining), (true, 9));
}

#[tokio::test]
async fn sliding_counter_keys_stay_small() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let subject = "user-1234567890";
    let mut last = None;
    for _ in 0..50 {
        last = Some(
            decide(
                &store,
                &check(Algorithm::SlidingCounter, subject, 1_000_000, ms(60_000)),
            )
            .await,
        );
    }
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingCounter, subject);
    let bytes = cli_int(&server, &["MEMORY", "USAGE", &keys.counter]);
    let encoding = server.cli(&["OBJECT", "ENCODING", &keys.counter]);
    println!(
        "sliding_counter key {}: {bytes} bytes, {encoding}",
        keys.counter
    );
    assert!(bytes <= 200, "{bytes} bytes");
    assert_eq!(encoding, "listpack");
    // Until the window after the one its hits were counted in ends: what
    // the last answer's reset_after says.
    assert_near(
        pttl(&server, &keys.counter),
        last.expect("decided").reset_after,
        ms(1_000),
    );

    // For comparison: the exact log grows with every hit.
    for _ in 0..50 {
        decide(
            &store,
            &check(Algorithm::SlidingLog, subject, 1_000_000, ms(60_000)),
        )
        .await;
    }
    let log = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, subject);
    let log_bytes = cli_int(&server, &["MEMORY", "USAGE", &log.counter]);
    println!("sliding_log key with 50 hits: {log_bytes} bytes");
}

// ---- both algorithms --------------------------------------------------

/// A denial's retry_after is the earliest time the hit fits: a little
/// earlier it is still denied, right after it is allowed.
#[tokio::test]
async fn retry_after_is_when_the_hit_fits() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    for algorithm in ALGORITHMS {
        let base = check(algorithm, "retry", 3, ms(600));
        let start = Instant::now();
        for _ in 0..3 {
            assert!(decide(&store, &base).await.allowed);
        }
        let denied = decide(&store, &base).await;
        assert!(!denied.allowed, "{algorithm}: {denied:?}");
        assert!(
            denied.retry_after > Duration::ZERO && denied.retry_after <= ms(1200),
            "{algorithm}: {denied:?}"
        );
        assert!(denied.reset_after >= denied.retry_after);
        let asked = start.elapsed();
        if denied.retry_after > ms(150) {
            sleep(denied.retry_after - ms(100)).await;
            let early = decide(
                &store,
                &LimitCheck {
                    dry_run: true,
                    ..base
                },
            )
            .await;
            assert!(!early.allowed, "{algorithm}: allowed before retry_after");
        }
        sleep_until(start + asked + denied.retry_after + ms(30)).await;
        let allowed = decide(&store, &base).await;
        assert!(allowed.allowed, "{algorithm}: denied after retry_after");
    }
}

#[tokio::test]
async fn dry_run_counts_nothing() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    for algorithm in ALGORITHMS {
        let base = check(algorithm, "dry", 2, ms(10_000));
        let keys = KeyBuilder::new(PREFIX).limit(RULE, algorithm, "dry");
        let dry = LimitCheck {
            dry_run: true,
            block_for: Some(ms(5_000)),
            ..base
        };
        let decision = decide(&store, &LimitCheck { cost: 2, ..dry }).await;
        assert_eq!(
            decision,
            LimitDecision {
                allowed: true,
                remaining: 0,
                retry_after: Duration::ZERO,
                reset_after: Duration::ZERO,
                blocked: false,
            }
        );
        assert_eq!(cli_int(&server, &["EXISTS", &keys.counter]), 0);

        assert!(
            decide(&store, &LimitCheck { cost: 2, ..base })
                .await
                .allowed
        );
        // A dry-run denial neither counts nor starts a block.
        let denied = decide(&store, &dry).await;
        assert!(
            !denied.allowed && !denied.blocked,
            "{algorithm}: {denied:?}"
        );
        assert_eq!(cli_int(&server, &["EXISTS", &keys.block]), 0);
        let again = decide(&store, &dry).await;
        assert_eq!(again.remaining, 0);
    }
}

#[tokio::test]
async fn a_denial_blocks_the_subject_for_block_for() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    for algorithm in ALGORITHMS {
        let base = LimitCheck {
            block_for: Some(ms(1000)),
            ..check(algorithm, "blocky", 2, ms(400))
        };
        let keys = KeyBuilder::new(PREFIX).limit(RULE, algorithm, "blocky");
        let start = Instant::now();
        assert!(decide(&store, &base).await.allowed);
        assert!(decide(&store, &base).await.allowed);
        let denied = decide(&store, &base).await;
        assert!(!denied.allowed && denied.blocked, "{algorithm}: {denied:?}");
        assert_eq!(denied.retry_after, ms(1000));
        let pttl = cli_int(&server, &["PTTL", &keys.block]);
        assert!((900..=1000).contains(&pttl), "PTTL {pttl}");

        // The window has slid past every hit, but the block holds.
        sleep_until(start + ms(700)).await;
        let blocked = decide(&store, &base).await;
        assert!(
            !blocked.allowed && blocked.blocked,
            "{algorithm}: {blocked:?}"
        );
        assert_eq!(blocked.remaining, 0);
        assert_near(blocked.retry_after, ms(300), ms(120));

        sleep_until(start + ms(1100)).await;
        let free = decide(&store, &base).await;
        assert!(free.allowed && !free.blocked, "{algorithm}: {free:?}");
    }
}

#[tokio::test]
async fn crafted_subjects_do_not_share_counters() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    for algorithm in ALGORITHMS {
        for subject in ["a:b", "a%3Ab", "{x}", "x", "a}:{rl:api:b"] {
            let decision = decide(&store, &check(algorithm, subject, 1, ms(10_000))).await;
            assert!(decision.allowed, "{algorithm} {subject:?} shares a counter");
        }
        let again = decide(&store, &check(algorithm, "a:b", 1, ms(10_000))).await;
        assert!(!again.allowed);
    }
    // Users and characters likewise.
    for (user, character) in [("u:1", "c"), ("u%3A1", "c"), ("u", "1:c"), ("{u}", "c")] {
        let decision = store
            .increment_usage(&usage(user, character, Some(1), ms(10_000)))
            .await
            .expect("increment answers");
        assert!(decision.allowed, "{user:?}/{character:?} shares a counter");
    }
}

/// 200 concurrent hits on one subject with limit 10, through two stores as
/// two tollgate instances would: exactly 10 get through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_hits_never_exceed_the_limit() {
    let server = RedisServer::start();
    let stores = [connect(&server).await, connect(&server).await];
    for algorithm in ALGORITHMS {
        let mut tasks = JoinSet::new();
        for i in 0..200 {
            let store = stores[i % 2].clone();
            tasks.spawn(async move {
                store
                    .check_limit(&check(algorithm, "crowd", 10, ms(10_000)))
                    .await
                    .expect("check_limit answers")
                    .allowed
            });
        }
        let allowed = tasks
            .join_all()
            .await
            .into_iter()
            .filter(|allowed| *allowed)
            .count();
        assert_eq!(allowed, 10, "{algorithm}");
    }
}

// ---- usage_increment.lua and usage_list.lua ---------------------------

fn usage<'a>(
    user_id: &'a str,
    character_id: &'a str,
    limit: Option<u64>,
    period: Duration,
) -> UsageIncrement<'a> {
    UsageIncrement {
        user_id,
        character_id,
        kind: "text",
        amount: 1,
        limit,
        period,
    }
}

/// The worked example of `lua/usage_increment.lua`.
#[tokio::test]
async fn usage_counts_up_to_the_quota() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let day = Duration::from_secs(86_400);
    let one = usage("u1", "luna", Some(3), day);

    let first = store
        .increment_usage(&UsageIncrement { amount: 2, ..one })
        .await
        .expect("increment answers");
    assert_eq!((first.allowed, first.used), (true, 2));
    assert_eq!(first.resets_after, day);
    let second = store
        .increment_usage(&one)
        .await
        .expect("increment answers");
    assert_eq!((second.allowed, second.used), (true, 3));
    assert_near(second.resets_after, day, ms(100));
    let denied = store
        .increment_usage(&one)
        .await
        .expect("increment answers");
    assert_eq!((denied.allowed, denied.used), (false, 3));
    assert_near(denied.resets_after, day, ms(100));

    // Kinds count apart; an unlimited tier is always counted.
    let image = UsageIncrement {
        kind: "image",
        limit: None,
        ..one
    };
    for used in 1..=5 {
        let decision = store
            .increment_usage(&image)
            .await
            .expect("increment answers");
        assert_eq!((decision.allowed, decision.used), (true, used));
    }
    let counters = store
        .get_usage("u1", "luna")
        .await
        .expect("get_usage answers");
    assert_eq!(
        counters.used,
        vec![("image".to_owned(), 5), ("text".to_owned(), 3)]
    );
    assert_near(counters.resets_after, day, ms(100));

    // A quota of 0 allows nothing and creates nothing.
    let zero = store
        .increment_usage(&usage("u1", "mars", Some(0), day))
        .await
        .expect("increment answers");
    assert_eq!(
        (zero.allowed, zero.used, zero.resets_after),
        (false, 0, Duration::ZERO)
    );
    let keys = KeyBuilder::new(PREFIX).usage("u1");
    assert_eq!(cli_int(&server, &["EXISTS", &keys.conversation("mars")]), 0);
    assert_eq!(cli_int(&server, &["ZCARD", &keys.index]), 1);
}

#[tokio::test]
async fn usage_resets_after_the_period() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let short = usage("u2", "luna", Some(2), ms(600));
    let start = Instant::now();
    for _ in 0..2 {
        store
            .increment_usage(&short)
            .await
            .expect("increment answers");
    }
    assert!(
        !store
            .increment_usage(&short)
            .await
            .expect("increment answers")
            .allowed
    );
    let keys = KeyBuilder::new(PREFIX).usage("u2");
    let index_pttl = cli_int(&server, &["PTTL", &keys.index]);
    assert!((400..=600).contains(&index_pttl), "index PTTL {index_pttl}");

    sleep_until(start + ms(700)).await;
    let counters = store
        .get_usage("u2", "luna")
        .await
        .expect("get_usage answers");
    assert_eq!(counters, Default::default());
    assert!(
        store
            .list_usage("u2", 10)
            .await
            .expect("list answers")
            .is_empty()
    );
    let fresh = store
        .increment_usage(&short)
        .await
        .expect("increment answers");
    assert_eq!(
        (fresh.allowed, fresh.used, fresh.resets_after),
        (true, 1, ms(600))
    );
}

/// ListUsage sorts by character id (bytewise), keeps the smallest `max`,
/// and skips conversations whose counters expired.
#[tokio::test]
async fn list_usage_is_sorted_and_skips_expired_conversations() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let keys = KeyBuilder::new(PREFIX).usage("u3");
    let long = Duration::from_secs(60);
    for (character, period) in [
        ("b", long),
        ("é", long),
        ("short", ms(300)),
        ("a", long),
        ("Z", long),
        ("a:b", long),
    ] {
        store
            .increment_usage(&usage("u3", character, Some(10), period))
            .await
            .expect("increment answers");
    }
    let start = Instant::now();
    let ids = |listed: &[(String, tollgate::store::ConversationCounters)]| -> Vec<String> {
        listed.iter().map(|(id, _)| id.clone()).collect()
    };

    let listed = store.list_usage("u3", 10).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a", "a:b", "b", "short", "é"]);
    let (_, luna) = &listed[0];
    assert_eq!(luna.used("text"), 1);
    assert_near(luna.resets_after, long, ms(200));

    sleep_until(start + ms(400)).await;
    let listed = store.list_usage("u3", 10).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a", "a:b", "b", "é"]);
    // The expired entry has left the index, too.
    assert_eq!(cli_int(&server, &["ZCARD", &keys.index]), 5);

    let listed = store.list_usage("u3", 2).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a"]);
    // A conversation gone from under its index entry is skipped, and the
    // next one takes its place.
    server.cli(&["DEL", &keys.conversation("a")]);
    let listed = store.list_usage("u3", 2).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a:b"]);

    assert!(
        store
            .list_usage("nobody", 10)
            .await
            .expect("list answers")
            .is_empty()
    );
    assert!(
        store
            .list_usage("u3", 0)
            .await
            .expect("list answers")
            .is_empty()
    );
}

/// A user with 20,000 conversations gets the first 1,000 by character id,
/// and the script reads 1,000 ids, not 20,000 (its work is bounded by what
/// it returns, plus the entries that expired since the last call).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_with_20000_conversations_lists_the_first_1000() {
    const CONVERSATIONS: usize = 20_000;
    let server = RedisServer::start();
    let store = connect(&server).await;
    let mut tasks = JoinSet::new();
    for worker in 0..32 {
        let store = store.clone();
        tasks.spawn(async move {
            for n in (worker..CONVERSATIONS).step_by(32) {
                let character = format!("c{n:05}");
                store
                    .increment_usage(&usage("many", &character, None, Duration::from_secs(600)))
                    .await
                    .expect("increment answers");
            }
        });
    }
    tasks.join_all().await;

    let listed = store.list_usage("many", 1000).await.expect("list answers");
    let expected: Vec<String> = (0..1000).map(|n| format!("c{n:05}")).collect();
    let ids: Vec<String> = listed.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids, expected);
    assert!(
        listed
            .iter()
            .all(|(_, counters)| counters.used("text") == 1)
    );
    let keys = KeyBuilder::new(PREFIX).usage("many");
    assert_eq!(cli_int(&server, &["ZCARD", &keys.by_id]), 20_000);
}

/// A user's index written before the by-id set existed (an upgrade) is
/// read all the same: the set is rebuilt from it on the first list.
#[tokio::test]
async fn an_index_without_its_by_id_set_is_rebuilt() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    for character in ["b", "a", "c"] {
        store
            .increment_usage(&usage("old", character, None, Duration::from_secs(60)))
            .await
            .expect("increment answers");
    }
    let keys = KeyBuilder::new(PREFIX).usage("old");
    server.cli(&["DEL", &keys.by_id]);
    // A conversation opened after the upgrade starts a set of one.
    store
        .increment_usage(&usage("old", "d", None, Duration::from_secs(60)))
        .await
        .expect("increment answers");
    assert_eq!(cli_int(&server, &["ZCARD", &keys.by_id]), 1);

    let listed = store.list_usage("old", 10).await.expect("list answers");
    let ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c", "d"]);
    assert_eq!(cli_int(&server, &["ZCARD", &keys.by_id]), 4);
    let ttl = cli_int(&server, &["PTTL", &keys.by_id]);
    assert!((50_000..=60_000).contains(&ttl), "by-id PTTL {ttl}");
}

// ---- script and connection handling ------------------------------------

#[tokio::test]
async fn scripts_assert_their_argument_counts() {
    let server = RedisServer::start();
    for (source, expected) in [
        (
            include_str!("../lua/sliding_log.lua"),
            "expected 5 or 6 ARGV",
        ),
        (
            include_str!("../lua/sliding_counter.lua"),
            "expected 5 or 6 ARGV",
        ),
        (include_str!("../lua/settle_log.lua"), "expected 2 KEYS"),
        (include_str!("../lua/settle_counter.lua"), "expected 2 KEYS"),
        (include_str!("../lua/usage_settle.lua"), "expected 2 KEYS"),
        (
            include_str!("../lua/usage_increment.lua"),
            "expected 3 KEYS",
        ),
        (include_str!("../lua/usage_list.lua"), "expected 2 KEYS"),
    ] {
        // No keys and one argument suit none of the scripts.
        let reply = server.cli(&["EVAL", source, "0", "x"]);
        assert!(reply.contains(expected), "{reply}");
    }
    // The sliding windows take the block key exactly when they lock out.
    for (script, first) in [
        (include_str!("../lua/sliding_log.lua"), "log"),
        (include_str!("../lua/sliding_counter.lua"), "counter"),
    ] {
        let args = ["10", "60000000", "1", "0"];
        let reply =
            server.cli(&[&["EVAL", script, "2", "{t}a", "{t}b"][..], &args, &["0"]].concat());
        assert!(
            reply.contains(&format!("expected 1 KEYS ({first}) for block_us 0, got 2")),
            "{reply}"
        );
        let reply = server.cli(&[&["EVAL", script, "1", "{t}a"][..], &args, &["1000000"]].concat());
        assert!(
            reply.contains(&format!(
                "expected 2 KEYS ({first}, block) for block_us 1000000, got 1"
            )),
            "{reply}"
        );
    }
}

/// An argument that is not a number, or not one the script takes, fails
/// the script with an error that names it.
#[tokio::test]
async fn scripts_name_a_bad_argument() {
    let server = RedisServer::start();
    for script in [
        include_str!("../lua/sliding_log.lua"),
        include_str!("../lua/sliding_counter.lua"),
    ] {
        for (args, expected) in [
            (["10", "60000000", "x", "0", "0"], "local 'cost'"),
            (["10", "z", "1", "0", "0"], "local 'window'"),
            (
                ["10", "60000000", "-1", "0", "0"],
                "cost must be a non-negative integer",
            ),
            (
                ["1.5", "60000000", "1", "0", "0"],
                "limit must be a non-negative integer",
            ),
        ] {
            let reply = server.cli(&[&["EVAL", script, "1", "{t}a"][..], &args].concat());
            assert!(reply.contains(expected), "{args:?}: {reply}");
        }
    }
    let usage = include_str!("../lua/usage_increment.lua");
    for (args, expected) in [
        (["text", "one", "10", "1000", "c"], "local 'amount'"),
        (
            ["text", "0", "10", "1000", "c"],
            "amount must be a positive integer",
        ),
        (
            ["text", "1", "-2", "1000", "c"],
            "limit must be an integer >= -1",
        ),
    ] {
        let reply =
            server.cli(&[&["EVAL", usage, "3", "{u}a", "{u}b", "{u}c"][..], &args].concat());
        assert!(reply.contains(expected), "{args:?}: {reply}");
    }
    // Nothing was written.
    assert_eq!(server.cli(&["DBSIZE"]), "0");
}

#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let base = check(Algorithm::SlidingLog, "flush", 3, ms(10_000));
    assert_eq!(decide(&store, &base).await.remaining, 2);
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    // Counters survive a flush; the script is re-sent on NOSCRIPT.
    assert_eq!(decide(&store, &base).await.remaining, 1);
    store
        .increment_usage(&usage("u", "c", None, ms(10_000)))
        .await
        .expect("increment answers");
    store.list_usage("u", 10).await.expect("list answers");
}

/// After a restart (no data, no scripts, every socket dead) the store heals
/// by itself: at most a request or two fail, then the pool reconnects.
#[tokio::test]
async fn the_store_recovers_after_a_redis_restart() {
    let mut server = RedisServer::start();
    let store = connect(&server).await;
    let base = check(Algorithm::SlidingCounter, "restart", 5, ms(10_000));
    // Touch every pooled connection.
    for _ in 0..8 {
        decide(&store, &base).await;
    }
    server.restart();

    let mut failures = 0;
    let first = loop {
        match store.check_limit(&base).await {
            Ok(decision) => break decision,
            Err(StoreError::Unavailable(message)) if failures < 5 => {
                println!("after restart: {message}");
                failures += 1;
                sleep(ms(50)).await;
            }
            Err(other) => panic!("after {failures} failures: {other:?}"),
        }
    };
    println!("requests failed after the restart: {failures}");
    assert!(failures <= 2, "{failures} failures");
    // A fresh server: the counter starts over.
    assert_eq!((first.allowed, first.remaining), (true, 4));
    // Every pooled connection has been replaced, and every script reloads.
    for _ in 0..8 {
        store.ping().await.expect("ping answers after a restart");
    }
    decide(
        &store,
        &check(Algorithm::SlidingLog, "restart", 5, ms(10_000)),
    )
    .await;
    store
        .increment_usage(&usage("u", "c", None, ms(10_000)))
        .await
        .expect("increment answers after a restart");
    store
        .list_usage("u", 10)
        .await
        .expect("list answers after a restart");
}

#[tokio::test]
async fn a_dead_redis_fails_fast_and_never_hangs() {
    let mut server = RedisServer::start();
    let mut options = options(server.url());
    options.timeout = ms(300);
    let store = RedisStore::connect(&options).await.expect("connects");
    store.ping().await.expect("ping answers");
    server.kill();
    for _ in 0..3 {
        let start = Instant::now();
        let err = store
            .check_limit(&check(Algorithm::SlidingLog, "dead", 5, ms(1000)))
            .await
            .expect_err("no answer from a dead server");
        assert!(start.elapsed() < ms(500), "took {:?}", start.elapsed());
        assert!(
            matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn connecting_to_nothing_is_unavailable_and_masks_the_password() {
    let port = free_port();
    let mut options = options(format!("redis://tollgate:hunter2@127.0.0.1:{port}/0"));
    options.timeout = ms(300);
    assert_unreachable_and_masked(&options, &format!("127.0.0.1:{port}"), ms(600)).await;
}

/// A server that accepts connections and never answers.
#[tokio::test]
async fn a_silent_server_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("local address").port();
    let mut options = options(format!("redis://127.0.0.1:{port}/0"));
    options.timeout = ms(300);
    let start = Instant::now();
    let err = RedisStore::connect(&options)
        .await
        .expect_err("a silent server never answers");
    assert!(start.elapsed() < ms(600), "took {:?}", start.elapsed());
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    drop(listener);
}

/// `check_limits_undo.lua` as its header documents it: the worked
/// example, an undo of a call that an earlier undo rewrote, an entry
/// already gone, and a sliding counter in its own and the next window.
#[tokio::test]
async fn check_limits_undo_takes_back_exactly_one_call() {
    let server = RedisServer::start();
    let undo = include_str!("../lua/check_limits_undo.lua");
    // A log as sliding_log.lua keeps it: the base "0:0", then four calls
    // of costs 1, 2, 1, 2 (a call's cost is its score minus the score
    // ranked before it).
    server.cli(&[
        "ZADD", "{t}log", "0", "0:0", "1", "100:0", "3", "200:1", "4", "300:3", "6", "400:4",
    ]);
    // Take back the cost-2 call at 200, then the cost-1 call at 300: each
    // has fewer members after it than before, so the later scores come down.
    let reply = server.cli(&[
        "EVAL",
        undo,
        "2",
        "{t}log",
        "{t}log",
        "sliding_log",
        "200:1",
        "3",
        "sliding_log",
        "300:3",
        "4",
    ]);
    assert_eq!(reply.trim(), "2", "both taken back");
    assert_eq!(
        server
            .cli(&["ZRANGE", "{t}log", "0", "-1", "WITHSCORES"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["0:0", "0", "100:0", "1", "400:4", "3"],
        "the calls at 100 (cost 1) and 400 (cost 2) remain, totals exact"
    );
    // A call no longer in the log, or the base (it has left the window),
    // counts nothing.
    let reply = server.cli(&["EVAL", undo, "1", "{t}log", "sliding_log", "50:0", "1"]);
    assert_eq!(reply.trim(), "0");
    let reply = server.cli(&["EVAL", undo, "1", "{t}log", "sliding_log", "0:0", "0"]);
    assert_eq!(reply.trim(), "0");
    assert_eq!(cli_int(&server, &["ZCARD", "{t}log"]), 3);

    // More members after the call than before it: the earlier scores (the
    // base's included) go up instead, and every other call keeps its cost.
    server.cli(&[
        "ZADD", "{t}long", "10", "0:0", "11", "100:0", "13", "200:1", "14", "300:3", "16", "400:4",
        "17", "500:6",
    ]);
    let reply = server.cli(&["EVAL", undo, "1", "{t}long", "sliding_log", "200:1", "13"]);
    assert_eq!(reply.trim(), "1");
    assert_eq!(
        server
            .cli(&["ZRANGE", "{t}long", "0", "-1", "WITHSCORES"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "0:0", "12", "100:0", "13", "300:3", "14", "400:4", "16", "500:6", "17"
        ],
        "5 hits left of 7, costs 1, 1, 2, 1"
    );

    // A sliding counter: cost 3 taken back from c in its own window, from p
    // once the window has moved on, never below 0, and not at all later.
    server.cli(&["HSET", "{t}ctr", "w", "7", "c", "5", "p", "2"]);
    server.cli(&["EVAL", undo, "1", "{t}ctr", "sliding_counter", "7", "3"]);
    assert_eq!(
        server
            .cli(&["HMGET", "{t}ctr", "c", "p"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["2", "2"]
    );
    server.cli(&["EVAL", undo, "1", "{t}ctr", "sliding_counter", "6", "3"]);
    assert_eq!(
        server
            .cli(&["HMGET", "{t}ctr", "c", "p"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["2", "0"]
    );
    let reply = server.cli(&["EVAL", undo, "1", "{t}ctr", "sliding_counter", "5", "3"]);
    assert_eq!(reply.trim(), "0", "two windows back: already gone");
}

/// The counts of each command Redis ran since the last CONFIG RESETSTAT.
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a count"))
}

/// A settle's work is bounded whatever the log holds: it shifts the scores
/// on the smaller side of the call, at most 64, and past that adds to the
/// newest call (up) or refunds nothing (down), never rewriting the log.
#[tokio::test]
async fn a_settle_rewrites_at_most_64_scores() {
    let server = RedisServer::start();
    let store = connect(&server).await;
    let rule = check(Algorithm::SlidingLog, "deep", 1_000_000, ms(60_000));
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, "deep");
    for i in 0..300 {
        let once = store
            .check_limit_once(&LimitCheck { cost: 10, ..rule }, &format!("c{i}"))
            .await
            .expect("redis");
        assert!(once.decision.allowed && !once.replayed);
    }
    let settle = |id: &'static str, actual| LimitSettle {
        rule: RULE,
        subject: "deep",
        algorithm: Algorithm::SlidingLog,
        window: ms(60_000),
        request_id: id,
        actual,
    };
    server.cli(&["CONFIG", "RESETSTAT"]);
    // 49 calls after c250: it and they are shifted.
    assert_eq!(
        store.settle_limit(&settle("c250", 4)).await.expect("redis"),
        Some(1_000_000 - 2994)
    );
    assert_eq!(command_calls(&server, "zadd"), 50);
    // 3 calls and the base before c2: those are shifted instead.
    assert_eq!(
        store.settle_limit(&settle("c2", 0)).await.expect("redis"),
        Some(1_000_000 - 2984)
    );
    assert_eq!(command_calls(&server, "zadd"), 53);
    // 150 on each side of c150: up goes onto the newest call, down is not
    // refunded; neither touches another score.
    assert_eq!(
        store
            .settle_limit(&settle("c150", 25))
            .await
            .expect("redis"),
        Some(1_000_000 - 2999)
    );
    assert_eq!(
        store
            .settle_limit(&settle("c150", 10))
            .await
            .expect("redis"),
        Some(1_000_000 - 2999)
    );
    assert_eq!(command_calls(&server, "zadd"), 53);
    assert_eq!(command_calls(&server, "zincrby"), 1);
    // The log's counts are the calls' own: the newest holds c150's extra 15.
    let scores = log_calls(&server, &keys.counter);
    assert_eq!(scores.len(), 300);
    assert_eq!(scores[299] - scores[298], 25);
    assert_eq!(scores[250] - scores[249], 4);
}
