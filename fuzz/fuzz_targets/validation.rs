//! Any sequence of requests through the limiter, on the memory store: each
//! gets a decision or the error its fields call for, never a panic.
//!
//! The expected error is worked out here from the rules the limiter
//! promises (ids of 1 to 256 bytes, configured rules, tiers and kinds), so
//! a validation that lets a bad value through, or refuses a good one, fails
//! the target as surely as a panic.

#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate::{
    limiter::{CheckRequest, Error, IncrementRequest, Limiter, MAX_ID_BYTES},
    rules::Policy,
    store::memory::MemoryStore,
};

const POLICY: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[rules.api]
window = "1m"
limit = { free = 3, premium = 5 }

[rules.auth]
window = "1s"
limit = 2
block_for = "5s"
algorithm = "sliding_counter"

[quotas]
period = "24h"
[quotas.kinds.text]
free = 2
premium = "unlimited"
"#;

/// One request, with fields as a client could send them.
#[derive(Debug, Arbitrary)]
enum Call {
    Check {
        rule: String,
        subject: String,
        tier: String,
        cost: u32,
        dry_run: bool,
    },
    Increment {
        user_id: String,
        character_id: String,
        kind: String,
        tier: String,
        amount: u32,
    },
    Get {
        user_id: String,
        character_id: String,
        tier: String,
    },
    List {
        user_id: String,
        tier: String,
    },
}

fn policy() -> Arc<Policy> {
    static POLICY_CELL: OnceLock<Arc<Policy>> = OnceLock::new();
    Arc::clone(
        POLICY_CELL.get_or_init(|| match tollgate::config::load_str(POLICY, "fuzz") {
            Ok(config) => Arc::new(config.policy),
            Err(err) => panic!("the fuzz policy is valid: {err}"),
        }),
    )
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(
        || match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(err) => panic!("a runtime: {err}"),
        },
    )
}

fn id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES
}

/// The field the limiter must name for these ids, checked in its order, or
/// `None` when all are valid.
fn bad_id(ids: &[(&'static str, &str)]) -> Option<&'static str> {
    ids.iter()
        .find(|(_, id)| !id_ok(id))
        .map(|&(field, _)| field)
}

/// Panics unless `result` is the error for `expected` (a field), or Ok when
/// nothing is expected.
fn expect<T: std::fmt::Debug>(
    call: &Call,
    expected: Option<&'static str>,
    result: Result<T, Error>,
) {
    match (expected, &result) {
        (None, Ok(_)) => {}
        (Some(want), Err(Error::InvalidArgument { field, .. } | Error::Unknown { field, .. }))
            if *field == want => {}
        _ => panic!("{call:?}: expected an error on {expected:?}, got {result:?}"),
    }
}

fuzz_target!(|calls: Vec<Call>| {
    let policy = policy();
    // A fresh store per input: counters of earlier inputs would make the
    // run's memory grow with every distinct subject.
    let limiter = Limiter::new(MemoryStore::new(), Arc::clone(&policy));
    let known_tier = |tier: &str| policy.tiers().resolve(tier).is_some();
    runtime().block_on(async {
        for call in calls.iter().take(16) {
            match call {
                Call::Check {
                    rule,
                    subject,
                    tier,
                    cost,
                    dry_run,
                } => {
                    let expected = bad_id(&[("subject", subject)])
                        .or_else(|| policy.rule(rule).is_none().then_some("rule"))
                        .or_else(|| (!known_tier(tier)).then_some("tier"));
                    let result = limiter
                        .check_limit(CheckRequest {
                            rule,
                            subject,
                            tier,
                            cost: *cost,
                            dry_run: *dry_run,
                        })
                        .await;
                    if let Ok(outcome) = &result {
                        assert!(outcome.decision.remaining <= outcome.limit, "{outcome:?}");
                    }
                    expect(call, expected, result);
                }
                Call::Increment {
                    user_id,
                    character_id,
                    kind,
                    tier,
                    amount,
                } => {
                    let expected = bad_id(&[("user_id", user_id), ("character_id", character_id)])
                        .or_else(|| (!known_tier(tier)).then_some("tier"))
                        .or_else(|| policy.quotas().kind(kind).is_none().then_some("kind"));
                    let result = limiter
                        .increment_usage(IncrementRequest {
                            user_id,
                            character_id,
                            kind,
                            tier,
                            amount: *amount,
                        })
                        .await;
                    expect(call, expected, result);
                }
                Call::Get {
                    user_id,
                    character_id,
                    tier,
                } => {
                    let expected = bad_id(&[("user_id", user_id), ("character_id", character_id)])
                        .or_else(|| (!known_tier(tier)).then_some("tier"));
                    let result = limiter.get_usage(user_id, character_id, tier).await;
                    expect(call, expected, result);
                }
                Call::List { user_id, tier } => {
                    let expected = bad_id(&[("user_id", user_id)])
                        .or_else(|| (!known_tier(tier)).then_some("tier"));
                    let result = limiter.list_usage(user_id, tier).await;
                    expect(call, expected, result);
                }
            }
        }
    });
});
