//! The floor: what a service that calls Redis itself would do, as a server
//! `bench/run.sh` measures tollgate against (`cargo run --release --example
//! floor -- --help`).
//!
//! The question users ask of a rate limiter is whether it is slower than
//! calling Redis from their own service. This answers the two RPCs the
//! benchmark drives, `tollgate.v1.RateLimiter/CheckLimit` and Envoy's
//! `ShouldRateLimit`, with exactly one `EVALSHA` of tollgate's own
//! `lua/sliding_log.lua` per request on one multiplexed Redis connection,
//! on the key tollgate uses for a rule without a lock-out
//! (`<prefix>{rl:<subject>}:<rule>:calls`, see `src/keys.rs`), with one
//! limit and window for every rule. Nothing else: no validation, no tiers,
//! no metrics, no circuit breaker, no deny cache, no pool, no deadline, no
//! headers; every other RPC answers UNIMPLEMENTED. A caller's subject is
//! put into the key as sent, so this is a benchmark tool only, and it
//! listens on loopback only.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;
use envoy_types::pb::envoy::service::ratelimit::v3::{
    RateLimitRequest, RateLimitResponse,
    rate_limit_response::{Code, DescriptorStatus},
    rate_limit_service_server::{RateLimitService, RateLimitServiceServer},
};
use redis::{AsyncConnectionConfig, Script, aio::MultiplexedConnection};
use tollgate::proto::{
    CheckLimitRequest, CheckLimitResponse, CheckLimitsRequest, CheckLimitsResponse,
    SettleLimitRequest, SettleLimitResponse,
    rate_limiter_server::{RateLimiter, RateLimiterServer},
};
use tonic::{Request, Response, Status, transport::Server};

#[derive(Debug, Parser)]
#[command(
    about = "A bare server doing one EVALSHA of sliding_log.lua per request: tollgate's floor"
)]
struct Cli {
    /// Where to listen; a loopback address only.
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: SocketAddr,
    /// The Redis server.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    redis: String,
    /// Hits allowed per window, for every rule (bench/tollgate-bench.toml's
    /// api_log).
    #[arg(long, default_value_t = 1_000_000)]
    limit: u64,
    /// The window, for every rule (humantime: 15m, 1s).
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Put before every key; another prefix than tollgate's keeps the two
    /// servers' logs apart on one Redis.
    #[arg(long, default_value = "floor:")]
    key_prefix: String,
    /// The runtime's worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
}

/// What every request shares: the script, one connection and the rule.
#[derive(Clone)]
struct Floor {
    script: Script,
    redis: MultiplexedConnection,
    prefix: String,
    limit: u64,
    window_us: u64,
}

/// sliding_log.lua's reply: allowed, remaining, retry_after_us,
/// reset_after_us, blocked.
type Reply = (u8, u64, u64, u64, u8);

impl Floor {
    /// One decision: one EVALSHA (redis-rs sends EVAL after a NOSCRIPT).
    async fn decide(&self, rule: &str, subject: &str, cost: u32) -> Result<Reply, Status> {
        let key = format!("{}{{rl:{subject}}}:{rule}:calls", self.prefix);
        let mut redis = self.redis.clone();
        self.script
            .key(key)
            .arg(self.limit)
            .arg(self.window_us)
            .arg(cost.max(1))
            .arg(0) // dry_run
            .arg(0) // block_us
            .invoke_async(&mut redis)
            .await
            .map_err(|err| Status::unavailable(format!("redis: {err}")))
    }
}

fn duration_from_us(us: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(us / 1_000_000).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from(us % 1_000_000 * 1_000).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl RateLimiter for Floor {
    async fn check_limit(
        &self,
        request: Request<CheckLimitRequest>,
    ) -> Result<Response<CheckLimitResponse>, Status> {
        let request = request.get_ref();
        let (allowed, remaining, retry_after_us, reset_after_us, blocked) = self
            .decide(&request.rule, &request.subject, request.cost)
            .await?;
        Ok(Response::new(CheckLimitResponse {
            allowed: allowed == 1,
            limit: self.limit,
            remaining,
            retry_after: (allowed == 0).then(|| duration_from_us(retry_after_us)),
            reset_after: Some(duration_from_us(reset_after_us)),
            blocked: blocked == 1,
            ..CheckLimitResponse::default()
        }))
    }

    async fn check_limits(
        &self,
        _request: Request<CheckLimitsRequest>,
    ) -> Result<Response<CheckLimitsResponse>, Status> {
        Err(Status::unimplemented("the floor answers CheckLimit only"))
    }

    async fn settle_limit(
        &self,
        _request: Request<SettleLimitRequest>,
    ) -> Result<Response<SettleLimitResponse>, Status> {
        Err(Status::unimplemented("the floor answers CheckLimit only"))
    }
}

#[tonic::async_trait]
impl RateLimitService for Floor {
    /// Each descriptor is one decision: the rule is its `generic_key`, the
    /// subject its `user_id` (tollgate-bench's shape); the domain is not read.
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.get_ref();
        let mut response = RateLimitResponse {
            overall_code: Code::Ok as i32,
            ..RateLimitResponse::default()
        };
        for descriptor in &request.descriptors {
            let entry = |key: &str| {
                descriptor
                    .entries
                    .iter()
                    .find(|entry| entry.key == key)
                    .map_or("", |entry| entry.value.as_str())
            };
            let hits = descriptor.hits_addend.map_or(request.hits_addend, |hits| {
                u32::try_from(hits.value).unwrap_or(u32::MAX)
            });
            let (allowed, remaining, ..) = self
                .decide(entry("generic_key"), entry("user_id"), hits)
                .await?;
            let code = if allowed == 1 {
                Code::Ok
            } else {
                Code::OverLimit
            };
            if code == Code::OverLimit {
                response.overall_code = code as i32;
            }
            response.statuses.push(DescriptorStatus {
                code: code as i32,
                limit_remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                ..DescriptorStatus::default()
            });
        }
        Ok(Response::new(response))
    }
}

async fn serve(cli: Cli) -> Result<(), String> {
    let client =
        redis::Client::open(cli.redis.as_str()).map_err(|err| format!("--redis: {err}"))?;
    // As tollgate: no per-request timer on the connection.
    let config = AsyncConnectionConfig::new().set_response_timeout(None);
    let mut redis = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|err| format!("cannot connect to {}: {err}", cli.redis))?;
    let script = Script::new(include_str!("../lua/sliding_log.lua"));
    script
        .prepare_invoke()
        .load_async(&mut redis)
        .await
        .map_err(|err| format!("SCRIPT LOAD: {err}"))?;
    let floor = Floor {
        script,
        redis,
        prefix: cli.key_prefix,
        limit: cli.limit,
        window_us: u64::try_from(cli.window.as_micros()).unwrap_or(u64::MAX),
    };
    eprintln!("floor: listening on {}", cli.listen);
    Server::builder()
        .add_service(RateLimiterServer::new(floor.clone()))
        .add_service(RateLimitServiceServer::new(floor))
        .serve_with_shutdown(cli.listen, async {
            // Stop on Ctrl-C or SIGTERM, which bench/run.sh sends.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async {
                    match term.as_mut() {
                        Some(term) => { term.recv().await; }
                        None => std::future::pending().await,
                    }
                } => {}
            }
        })
        .await
        .map_err(|err| format!("serving on {}: {err}", cli.listen))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() {
        eprintln!(
            "floor: --listen must be a loopback address, not {}",
            cli.listen
        );
        return ExitCode::from(2);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = cli.worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let result = match runtime.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve(cli)),
        Err(err) => Err(format!("cannot start the async runtime: {err}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("floor: {err}");
            ExitCode::FAILURE
        }
    }
}
