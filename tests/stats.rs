//! Usage statistics over the wire (`tollgate.v1.UsageStats`), on the memory
//! store, a real `redis-server` and a real 3-master Redis Cluster: what
//! IncrementUsage decided shows up in GetStats, per kind, per bucket and per
//! character, within the flush interval.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::server::{Backend, KEY_PREFIX, StoreKind, TestServer, test_config};
use tokio::task::JoinSet;
use tollgate::{
    keys::KeyBuilder,
    proto::{
        GetStatsRequest, GetStatsResponse, Granularity as Wire, IncrementUsageRequest,
        usage_stats_client::UsageStatsClient,
    },
    stats::{Granularity, StatsClock},
};
use tonic::{Code, Status, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

/// The shipped kinds, quotas of a few messages, and a fast flush.
const TOML: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[quotas]
period = "1h"

[quotas.kinds]
text = { free = 3, premium = "unlimited" }
audio = { free = 2, premium = "unlimited" }
image = { free = 1, premium = "unlimited" }

[stats]
flush = "100ms"
hours = 5
days = 3
weeks = 2
"#;

/// 2026-11-29 (a Sunday) 23:59:59 UTC: the next second starts a new hour,
/// day and ISO week.
const SUNDAY_LAST_SECOND: i64 = 1_795_996_799;

async fn stats_client(server: &TestServer) -> UsageStatsClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .expect("a loopback URL is valid")
        .connect()
        .await
        .expect("connect to the test server");
    UsageStatsClient::new(channel)
}

async fn get_stats(
    client: &UsageStatsClient<Channel>,
    granularity: Wire,
    buckets: u32,
    character_id: &str,
    top_characters: u32,
) -> Result<GetStatsResponse, Status> {
    client
        .clone()
        .get_stats(GetStatsRequest {
            granularity: granularity.into(),
            buckets,
            character_id: character_id.to_owned(),
            top_characters,
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn increment(server: &TestServer, user: &str, character: &str, kind: &str, tier: &str) {
    server
        .increment(IncrementUsageRequest {
            user_id: user.to_owned(),
            character_id: character.to_owned(),
            kind: kind.to_owned(),
            tier: tier.to_owned(),
            amount: 1,
            ..IncrementUsageRequest::default()
        })
        .await
        .expect("IncrementUsage answers");
}

/// Polls GetStats until `done` holds of the answer, for at most `within`.
async fn await_stats(
    client: &UsageStatsClient<Channel>,
    request: (Wire, u32, &str, u32),
    within: Duration,
    done: impl Fn(&GetStatsResponse) -> bool,
) -> GetStatsResponse {
    let start = Instant::now();
    loop {
        let answer = get_stats(client, request.0, request.1, request.2, request.3).await;
        if let Ok(answer) = &answer
            && done(answer)
        {
            return answer.clone();
        }
        assert!(
            start.elapsed() < within,
            "GetStats{request:?} not as expected within {within:?}: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn messages(response: &GetStatsResponse, bucket: usize, kind: &str) -> u64 {
    response.buckets[bucket]
        .messages
        .get(kind)
        .copied()
        .unwrap_or(u64::MAX)
}

fn denials(response: &GetStatsResponse, bucket: usize, kind: &str) -> u64 {
    response.buckets[bucket]
        .quota_denials
        .get(kind)
        .copied()
        .unwrap_or(u64::MAX)
}

/// Expands one async test body over every store.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::StoreKind::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::StoreKind::Redis).await;
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::StoreKind::Cluster).await;
                }
            )*
        }
    };
}

on_every_store!(
    counts_per_kind_with_denials_in_every_granularity,
    buckets_change_at_the_hour_the_day_and_the_monday,
    active_users_are_within_two_percent_of_1000,
    top_characters_rank_most_first_and_ties_by_id,
);

async fn counts_per_kind_with_denials_in_every_granularity(kind: StoreKind) {
    let backend = Backend::new(kind);
    let server = backend.serve_toml(TOML).await;
    let client = stats_client(&server).await;
    // Free text: 3 counted, then 2 denied. Premium image: unlimited, counted.
    for _ in 0..5 {
        increment(&server, "u1", "luna", "text", "free").await;
    }
    for _ in 0..4 {
        increment(&server, "u2", "max", "image", "premium").await;
    }
    for granularity in [Wire::Hour, Wire::Day, Wire::Week] {
        let answer = await_stats(
            &client,
            (granularity, 1, "", 0),
            Duration::from_secs(5),
            |a| messages(a, 0, "image") == 4,
        )
        .await;
        assert_eq!(answer.buckets.len(), 1);
        assert_eq!(messages(&answer, 0, "text"), 3, "{granularity:?}");
        assert_eq!(denials(&answer, 0, "text"), 2, "{granularity:?}");
        assert_eq!(denials(&answer, 0, "image"), 0, "{granularity:?}");
        // Every configured kind, 0 included.
        assert_eq!(messages(&answer, 0, "audio"), 0, "{granularity:?}");
        assert_eq!(denials(&answer, 0, "audio"), 0, "{granularity:?}");
        assert_eq!(answer.buckets[0].active_users, 2, "{granularity:?}");
        // One character's figures.
        let luna = get_stats(&client, granularity, 1, "luna", 0)
            .await
            .expect("GetStats for one character");
        assert_eq!(messages(&luna, 0, "text"), 3);
        assert_eq!(denials(&luna, 0, "text"), 2);
        assert_eq!(messages(&luna, 0, "image"), 0);
        assert_eq!(luna.buckets[0].active_users, 1);
        let nobody = get_stats(&client, granularity, 1, "nobody", 0)
            .await
            .expect("GetStats for a character with no traffic");
        assert_eq!(messages(&nobody, 0, "text"), 0);
        assert_eq!(nobody.buckets[0].active_users, 0);
    }
    // Older buckets are there, with zeros, oldest first.
    let answer = get_stats(&client, Wire::Hour, 3, "", 0)
        .await
        .expect("three hour buckets");
    assert_eq!(answer.buckets.len(), 3);
    assert_eq!(messages(&answer, 0, "text"), 0);
    assert_eq!(messages(&answer, 1, "text"), 0);
    assert_eq!(messages(&answer, 2, "text"), 3);
    let starts: Vec<i64> = answer
        .buckets
        .iter()
        .map(|b| b.start.expect("every bucket has a start").seconds)
        .collect();
    assert_eq!(starts[1] - starts[0], 3600);
    assert_eq!(starts[2] - starts[1], 3600);
    assert_eq!(starts[2] % 3600, 0, "hour buckets start on the hour");
    server.stop().await;
}

async fn buckets_change_at_the_hour_the_day_and_the_monday(kind: StoreKind) {
    let backend = Backend::new(kind);
    let clock = StatsClock::manual(SUNDAY_LAST_SECOND);
    let server = backend
        .serve_with_stats_clock(&test_config(TOML), clock.clone())
        .await;
    let client = stats_client(&server).await;
    increment(&server, "u1", "luna", "text", "premium").await;
    clock.set(SUNDAY_LAST_SECOND + 1);
    increment(&server, "u1", "luna", "text", "premium").await;
    increment(&server, "u2", "luna", "text", "premium").await;
    let monday = SUNDAY_LAST_SECOND + 1;
    for (granularity, size) in [
        (Wire::Hour, 3600),
        (Wire::Day, 86_400),
        (Wire::Week, 7 * 86_400),
    ] {
        let answer = await_stats(
            &client,
            (granularity, 2, "", 0),
            Duration::from_secs(5),
            |a| messages(a, 0, "text") == 1 && messages(a, 1, "text") == 2,
        )
        .await;
        let starts: Vec<i64> = answer
            .buckets
            .iter()
            .map(|b| b.start.expect("a start").seconds)
            .collect();
        assert_eq!(starts, [monday - size, monday], "{granularity:?}");
        assert_eq!(answer.buckets[0].active_users, 1, "{granularity:?}");
        assert_eq!(answer.buckets[1].active_users, 2, "{granularity:?}");
    }
    server.stop().await;
}

async fn active_users_are_within_two_percent_of_1000(kind: StoreKind) {
    let backend = Backend::new(kind);
    let server = backend.serve_toml(TOML).await;
    let client = stats_client(&server).await;
    let mut calls = JoinSet::new();
    for worker in 0..10 {
        let mut quota = server.quota.clone();
        calls.spawn(async move {
            for user in (worker * 100)..(worker * 100 + 100) {
                quota
                    .increment_usage(IncrementUsageRequest {
                        user_id: format!("user-{user}"),
                        character_id: format!("c{}", user % 7),
                        kind: "text".to_owned(),
                        tier: "premium".to_owned(),
                        amount: 1,
                        ..IncrementUsageRequest::default()
                    })
                    .await
                    .expect("IncrementUsage answers");
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("a worker finishes");
    }
    let answer = await_stats(
        &client,
        (Wire::Day, 1, "", 0),
        Duration::from_secs(5),
        |a| messages(a, 0, "text") == 1000,
    )
    .await;
    let estimate = answer.buckets[0].active_users as f64;
    assert!(
        (estimate - 1000.0).abs() <= 20.0,
        "1000 users estimated as {estimate}"
    );
    server.stop().await;
}

async fn top_characters_rank_most_first_and_ties_by_id(kind: StoreKind) {
    let backend = Backend::new(kind);
    let server = backend.serve_toml(TOML).await;
    let client = stats_client(&server).await;
    for (character, count) in [("delta", 1), ("bravo", 3), ("alpha", 3), ("charlie", 5)] {
        for _ in 0..count {
            increment(&server, "u1", character, "text", "premium").await;
        }
    }
    let ranked = |answer: &GetStatsResponse| -> Vec<(String, u64)> {
        answer
            .top_characters
            .iter()
            .map(|c| (c.character_id.clone(), c.messages))
            .collect()
    };
    let answer = await_stats(
        &client,
        (Wire::Hour, 1, "", 10),
        Duration::from_secs(5),
        |a| messages(a, 0, "text") == 12,
    )
    .await;
    let own = |list: &[(&str, u64)]| -> Vec<(String, u64)> {
        list.iter().map(|(id, n)| ((*id).to_owned(), *n)).collect()
    };
    assert_eq!(
        ranked(&answer),
        own(&[("charlie", 5), ("alpha", 3), ("bravo", 3), ("delta", 1)])
    );
    // Cut inside a tie: the id decides who stays.
    let answer = get_stats(&client, Wire::Hour, 1, "", 2)
        .await
        .expect("top 2");
    assert_eq!(ranked(&answer), own(&[("charlie", 5), ("alpha", 3)]));
    let answer = get_stats(&client, Wire::Week, 1, "", 1)
        .await
        .expect("top 1");
    assert_eq!(ranked(&answer), own(&[("charlie", 5)]));
    let answer = get_stats(&client, Wire::Day, 1, "", 0)
        .await
        .expect("no top");
    assert!(answer.top_characters.is_empty());
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let backend = Backend::new(StoreKind::Memory);
    let server = backend.serve_toml(TOML).await;
    let client = stats_client(&server).await;
    let long = "x".repeat(257);
    let cases: [(Wire, u32, &str, u32, &str); 7] = [
        (Wire::Unspecified, 1, "", 0, "granularity"),
        (Wire::Hour, 6, "", 0, "buckets"),
        (Wire::Day, 4, "", 0, "buckets"),
        (Wire::Week, 3, "", 0, "buckets"),
        (Wire::Hour, 1, "", 101, "top_characters"),
        (Wire::Hour, 1, &long, 0, "character_id"),
        (Wire::Hour, 1000, "", 0, "buckets"),
    ];
    for (granularity, buckets, character, top, field) in cases {
        let status = get_stats(&client, granularity, buckets, character, top)
            .await
            .expect_err("a bad request is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
    }
    // The retention itself, 0 (one bucket) and the top 100 are fine.
    for (granularity, buckets, expected) in [
        (Wire::Hour, 5, 5),
        (Wire::Day, 3, 3),
        (Wire::Week, 2, 2),
        (Wire::Hour, 0, 1),
    ] {
        let answer = get_stats(&client, granularity, buckets, "", 100)
            .await
            .expect("within retention");
        assert_eq!(answer.buckets.len(), expected);
    }
    // An unknown granularity number is refused as well.
    let status = client
        .clone()
        .get_stats(GetStatsRequest {
            granularity: 9,
            buckets: 1,
            ..GetStatsRequest::default()
        })
        .await
        .expect_err("an unknown granularity");
    assert_eq!(status.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test]
async fn the_shipped_retention_bounds_buckets() {
    let backend = Backend::new(StoreKind::Memory);
    let server = backend.serve_shipped().await;
    let client = stats_client(&server).await;
    for (granularity, retention) in [(Wire::Hour, 168), (Wire::Day, 90), (Wire::Week, 52)] {
        let answer = get_stats(&client, granularity, retention, "", 0)
            .await
            .expect("the retention");
        assert_eq!(answer.buckets.len(), retention as usize);
        let status = get_stats(&client, granularity, retention + 1, "", 0)
            .await
            .expect_err("one more than the retention");
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    server.stop().await;
}

#[tokio::test]
async fn disabled_statistics_are_failed_precondition_and_record_nothing() {
    let backend = Backend::new(StoreKind::Memory);
    let toml = TOML.replace("[stats]\n", "[stats]\nenabled = false\n");
    let server = backend.serve_toml(&toml).await;
    let client = stats_client(&server).await;
    increment(&server, "u1", "luna", "text", "free").await;
    let status = get_stats(&client, Wire::Hour, 1, "", 0)
        .await
        .expect_err("statistics are off");
    assert_eq!(status.code(), Code::FailedPrecondition);
    server.stop().await;
}

/// With the shipped config (a flush every second), each of 3 messages is
/// visible within 2 s of its answer.
#[tokio::test]
async fn a_counted_message_is_visible_within_two_seconds() {
    let backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_shipped().await;
    let client = stats_client(&server).await;
    for seen in 1..=3u64 {
        increment(&server, "u1", "luna", "text", "premium").await;
        let answered = Instant::now();
        await_stats(
            &client,
            (Wire::Hour, 1, "", 0),
            Duration::from_secs(2),
            |a| messages(a, 0, "text") == seen,
        )
        .await;
        assert!(answered.elapsed() < Duration::from_secs(2));
    }
    server.stop().await;
}

/// Messages recorded while Redis is down wait for it, and are written by
/// the first flush after it is back.
#[tokio::test]
async fn the_flush_survives_a_redis_restart() {
    let mut backend = Backend::new(StoreKind::Redis);
    let toml = TOML.replace("flush = \"100ms\"", "flush = \"3s\"");
    let server = backend.serve_toml(&toml).await;
    let client = stats_client(&server).await;
    // The first flush runs as the server starts; the next is 3 s later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..4 {
        increment(&server, "u1", "luna", "audio", "premium").await;
    }
    backend.redis_mut().kill();
    // The flush at 3 s fails; the one at 6 s finds Redis back.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    backend.redis_mut().restart();
    // Once tollgate sees Redis again (its breaker closed), the next flush,
    // at most 3 s later, writes what waited.
    let (status, _) = server
        .await_health("", ServingStatus::Serving, Duration::from_secs(10))
        .await;
    assert_eq!(status, ServingStatus::Serving);
    let answer = await_stats(
        &client,
        (Wire::Hour, 1, "", 0),
        Duration::from_secs(8),
        |a| messages(a, 0, "audio") == 4,
    )
    .await;
    assert_eq!(answer.buckets[0].active_users, 1);
    let metrics = server.metrics.encode();
    assert!(
        metrics.contains("tollgate_stats_dropped_total 0"),
        "{metrics}"
    );
    server.stop().await;
}

/// The keys of one hour bucket (the global figures and each character's)
/// sit on more than one master.
#[tokio::test]
async fn one_bucket_spreads_over_the_masters_of_a_cluster() {
    let backend = Backend::new(StoreKind::Cluster);
    let clock = StatsClock::manual(SUNDAY_LAST_SECOND);
    let server = backend
        .serve_with_stats_clock(&test_config(TOML), clock)
        .await;
    let client = stats_client(&server).await;
    let characters: Vec<String> = (0..12).map(|i| format!("char-{i}")).collect();
    for character in &characters {
        increment(&server, "u1", character, "text", "premium").await;
    }
    await_stats(
        &client,
        (Wire::Hour, 1, "", 0),
        Duration::from_secs(5),
        |a| messages(a, 0, "text") == 12,
    )
    .await;
    let cluster = backend.cluster();
    let keys = KeyBuilder::new(KEY_PREFIX);
    let hour = Granularity::Hour.start_of(SUNDAY_LAST_SECOND);
    let mut owners = BTreeSet::new();
    let mut all = vec![keys.stats(Granularity::Hour, hour, None)];
    all.extend(
        characters
            .iter()
            .map(|c| keys.stats(Granularity::Hour, hour, Some(c))),
    );
    for bucket in all {
        let owner = cluster.owner_of(cluster.key_slot(&bucket.counts));
        assert_eq!(
            cluster.cli_int(owner, &["EXISTS", &bucket.counts]),
            1,
            "{} is on its slot's master",
            bucket.counts
        );
        owners.insert(owner);
    }
    assert!(owners.len() > 1, "every key on one master: {owners:?}");
    server.stop().await;
}

#[tokio::test]
async fn reflection_lists_usage_stats() {
    let backend = Backend::new(StoreKind::Memory);
    let server = backend.serve_shipped().await;
    let (v1, v1alpha) = server.reflected_services().await;
    for names in [v1, v1alpha] {
        assert!(
            names.iter().any(|name| name == "tollgate.v1.UsageStats"),
            "{names:?}"
        );
    }
    server.stop().await;
}

/// `tollgate stats` prints the last 24 hours and the last 7 days.
#[tokio::test]
async fn the_cli_prints_hours_and_days() {
    let backend = Backend::new(StoreKind::Memory);
    let server = backend
        .serve_toml(
            TOML.replace("hours = 5", "hours = 24")
                .replace("days = 3", "days = 7")
                .as_str(),
        )
        .await;
    let client = stats_client(&server).await;
    increment(&server, "u1", "luna", "text", "free").await;
    await_stats(
        &client,
        (Wire::Hour, 1, "", 0),
        Duration::from_secs(5),
        |a| messages(a, 0, "text") == 1,
    )
    .await;
    let addr = format!("http://{}", server.addr);
    let output = tokio::task::spawn_blocking(move || {
        common::binary::Tollgate::command()
            .args(["stats", "--addr", &addr])
            .output()
            .expect("tollgate stats runs")
    })
    .await
    .expect("the blocking task finishes");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("Last 24 hours (UTC)"), "{stdout}");
    assert!(stdout.contains("Last 7 days (UTC)"), "{stdout}");
    // A header, 24 hour rows, a blank line, a title, a header, 7 day rows.
    let rows = stdout.lines().filter(|line| line.starts_with("20")).count();
    assert_eq!(rows, 31, "{stdout}");
    server.stop().await;
}

/// The README's figure: Redis memory for one day of statistics of 10,000
/// users over 1,000 characters, every user active in every hour of the day
/// (with one character each, 3 kinds), summed over every statistics key
/// with `MEMORY USAGE ... SAMPLES 0`. Run with
/// `cargo test --test stats -- --ignored --nocapture memory_per_day`.
#[tokio::test]
#[ignore = "a measurement, not a check: prints the figure"]
async fn memory_per_day_for_10000_users_over_1000_characters() {
    use tollgate::{
        stats::{KindCount, Retention, StatsBatch, StatsRow},
        store::{
            Store,
            redis::{RedisOptions, RedisStore},
        },
    };
    let redis = common::redis_server::RedisServer::start();
    let store = RedisStore::connect(&RedisOptions {
        url: redis.url(),
        key_prefix: KEY_PREFIX.to_owned(),
        timeout: Duration::from_secs(30),
        pool_size: 1,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    })
    .await
    .expect("RedisStore connects");
    let before: i64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("used_memory");
    // Monday 2026-11-30, hour by hour; retention the shipped one.
    let day = SUNDAY_LAST_SECOND + 1;
    for hour in 0..24 {
        let start = day + hour * 3600;
        let mut rows: Vec<StatsRow> = (0..1000)
            .map(|c| StatsRow {
                hour: start,
                character_id: format!("character-{c}"),
                kinds: ["text", "audio", "image"]
                    .iter()
                    .map(|kind| KindCount {
                        kind: (*kind).to_owned(),
                        messages: 10,
                        denials: 1,
                    })
                    .collect(),
                users: Vec::new(),
            })
            .collect();
        for user in 0..10_000 {
            rows[user % 1000].users.push(format!("user-{user}"));
        }
        let batch = StatsBatch {
            now: start + 3599,
            retention: Retention::default(),
            rows,
        };
        store.flush_stats(&batch).await.expect("a flush");
    }
    let script = "local total = 0 local keys = redis.call('KEYS', ARGV[1]) \
                  for _, key in ipairs(keys) do \
                  total = total + redis.call('MEMORY', 'USAGE', key, 'SAMPLES', 0) end \
                  return {#keys, total}";
    let summed = redis.cli(&["EVAL", script, "0", &format!("{KEY_PREFIX}{{st:*")]);
    let after: i64 = redis
        .cli(&["INFO", "memory"])
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("used_memory");
    println!(
        "statistics keys, MEMORY USAGE bytes: {summed:?}; used_memory grew by {} bytes",
        after - before
    );
}

/// SIGTERM writes what the last interval recorded: with a flush every hour,
/// only the flush at shutdown can put the message in Redis.
#[tokio::test]
async fn sigterm_flushes_once_more() {
    let redis = common::redis_server::RedisServer::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("tollgate.toml");
    let toml = TOML.replace("flush = \"100ms\"", "flush = \"1h\"");
    std::fs::write(&config, toml).expect("write the config");
    let port = common::redis_server::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut tollgate = common::binary::Tollgate::spawn_command({
        let mut command = common::binary::Tollgate::command();
        command.args([
            "serve",
            "--config",
            &config.to_string_lossy(),
            "--listen",
            &listen,
            "--store",
            &redis.url(),
        ]);
        command
    });
    let start = Instant::now();
    let mut quota = loop {
        let connected = Channel::from_shared(format!("http://{listen}"))
            .expect("a loopback URL is valid")
            .connect()
            .await;
        if let Ok(channel) = connected {
            break tollgate::proto::usage_quota_client::UsageQuotaClient::new(channel);
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tollgate did not listen: {}",
            tollgate.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    quota
        .increment_usage(IncrementUsageRequest {
            user_id: "u1".to_owned(),
            character_id: "luna".to_owned(),
            kind: "text".to_owned(),
            amount: 2,
            ..IncrementUsageRequest::default()
        })
        .await
        .expect("IncrementUsage answers");
    tollgate.signal("-TERM");
    assert!(
        tollgate.wait(Duration::from_secs(10)),
        "tollgate stops on SIGTERM"
    );
    let keys = redis.cli(&["KEYS", "tollgate:{st:h:*}:n"]);
    assert!(
        !keys.is_empty(),
        "no statistics in Redis: {}",
        tollgate.output()
    );
    // The global hour bucket and luna's.
    assert_eq!(keys.lines().count(), 2, "{keys}");
    for key in keys.lines() {
        assert_eq!(redis.cli(&["HGET", key, "m:text"]), "2", "{key}");
    }
}
