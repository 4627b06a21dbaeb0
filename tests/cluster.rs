//! The Redis store on a real 3-master Redis Cluster: the same Lua scripts,
//! routed by hash tag, through MOVED/ASK, resharding and failover.
//!
//! - [`the_store_behaves_the_same_on_a_cluster`] runs every store case (each
//!   an `async fn(&Env)`, on keys of its own prefix) concurrently against
//!   one cluster, and checks that subjects spread over all three masters.
//! - [`resharding_a_slot_in_use_loses_and_doubles_no_decision`] moves a hot
//!   subject's slot to another master and back while two instances keep
//!   checking it.
//! - [`a_failover_under_load_keeps_every_decision`] promotes a replica that
//!   has no scripts while requests flow.
//! - [`a_crashed_master_fails_over_and_every_decision_still_comes`] kills a
//!   master outright and bounds what the crash may lose or double.
//!
//! Every test starts its own cluster on free loopback ports.

// The helpers' `pub` items are for their sibling modules and the test
// crates that use them, not for export.
#[allow(unreachable_pub)]
mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use common::{
    cluster::RedisCluster,
    redis_server::{RedisServer, assert_unreachable_and_masked, free_port},
};
use tokio::{
    task::JoinSet,
    time::{Instant, sleep, sleep_until},
};
use tollgate::{
    keys::KeyBuilder,
    rules::Algorithm,
    store::{
        ConversationCounters, LimitCheck, LimitDecision, LimitSettle, Store, StoreError,
        UsageIncrement, UsageSettle,
        redis::{RedisOptions, RedisStore},
    },
};

const RULE: &str = "api";
const ALGORITHMS: [Algorithm; 2] = [Algorithm::SlidingLog, Algorithm::SlidingCounter];

fn options(url: String, key_prefix: &str) -> RedisOptions {
    RedisOptions {
        url,
        key_prefix: key_prefix.to_owned(),
        timeout: Duration::from_secs(1),
        pool_size: 4,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    }
}

async fn connect(url: String, key_prefix: &str) -> RedisStore {
    RedisStore::connect(&options(url, key_prefix))
        .await
        .expect("the store connects to the test's cluster")
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

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

#[track_caller]
fn assert_near(actual: Duration, expected: Duration, tolerance: Duration) {
    let gap = actual.abs_diff(expected);
    assert!(
        gap <= tolerance,
        "{actual:?} is not within {tolerance:?} of {expected:?}"
    );
}

// ---- The store's behaviour, case by case -------------------------------

/// What a case gets: a store whose keys start with the case's own prefix,
/// and the cluster, to look at where keys live.
struct Env {
    cluster: Arc<RedisCluster>,
    store: RedisStore,
    prefix: String,
}

impl Env {
    async fn decide(&self, check: &LimitCheck<'_>) -> LimitDecision {
        self.store
            .check_limit(check)
            .await
            .expect("check_limit answers")
    }

    fn keys(&self) -> KeyBuilder {
        KeyBuilder::new(self.prefix.as_str())
    }

    /// Runs `args` on the master that owns `key`'s slot.
    fn on_owner(&self, key: &str, args: &[&str]) -> String {
        let owner = self.cluster.owner_of(self.cluster.key_slot(key));
        self.cluster.cli(owner, args)
    }

    fn on_owner_int(&self, key: &str, args: &[&str]) -> i64 {
        let reply = self.on_owner(key, args);
        reply
            .parse()
            .unwrap_or_else(|_| panic!("{args:?} answered {reply:?}"))
    }
}

/// Runs each case concurrently on `cluster`, each with a store of its own
/// key prefix, and names every case that failed.
macro_rules! run_cases {
    ($cluster:expr, [$($case:ident),* $(,)?]) => {{
        let mut tasks = JoinSet::new();
        let mut names = BTreeMap::new();
        $(
            let prefix = format!("{}:", stringify!($case));
            let env = Env {
                cluster: Arc::clone(&$cluster),
                store: connect($cluster.url(), &prefix).await,
                prefix,
            };
            let handle = tasks.spawn(async move { $case(&env).await });
            names.insert(handle.id(), stringify!($case));
        )*
        let mut failed = Vec::new();
        while let Some(result) = tasks.join_next_with_id().await {
            if let Err(err) = result {
                failed.push(names[&err.id()]);
            }
        }
        assert!(failed.is_empty(), "cases failed on the cluster: {failed:?}");
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn the_store_behaves_the_same_on_a_cluster() {
    let cluster = Arc::new(RedisCluster::start(0));
    run_cases!(
        cluster,
        [
            sliding_log_counts_exactly,
            sliding_log_slides_in_real_time,
            sliding_counter_counts_and_stays_one_hash,
            a_denial_blocks_the_subject,
            dry_run_counts_nothing,
            usage_counts_up_to_the_quota,
            list_usage_is_sorted_and_skips_missing_conversations,
            crafted_ids_do_not_share_counters,
            concurrent_checks_allow_exactly_the_limit,
            concurrent_increments_allow_exactly_the_quota,
            scripts_reload_after_script_flush_on_every_node,
            subjects_spread_over_every_master,
            one_live_seed_node_is_enough,
            request_ids_live_in_their_counter_s_slot_and_count_once,
        ]
    );
}

async fn sliding_log_counts_exactly(env: &Env) {
    let base = check(Algorithm::SlidingLog, "bob", 5, ms(10_000));
    let keys = env.keys().limit(RULE, Algorithm::SlidingLog, "bob");
    let decision = env.decide(&LimitCheck { cost: 3, ..base }).await;
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
    // The log lives on the master that owns its slot: one member per call,
    // and the base member (see lua/sliding_log.lua).
    assert_eq!(
        env.on_owner_int(&keys.counter, &["ZCARD", &keys.counter]),
        2
    );

    let denied = env.decide(&LimitCheck { cost: 3, ..base }).await;
    assert!(!denied.allowed);
    assert_eq!(denied.remaining, 2);
    assert_near(denied.retry_after, ms(10_000), ms(300));
    let never = env.decide(&LimitCheck { cost: 6, ..base }).await;
    assert!(!never.allowed);
    assert_eq!(never.retry_after, never.reset_after);
    let last = env.decide(&LimitCheck { cost: 2, ..base }).await;
    assert_eq!((last.allowed, last.remaining), (true, 0));
    assert_eq!(
        env.on_owner_int(&keys.counter, &["ZCARD", &keys.counter]),
        3
    );
}

async fn sliding_log_slides_in_real_time(env: &Env) {
    for algorithm in ALGORITHMS {
        let base = check(algorithm, "slide", 2, ms(800));
        let start = Instant::now();
        assert!(env.decide(&base).await.allowed);
        assert!(env.decide(&base).await.allowed);
        let denied = env.decide(&base).await;
        assert!(!denied.allowed, "{algorithm}: {denied:?}");
        assert!(
            denied.retry_after > Duration::ZERO && denied.retry_after <= ms(1600),
            "{algorithm}: {denied:?}"
        );
        let asked = start.elapsed();
        sleep_until(start + asked + denied.retry_after + ms(30)).await;
        assert!(
            env.decide(&base).await.allowed,
            "{algorithm}: denied after retry_after"
        );
    }
}

async fn sliding_counter_counts_and_stays_one_hash(env: &Env) {
    let base = check(Algorithm::SlidingCounter, "carol", 3, ms(60_000));
    for remaining in [2, 1, 0] {
        let decision = env.decide(&base).await;
        assert_eq!((decision.allowed, decision.remaining), (true, remaining));
    }
    let denied = env.decide(&base).await;
    assert!(!denied.allowed && !denied.blocked, "{denied:?}");
    assert!(denied.retry_after > Duration::ZERO);
    let keys = env.keys().limit(RULE, Algorithm::SlidingCounter, "carol");
    assert_eq!(
        env.on_owner(&keys.counter, &["HGET", &keys.counter, "c"]),
        "3"
    );
    assert_eq!(
        env.on_owner(&keys.counter, &["OBJECT", "ENCODING", &keys.counter]),
        "listpack"
    );
}

async fn a_denial_blocks_the_subject(env: &Env) {
    for algorithm in ALGORITHMS {
        let base = LimitCheck {
            block_for: Some(ms(1000)),
            ..check(algorithm, "blocky", 2, ms(400))
        };
        let keys = env.keys().limit(RULE, algorithm, "blocky");
        let start = Instant::now();
        assert!(env.decide(&base).await.allowed);
        assert!(env.decide(&base).await.allowed);
        let denied = env.decide(&base).await;
        assert!(!denied.allowed && denied.blocked, "{algorithm}: {denied:?}");
        assert_eq!(denied.retry_after, ms(1000));
        // The block key shares the counter's hash tag, so it sits beside it.
        let pttl = env.on_owner_int(&keys.counter, &["PTTL", &keys.block]);
        assert!((800..=1000).contains(&pttl), "{algorithm}: PTTL {pttl}");

        sleep_until(start + ms(700)).await;
        let blocked = env.decide(&base).await;
        assert!(
            !blocked.allowed && blocked.blocked,
            "{algorithm}: {blocked:?}"
        );
        sleep_until(start + ms(1100)).await;
        let free = env.decide(&base).await;
        assert!(free.allowed && !free.blocked, "{algorithm}: {free:?}");
    }
}

async fn dry_run_counts_nothing(env: &Env) {
    for algorithm in ALGORITHMS {
        let base = check(algorithm, "dry", 2, ms(10_000));
        let keys = env.keys().limit(RULE, algorithm, "dry");
        let dry = LimitCheck {
            dry_run: true,
            block_for: Some(ms(5_000)),
            ..base
        };
        let decision = env.decide(&LimitCheck { cost: 2, ..dry }).await;
        assert_eq!((decision.allowed, decision.remaining), (true, 0));
        assert_eq!(
            env.on_owner_int(&keys.counter, &["EXISTS", &keys.counter]),
            0
        );
        assert!(env.decide(&LimitCheck { cost: 2, ..base }).await.allowed);
        let denied = env.decide(&dry).await;
        assert!(
            !denied.allowed && !denied.blocked,
            "{algorithm}: {denied:?}"
        );
        assert_eq!(env.on_owner_int(&keys.counter, &["EXISTS", &keys.block]), 0);
    }
}

async fn usage_counts_up_to_the_quota(env: &Env) {
    let day = Duration::from_secs(86_400);
    let one = usage("u1", "luna", Some(3), day);
    let first = env
        .store
        .increment_usage(&UsageIncrement { amount: 2, ..one })
        .await
        .expect("increment answers");
    assert_eq!(
        (first.allowed, first.used, first.resets_after),
        (true, 2, day)
    );
    let second = env.store.increment_usage(&one).await.expect("increment");
    assert_eq!((second.allowed, second.used), (true, 3));
    let denied = env.store.increment_usage(&one).await.expect("increment");
    assert_eq!((denied.allowed, denied.used), (false, 3));
    let image = UsageIncrement {
        kind: "image",
        limit: None,
        ..one
    };
    for used in 1..=5 {
        let decision = env.store.increment_usage(&image).await.expect("increment");
        assert_eq!((decision.allowed, decision.used), (true, used));
    }
    let counters = env.store.get_usage("u1", "luna").await.expect("get_usage");
    assert_eq!(
        counters.used,
        vec![("image".to_owned(), 5), ("text".to_owned(), 3)]
    );
    assert_near(counters.resets_after, day, ms(500));
    assert_eq!(
        env.store
            .get_usage("u1", "nobody")
            .await
            .expect("get_usage"),
        ConversationCounters::default()
    );
    // The conversation and the user's index share the user's hash tag.
    let keys = env.keys().usage("u1");
    assert_eq!(
        env.cluster.key_slot(&keys.index),
        env.cluster.key_slot(&keys.conversation("luna"))
    );
    assert_eq!(env.on_owner_int(&keys.index, &["ZCARD", &keys.index]), 1);
}

async fn list_usage_is_sorted_and_skips_missing_conversations(env: &Env) {
    let long = Duration::from_secs(60);
    for character in ["b", "é", "a", "Z", "a:b"] {
        env.store
            .increment_usage(&usage("u3", character, Some(10), long))
            .await
            .expect("increment answers");
    }
    let ids = |listed: &[(String, ConversationCounters)]| -> Vec<String> {
        listed.iter().map(|(id, _)| id.clone()).collect()
    };
    let listed = env.store.list_usage("u3", 10).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a", "a:b", "b", "é"]);
    assert_eq!(listed[0].1.used("text"), 1);
    let listed = env.store.list_usage("u3", 2).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a"]);
    // A conversation gone from under its index entry is skipped.
    let keys = env.keys().usage("u3");
    let gone = keys.conversation("a");
    env.on_owner(&gone, &["DEL", &gone]);
    let listed = env.store.list_usage("u3", 2).await.expect("list answers");
    assert_eq!(ids(&listed), ["Z", "a:b"]);
    assert!(
        env.store
            .list_usage("nobody", 10)
            .await
            .expect("list answers")
            .is_empty()
    );
}

async fn crafted_ids_do_not_share_counters(env: &Env) {
    for algorithm in ALGORITHMS {
        for subject in ["a:b", "a%3Ab", "{x}", "x", "a}:{rl:api:b", "{}", "}{"] {
            let decision = env.decide(&check(algorithm, subject, 1, ms(10_000))).await;
            assert!(decision.allowed, "{algorithm} {subject:?} shares a counter");
        }
        let again = env.decide(&check(algorithm, "a:b", 1, ms(10_000))).await;
        assert!(!again.allowed);
    }
    for (user, character) in [("u:1", "c"), ("u%3A1", "c"), ("u", "1:c"), ("{u}", "c")] {
        let decision = env
            .store
            .increment_usage(&usage(user, character, Some(1), ms(10_000)))
            .await
            .expect("increment answers");
        assert!(decision.allowed, "{user:?}/{character:?} shares a counter");
    }
}

/// 200 concurrent hits on one subject with limit 10, through two stores as
/// two tollgate instances would: exactly 10 get through.
async fn concurrent_checks_allow_exactly_the_limit(env: &Env) {
    let other = connect(env.cluster.url(), &env.prefix).await;
    let stores = [env.store.clone(), other];
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
        let allowed = tasks.join_all().await.into_iter().filter(|a| *a).count();
        assert_eq!(allowed, 10, "{algorithm}");
    }
}

async fn concurrent_increments_allow_exactly_the_quota(env: &Env) {
    let mut tasks = JoinSet::new();
    for _ in 0..200 {
        let store = env.store.clone();
        tasks.spawn(async move {
            store
                .increment_usage(&usage("crowd", "luna", Some(10), ms(10_000)))
                .await
                .expect("increment answers")
                .allowed
        });
    }
    let allowed = tasks.join_all().await.into_iter().filter(|a| *a).count();
    assert_eq!(allowed, 10);
    let counters = env.store.get_usage("crowd", "luna").await.expect("get");
    assert_eq!(counters.used("text"), 10);
}

/// A node that lost its scripts (SCRIPT FLUSH here; a restart or a promoted
/// replica in production) gets them again from the first call it serves.
async fn scripts_reload_after_script_flush_on_every_node(env: &Env) {
    let base = check(Algorithm::SlidingLog, "flush", 3, ms(10_000));
    assert_eq!(env.decide(&base).await.remaining, 2);
    for master in env.cluster.masters() {
        assert_eq!(env.cluster.cli(master.port, &["SCRIPT", "FLUSH"]), "OK");
    }
    assert_eq!(env.decide(&base).await.remaining, 1);
    let counter = check(Algorithm::SlidingCounter, "flush", 3, ms(10_000));
    assert_eq!(env.decide(&counter).await.remaining, 2);
    env.store
        .increment_usage(&usage("u", "c", None, ms(10_000)))
        .await
        .expect("increment answers after SCRIPT FLUSH");
    let listed = env.store.list_usage("u", 10).await.expect("list answers");
    assert_eq!(listed.len(), 1);
    env.store.ping().await.expect("ping answers");
}

/// Hash tags put subjects' keys all over the cluster: every master holds
/// some of 300 subjects' counters and 60 users' quotas.
async fn subjects_spread_over_every_master(env: &Env) {
    let subjects: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    for subject in &subjects {
        assert!(
            env.decide(&check(Algorithm::SlidingCounter, subject, 5, ms(60_000)))
                .await
                .allowed
        );
    }
    for user in 0..60 {
        env.store
            .increment_usage(&usage(&format!("u{user}"), "luna", Some(5), ms(60_000)))
            .await
            .expect("increment answers");
    }
    let pattern = format!("{}*", env.prefix);
    let mut per_master = BTreeMap::new();
    for master in env.cluster.masters() {
        let keys = env
            .cluster
            .cli(master.port, &["--scan", "--pattern", &pattern]);
        per_master.insert(master.port, keys.lines().count());
    }
    println!("keys per master (300 counters + 60 x 3 usage keys): {per_master:?}");
    assert_eq!(per_master.len(), 3);
    // Each user: a conversation, the index by expiry and the index by id.
    assert_eq!(per_master.values().sum::<usize>(), 300 + 180);
    for (port, keys) in &per_master {
        // About a third each; far from all or nothing.
        assert!(*keys >= 70, "master :{port} holds only {keys} keys");
    }
}

/// The client learns the whole cluster from any seed that answers.
async fn one_live_seed_node_is_enough(env: &Env) {
    let live = env.cluster.masters()[1].port;
    let url = format!("redis-cluster://127.0.0.1:{},127.0.0.1:{live}", free_port());
    let store = connect(url, &env.prefix).await;
    for i in 0..30 {
        let subject = format!("seed-{i}");
        let decision = store
            .check_limit(&check(Algorithm::SlidingLog, &subject, 1, ms(10_000)))
            .await
            .expect("every slot is reachable");
        assert!(decision.allowed);
    }
    store.ping().await.expect("ping reaches every master");
}

// ---- Topology changes while requests flow -------------------------------

/// What a load loop saw.
#[derive(Debug, Default)]
struct Tally {
    allowed: usize,
    denied: usize,
    /// Clean store errors, each retried until a decision came.
    errors: usize,
    /// Of those, timeouts: a call given up on may still run later, and
    /// its retry then counts a second hit.
    timeouts: usize,
    messages: Vec<String>,
}

impl Tally {
    /// Every load loop's tally in one.
    fn sum(tallies: Vec<Tally>) -> Self {
        tallies
            .into_iter()
            .fold(Self::default(), |mut total, tally| {
                total.allowed += tally.allowed;
                total.denied += tally.denied;
                total.errors += tally.errors;
                total.timeouts += tally.timeouts;
                total.messages.extend(tally.messages);
                total
            })
    }

    /// Prints the first errors each loop saw, for a failing run's log.
    fn print_errors(&self) {
        for message in &self.messages {
            println!("  error: {message}");
        }
    }
}

/// Sends `attempts` checks of `check`, one per `pace`, retrying each one that
/// fails with a store error until it gets a decision (for at most
/// [`RECOVERY`] in all); counts decisions into `progress`.
async fn load(
    store: RedisStore,
    check: LimitCheck<'static>,
    attempts: usize,
    pace: Duration,
    progress: Arc<AtomicUsize>,
) -> Tally {
    let mut failing_since = None;
    let mut tally = Tally::default();
    for _ in 0..attempts {
        let decision = loop {
            match store.check_limit(&check).await {
                Ok(decision) => break decision,
                Err(err) => {
                    // A timeout is clean too, here: the tally shows whether
                    // its retry doubled a decision.
                    assert!(
                        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout(_)),
                        "a topology change may only make the store fail for a moment: {err:?}"
                    );
                    tally.errors += 1;
                    if matches!(err, StoreError::Timeout(_)) {
                        tally.timeouts += 1;
                    }
                    if tally.messages.len() < 5 {
                        tally.messages.push(err.to_string());
                    }
                    let since = *failing_since.get_or_insert_with(Instant::now);
                    assert!(
                        since.elapsed() < RECOVERY,
                        "the store did not recover within {RECOVERY:?}: {tally:?}"
                    );
                    sleep(ms(10)).await;
                }
            }
        };
        failing_since = None;
        if decision.allowed {
            tally.allowed += 1;
        } else {
            tally.denied += 1;
        }
        progress.fetch_add(1, Ordering::SeqCst);
        sleep(pace).await;
    }
    tally
}

/// The longest one call of [`load`] may keep failing: a crashed master is
/// noticed after `cluster-node-timeout` (2 s in the test clusters), and its
/// replica's election takes about a second more.
const RECOVERY: Duration = Duration::from_secs(15);

fn wait_for(progress: &AtomicUsize, at_least: usize) {
    while progress.load(Ordering::SeqCst) < at_least {
        thread::sleep(ms(2));
    }
}

/// A hot subject's slot moves to another master while two instances keep
/// checking it (limit 50 per minute, 200 attempts), then moves back. Every
/// hit counted before, during and after each move stays counted: exactly 50
/// are allowed in all, and the log ends with exactly 50 entries. The rule
/// has no lock-out, so its one-key script keeps deciding while the slot
/// migrates (by `ASK` once the log has moved) instead of waiting it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resharding_a_slot_in_use_loses_and_doubles_no_decision() {
    const PREFIX: &str = "reshard:";
    const SUBJECT: &str = "hot-subject";
    let cluster = Arc::new(RedisCluster::start(0));
    let keys = KeyBuilder::new(PREFIX).limit(RULE, Algorithm::SlidingLog, SUBJECT);
    let slot = cluster.key_slot(&keys.counter);
    let home = cluster.owner_of(slot);
    let away = cluster
        .masters()
        .into_iter()
        .map(|master| master.port)
        .find(|port| *port != home)
        .expect("three masters");

    let progress = Arc::new(AtomicUsize::new(0));
    let hot = LimitCheck {
        rule: RULE,
        subject: SUBJECT,
        algorithm: Algorithm::SlidingLog,
        limit: 50,
        window: Duration::from_secs(60),
        block_for: None,
        cost: 1,
        dry_run: false,
    };
    let mut loads = JoinSet::new();
    for _ in 0..2 {
        let store = connect(cluster.url(), PREFIX).await;
        loads.spawn(load(store, hot, 100, ms(8), Arc::clone(&progress)));
    }

    // Move the slot away while hits are still allowed, and back once the
    // subject is over its limit.
    let mover = {
        let cluster = Arc::clone(&cluster);
        let progress = Arc::clone(&progress);
        tokio::task::spawn_blocking(move || {
            // (state, decisions made when it began)
            let mut seen = Vec::new();
            let mut step = |state: &str| {
                seen.push((state.to_owned(), progress.load(Ordering::SeqCst)));
                if state != "slot moved" {
                    thread::sleep(ms(100));
                }
            };
            wait_for(&progress, 10);
            cluster.migrate_slot(slot, away, &mut step);
            wait_for(&progress, 120);
            cluster.migrate_slot(slot, home, &mut step);
            seen
        })
    };
    let seen = mover.await.expect("the slot moves without a panic");
    let total = Tally::sum(loads.join_all().await);
    let (allowed, denied, errors) = (total.allowed, total.denied, total.errors);
    println!("migration steps (state, at decision): {seen:?}");
    println!("allowed {allowed}, denied {denied}, store errors retried {errors}");
    total.print_errors();
    // What the client was told on the way, and followed by itself.
    let mut redirections = BTreeMap::<String, u64>::new();
    for port in [home, away] {
        for (code, count) in cluster.error_counts(port) {
            *redirections.entry(code).or_default() += count;
        }
    }
    println!("error replies from the two masters: {redirections:?}");
    assert!(
        redirections.get("MOVED").is_some_and(|moved| *moved > 0),
        "the client was redirected after each move"
    );
    let migrating_at = seen
        .iter()
        .find(|(state, _)| state == "migrating")
        .map(|(_, at)| *at);
    assert!(
        migrating_at.is_some_and(|at| at < 50),
        "the first move should begin while hits are still allowed: {seen:?}"
    );
    // A rule without a lock-out sends one key, so decisions went on during
    // each migration: on the target by ASK once the log had moved.
    assert!(
        redirections.get("ASK").is_some_and(|ask| *ask > 0),
        "decisions were served during the migrations: {redirections:?}"
    );
    assert_eq!(allowed + denied, 200);
    assert_eq!(allowed, 50, "no decision lost or doubled");
    assert_eq!(cluster.owner_of(slot), home);
    // 50 calls and the log's base member.
    assert_eq!(cluster.cli_int(home, &["ZCARD", &keys.counter]), 51);
    let slot = slot.to_string();
    assert_eq!(
        cluster.cli_int(away, &["CLUSTER", "COUNTKEYSINSLOT", &slot]),
        0
    );
}

/// The failover tests' subject: a sliding counter of 50 per window, without
/// a lock-out, which two instances check 100 times each.
///
/// The window is longer than the time since 1970, so the counter's fixed
/// window (`floor(now / window)`) is the same all through the test: no
/// window boundary falls inside a run, and no hit fades. With a one-minute
/// window, a run that straddled a minute boundary saw the hits it had
/// counted move to the previous window and fade, so more were allowed than
/// the limit (and `c` held fewer than were counted): the crash test failed
/// so once in about eight runs. These tests are about failover, not about
/// the slide, which the conformance suite pins.
fn hot_counter_check() -> LimitCheck<'static> {
    check(
        Algorithm::SlidingCounter,
        "hot-subject",
        50,
        LONGER_THAN_THE_EPOCH,
    )
}

/// 100 years of 365 days.
const LONGER_THAN_THE_EPOCH: Duration = Duration::from_secs(100 * 365 * 86_400);

/// A replica that never had the scripts is promoted (`CLUSTER FAILOVER`)
/// while two instances check a subject on its master: the client follows
/// the new master, the scripts load there by themselves, and exactly the
/// limit is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_under_load_keeps_every_decision() {
    const PREFIX: &str = "failover:";
    let cluster = Arc::new(RedisCluster::start(1));
    let hot = hot_counter_check();
    let keys = KeyBuilder::new(PREFIX).limit(RULE, hot.algorithm, hot.subject);
    let slot = cluster.key_slot(&keys.counter);
    let old_master = cluster.owner_of(slot);
    let replica = cluster.replica_of(old_master);

    let progress = Arc::new(AtomicUsize::new(0));
    let stores = [
        connect(cluster.url(), PREFIX).await,
        connect(cluster.url(), PREFIX).await,
    ];
    // Connecting preloaded the scripts on every node; this replica forgets
    // them, as one added later or restarted would have none.
    assert_eq!(cluster.cli(replica, &["SCRIPT", "FLUSH"]), "OK");
    let mut loads = JoinSet::new();
    for store in stores {
        loads.spawn(load(store, hot, 100, ms(8), Arc::clone(&progress)));
    }

    let promoted_at = {
        let cluster = Arc::clone(&cluster);
        let progress = Arc::clone(&progress);
        tokio::task::spawn_blocking(move || {
            wait_for(&progress, 20);
            let started = progress.load(Ordering::SeqCst);
            let mut promoted = 0;
            cluster.fail_over(replica, || promoted = progress.load(Ordering::SeqCst));
            (started, promoted)
        })
        .await
        .expect("the failover runs without a panic")
    };
    let total = Tally::sum(loads.join_all().await);
    let (allowed, denied, errors) = (total.allowed, total.denied, total.errors);
    println!(
        "failover from decision {} to {}; allowed {allowed}, denied {denied}, store errors retried {errors}",
        promoted_at.0, promoted_at.1
    );
    total.print_errors();
    assert_eq!(allowed + denied, 200);
    assert_eq!(allowed, 50, "no decision lost or doubled");
    assert_eq!(
        cluster.owner_of(slot),
        replica,
        "the replica is the master now"
    );
    assert_eq!(cluster.cli(replica, &["HGET", &keys.counter, "c"]), "50");
    // The new master had no scripts; the calls it served loaded the one
    // they needed.
    let sha = redis::Script::new(include_str!("../lua/sliding_counter.lua"))
        .get_hash()
        .to_owned();
    assert_eq!(cluster.cli(replica, &["SCRIPT", "EXISTS", &sha]), "1");
    let errors = cluster.error_counts(replica);
    let commands = cluster.command_counts(replica);
    println!(
        "new master: {} NOSCRIPT, {} EVAL, {} EVALSHA; old master: {} MOVED",
        errors.get("NOSCRIPT").unwrap_or(&0),
        commands.get("eval").unwrap_or(&0),
        commands.get("evalsha").unwrap_or(&0),
        cluster.error_counts(old_master).get("MOVED").unwrap_or(&0),
    );
    assert!(errors.get("NOSCRIPT").is_some_and(|n| *n >= 1));
    assert!(commands.get("eval").is_some_and(|n| *n >= 1));
}

/// A master is killed (SIGKILL) while two instances check a subject on it;
/// once the other masters take it for failed, its replica is elected and
/// the client follows it, and every decision still comes.
///
/// What a crash may cost, and so what this test may assert. Redis
/// replicates asynchronously and promises nothing about how far a replica
/// lags, so the hits a master counted but had not yet replicated are gone
/// with it: the new master allows them again. To bound them by what Redis
/// does promise, the test writes on the master and `WAIT`s until the
/// replica has acknowledged that write (and so, replication being in
/// order, every hit counted before it), then kills the master at once.
/// Only hits counted after that write can be lost, and each was counted by
/// a call that either came back before the master was dead (`crashed_at -
/// replicated_at` decisions at most) or was in flight when it died (one per
/// instance). A call cut off by the crash after its script ran is retried
/// and, if its hit was replicated, counted twice: one per instance at
/// most; so is a call that timed out and ran after all. So the allowed
/// count lies between the limit minus the calls in flight and timeouts,
/// and the limit plus the decisions made between the write and the crash
/// and the calls in flight. The window never slides during the test
/// (see [`hot_counter_check`]), so nothing else moves the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_master_fails_over_and_every_decision_still_comes() {
    const PREFIX: &str = "crash:";
    const IN_FLIGHT: usize = 2;
    let cluster = Arc::new(RedisCluster::start(1));
    let hot = hot_counter_check();
    let keys = KeyBuilder::new(PREFIX).limit(RULE, hot.algorithm, hot.subject);
    let slot = cluster.key_slot(&keys.counter);
    let master = cluster.owner_of(slot);
    let replica = cluster.replica_of(master);
    let limit = hot.limit as usize;
    // Shares the counter's hash tag, so it lives in the counter's slot.
    let marker = format!("{}:replicated", keys.counter);

    let progress = Arc::new(AtomicUsize::new(0));
    let mut loads = JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let store = connect(cluster.url(), PREFIX).await;
        loads.spawn(load(store, hot, 100, ms(8), Arc::clone(&progress)));
    }

    let (replicated_at, crashed_at, promoted_at) = {
        let cluster = Arc::clone(&cluster);
        let progress = Arc::clone(&progress);
        tokio::task::spawn_blocking(move || {
            wait_for(&progress, 20);
            // Every decision that came back by now was counted before the
            // marker is written.
            let replicated_at = progress.load(Ordering::SeqCst);
            let acked = cluster.replicate(master, &marker, 1, Duration::from_secs(10));
            assert_eq!(acked, 1, "the replica acknowledged the marker");
            cluster.crash(master);
            let crashed_at = progress.load(Ordering::SeqCst);
            let mut promoted_at = 0;
            cluster.await_promotion(replica, || promoted_at = progress.load(Ordering::SeqCst));
            (replicated_at, crashed_at, promoted_at)
        })
        .await
        .expect("the crash and the election run without a panic")
    };
    let total = Tally::sum(loads.join_all().await);
    let (allowed, denied, errors) = (total.allowed, total.denied, total.errors);
    println!(
        "replicated at decision {replicated_at}, crash at {crashed_at}, new master at \
         {promoted_at}; allowed {allowed}, denied {denied}, store errors retried {errors} \
         ({} timeouts)",
        total.timeouts
    );
    total.print_errors();
    assert_eq!(allowed + denied, 200, "every decision came");
    assert!(errors > 0, "the crash was felt");
    let doubled = IN_FLIGHT + total.timeouts;
    let unreplicated = crashed_at - replicated_at + IN_FLIGHT;
    assert!(
        (limit.saturating_sub(doubled)..=limit + unreplicated).contains(&allowed),
        "allowed {allowed}: outside {}..={} (the limit, less what may have been \
         counted twice, plus what the crash may have lost)",
        limit.saturating_sub(doubled),
        limit + unreplicated
    );
    assert_eq!(cluster.owner_of(slot), replica, "the replica took the slot");
    // The new master holds a full window: asked through the store, so the
    // test reads no script's data layout.
    let store = connect(cluster.url(), PREFIX).await;
    let after = store
        .check_limit(&LimitCheck {
            dry_run: true,
            ..hot
        })
        .await
        .expect("the new master answers");
    assert_eq!((after.allowed, after.remaining), (false, 0), "{after:?}");
}

// ---- Connecting -----------------------------------------------------------

#[tokio::test]
async fn connecting_to_no_cluster_is_unavailable_and_masks_the_password() {
    let (a, b) = (free_port(), free_port());
    let mut options = options(
        format!("redis-cluster://tollgate:hunter2@127.0.0.1:{a},127.0.0.1:{b}"),
        "t:",
    );
    options.timeout = ms(300);
    assert_unreachable_and_masked(&options, &format!("127.0.0.1:{a}"), ms(700)).await;
}

#[tokio::test]
async fn a_plain_server_is_not_a_cluster() {
    let server = RedisServer::start();
    let err = RedisStore::connect(&options(
        format!("redis-cluster://127.0.0.1:{}", server.port()),
        "t:",
    ))
    .await
    .expect_err("a server without cluster mode is no cluster");
    println!("{err}");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn a_cluster_with_a_node_that_does_not_answer_stops_start_up() {
    let cluster = RedisCluster::start(0);
    let masters = cluster.masters();
    let (seed, silent) = (masters[0].port, masters[2].port);
    // The silent master stays in the cluster (its bus still talks) but
    // answers no client for a while. (A node that answers but cannot be
    // used is in cluster_tls.rs: a certificate without the node's address.)
    cluster.cli(silent, &["CLIENT", "PAUSE", "5000", "ALL"]);
    let mut options = options(format!("redis-cluster://127.0.0.1:{seed}"), "t:");
    options.timeout = ms(500);
    let start = Instant::now();
    let err = RedisStore::connect(&options)
        .await
        .expect_err("a node that does not answer stops start-up");
    assert!(start.elapsed() < ms(2_000), "took {:?}", start.elapsed());
    let StoreError::Unavailable(message) = &err else {
        panic!("{err:?}");
    };
    println!("{message}");
    assert!(
        message.contains(&format!("redis-cluster://127.0.0.1:{seed} ")),
        "names the URL: {message}"
    );
}

// ---- Several limits in one call, across slots ----------------------------

/// 200 concurrent groups of two checks whose subjects are in different
/// slots (so counted slot by slot, and taken back when the second denies),
/// through two stores: no limit is exceeded, and each counter holds exactly
/// what the allowed groups spent, whichever algorithm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_limits_across_slots_never_over_admit() {
    let cluster = RedisCluster::start(0);
    let prefix = "groups:";
    let stores = [
        connect(cluster.url(), prefix).await,
        connect(cluster.url(), prefix).await,
    ];
    let keys = KeyBuilder::new(prefix);
    // Subjects in two different slots.
    let (first, second) = ("left-0", "right-0");
    assert_ne!(
        cluster.key_slot(&keys.limit(RULE, Algorithm::SlidingLog, first).counter),
        cluster.key_slot(&keys.limit(RULE, Algorithm::SlidingLog, second).counter),
    );
    for algorithm in ALGORITHMS {
        let mut tasks = JoinSet::new();
        for i in 0..200 {
            let store = stores[i % 2].clone();
            tasks.spawn(async move {
                let checks = [
                    check(algorithm, first, 10, ms(60_000)),
                    LimitCheck {
                        cost: 3,
                        ..check(algorithm, second, 20, ms(60_000))
                    },
                ];
                let group = store
                    .check_limits(&checks, None)
                    .await
                    .expect("check_limits answers");
                group.decisions.iter().all(|d| d.allowed)
            });
        }
        let allowed = tasks.join_all().await.into_iter().filter(|a| *a).count() as u64;
        let left = |subject: &'static str, limit: u64| {
            let store = stores[0].clone();
            async move {
                let d = store
                    .check_limit(&LimitCheck {
                        dry_run: true,
                        ..check(algorithm, subject, limit, ms(60_000))
                    })
                    .await
                    .expect("check_limit answers");
                if d.allowed {
                    d.remaining + 1
                } else {
                    d.remaining
                }
            }
        };
        let log = cluster.cli(
            cluster.owner_of(cluster.key_slot(&keys.limit(RULE, algorithm, first).counter)),
            &[
                "ZRANGE",
                &keys.limit(RULE, algorithm, first).counter,
                "0",
                "-1",
                "WITHSCORES",
            ],
        );
        assert!((1..=6).contains(&allowed), "{algorithm}: {allowed} allowed");
        assert_eq!(left(first, 10).await, 10 - allowed, "{algorithm}: {log}");
        assert_eq!(left(second, 20).await, 20 - 3 * allowed, "{algorithm}");
    }
}

/// A group over two slots with a request_id: 20 duplicates at once, through
/// two stores, are decided once (the record is claimed in the first
/// subject's slot), and every duplicate gets the same answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_limits_request_id_across_slots_decides_once() {
    let cluster = RedisCluster::start(0);
    let prefix = "group-ids:";
    let stores = [
        connect(cluster.url(), prefix).await,
        connect(cluster.url(), prefix).await,
    ];
    let keys = KeyBuilder::new(prefix);
    let (first, second) = ("left-0", "right-0");
    assert_ne!(
        cluster.key_slot(&keys.limit(RULE, Algorithm::SlidingLog, first).counter),
        cluster.key_slot(&keys.limit(RULE, Algorithm::SlidingLog, second).counter),
    );
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let store = stores[i % 2].clone();
        tasks.spawn(async move {
            let checks = [
                check(Algorithm::SlidingLog, first, 10, ms(60_000)),
                check(Algorithm::SlidingCounter, second, 10, ms(60_000)),
            ];
            store
                .check_limits(&checks, Some("retry-me"))
                .await
                .expect("check_limits answers")
        });
    }
    let groups = tasks.join_all().await;
    assert_eq!(
        groups.iter().filter(|g| !g.replayed).count(),
        1,
        "decided once"
    );
    assert!(
        groups.iter().all(|g| g.decisions == groups[0].decisions),
        "every duplicate has the same answer"
    );
    for (algorithm, subject) in [
        (Algorithm::SlidingLog, first),
        (Algorithm::SlidingCounter, second),
    ] {
        let d = stores[0]
            .check_limit(&LimitCheck {
                dry_run: true,
                ..check(algorithm, subject, 10, ms(60_000))
            })
            .await
            .expect("check_limit answers");
        assert_eq!(d.remaining, 8, "{algorithm}: counted once");
    }
}

/// 50 calls with one request id at once, over two stores on the cluster:
/// one is counted, every one gets its answer; the record lives on the
/// counter's node, and settles find it there.
async fn request_ids_live_in_their_counter_s_slot_and_count_once(env: &Env) {
    let other = connect(env.cluster.url(), &env.prefix).await;
    let stores = [env.store.clone(), other];
    for algorithm in ALGORITHMS {
        let mut tasks = JoinSet::new();
        for i in 0..50 {
            let store = stores[i % 2].clone();
            tasks.spawn(async move {
                store
                    .check_limit_once(
                        &LimitCheck {
                            cost: 4,
                            ..check(algorithm, "dups", 10, ms(60_000))
                        },
                        "dup-1",
                    )
                    .await
                    .expect("check_limit_once answers")
            });
        }
        let answers = tasks.join_all().await;
        assert_eq!(
            answers.iter().filter(|a| !a.replayed).count(),
            1,
            "{algorithm}"
        );
        assert!(
            answers
                .iter()
                .all(|a| a.decision.allowed && a.decision.remaining == 6),
            "{algorithm}: {answers:?}"
        );
        let keys = env.keys().limit(RULE, algorithm, "dups");
        let record = keys.request("dup-1");
        assert_eq!(
            env.cluster.key_slot(&record),
            env.cluster.key_slot(&keys.counter)
        );
        assert_eq!(
            env.on_owner_int(&record, &["EXISTS", &record]),
            1,
            "{algorithm}"
        );
        let settle = LimitSettle {
            rule: RULE,
            subject: "dups",
            algorithm,
            window: ms(60_000),
            request_id: "dup-1",
            actual: 1,
        };
        assert_eq!(
            env.store.settle_limit(&settle).await.expect("settles"),
            Some(9),
            "{algorithm}"
        );
        assert_eq!(
            stores[1].settle_limit(&settle).await.expect("settles"),
            Some(9),
            "{algorithm}"
        );
    }
    let increment = usage("payer", "luna", Some(10), ms(60_000));
    let first = env
        .store
        .increment_usage_once(&increment, "m-1")
        .await
        .expect("increment_usage_once answers");
    let again = stores[1]
        .increment_usage_once(&increment, "m-1")
        .await
        .expect("increment_usage_once answers");
    assert!(!first.replayed && again.replayed && again.decision == first.decision);
    let settle = UsageSettle {
        user_id: "payer",
        character_id: "luna",
        kind: "text",
        request_id: "m-1",
        actual: 3,
    };
    assert_eq!(
        stores[1].settle_usage(&settle).await.expect("settles"),
        Some(3)
    );
}
