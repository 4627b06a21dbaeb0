//! The gRPC doors into the [`Limiter`](crate::limiter::Limiter): wire types
//! in, domain types through, and every error mapped to a status in one place.

use std::time::Duration;

use tonic::Status;

use crate::{limiter, store::StoreError};

pub mod admin;
pub mod envoy;
mod rate_limiter;
mod usage_quota;
mod usage_stats;

pub use admin::AdminService;
pub use envoy::EnvoyService;
pub use rate_limiter::RateLimiterService;
pub use usage_quota::UsageQuotaService;
pub use usage_stats::UsageStatsService;

impl From<limiter::Error> for Status {
    fn from(err: limiter::Error) -> Self {
        match &err {
            limiter::Error::InvalidArgument { .. }
            | limiter::Error::Unknown { .. }
            | limiter::Error::InCheck { .. } => Status::invalid_argument(err.to_string()),
            // The store could not be reached in time: the caller may retry,
            // and gateways know UNAVAILABLE as "try again", not "allowed".
            limiter::Error::Store(
                StoreError::Timeout(_) | StoreError::Unavailable(_) | StoreError::CircuitOpen(_),
            ) => Status::unavailable(err.to_string()),
            limiter::Error::Store(StoreError::Protocol(_)) => Status::internal(err.to_string()),
        }
    }
}

/// Durations always go on the wire, zero included, so callers need not tell
/// an absent field from zero.
fn wire_duration(duration: Duration) -> Option<prost_types::Duration> {
    Some(
        prost_types::Duration::try_from(duration).unwrap_or(prost_types::Duration {
            seconds: i64::MAX,
            nanos: 0,
        }),
    )
}
