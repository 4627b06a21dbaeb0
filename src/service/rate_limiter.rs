//! `tollgate.v1.RateLimiter`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use super::wire_duration;
use crate::{
    headers,
    limiter::{CheckOutcome, CheckRequest, Limiter, SettleRequest},
    proto::{
        CheckLimitRequest, CheckLimitResponse, CheckLimitsRequest, CheckLimitsResponse,
        SettleLimitRequest, SettleLimitResponse, rate_limiter_server::RateLimiter,
    },
    store::Store,
};

/// Serves CheckLimit from a shared limiter.
#[derive(Debug)]
pub struct RateLimiterService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> RateLimiterService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimiter for RateLimiterService<S> {
    #[instrument(
        name = "CheckLimit",
        skip_all,
        fields(rule = %request.get_ref().rule, tier = %request.get_ref().tier, allowed, remaining)
    )]
    async fn check_limit(
        &self,
        request: Request<CheckLimitRequest>,
    ) -> Result<Response<CheckLimitResponse>, Status> {
        let request = request.get_ref();
        let outcome = self
            .limiter
            .check_limit_or_degrade(CheckRequest {
                rule: &request.rule,
                subject: &request.subject,
                tier: &request.tier,
                cost: request.cost,
                dry_run: request.dry_run,
                request_id: &request.request_id,
            })
            .await?;
        Span::current()
            .record("allowed", outcome.decision.allowed)
            .record("remaining", outcome.decision.remaining);
        Ok(Response::new(check_response(&request.rule, &outcome)))
    }

    #[instrument(
        name = "CheckLimits",
        skip_all,
        fields(checks = request.get_ref().checks.len(), allowed)
    )]
    async fn check_limits(
        &self,
        request: Request<CheckLimitsRequest>,
    ) -> Result<Response<CheckLimitsResponse>, Status> {
        let request = request.get_ref();
        // A group has one request_id: the group's. Checked before the
        // limiter's own validation, as it is a wire-level rule.
        if let Some(index) = request
            .checks
            .iter()
            .position(|check| !check.request_id.is_empty())
        {
            return Err(Status::invalid_argument(format!(
                "checks[{index}].request_id: must be empty in a group; \
                 set the group's request_id instead"
            )));
        }
        let checks: Vec<CheckRequest<'_>> = request
            .checks
            .iter()
            .map(|check| CheckRequest {
                rule: &check.rule,
                subject: &check.subject,
                tier: &check.tier,
                cost: check.cost,
                dry_run: check.dry_run,
                request_id: "",
            })
            .collect();
        let outcome = self
            .limiter
            .check_limits(&checks, &request.request_id)
            .await?;
        Span::current().record("allowed", outcome.allowed);
        Ok(Response::new(CheckLimitsResponse {
            allowed: outcome.allowed,
            results: outcome
                .checks
                .iter()
                .zip(&request.checks)
                .map(|(check, sent)| check_response(&sent.rule, check))
                .collect(),
        }))
    }

    #[instrument(
        name = "SettleLimit",
        skip_all,
        fields(rule = %request.get_ref().rule, actual_cost = request.get_ref().actual_cost, found, remaining)
    )]
    async fn settle_limit(
        &self,
        request: Request<SettleLimitRequest>,
    ) -> Result<Response<SettleLimitResponse>, Status> {
        let request = request.get_ref();
        let settled = self
            .limiter
            .settle_limit(SettleRequest {
                rule: &request.rule,
                subject: &request.subject,
                request_id: &request.request_id,
                actual_cost: request.actual_cost,
            })
            .await?;
        Span::current()
            .record("found", settled.is_some())
            .record("remaining", settled.unwrap_or(0));
        Ok(Response::new(SettleLimitResponse {
            found: settled.is_some(),
            remaining: settled.unwrap_or(0),
        }))
    }
}

/// The wire answer for `outcome`, a decision of `rule`: the decision's
/// figures and both RateLimit header values.
fn check_response(rule: &str, outcome: &CheckOutcome) -> CheckLimitResponse {
    let decision = outcome.decision;
    // A degraded answer knows the rule (its policy) but not the window
    // (remaining, reset): no RateLimit value rather than made-up figures.
    let ratelimit = if outcome.degraded {
        String::new()
    } else {
        headers::ratelimit_item(rule, decision.remaining, decision.reset_after)
    };
    CheckLimitResponse {
        allowed: decision.allowed,
        limit: outcome.limit,
        remaining: decision.remaining,
        retry_after: wire_duration(decision.retry_after),
        reset_after: wire_duration(decision.reset_after),
        blocked: decision.blocked,
        degraded: outcome.degraded,
        ratelimit_policy: outcome.ratelimit_policy.to_string(),
        ratelimit,
        shadowed: outcome.shadowed,
        replayed: outcome.replayed,
    }
}
