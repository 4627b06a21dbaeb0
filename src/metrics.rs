//! Prometheus metrics, served over HTTP at `/metrics` when
//! `server.metrics_listen` is set.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `tollgate_decisions_total` | counter | `rule`, `tier`, `outcome` = allowed, denied, blocked, degraded, shadow_denied |
//! | `tollgate_quota_increments_total` | counter | `kind`, `outcome` = allowed, denied, degraded |
//! | `tollgate_store_call_duration_seconds` | histogram | `operation` |
//! | `tollgate_store_errors_total` | counter | `operation`, `error` = timeout, unavailable, protocol, circuit_open |
//! | `tollgate_circuit_breaker_open` | gauge | (1 while the breaker is open) |
//! | `tollgate_requests_in_flight` | gauge | |
//! | `tollgate_store_evictions_total` | counter | (entries the memory store evicted at `store.max_entries`) |
//! | `tollgate_envoy_untrusted_values_total` | counter | `reason` = subject_too_long, subject_empty, tier_unknown |
//! | `tollgate_stats_dropped_total` | counter | (statistics entries dropped unflushed: too many waiting for the store) |
//!
//! Subjects, user ids and store URLs never become labels: they are unbounded
//! or secret.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, OnceLock, atomic::AtomicI64},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    rules::{Policy, Tier},
    store::StoreError,
};

/// The outcome label of a decision.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// Allowed by the store.
    allowed,
    /// Denied by the store.
    denied,
    /// Denied because the subject is locked out.
    blocked,
    /// Answered without the store.
    degraded,
    /// Denied or blocked by the store under a shadow rule, and answered
    /// allowed (see [`crate::rules::Rule::shadow`]).
    shadow_denied,
    // A new outcome needs OUTCOMES raised: `Slots` indexes by `as usize`.
}

/// The store operation a latency or error belongs to.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Operation {
    /// A rate-limit decision.
    check_limit,
    /// Several rate-limit decisions together (CheckLimits).
    check_limits,
    /// A quota check-and-count.
    increment_usage,
    /// Reading one conversation.
    get_usage,
    /// Listing a user's conversations.
    list_usage,
    /// Pay after use on a rate limit.
    settle_limit,
    /// Pay after use on a usage quota.
    settle_usage,
    /// Writing a flush of usage statistics.
    flush_stats,
    /// Reading usage statistics (GetStats).
    read_stats,
}

/// Why the Envoy door counted a descriptor value other than as sent,
/// where CheckLimit would refuse it (see [`crate::service::envoy`]).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum UntrustedValue {
    /// A subject over [`crate::limiter::MAX_ID_BYTES`], counted under its
    /// digest.
    subject_too_long,
    /// An empty subject, counted as one subject like any other.
    subject_empty,
    /// A tier no one configured: the default tier applies.
    tier_unknown,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UntrustedLabels {
    reason: UntrustedValue,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    rule: String,
    tier: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IncrementLabels {
    kind: String,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: Operation,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    operation: Operation,
    error: &'static str,
}

type HistogramFamily = Family<OperationLabels, Histogram, fn() -> Histogram>;

/// Every metric tollgate exports, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    increments: Family<IncrementLabels, Counter>,
    store_latency: HistogramFamily,
    store_errors: Family<ErrorLabels, Counter>,
    breaker_open: Gauge<i64, AtomicI64>,
    in_flight: Gauge<i64, AtomicI64>,
    store_evictions: Counter,
    untrusted: Family<UntrustedLabels, Counter>,
    stats_dropped: Counter,
    store_batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::default();
        registry.register(
            "decisions",
            "Rate-limit decisions by rule, tier and outcome",
            Family::clone(&decisions),
        );
        let increments = Family::default();
        registry.register(
            "quota_increments",
            "Quota increments by kind and outcome",
            Family::clone(&increments),
        );
        // 50 us to about 1.6 s: a Redis round trip on loopback is ~100 us,
        // the default store timeout 250 ms.
        let store_latency: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00005, 2.0, 16)));
        registry.register(
            "store_call_duration_seconds",
            "Latency of store calls",
            Family::clone(&store_latency),
        );
        let store_errors = Family::default();
        registry.register(
            "store_errors",
            "Failed store calls by operation and error",
            Family::clone(&store_errors),
        );
        let breaker_open = Gauge::default();
        registry.register(
            "circuit_breaker_open",
            "1 while the store circuit breaker is open",
            breaker_open.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "requests_in_flight",
            "Requests being decided now",
            in_flight.clone(),
        );
        let store_evictions = Counter::default();
        registry.register(
            "store_evictions",
            "Entries the memory store evicted, least recently used first, to stay within store.max_entries",
            store_evictions.clone(),
        );
        let untrusted = Family::default();
        registry.register(
            "envoy_untrusted_values",
            "Envoy descriptor values counted other than as sent, by reason",
            Family::clone(&untrusted),
        );
        let stats_dropped = Counter::default();
        registry.register(
            "stats_dropped",
            "Usage statistics entries dropped before reaching the store: too many waited for it",
            stats_dropped.clone(),
        );
        // Powers of two up to the largest batch store.max_batch allows.
        let store_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 10));
        registry.register(
            "store_batch_size",
            "Decisions per Redis script call sent while others waited for the connection (1: sent alone)",
            store_batch_size.clone(),
        );
        Self {
            registry,
            stats_dropped,
            store_batch_size,
            decisions,
            increments,
            store_latency,
            store_errors,
            breaker_open,
            in_flight,
            store_evictions,
            untrusted,
        }
    }

    /// The handle the memory store counts its evictions into
    /// (`tollgate_store_evictions_total`; Redis reports its own as
    /// `evicted_keys`).
    pub fn store_evictions(&self) -> Counter {
        self.store_evictions.clone()
    }

    /// The handle the Redis store counts its batches' sizes into
    /// (`tollgate_store_batch_size`).
    pub fn store_batch_sizes(&self) -> Histogram {
        self.store_batch_size.clone()
    }

    /// The handle statistics count what they drop into
    /// (`tollgate_stats_dropped_total`).
    pub fn stats_dropped(&self) -> Counter {
        self.stats_dropped.clone()
    }

    /// Counts one rate-limit decision. Builds the labels each time; the
    /// request path counts through [`PolicyCounters`] instead.
    pub fn decision(&self, rule: &str, tier: &str, outcome: Outcome) {
        self.decision_counter(rule, tier, outcome).inc();
    }

    /// Counts one quota increment. Builds the labels each time; the request
    /// path counts through [`PolicyCounters`] instead.
    pub fn increment(&self, kind: &str, outcome: Outcome) {
        self.increment_counter(kind, outcome).inc();
    }

    /// Counter handles for `policy`'s rules, tiers and kinds.
    pub fn counters_for(self: &Arc<Self>, policy: &Policy) -> PolicyCounters {
        let tiers = policy.tiers().names().len();
        PolicyCounters {
            metrics: Arc::clone(self),
            tiers: policy.tiers().names().to_vec(),
            decisions: policy
                .rules()
                .map(|rule| {
                    let slots = (0..tiers).map(|_| Slots::default()).collect();
                    (rule.name().to_owned(), slots)
                })
                .collect(),
            increments: policy
                .quotas()
                .kinds()
                .iter()
                .map(|kind| (kind.name().to_owned(), Slots::default()))
                .collect(),
        }
    }

    fn decision_counter(&self, rule: &str, tier: &str, outcome: Outcome) -> Counter {
        self.decisions
            .get_or_create(&DecisionLabels {
                rule: rule.to_owned(),
                tier: tier.to_owned(),
                outcome,
            })
            .clone()
    }

    fn increment_counter(&self, kind: &str, outcome: Outcome) -> Counter {
        self.increments
            .get_or_create(&IncrementLabels {
                kind: kind.to_owned(),
                outcome,
            })
            .clone()
    }

    /// Runs a store call, recording its latency and any error.
    pub async fn store_call<T>(
        &self,
        operation: Operation,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = tokio::time::Instant::now();
        let result = call.await;
        self.store_latency
            .get_or_create(&OperationLabels { operation })
            .observe(started.elapsed().as_secs_f64());
        if let Err(err) = &result {
            let error = match err {
                StoreError::Timeout(_) => "timeout",
                StoreError::Unavailable(_) => "unavailable",
                StoreError::CircuitOpen(_) => "circuit_open",
                StoreError::Protocol(_) => "protocol",
            };
            self.store_errors
                .get_or_create(&ErrorLabels { operation, error })
                .inc();
        }
        result
    }

    /// Sets the breaker gauge.
    pub fn set_breaker_open(&self, open: bool) {
        self.breaker_open.set(i64::from(open));
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn in_flight(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }

    /// Counts one Envoy descriptor value taken other than as sent.
    pub fn untrusted_value(&self, reason: UntrustedValue) {
        self.untrusted
            .get_or_create(&UntrustedLabels { reason })
            .inc();
    }

    /// Requests being decided right now.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// How many [`Outcome`]s there are: one slot each in [`Slots`].
const OUTCOMES: usize = 5;

/// One counter handle per [`Outcome`], each found on first use.
#[derive(Debug, Default)]
struct Slots([OnceLock<Counter>; OUTCOMES]);

impl Slots {
    fn inc(&self, outcome: Outcome, resolve: impl FnOnce() -> Counter) {
        self.0[outcome as usize].get_or_init(resolve).inc();
    }
}

/// Handles to the decision and increment counters of one policy, kept with
/// it: counting is then a map lookup and an atomic add, where going through
/// the metric families would build two label strings per request. A handle
/// is looked up in its family on first use, so a series appears on
/// `/metrics` only once something was counted in it, as before.
#[derive(Debug)]
pub struct PolicyCounters {
    metrics: Arc<Metrics>,
    /// Tier names by [`Tier`] index, for first uses.
    tiers: Vec<String>,
    /// By rule name, then by [`Tier`] index.
    decisions: HashMap<String, Box<[Slots]>>,
    /// By kind name.
    increments: HashMap<String, Slots>,
}

impl PolicyCounters {
    /// Counts one decision of `rule` for `tier`, both of this policy.
    pub fn decision(&self, rule: &str, tier: Tier, outcome: Outcome) {
        let tier_name = self.tiers.get(tier.0).map_or("", String::as_str);
        match self.decisions.get(rule).and_then(|tiers| tiers.get(tier.0)) {
            Some(slots) => slots.inc(outcome, || {
                self.metrics.decision_counter(rule, tier_name, outcome)
            }),
            // Not a rule of this policy: count it all the same.
            None => self.metrics.decision(rule, tier_name, outcome),
        }
    }

    /// Counts one increment of `kind`, a kind of this policy.
    pub fn increment(&self, kind: &str, outcome: Outcome) {
        match self.increments.get(kind) {
            Some(slots) => slots.inc(outcome, || self.metrics.increment_counter(kind, outcome)),
            None => self.metrics.increment(kind, outcome),
        }
    }
}

/// Marks one request in flight; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(Gauge<i64, AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::{Router, http::header, routing::get};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tiers: &str) -> Policy {
        let toml = format!(
            r#"
            [tiers]
            names = {tiers}
            default = "free"
            [rules.api]
            window = "1m"
            limit = {{ free = 1, premium = 2 }}
            [quotas]
            period = "24h"
            [quotas.kinds.text]
            free = 3
            premium = "unlimited"
            "#
        );
        crate::config::load_str(&toml, "test")
            .unwrap_or_else(|err| panic!("a valid policy: {err}"))
            .policy
    }

    fn tier(policy: &Policy, name: &str) -> Tier {
        policy
            .tiers()
            .resolve(name)
            .unwrap_or_else(|| panic!("tier {name}"))
    }

    #[test]
    fn policy_counters_count_into_the_families_and_only_what_was_counted() {
        let metrics = Arc::new(Metrics::new());
        let policy = policy(r#"["free", "premium"]"#);
        let counters = metrics.counters_for(&policy);
        counters.decision("api", tier(&policy, "premium"), Outcome::allowed);
        counters.decision("api", tier(&policy, "premium"), Outcome::allowed);
        metrics.decision("api", "premium", Outcome::allowed);
        counters.increment("text", Outcome::denied);
        let text = metrics.encode();
        for line in [
            r#"tollgate_decisions_total{rule="api",tier="premium",outcome="allowed"} 3"#,
            r#"tollgate_quota_increments_total{kind="text",outcome="denied"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(
            !text.contains(r#"tier="free""#),
            "nothing counted for free:\n{text}"
        );
        assert!(!text.contains(r#"outcome="blocked""#), "{text}");
    }

    #[test]
    fn a_reloaded_policy_with_reordered_tiers_counts_under_the_right_names() {
        let metrics = Arc::new(Metrics::new());
        let before = policy(r#"["free", "premium"]"#);
        let after = policy(r#"["premium", "free"]"#);
        let (old, new) = (metrics.counters_for(&before), metrics.counters_for(&after));
        // A request decided by the old policy finishes after the reload.
        old.decision("api", tier(&before, "free"), Outcome::denied);
        new.decision("api", tier(&after, "free"), Outcome::denied);
        new.decision("api", tier(&after, "premium"), Outcome::allowed);
        // A rule the policy does not have is still counted.
        new.decision("gone", tier(&after, "free"), Outcome::allowed);
        let text = metrics.encode();
        for line in [
            r#"tollgate_decisions_total{rule="api",tier="free",outcome="denied"} 2"#,
            r#"tollgate_decisions_total{rule="api",tier="premium",outcome="allowed"} 1"#,
            r#"tollgate_decisions_total{rule="gone",tier="free",outcome="allowed"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }
}
