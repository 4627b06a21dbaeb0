//! `tollgate.v1.UsageQuota`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use super::wire_duration;
use crate::{
    limiter::{IncrementRequest, KindUsage, Limiter, UsageSettleRequest},
    proto::{
        ConversationUsage, GetUsageRequest, GetUsageResponse, IncrementUsageRequest,
        IncrementUsageResponse, ListUsageRequest, ListUsageResponse, SettleUsageRequest,
        SettleUsageResponse, UsageCounter, usage_quota_server::UsageQuota,
    },
    rules::Quota,
    store::Store,
};

/// Serves IncrementUsage, GetUsage and ListUsage from a shared limiter.
#[derive(Debug)]
pub struct UsageQuotaService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> UsageQuotaService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

#[tonic::async_trait]
impl<S: Store> UsageQuota for UsageQuotaService<S> {
    #[instrument(
        name = "IncrementUsage",
        skip_all,
        fields(kind = %request.get_ref().kind, tier = %request.get_ref().tier, allowed, used)
    )]
    async fn increment_usage(
        &self,
        request: Request<IncrementUsageRequest>,
    ) -> Result<Response<IncrementUsageResponse>, Status> {
        let request = request.get_ref();
        let outcome = self
            .limiter
            .increment_usage(IncrementRequest {
                user_id: &request.user_id,
                character_id: &request.character_id,
                kind: &request.kind,
                tier: &request.tier,
                amount: request.amount,
                request_id: &request.request_id,
            })
            .await?;
        Span::current()
            .record("allowed", outcome.allowed)
            .record("used", outcome.used);
        let (limit, remaining) = match outcome.quota {
            Quota::Limited(limit) => (limit, limit.saturating_sub(outcome.used)),
            Quota::Unlimited => (0, 0),
        };
        Ok(Response::new(IncrementUsageResponse {
            allowed: outcome.allowed,
            unlimited: outcome.quota == Quota::Unlimited,
            used: outcome.used,
            limit,
            remaining,
            resets_after: wire_duration(outcome.resets_after),
            degraded: outcome.degraded,
            replayed: outcome.replayed,
        }))
    }

    #[instrument(name = "GetUsage", skip_all, fields(tier = %request.get_ref().tier))]
    async fn get_usage(
        &self,
        request: Request<GetUsageRequest>,
    ) -> Result<Response<GetUsageResponse>, Status> {
        let request = request.get_ref();
        let usage = self
            .limiter
            .get_usage(&request.user_id, &request.character_id, &request.tier)
            .await?;
        Ok(Response::new(GetUsageResponse {
            counters: usage.iter().map(usage_counter).collect(),
        }))
    }

    #[instrument(name = "ListUsage", skip_all, fields(tier = %request.get_ref().tier, conversations))]
    async fn list_usage(
        &self,
        request: Request<ListUsageRequest>,
    ) -> Result<Response<ListUsageResponse>, Status> {
        let request = request.get_ref();
        let conversations = self
            .limiter
            .list_usage(&request.user_id, &request.tier)
            .await?;
        Span::current().record("conversations", conversations.len());
        Ok(Response::new(ListUsageResponse {
            conversations: conversations
                .into_iter()
                .map(|(character_id, usage)| ConversationUsage {
                    character_id,
                    counters: usage.iter().map(usage_counter).collect(),
                })
                .collect(),
        }))
    }

    #[instrument(
        name = "SettleUsage",
        skip_all,
        fields(kind = %request.get_ref().kind, actual_amount = request.get_ref().actual_amount, found, used)
    )]
    async fn settle_usage(
        &self,
        request: Request<SettleUsageRequest>,
    ) -> Result<Response<SettleUsageResponse>, Status> {
        let request = request.get_ref();
        let settled = self
            .limiter
            .settle_usage(UsageSettleRequest {
                user_id: &request.user_id,
                character_id: &request.character_id,
                kind: &request.kind,
                request_id: &request.request_id,
                actual_amount: request.actual_amount,
            })
            .await?;
        Span::current()
            .record("found", settled.is_some())
            .record("used", settled.unwrap_or(0));
        Ok(Response::new(SettleUsageResponse {
            found: settled.is_some(),
            used: settled.unwrap_or(0),
        }))
    }
}

fn usage_counter(usage: &KindUsage) -> UsageCounter {
    UsageCounter {
        kind: usage.kind.clone(),
        used: usage.used,
        limit: usage.quota.limit().unwrap_or(0),
        remaining: usage.remaining().unwrap_or(0),
        unlimited: usage.quota == Quota::Unlimited,
        resets_after: wire_duration(usage.resets_after),
    }
}
