//! `tollgate.v1.UsageStats`.

use std::{collections::HashMap, sync::Arc};

use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::{
    limiter::{Limiter, StatsRequest},
    proto::{
        self, CharacterCount, GetStatsRequest, GetStatsResponse, StatsBucket,
        usage_stats_server::UsageStats,
    },
    stats::Granularity,
    store::Store,
};

/// Serves GetStats from a shared limiter.
#[derive(Debug)]
pub struct UsageStatsService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> UsageStatsService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

impl TryFrom<i32> for Granularity {
    type Error = Status;

    fn try_from(wire: i32) -> Result<Self, Status> {
        match proto::Granularity::try_from(wire) {
            Ok(proto::Granularity::Hour) => Ok(Self::Hour),
            Ok(proto::Granularity::Day) => Ok(Self::Day),
            Ok(proto::Granularity::Week) => Ok(Self::Week),
            Ok(proto::Granularity::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
                "granularity: must be HOUR, DAY or WEEK, got {wire}"
            ))),
        }
    }
}

#[tonic::async_trait]
impl<S: Store> UsageStats for UsageStatsService<S> {
    #[instrument(name = "GetStats", skip_all, fields(granularity = request.get_ref().granularity, buckets = request.get_ref().buckets))]
    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let request = request.get_ref();
        let granularity = Granularity::try_from(request.granularity)?;
        let report = self
            .limiter
            .get_stats(StatsRequest {
                granularity,
                buckets: request.buckets,
                character_id: &request.character_id,
                top_characters: request.top_characters,
            })
            .await?
            .ok_or_else(|| {
                Status::failed_precondition("statistics are disabled (stats.enabled = false)")
            })?;
        Ok(Response::new(GetStatsResponse {
            buckets: report
                .buckets
                .into_iter()
                .map(|bucket| StatsBucket {
                    start: Some(prost_types::Timestamp {
                        seconds: bucket.start,
                        nanos: 0,
                    }),
                    messages: bucket.messages.into_iter().collect::<HashMap<_, _>>(),
                    quota_denials: bucket.denials.into_iter().collect::<HashMap<_, _>>(),
                    active_users: bucket.active_users,
                })
                .collect(),
            top_characters: report
                .top
                .into_iter()
                .map(|(character_id, messages)| CharacterCount {
                    character_id,
                    messages,
                })
                .collect(),
        }))
    }
}
