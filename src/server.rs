//! Serves the gRPC services, health and reflection on one listener until a
//! shutdown future completes.
//!
//! The caller binds the listener and owns the shutdown signal, so tests can
//! bind port 0 and stop the server cleanly, and `main` stays thin.

use std::{future::Future, sync::Arc, time::Duration};

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tonic::{Code, Status, codegen::http::Response, transport::Server};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::Settings,
    limiter::Limiter,
    proto::{
        self, admin_server::AdminServer, rate_limiter_server::RateLimiterServer,
        usage_quota_server::UsageQuotaServer, usage_stats_server::UsageStatsServer,
    },
    service::{
        AdminService, EnvoyService, RateLimiterService, UsageQuotaService, UsageStatsService,
    },
    store::Store,
    tls::{ReloadableTls, TlsError},
};

/// How often the health service asks the store whether it answers.
pub const HEALTH_PROBE_INTERVAL: Duration = Duration::from_millis(500);

/// The names the health service reports: the whole server ("") and each
/// service it serves.
const HEALTH_NAMES: [&str; 5] = [
    "",
    "tollgate.v1.RateLimiter",
    "tollgate.v1.UsageQuota",
    "tollgate.v1.UsageStats",
    "envoy.service.ratelimit.v3.RateLimitService",
];

/// The largest request message a service decodes by default, in bytes. The
/// largest valid request (a `ShouldRateLimit` with many descriptors) is a
/// few KiB; 64 KiB leaves room and still bounds what one request can cost.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024;

/// How [`run_with`] serves, beyond what it serves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// TLS for every connection (mutual TLS when it names a client CA),
    /// replaceable while serving, or `None` for plaintext HTTP/2.
    pub tls: Option<Arc<ReloadableTls>>,
    /// The largest request message any service decodes, in bytes; a larger
    /// one is refused with RESOURCE_EXHAUSTED before it is read.
    pub max_decoding_message_size: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            tls: None,
            max_decoding_message_size: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

impl ServeOptions {
    /// The options `settings` ask for, reading the PEM files that
    /// `[server.tls]` names (checked already when the config loaded; read
    /// again here, as they are at every start) and checking that rustls
    /// takes them: a key that does not parse or does not match the
    /// certificate fails here, before anything listens.
    pub fn from_settings(settings: &Settings) -> Result<Self, ServerError> {
        let Some(tls) = &settings.tls else {
            return Ok(Self::default());
        };
        Ok(Self {
            tls: Some(Arc::new(ReloadableTls::load(tls)?)),
            ..Self::default()
        })
    }
}

/// Why the server stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The reflection service could not be built from the descriptors.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A file of `[server.tls]` is unreadable, or rustls refused it.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Serves `limiter` on `listener` until `shutdown` completes; then health
/// turns NOT_SERVING, no new connection is accepted, and in-flight requests
/// finish before this returns. Plaintext, with the default request size
/// limit: [`run_with`] with [`ServeOptions::default`].
pub async fn run<S: Store>(
    limiter: Arc<Limiter<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    run_with(limiter, listener, shutdown, ServeOptions::default()).await
}

/// [`run`], over TLS when `options` say so, and with their request size
/// limit.
pub async fn run_with<S: Store>(
    limiter: Arc<Limiter<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), ServerError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let limit = options.max_decoding_message_size;
    let reflection_v1 = reflection().build_v1()?.max_decoding_message_size(limit);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(limit);
    let builder = Server::builder();

    let prober = tokio::spawn(probe_store(limiter.clone(), reporter.clone()));
    let flusher = tokio::spawn(flush_stats(limiter.clone()));
    // On shutdown, turn NOT_SERVING first, so load balancers stop sending
    // while in-flight requests finish.
    let stop_prober = prober.abort_handle();
    let shutdown_reporter = reporter.clone();
    let shutdown = async move {
        shutdown.await;
        stop_prober.abort();
        set_health(&shutdown_reporter, ServingStatus::NotServing).await;
    };
    let router = builder
        .layer(tower::util::MapResponseLayer::new(
            move |response: Response<tonic::body::Body>| {
                oversized_is_resource_exhausted(response, limit)
            },
        ))
        .add_service(health.max_decoding_message_size(limit))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            RateLimiterServer::new(RateLimiterService::new(limiter.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            UsageQuotaServer::new(UsageQuotaService::new(limiter.clone()))
                .max_decoding_message_size(limit),
        )
        .add_service(
            UsageStatsServer::new(UsageStatsService::new(limiter.clone()))
                .max_decoding_message_size(limit),
        )
        // Envoy's rate limit service, for gateways.
        .add_service(
            RateLimitServiceServer::new(EnvoyService::new(limiter.clone()))
                .max_decoding_message_size(limit),
        );
    let served = match options.tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
    };
    prober.abort();
    flusher.abort();
    // What the last interval recorded, once more, if the store answers
    // within its timeout; else it is lost, as in a crash.
    if let Err(err) = limiter.flush_stats().await {
        tracing::warn!(error = %err, "cannot flush statistics at shutdown; the last interval is lost");
    }
    set_health(&reporter, ServingStatus::NotServing).await;
    Ok(served?)
}

/// Serves the admin door, `tollgate.v1.Admin` (and reflection, for
/// grpcurl), on `listener` until `shutdown` completes, over TLS when
/// `options` say so: `server.admin_listen`, with the server's TLS and
/// client-certificate settings. A listener of its own, never the callers':
/// who can reach it can unlock any subject.
pub async fn run_admin<S: Store>(
    limiter: Arc<Limiter<S>>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    options: ServeOptions,
) -> Result<(), ServerError> {
    let limit = options.max_decoding_message_size;
    let router = Server::builder()
        .add_service(reflection().build_v1()?.max_decoding_message_size(limit))
        .add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(limit),
        )
        .add_service(AdminServer::new(AdminService::new(limiter)).max_decoding_message_size(limit));
    let served = match options.tls {
        None => {
            router
                .serve_with_incoming_shutdown(incoming(listener), shutdown)
                .await
        }
        Some(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
    };
    Ok(served?)
}

/// tonic refuses a request message over the decoding limit with
/// OUT_OF_RANGE; gRPC's status code table says RESOURCE_EXHAUSTED ("received
/// message larger than max"), which is what clients of other gRPC stacks
/// expect. The refusal is a trailers-only response, so its status is in the
/// headers, where this rewrites it.
fn oversized_is_resource_exhausted(
    mut response: Response<tonic::body::Body>,
    limit: usize,
) -> Response<tonic::body::Body> {
    let oversized = Status::from_header_map(response.headers()).is_some_and(|status| {
        status.code() == Code::OutOfRange
            && status
                .message()
                .contains("decoded message length too large")
    });
    if oversized {
        let status =
            Status::resource_exhausted(format!("the request is larger than {limit} bytes"));
        // Only fails on a message that is not a valid header value; ours is.
        let _ = status.add_header(response.headers_mut());
    }
    response
}

/// Accepted connections with Nagle's algorithm off: an answer is one small
/// frame, and Nagle holding it back for the client's delayed ACK puts ~40 ms
/// on the latency tail. tonic's `Server::tcp_nodelay` does not reach
/// listeners handed in by the caller, so it is set here.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
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
        let pinged = limiter.store().ping().await;
        limiter
            .metrics()
            .set_breaker_open(limiter.store().circuit_open());
        let status = match pinged {
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

/// Writes the statistics to the store every `stats.flush`. A failure is
/// logged once per outage and retried with the next flush; it never reaches
/// a decision.
async fn flush_stats<S: Store>(limiter: Arc<Limiter<S>>) {
    let Some(every) = limiter.stats().map(|stats| stats.settings().flush) else {
        return;
    };
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        interval.tick().await;
        match limiter.flush_stats().await {
            Ok(()) if failing => {
                tracing::info!("statistics flushed again");
                failing = false;
            }
            Ok(()) => {}
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "cannot flush statistics; keeping them for the next flush");
                }
                failing = true;
            }
        }
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        reporter.set_service_status(name, status).await;
    }
}
