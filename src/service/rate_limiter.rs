//! `tollgate.v1.RateLimiter`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use super::wire_duration;
use crate::{
    headers,
    limiter::{CheckOutcome, CheckRequest, Limiter},
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
            })
            .await?;
        Span::current()
            .record("allowed", outcome.decision.allowed)
            .record("remaining", outcome.decision.remaining);
        Ok(Response::new(check_response(&request.rule, &outcome)))
    }

    // Placeholder until the multi-limit call lands (issue 11, part 1).
    async fn check_limits(
        &self,
        _request: Request<CheckLimitsRequest>,
    ) -> Result<Response<CheckLimitsResponse>, Status> {
        Err(Status::unimplemented("CheckLimits is not implemented yet"))
    }

    // Placeholder until pay-after-use lands (issue 11, part 3).
    async fn settle_limit(
        &self,
        _request: Request<SettleLimitRequest>,
    ) -> Result<Response<SettleLimitResponse>, Status> {
        Err(Status::unimplemented("SettleLimit is not implemented yet"))
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
        ..CheckLimitResponse::default()
    }
}
