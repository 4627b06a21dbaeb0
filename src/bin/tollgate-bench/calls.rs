//! One [`Caller`] per RPC: it builds a request for a subject, sends it and
//! says whether the server allowed it, and whether without its store.
//!
//! Adding a call means one `impl Caller` here and one match arm in
//! `main::run`.

use std::{
    future::Future,
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::envoy::{
    extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
    service::ratelimit::v3::{
        RateLimitRequest, rate_limit_response::Code,
        rate_limit_service_client::RateLimitServiceClient,
    },
};
use tollgate::proto::{
    CheckLimitRequest, CheckLimitsRequest, IncrementUsageRequest, SettleLimitRequest,
    rate_limiter_client::RateLimiterClient, usage_quota_client::UsageQuotaClient,
};
use tonic::{Status, transport::Channel};

use crate::cli::Plan;

/// The server's answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Answer {
    /// The request may go ahead.
    pub(crate) allowed: bool,
    /// The server answered without its store, by its failure policy (the
    /// response's `degraded`); always false for ShouldRateLimit, whose
    /// response has no such field.
    pub(crate) degraded: bool,
}

/// Sends one kind of request. A worker owns one clone and sends one request
/// at a time through it; clones share the connection they were built on.
pub(crate) trait Caller: Clone + Send + 'static {
    /// A caller that sends over `channel`, with the plan's fixed fields.
    fn new(channel: Channel, plan: &Plan) -> Self;

    /// Sends one request for `subject` and returns the server's answer.
    fn send(&mut self, subject: &str) -> impl Future<Output = Result<Answer, Status>> + Send;
}

/// Request ids unique to this process and run: a prefix from the process id
/// and the start time, so that a later run on the same Redis (RUNS > 1, or a
/// warm-up before the measured phase, which shares the counter) is never
/// taken for a retry, then a counter.
#[derive(Debug, Clone)]
struct RequestIds {
    prefix: String,
}

/// Ids handed out so far, by every caller of the process.
static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(0);

impl RequestIds {
    fn new() -> Self {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        Self {
            prefix: format!("bench-{:x}-{started:x}-", std::process::id()),
        }
    }

    /// The next id: the one string formatted per request.
    fn next(&self) -> String {
        let n = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:x}", self.prefix)
    }
}

/// tollgate.v1.RateLimiter/CheckLimit.
#[derive(Debug, Clone)]
pub(crate) struct CheckLimit {
    client: RateLimiterClient<Channel>,
    rule: String,
    tier: String,
    cost: u32,
    /// Costs are drawn from `cost..=cost_max`.
    cost_max: u32,
    /// xorshift64 state for the drawn costs: deterministic and cheap.
    draw: u64,
    /// Present with --request-ids.
    request_ids: Option<RequestIds>,
}

impl CheckLimit {
    /// This request's cost: fixed, or drawn uniformly from the range.
    fn next_cost(&mut self) -> u32 {
        if self.cost_max <= self.cost {
            return self.cost;
        }
        self.draw ^= self.draw << 13;
        self.draw ^= self.draw >> 7;
        self.draw ^= self.draw << 17;
        let span = u64::from(self.cost_max - self.cost) + 1;
        // The remainder is below span, which fits in u32 with the offset.
        self.cost + u32::try_from(self.draw % span).unwrap_or(0)
    }
}

impl Caller for CheckLimit {
    fn new(channel: Channel, plan: &Plan) -> Self {
        Self {
            client: RateLimiterClient::new(channel),
            rule: plan.rule.clone(),
            tier: plan.tier.clone(),
            cost: plan.cost,
            cost_max: plan.cost_max,
            draw: 0x2545_f491_4f6c_dd1d,
            request_ids: plan.request_ids.then(RequestIds::new),
        }
    }

    async fn send(&mut self, subject: &str) -> Result<Answer, Status> {
        // prost messages own their strings, so each request copies the
        // pre-built ones; nothing is formatted per request but a request id.
        let cost = self.next_cost();
        let request = CheckLimitRequest {
            rule: self.rule.clone(),
            subject: subject.to_owned(),
            tier: self.tier.clone(),
            cost,
            dry_run: false,
            request_id: self
                .request_ids
                .as_ref()
                .map(RequestIds::next)
                .unwrap_or_default(),
        };
        let response = self.client.check_limit(request).await?.into_inner();
        Ok(Answer {
            allowed: response.allowed,
            degraded: response.degraded,
        })
    }
}

/// tollgate.v1.RateLimiter/CheckLimits: one check per rule of the plan's
/// comma-separated `rule`, all for the request's subject, at the plan's
/// cost; allowed when the whole group is.
#[derive(Debug, Clone)]
pub(crate) struct CheckLimits {
    client: RateLimiterClient<Channel>,
    rules: Vec<String>,
    tier: String,
    cost: u32,
}

impl Caller for CheckLimits {
    fn new(channel: Channel, plan: &Plan) -> Self {
        Self {
            client: RateLimiterClient::new(channel),
            rules: plan.rule.split(',').map(str::to_owned).collect(),
            tier: plan.tier.clone(),
            cost: plan.cost,
        }
    }

    async fn send(&mut self, subject: &str) -> Result<Answer, Status> {
        let checks = self
            .rules
            .iter()
            .map(|rule| CheckLimitRequest {
                rule: rule.clone(),
                subject: subject.to_owned(),
                tier: self.tier.clone(),
                cost: self.cost,
                dry_run: false,
                request_id: String::new(),
            })
            .collect();
        let response = self
            .client
            .check_limits(CheckLimitsRequest {
                checks,
                request_id: String::new(),
            })
            .await?
            .into_inner();
        Ok(Answer {
            allowed: response.allowed,
            degraded: response.results.iter().any(|r| r.degraded),
        })
    }
}

/// Pay after use: a CheckLimit reserving `cost` under a fresh request id,
/// then a SettleLimit of half of it (at least 1 less, so the settle is a
/// refund that writes).
#[derive(Debug, Clone)]
pub(crate) struct SettleLimit {
    client: RateLimiterClient<Channel>,
    rule: String,
    tier: String,
    cost: u32,
    request_ids: RequestIds,
}

impl Caller for SettleLimit {
    fn new(channel: Channel, plan: &Plan) -> Self {
        Self {
            client: RateLimiterClient::new(channel),
            rule: plan.rule.clone(),
            tier: plan.tier.clone(),
            cost: plan.cost.max(2),
            request_ids: RequestIds::new(),
        }
    }

    async fn send(&mut self, subject: &str) -> Result<Answer, Status> {
        let request_id = self.request_ids.next();
        let reserve = CheckLimitRequest {
            rule: self.rule.clone(),
            subject: subject.to_owned(),
            tier: self.tier.clone(),
            cost: self.cost,
            dry_run: false,
            request_id: request_id.clone(),
        };
        let reserved = self.client.check_limit(reserve).await?.into_inner();
        if !reserved.allowed {
            return Ok(Answer {
                allowed: false,
                degraded: reserved.degraded,
            });
        }
        let settle = SettleLimitRequest {
            rule: self.rule.clone(),
            subject: subject.to_owned(),
            request_id,
            actual_cost: self.cost / 2,
        };
        let settled = self.client.settle_limit(settle).await?.into_inner();
        Ok(Answer {
            allowed: settled.found,
            degraded: reserved.degraded,
        })
    }
}

/// tollgate.v1.UsageQuota/IncrementUsage, one conversation per subject (the
/// subject is the user, the character is fixed).
#[derive(Debug, Clone)]
pub(crate) struct IncrementUsage {
    client: UsageQuotaClient<Channel>,
    character: String,
    kind: String,
    tier: String,
    amount: u32,
}

impl Caller for IncrementUsage {
    fn new(channel: Channel, plan: &Plan) -> Self {
        Self {
            client: UsageQuotaClient::new(channel),
            character: plan.character.clone(),
            kind: plan.kind.clone(),
            tier: plan.tier.clone(),
            amount: plan.cost,
        }
    }

    async fn send(&mut self, subject: &str) -> Result<Answer, Status> {
        let request = IncrementUsageRequest {
            user_id: subject.to_owned(),
            character_id: self.character.clone(),
            kind: self.kind.clone(),
            tier: self.tier.clone(),
            amount: self.amount,
            request_id: String::new(),
        };
        let response = self.client.increment_usage(request).await?.into_inner();
        Ok(Answer {
            allowed: response.allowed,
            degraded: response.degraded,
        })
    }
}

/// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit with one
/// descriptor, `generic_key = <rule>, user_id = <subject>` (plus
/// `tier = <tier>` when one is given), in the shipped config's domain: the
/// shape the shipped `[rules.<name>.envoy]` mappings match.
#[derive(Debug, Clone)]
pub(crate) struct ShouldRateLimit {
    client: RateLimitServiceClient<Channel>,
    rule: String,
    tier: String,
    hits: u32,
}

/// The shipped config's `[envoy] domain`.
const ENVOY_DOMAIN: &str = "tollgate";

impl Caller for ShouldRateLimit {
    fn new(channel: Channel, plan: &Plan) -> Self {
        Self {
            client: RateLimitServiceClient::new(channel),
            rule: plan.rule.clone(),
            tier: plan.tier.clone(),
            hits: plan.cost,
        }
    }

    async fn send(&mut self, subject: &str) -> Result<Answer, Status> {
        let entry = |key: &str, value: &str| Entry {
            key: key.to_owned(),
            value: value.to_owned(),
        };
        let mut entries = vec![entry("generic_key", &self.rule), entry("user_id", subject)];
        if !self.tier.is_empty() {
            entries.push(entry("tier", &self.tier));
        }
        let request = RateLimitRequest {
            domain: ENVOY_DOMAIN.to_owned(),
            descriptors: vec![RateLimitDescriptor {
                entries,
                ..RateLimitDescriptor::default()
            }],
            hits_addend: self.hits,
        };
        let response = self.client.should_rate_limit(request).await?;
        Ok(Answer {
            allowed: response.get_ref().overall_code == Code::Ok as i32,
            degraded: false,
        })
    }
}
