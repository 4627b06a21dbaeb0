//! Differential tests: random sequences of requests go to tollgate on the
//! memory store, tollgate on a real redis-server and a plain model of what
//! the contract says, and every answer must agree at every step.
//!
//! The windows, blocks and quota periods are an hour or a day, so time does
//! not matter within one sequence: the model is a counter per (rule,
//! subject) and per (conversation, kind). Both tollgates are served on
//! loopback sockets and called through real tonic clients. Each sequence
//! uses subjects and users of its own, so sequences never share counters.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::collections::HashMap;

use common::{
    property::live_runner,
    server::{Backend, StoreKind, TestServer},
};
use proptest::{prelude::*, test_runner::TestCaseError};
use tollgate::proto::{CheckLimitRequest, IncrementUsageRequest, SettleLimitRequest};

const POLICY: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[rules.api]
window = "1h"
limit = { free = 5, premium = 12 }

[rules.tokens]
window = "1h"
limit = 1000

[rules.auth]
window = "1h"
limit = 3
block_for = "1h"

[quotas]
period = "24h"

[quotas.kinds]
text = { free = 4, premium = "unlimited" }
image = { free = 2, premium = 3 }
"#;

/// The rules of [`POLICY`]: name, limit for (free, premium), lock-out.
const RULES: [(&str, [u64; 2], bool); 3] = [
    ("api", [5, 12], false),
    ("tokens", [1000, 1000], false),
    ("auth", [3, 3], true),
];

/// The kinds of [`POLICY`]: name, quota for (free, premium; None: unlimited).
const KINDS: [(&str, [Option<u64>; 2]); 2] =
    [("text", [Some(4), None]), ("image", [Some(2), Some(3)])];

const TIERS: [&str; 3] = ["", "free", "premium"];

/// One CheckLimit of a generated sequence.
#[derive(Debug, Clone)]
struct Check {
    rule: usize,
    subject: usize,
    tier: usize,
    /// A fraction of twice the limit, so costs run from 1 to 2 x limit.
    cost_share: f64,
    dry_run: bool,
}

/// One IncrementUsage of a generated sequence.
#[derive(Debug, Clone)]
struct Increment {
    user: usize,
    character: usize,
    kind: usize,
    tier: usize,
    amount: u32,
}

fn checks() -> impl Strategy<Value = Vec<Check>> {
    let check = (
        0..RULES.len(),
        0..3usize,
        0..TIERS.len(),
        0.0..1.0f64,
        prop::bool::weighted(0.15),
    )
        .prop_map(|(rule, subject, tier, cost_share, dry_run)| Check {
            rule,
            subject,
            tier,
            cost_share,
            dry_run,
        });
    prop::collection::vec(check, 1..40)
}

fn increments() -> impl Strategy<Value = Vec<Increment>> {
    let increment = (
        0..2usize,
        0..2usize,
        0..KINDS.len(),
        0..TIERS.len(),
        1..4u32,
    )
        .prop_map(|(user, character, kind, tier, amount)| Increment {
            user,
            character,
            kind,
            tier,
            amount,
        });
    prop::collection::vec(increment, 1..40)
}

/// The tier index into the policy's limits: "" is the default, free.
fn tier_slot(tier: usize) -> usize {
    usize::from(TIERS[tier] == "premium")
}

/// The contract's sliding log when nothing leaves the window.
#[derive(Default)]
struct LimitModel {
    counted: HashMap<(usize, usize), u64>,
    blocked: HashMap<(usize, usize), bool>,
}

impl LimitModel {
    /// (allowed, remaining, blocked) for `check` costing `cost`.
    fn decide(&mut self, check: &Check, cost: u64) -> (bool, u64, bool) {
        let (_, limits, locks_out) = RULES[check.rule];
        let limit = limits[tier_slot(check.tier)];
        let key = (check.rule, check.subject);
        if self.blocked.get(&key).copied().unwrap_or(false) {
            return (false, 0, true);
        }
        let counted = self.counted.entry(key).or_default();
        if *counted + cost <= limit {
            if !check.dry_run {
                *counted += cost;
            }
            return (
                true,
                limit - (*counted + if check.dry_run { cost } else { 0 }),
                false,
            );
        }
        let remaining = limit.saturating_sub(*counted);
        if locks_out && !check.dry_run {
            self.blocked.insert(key, true);
            return (false, remaining, true);
        }
        (false, remaining, false)
    }
}

/// The contract's quotas when no period ends.
#[derive(Default)]
struct UsageModel {
    used: HashMap<(usize, usize, usize), u64>,
}

impl UsageModel {
    /// (allowed, used after) for `increment`.
    fn decide(&mut self, increment: &Increment) -> (bool, u64) {
        let quota = KINDS[increment.kind].1[tier_slot(increment.tier)];
        let used = self
            .used
            .entry((increment.user, increment.character, increment.kind))
            .or_default();
        let amount = u64::from(increment.amount);
        if quota.is_some_and(|quota| *used + amount > quota) {
            return (false, *used);
        }
        *used += amount;
        (true, *used)
    }
}

/// Both tollgates, and a number that makes each sequence's ids its own.
struct Fixture {
    servers: [(StoreKind, TestServer); 2],
    _backends: [Backend; 2],
    sequence: std::cell::Cell<u64>,
}

impl Fixture {
    async fn start() -> Self {
        let memory = Backend::new(StoreKind::Memory);
        let redis = Backend::new(StoreKind::Redis);
        let servers = [
            (StoreKind::Memory, memory.serve_toml(POLICY).await),
            (StoreKind::Redis, redis.serve_toml(POLICY).await),
        ];
        Self {
            servers,
            _backends: [memory, redis],
            sequence: std::cell::Cell::new(0),
        }
    }

    fn next_sequence(&self) -> u64 {
        let n = self.sequence.get() + 1;
        self.sequence.set(n);
        n
    }

    async fn run_checks(&self, checks: &[Check]) -> Result<(), TestCaseError> {
        let sequence = self.next_sequence();
        let mut model = LimitModel::default();
        for (step, check) in checks.iter().enumerate() {
            let (rule, limits, _) = RULES[check.rule];
            let limit = limits[tier_slot(check.tier)];
            // 1 ..= 2 x limit.
            let cost = 1 + (check.cost_share * (2 * limit) as f64) as u64;
            let cost = cost.min(2 * limit);
            let (allowed, remaining, blocked) = model.decide(check, cost);
            for (kind, server) in &self.servers {
                let request = CheckLimitRequest {
                    rule: rule.to_owned(),
                    subject: format!("s{sequence}-{}", check.subject),
                    tier: TIERS[check.tier].to_owned(),
                    cost: u32::try_from(cost).expect("small costs"),
                    dry_run: check.dry_run,
                    ..CheckLimitRequest::default()
                };
                let got = server
                    .check(request)
                    .await
                    .map_err(|status| TestCaseError::fail(format!("{kind:?}: {status}")))?;
                prop_assert_eq!(
                    (
                        got.allowed,
                        got.remaining,
                        got.blocked,
                        got.degraded,
                        got.limit
                    ),
                    (allowed, remaining, blocked, false, limit),
                    "step {} on {:?}: {:?} costing {}",
                    step,
                    kind,
                    check,
                    cost
                );
                // A denial that can fit later says when; one that never
                // fits (cost above the limit) says when the window empties.
                prop_assert_eq!(
                    got.retry_after
                        .is_some_and(|d| d.seconds > 0 || d.nanos > 0),
                    !allowed && (blocked || model_has_hits(&model, check)),
                    "step {} on {:?}: retry_after {:?}",
                    step,
                    kind,
                    got.retry_after
                );
            }
        }
        Ok(())
    }

    async fn run_increments(&self, increments: &[Increment]) -> Result<(), TestCaseError> {
        let sequence = self.next_sequence();
        let mut model = UsageModel::default();
        for (step, increment) in increments.iter().enumerate() {
            let (allowed, used) = model.decide(increment);
            let (kind_name, quotas) = KINDS[increment.kind];
            let quota = quotas[tier_slot(increment.tier)];
            for (kind, server) in &self.servers {
                let request = IncrementUsageRequest {
                    user_id: format!("u{sequence}-{}", increment.user),
                    character_id: format!("c{}", increment.character),
                    kind: kind_name.to_owned(),
                    tier: TIERS[increment.tier].to_owned(),
                    amount: increment.amount,
                    ..IncrementUsageRequest::default()
                };
                let got = server
                    .increment(request)
                    .await
                    .map_err(|status| TestCaseError::fail(format!("{kind:?}: {status}")))?;
                prop_assert_eq!(
                    (
                        got.allowed,
                        got.used,
                        got.unlimited,
                        got.limit,
                        got.remaining,
                        got.degraded
                    ),
                    (
                        allowed,
                        used,
                        quota.is_none(),
                        quota.unwrap_or(0),
                        quota.map_or(0, |quota| quota.saturating_sub(used)),
                        false
                    ),
                    "step {} on {:?}: {:?}",
                    step,
                    kind,
                    increment
                );
            }
        }
        Ok(())
    }
}

/// Whether the model's log for `check`'s key holds any hit (a denial then
/// has a time to wait for).
fn model_has_hits(model: &LimitModel, check: &Check) -> bool {
    model
        .counted
        .get(&(check.rule, check.subject))
        .is_some_and(|&counted| counted > 0)
}

#[test]
fn limits_agree_with_the_model_on_both_stores() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let fixture = runtime.block_on(Fixture::start());
    let result = live_runner(96).run(&checks(), |checks| {
        runtime.block_on(fixture.run_checks(&checks))
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

#[test]
fn quotas_agree_with_the_model_on_both_stores() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let fixture = runtime.block_on(Fixture::start());
    let result = live_runner(64).run(&increments(), |increments| {
        runtime.block_on(fixture.run_increments(&increments))
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}

// ---- Request ids and settles ---------------------------------------------------

/// One step of a pay-after-use sequence: a CheckLimit, with a request id
/// from a small set (so that retries happen) or none, or a SettleLimit.
#[derive(Debug, Clone)]
enum PayStep {
    Check {
        check: Check,
        id: Option<usize>,
    },
    Settle {
        rule: usize,
        subject: usize,
        id: usize,
        actual: u32,
    },
}

fn pay_steps() -> impl Strategy<Value = Vec<PayStep>> {
    let check = (
        0..RULES.len(),
        0..2usize,
        0..TIERS.len(),
        0.0..0.6f64,
        prop::bool::weighted(0.1),
        prop::option::weighted(0.7, 0..6usize),
    )
        .prop_map(
            |(rule, subject, tier, cost_share, dry_run, id)| PayStep::Check {
                check: Check {
                    rule,
                    subject,
                    tier,
                    cost_share,
                    dry_run,
                },
                id,
            },
        );
    let settle = (0..RULES.len(), 0..2usize, 0..6usize, 0..1200u32).prop_map(
        |(rule, subject, id, actual)| PayStep::Settle {
            rule,
            subject,
            id,
            actual,
        },
    );
    prop::collection::vec(prop_oneof![3 => check, 2 => settle], 1..50)
}

/// A remembered request id in the model.
#[derive(Debug, Clone, Copy)]
struct Remembered {
    /// (allowed, remaining, blocked) as first answered.
    first: (bool, u64, bool),
    limit: u64,
    /// What the call counts now; meaningful only when allowed.
    counts: u64,
}

/// The contract with request ids and settles, when nothing leaves the
/// window (every settle is within the rewrite bound: sequences are short).
#[derive(Default)]
struct PayModel {
    limits: LimitModel,
    /// Calls counted per key, settled to 0 or not: a denial has a time to
    /// wait for while there is one.
    entries: HashMap<(usize, usize), u64>,
    remembered: HashMap<(usize, usize, usize), Remembered>,
}

impl Fixture {
    async fn run_pay_steps(&self, steps: &[PayStep]) -> Result<(), TestCaseError> {
        let sequence = self.next_sequence();
        let mut model = PayModel::default();
        for (step, pay) in steps.iter().enumerate() {
            match pay {
                PayStep::Check { check, id } => {
                    let (rule, limits, _) = RULES[check.rule];
                    let limit = limits[tier_slot(check.tier)];
                    let cost = (1 + (check.cost_share * (2 * limit) as f64) as u64).min(2 * limit);
                    let key = (check.rule, check.subject);
                    let recorded = id.filter(|_| !check.dry_run);
                    let (expected, replayed) = match recorded
                        .and_then(|id| model.remembered.get(&(check.rule, check.subject, id)))
                    {
                        Some(remembered) => (remembered.first, true),
                        None => {
                            let answer = model.limits.decide(check, cost);
                            if answer.0 && !check.dry_run {
                                *model.entries.entry(key).or_default() += 1;
                            }
                            if let Some(id) = recorded {
                                model.remembered.insert(
                                    (check.rule, check.subject, id),
                                    Remembered {
                                        first: answer,
                                        limit,
                                        counts: cost,
                                    },
                                );
                            }
                            (answer, false)
                        }
                    };
                    let has_entries = model.entries.get(&key).is_some_and(|&n| n > 0);
                    for (kind, server) in &self.servers {
                        let request = CheckLimitRequest {
                            rule: rule.to_owned(),
                            subject: format!("p{sequence}-{}", check.subject),
                            tier: TIERS[check.tier].to_owned(),
                            cost: u32::try_from(cost).expect("small costs"),
                            dry_run: check.dry_run,
                            request_id: id.map(|id| format!("id-{id}")).unwrap_or_default(),
                        };
                        let got = server
                            .check(request)
                            .await
                            .map_err(|status| TestCaseError::fail(format!("{kind:?}: {status}")))?;
                        prop_assert_eq!(
                            (
                                got.allowed,
                                got.remaining,
                                got.blocked,
                                got.replayed,
                                got.degraded
                            ),
                            (expected.0, expected.1, expected.2, replayed, false),
                            "step {} on {:?}: {:?}",
                            step,
                            kind,
                            pay
                        );
                        if !replayed {
                            prop_assert_eq!(
                                got.retry_after
                                    .is_some_and(|d| d.seconds > 0 || d.nanos > 0),
                                !expected.0 && (expected.2 || has_entries),
                                "step {} on {:?}: retry_after {:?}",
                                step,
                                kind,
                                got.retry_after
                            );
                        }
                    }
                }
                PayStep::Settle {
                    rule,
                    subject,
                    id,
                    actual,
                } => {
                    let expected = match model.remembered.get_mut(&(*rule, *subject, *id)) {
                        Some(remembered) if remembered.first.0 => {
                            let counted =
                                model.limits.counted.entry((*rule, *subject)).or_default();
                            *counted = *counted - remembered.counts + u64::from(*actual);
                            remembered.counts = u64::from(*actual);
                            (true, remembered.limit.saturating_sub(*counted))
                        }
                        _ => (false, 0),
                    };
                    for (kind, server) in &self.servers {
                        let request = SettleLimitRequest {
                            rule: RULES[*rule].0.to_owned(),
                            subject: format!("p{sequence}-{subject}"),
                            request_id: format!("id-{id}"),
                            actual_cost: *actual,
                        };
                        let got = server
                            .rate
                            .clone()
                            .settle_limit(request)
                            .await
                            .map_err(|status| TestCaseError::fail(format!("{kind:?}: {status}")))?
                            .into_inner();
                        prop_assert_eq!(
                            (got.found, got.remaining),
                            expected,
                            "step {} on {:?}: {:?}",
                            step,
                            kind,
                            pay
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[test]
fn request_ids_and_settles_agree_with_the_model_on_both_stores() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let fixture = runtime.block_on(Fixture::start());
    let result = live_runner(64).run(&pay_steps(), |steps| {
        runtime.block_on(fixture.run_pay_steps(&steps))
    });
    if let Err(err) = result {
        panic!("{err}");
    }
}
