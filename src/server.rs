//! Serves the gRPC services, health and reflection on one listener until a
//! shutdown future completes.
//!
//! The caller binds the listener and owns the shutdown signal, so tests can
//! bind port 0 and stop the server cleanly, and `main` stays thin.

use std::{future::Future, sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    limiter::Limiter,
    proto::{self, rate_limiter_server::RateLimiterServer, usage_quota_server::UsageQuotaServer},
    service::{EnvoyService, RateLimiterService, UsageQuotaService},
    store::Store,
};

/// How often the health service asks the store whether it answers.
pub const HEALTH_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The names the health service reports: the whole server ("") and each
/// service it serves.
const HEALTH_NAMES: [&str; 4] = [
    "",
    "tollgate.v1.RateLimiter",
    "tollgate.v1.UsageQuota",
    "envoy.service.ratelimit.v3.RateLimitService",
];

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not be built from the descriptors.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `limiter` on `listener` until `shutdown` completes; then health
/// turns NOT_SERVING, no new connection is accepted, and in-flight requests
/// finish before this returns.
pub async fn run<S: Store>(
    limiter: Arc<Limiter<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let prober = tokio::spawn(probe_store(limiter.clone(), reporter.clone()));
    // On shutdown, turn NOT_SERVING first, so load balancers stop sending
    // while in-flight requests finish.
    let stop_prober = prober.abort_handle();
    let shutdown_reporter = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        stop_prober.abort();
        set_health(&shutdown_reporter, ServingStatus::NotServing).await;
    };
    let served = Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(RateLimiterServer::new(RateLimiterService::new(
            limiter.clone(),
        )))
        .add_service(UsageQuotaServer::new(UsageQuotaService::new(
            limiter.clone(),
        )))
        // Envoy's rate limit service, for gateways.
        .add_service(RateLimitServiceServer::new(EnvoyService::new(limiter)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    prober.abort();
    set_health(&reporter, ServingStatus::NotServing).await;
    Ok(served?)
}

/// Every service's descriptors, for both reflection versions.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(proto::ENVOY_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Keeps the health service SERVING exactly while the store answers.
async fn probe_store<S: Store>(limiter: Arc<Limiter<S>>, reporter: HealthReporter) {
    let mut last = None;
    let mut interval = tokio::time::interval(HEALTH_PROBE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let status = match limiter.store().ping().await {
            Ok(()) => ServingStatus::Serving,
            Err(err) => {
                tracing::warn!(error = %err, "store does not answer; health is NOT_SERVING");
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            set_health(&reporter, status).await;
            last = Some(status);
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, status).await;
    }
}
