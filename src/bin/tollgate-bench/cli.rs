//! The command line, checked once into a [`Plan`]: which call, against
//! which address, and the bounds that every run has.

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

use clap::{Parser, ValueEnum};
use tonic::transport::Uri;

/// The longest run accepted, so that a typo cannot load a machine for hours.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(10 * 60);

/// The most requests one run sends.
pub(crate) const MAX_REQUESTS: u64 = 100_000_000;

/// The run length when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// The most distinct subjects; each is one pre-built string held in memory.
const MAX_SUBJECTS: u32 = 10_000_000;

/// The most requests in flight at once.
const MAX_CONCURRENCY: u32 = 100_000;

/// The most HTTP/2 connections.
const MAX_CONNECTIONS: u32 = 1_000;

/// A ghz-style load generator for tollgate's gRPC API.
///
/// Sends CheckLimit or IncrementUsage requests with subjects "bench-0" ..
/// "bench-{N-1}" and prints a summary: count, requests/s, latency
/// percentiles (HDR histogram) and allowed/denied/errors. Loopback only
/// unless --allow-remote is given.
#[derive(Debug, Parser)]
#[command(name = "tollgate-bench", version, about)]
pub(crate) struct Cli {
    /// The tollgate server.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Permit a non-loopback --addr (only where load on that host is allowed).
    #[arg(long)]
    allow_remote: bool,
    /// The RPC to call.
    #[arg(long, value_enum, default_value_t = Call::CheckLimit)]
    call: Call,
    /// The rule, for check-limit; for check-limits, the group's rules,
    /// comma-separated.
    #[arg(long, default_value = "api")]
    rule: String,
    /// The message kind, for increment-usage.
    #[arg(long, default_value = "text")]
    kind: String,
    /// The character every increment-usage conversation is with.
    #[arg(long, default_value = "bench-character")]
    character: String,
    /// The tier; empty means the server's default tier.
    #[arg(long, default_value = "")]
    tier: String,
    /// Hits (check-limit) or messages (increment-usage) per request.
    #[arg(long, default_value_t = 1)]
    cost: u32,
    /// With check-limit: draw each request's cost uniformly from --cost to
    /// this (a token budget's varying costs); unset: every request costs --cost.
    #[arg(long)]
    cost_max: Option<u32>,
    /// With check-limit: give every request a request_id of its own (unique
    /// to this run), so each is remembered as retries are; settle-limit
    /// always does.
    #[arg(long)]
    request_ids: bool,
    /// Distinct subjects (users for increment-usage): "bench-0" .. "bench-{N-1}".
    #[arg(long, default_value_t = 10_000)]
    subjects: u32,
    /// How each request picks its subject.
    #[arg(long, value_enum, default_value_t = Pick::RoundRobin)]
    pick: Pick,
    /// Requests in flight at once.
    #[arg(short, long, default_value_t = 50)]
    concurrency: u32,
    /// HTTP/2 connections; requests are spread over them.
    #[arg(long, default_value_t = 1)]
    connections: u32,
    /// How long to send (e.g. 10s, 1m), at most 10m. Default 10s when
    /// --requests is not given.
    #[arg(short, long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// How many requests to send in all, at most 100,000,000. Alone, the run
    /// still stops after 10m.
    #[arg(short = 'n', long)]
    requests: Option<u64>,
    /// A fixed arrival rate (requests/s); latency counts from each request's
    /// scheduled time, so a slow server cannot hide its queueing.
    #[arg(long)]
    rps: Option<u32>,
    /// Send load for this long first, without counting it.
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Give up on a request after this long (counted as DeadlineExceeded).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Runtime worker threads; default: one per core.
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line instead of the summary.
    #[arg(long)]
    json: bool,
}

/// The RPCs the generator can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Call {
    /// tollgate.v1.RateLimiter/CheckLimit.
    CheckLimit,
    /// tollgate.v1.RateLimiter/CheckLimits: one check per rule of --rule
    /// (comma-separated, e.g. `api_log,api_sliding_counter,api_counter`),
    /// all for the request's subject.
    CheckLimits,
    /// tollgate.v1.UsageQuota/IncrementUsage.
    IncrementUsage,
    /// envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit, one
    /// descriptor per request.
    ShouldRateLimit,
    /// Pay after use: each request is a CheckLimit reserving --cost under a
    /// request id of its own, then a SettleLimit of half of it; latency
    /// counts both, and a request is allowed when the settle found the call.
    SettleLimit,
}

impl Call {
    /// The flag value, as the user types it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::CheckLimit => "check-limit",
            Self::CheckLimits => "check-limits",
            Self::IncrementUsage => "increment-usage",
            Self::ShouldRateLimit => "should-rate-limit",
            Self::SettleLimit => "settle-limit",
        }
    }

    /// The full gRPC method.
    pub(crate) fn rpc(self) -> &'static str {
        match self {
            Self::CheckLimit => "tollgate.v1.RateLimiter/CheckLimit",
            Self::CheckLimits => "tollgate.v1.RateLimiter/CheckLimits",
            Self::IncrementUsage => "tollgate.v1.UsageQuota/IncrementUsage",
            Self::ShouldRateLimit => "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            Self::SettleLimit => {
                "tollgate.v1.RateLimiter/CheckLimit + tollgate.v1.RateLimiter/SettleLimit"
            }
        }
    }
}

/// How a request chooses its subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Pick {
    /// Request number i uses subject i mod N, like ghz's `{{.RequestNumber}}`:
    /// every subject gets the same share, so allowed counts are exact.
    RoundRobin,
    /// Uniformly random per request.
    Random,
}

/// When a phase stops: whichever bound is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// Stop starting requests after this long.
    pub(crate) duration: Duration,
    /// Stop after this many requests.
    pub(crate) requests: u64,
}

/// A validated run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The server URI.
    pub(crate) addr: Uri,
    /// The RPC.
    pub(crate) call: Call,
    /// Rule name (check-limit).
    pub(crate) rule: String,
    /// Kind name (increment-usage).
    pub(crate) kind: String,
    /// Character id (increment-usage).
    pub(crate) character: String,
    /// Tier name; empty for the default tier.
    pub(crate) tier: String,
    /// Cost or amount per request (the least, with `cost_max`).
    pub(crate) cost: u32,
    /// The most a check-limit request costs; costs are drawn uniformly from
    /// `cost..=cost_max`. Equal to `cost` for a fixed cost.
    pub(crate) cost_max: u32,
    /// Every check-limit request carries a request id of its own.
    pub(crate) request_ids: bool,
    /// Distinct subjects.
    pub(crate) subjects: u32,
    /// Subject choice.
    pub(crate) pick: Pick,
    /// Requests in flight.
    pub(crate) concurrency: u32,
    /// HTTP/2 connections.
    pub(crate) connections: u32,
    /// The measured phase's bounds.
    pub(crate) bounds: Bounds,
    /// The fixed arrival rate, if any.
    pub(crate) rps: Option<u32>,
    /// The uncounted warm-up phase, if any.
    pub(crate) warmup: Option<Duration>,
    /// Per-request deadline.
    pub(crate) timeout: Duration,
    /// Runtime worker threads.
    pub(crate) threads: Option<usize>,
    /// One JSON line instead of the summary.
    pub(crate) json: bool,
}

impl Cli {
    /// Checks every flag and the combination, or says what is wrong.
    pub(crate) fn into_plan(self) -> Result<Plan, String> {
        let addr: Uri = self
            .addr
            .parse()
            .map_err(|err| format!("--addr {:?}: not a URI: {err}", self.addr))?;
        if !matches!(addr.scheme_str(), Some("http" | "https")) {
            return Err(format!(
                "--addr {:?}: give a URI such as http://127.0.0.1:50051",
                self.addr
            ));
        }
        let host = addr.host().unwrap_or_default();
        if !self.allow_remote && !is_loopback(host) {
            return Err(format!(
                "--addr {:?}: refusing to send load to {host:?}, which is not a loopback \
                 address; pass --allow-remote only where load on that host is permitted",
                self.addr
            ));
        }
        let bounds = bounds(self.duration, self.requests)?;
        check_range("--subjects", self.subjects.into(), 1, MAX_SUBJECTS.into())?;
        if let Some(most) = self.cost_max {
            if most < self.cost.max(1) {
                return Err(format!(
                    "--cost-max {most}: at least --cost ({})",
                    self.cost.max(1)
                ));
            }
            if self.call != Call::CheckLimit {
                return Err("--cost-max: only with --call check-limit".to_owned());
            }
        }
        if self.request_ids && self.call != Call::CheckLimit {
            return Err("--request-ids: only with --call check-limit".to_owned());
        }
        let cost_max = self.cost_max;
        check_range(
            "--concurrency",
            self.concurrency.into(),
            1,
            MAX_CONCURRENCY.into(),
        )?;
        check_range(
            "--connections",
            self.connections.into(),
            1,
            MAX_CONNECTIONS.into(),
        )?;
        if self.connections > self.concurrency {
            return Err(format!(
                "--connections {} exceeds --concurrency {}: some connections would stay idle",
                self.connections, self.concurrency
            ));
        }
        if let Some(rps) = self.rps {
            check_range("--rps", rps.into(), 1, 10_000_000)?;
        }
        if let Some(warmup) = self.warmup {
            if warmup > MAX_DURATION {
                return Err(format!(
                    "--warmup {}: at most {}",
                    humantime::format_duration(warmup),
                    humantime::format_duration(MAX_DURATION)
                ));
            }
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            return Err("--timeout: between 1ms and 60s".to_owned());
        }
        if let Some(threads) = self.threads {
            check_range("--threads", threads as u64, 1, 256)?;
        }
        Ok(Plan {
            addr,
            call: self.call,
            rule: self.rule,
            kind: self.kind,
            character: self.character,
            tier: self.tier,
            cost: self.cost,
            cost_max: cost_max.unwrap_or(self.cost),
            request_ids: self.request_ids,
            subjects: self.subjects,
            pick: self.pick,
            concurrency: self.concurrency,
            connections: self.connections,
            bounds,
            rps: self.rps,
            warmup: self.warmup,
            timeout: self.timeout,
            threads: self.threads,
            json: self.json,
        })
    }
}

/// At least one bound is always in force, and neither exceeds its cap.
fn bounds(duration: Option<Duration>, requests: Option<u64>) -> Result<Bounds, String> {
    if let Some(duration) = duration {
        if duration.is_zero() || duration > MAX_DURATION {
            return Err(format!(
                "--duration {}: between 1ms and {}",
                humantime::format_duration(duration),
                humantime::format_duration(MAX_DURATION)
            ));
        }
    }
    if let Some(requests) = requests {
        check_range("--requests", requests, 1, MAX_REQUESTS)?;
    }
    Ok(match (duration, requests) {
        (None, None) => Bounds {
            duration: DEFAULT_DURATION,
            requests: MAX_REQUESTS,
        },
        (duration, requests) => Bounds {
            duration: duration.unwrap_or(MAX_DURATION),
            requests: requests.unwrap_or(MAX_REQUESTS),
        },
    })
}

fn check_range(flag: &str, value: u64, min: u64, max: u64) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{flag} {value}: between {min} and {max}"))
    }
}

/// Whether `host` (from a URI, so IPv6 comes in brackets) is this machine.
/// Names other than "localhost" are not resolved: a name could point
/// anywhere, so it counts as remote.
fn is_loopback(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip.is_loopback(),
        Ok(IpAddr::V6(ip)) => {
            ip == Ipv6Addr::LOCALHOST || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1", "127.1.2.3", "localhost", "LocalHost", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "10.0.0.1",
            "0.0.0.0",
            "example.com",
            "[::]",
            "[2001:db8::1]",
            "",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn a_bound_is_always_in_force() {
        let default = bounds(None, None).expect("no flags is valid");
        assert_eq!(default.duration, DEFAULT_DURATION);
        let count_only = bounds(None, Some(5)).expect("a count is valid");
        assert_eq!(
            (count_only.duration, count_only.requests),
            (MAX_DURATION, 5)
        );
        let time_only = bounds(Some(Duration::from_secs(2)), None).expect("a duration is valid");
        assert_eq!(time_only.requests, MAX_REQUESTS);
        assert!(bounds(Some(MAX_DURATION * 2), None).is_err());
        assert!(bounds(None, Some(MAX_REQUESTS + 1)).is_err());
        assert!(bounds(None, Some(0)).is_err());
    }
}
