//! The in-process hot paths of a decision, without gRPC or a network:
//! `cargo bench --bench hot_paths`.
//!
//! - `limiter/check_limit`: the limiter end to end on the memory store:
//!   request validation, rule and tier lookup, the store's decision;
//! - `keys/*`: building the Redis keys of one decision;
//! - `memory_store/*`: the memory store's decision alone, per algorithm;
//! - `deny_cache/*`: a denied subject answered by the deny cache, and the
//!   cost the cache adds to an allowed one.
//!
//! The memory store's futures never wait, so each iteration is driven by a
//! current-thread runtime's `block_on`, whose own cost `runtime/block_on`
//! shows. Under `cargo bench` tokio has its `test-util` feature (from the
//! dev-dependencies), which makes `tokio::time::Instant::now` (the deny
//! cache's clock) dearer than in the release binary.

// criterion_main! defines an undocumented `main`.
#![allow(missing_docs)]

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate::{
    config,
    keys::KeyBuilder,
    limiter::{CheckRequest, Limiter},
    rules::Algorithm,
    store::{LimitCheck, Store, deny_cache::DenyCache, memory::MemoryStore},
};

/// Rules with room, so that every iteration is allowed and counted. The
/// window is short so that each subject's sliding log holds a steady few
/// dozen hits however long criterion runs.
const POLICY: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[rules.api]
window = "100ms"
limit = { free = 1000000000, premium = 2000000000 }

[quotas]
period = "24h"

[quotas.kinds]
text = 30
"#;

/// Distinct subjects cycled through, as a server sees many callers.
const SUBJECTS: usize = 10_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds")
}

fn subjects() -> Vec<String> {
    (0..SUBJECTS).map(|i| format!("user-{i}")).collect()
}

fn check<'a>(subject: &'a str, algorithm: Algorithm) -> LimitCheck<'a> {
    LimitCheck {
        rule: "api",
        subject,
        algorithm,
        limit: 1_000_000_000,
        window: Duration::from_millis(100),
        block_for: None,
        cost: 1,
        dry_run: false,
    }
}

fn block_on(c: &mut Criterion) {
    let rt = runtime();
    c.bench_function("runtime/block_on", |b| {
        b.iter(|| black_box(rt.block_on(std::future::ready(black_box(1)))))
    });
}

fn limiter(c: &mut Criterion) {
    let rt = runtime();
    let policy = config::load_str(POLICY, "bench")
        .expect("the bench policy is valid")
        .policy;
    let limiter = Limiter::new(MemoryStore::new(), Arc::new(policy));
    let subjects = subjects();
    let mut i = 0;
    c.bench_function("limiter/check_limit", |b| {
        b.iter(|| {
            i = (i + 1) % SUBJECTS;
            let request = CheckRequest {
                rule: "api",
                subject: &subjects[i],
                tier: "premium",
                cost: 1,
                dry_run: false,
                request_id: "",
            };
            black_box(rt.block_on(limiter.check_limit(black_box(request))))
        })
    });
}

fn keys(c: &mut Criterion) {
    let keys = KeyBuilder::new("aim:");
    c.bench_function("keys/limit", |b| {
        b.iter(|| {
            black_box(keys.limit(
                black_box("api"),
                Algorithm::SlidingLog,
                black_box("user-12345"),
            ))
        })
    });
    c.bench_function("keys/limit_encoded_subject", |b| {
        b.iter(|| {
            black_box(keys.limit(
                black_box("api"),
                Algorithm::SlidingLog,
                black_box("10.0.0.1:443/{tenant}"),
            ))
        })
    });
    c.bench_function("keys/usage_conversation", |b| {
        b.iter(|| {
            black_box(
                keys.usage(black_box("user-12345"))
                    .conversation(black_box("luna")),
            )
        })
    });
}

fn memory_store(c: &mut Criterion) {
    let rt = runtime();
    let subjects = subjects();
    for (name, algorithm) in [
        ("memory_store/sliding_log", Algorithm::SlidingLog),
        ("memory_store/sliding_counter", Algorithm::SlidingCounter),
    ] {
        let store = MemoryStore::new();
        let mut i = 0;
        c.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % SUBJECTS;
                black_box(rt.block_on(store.check_limit(&check(&subjects[i], algorithm))))
            })
        });
    }
}

fn deny_cache(c: &mut Criterion) {
    let rt = runtime();
    // One subject far over a limit of 1: every call after the first is
    // answered by the cache.
    let cache = DenyCache::new(MemoryStore::new());
    let over = LimitCheck {
        limit: 1,
        ..check("abuser", Algorithm::SlidingLog)
    };
    for _ in 0..2 {
        let _ = rt.block_on(cache.check_limit(&over));
    }
    c.bench_function("deny_cache/denied_from_cache", |b| {
        b.iter(|| black_box(rt.block_on(cache.check_limit(black_box(&over)))))
    });
    // Allowed subjects pass through to the store: the cache's lookup cost.
    let subjects = subjects();
    let mut i = 0;
    c.bench_function("deny_cache/allowed_through_cache", |b| {
        b.iter(|| {
            i = (i + 1) % SUBJECTS;
            let allowed = check(&subjects[i], Algorithm::SlidingLog);
            black_box(rt.block_on(cache.check_limit(&allowed)))
        })
    });
}

criterion_group!(hot_paths, block_on, limiter, keys, memory_store, deny_cache);
criterion_main!(hot_paths);
