//! `envoy.service.ratelimit.v3.RateLimitService`: tollgate as the global rate
//! limit service of Envoy, Istio and other gateways that speak Envoy's
//! protocol, on the same port as tollgate's own services.
//!
//! # Mapping
//!
//! A rule takes part when the config gives it an `[rules.<name>.envoy]`
//! mapping (see [`EnvoyMatch`]):
//!
//! ```toml
//! [envoy]
//! domain = "tollgate"
//! [rules.api.envoy]
//! match = { generic_key = "api" }
//! subject = "user_id"
//! tier = "tier"
//! ```
//!
//! - A request whose `domain` is not `envoy.domain` gets OK for every
//!   descriptor and counts nothing (a debug log line says so).
//! - A rule applies to a descriptor that holds every `match` entry *and* the
//!   `subject` entry. A descriptor that holds the `match` entries but not the
//!   subject entry is one of another shape, as Envoy sends when a header is
//!   missing from a request, and does not match: the next rule is tried.
//!   When several rules apply, the first by rule name wins.
//! - The `tier` entry's value names the tier; without that entry (or
//!   without a `tier` key in the mapping) the default tier applies.
//! - Descriptor values are untrusted (see Errors): an unknown tier is the
//!   default tier; an empty subject is one subject like any other; a
//!   subject over 256 bytes is counted under a SHA-256 digest of the whole
//!   value ([`limiter::untrusted_subject`] shows why no subject counted as
//!   sent can share its counter). Each such value counts once in
//!   `tollgate_envoy_untrusted_values_total{reason}`. CheckLimit, whose
//!   callers are trusted services that should learn of their bug, still
//!   answers INVALID_ARGUMENT for the same values.
//! - The cost is the descriptor's `hits_addend` where set, else the
//!   request's `hits_addend`, where 0 (unset in proto3) means 1. A
//!   descriptor `hits_addend` explicitly set to 0 checks without counting
//!   (a dry run): OVER_LIMIT when one more hit would not fit, and
//!   `limit_remaining` is what is left now. A cost above `u32::MAX` is clamped to `u32::MAX`, which
//!   no limit Envoy can express admits: the descriptor is OVER_LIMIT.
//! - Each descriptor gets one status, in order: OK or OVER_LIMIT,
//!   `current_limit` (`name` = the rule, `requests_per_unit` = the tier's
//!   limit, `unit` from the window, see [`unit_for`]), `limit_remaining` and
//!   `duration_until_reset` (when the window holds no hits). A descriptor
//!   that matches no rule is OK without `current_limit`, as Envoy expects.
//!   `overall_code` is OVER_LIMIT when any descriptor is.
//! - A descriptor whose rule is a shadow rule (`shadow = true`) is always
//!   OK: it is counted as if enforced, and a would-be denial counts in
//!   `tollgate_decisions_total{outcome="shadow_denied"}`.
//! - With `[envoy] headers = "draft-11"` (the default), the response asks
//!   Envoy to add `RateLimit-Policy` and `RateLimit`
//!   (`response_headers_to_add`), one list item per matched descriptor in
//!   order, joined by ", " ([`crate::headers`] writes the items; `r` is the
//!   descriptor's `limit_remaining`). No descriptor matched: no headers.
//!   `headers = "none"` adds none.
//! - The hits go through the same [`Limiter`] as CheckLimit, so a hit through
//!   either door counts against the same window of the same rule and
//!   subject.
//!
//! # Errors
//!
//! Store failures (timeouts, Redis down, an unexpected reply) are always
//! UNAVAILABLE: Envoy then applies its own `failure_mode_deny`, the
//! operator's switch between failing open and closed.
//!
//! No descriptor value is ever an error. Envoy's default
//! (`failure_mode_deny: false`) allows a request on any error, so a client
//! that controls the header behind a subject or tier would otherwise skip
//! its limit by sending a bad value. (The one other error: a rule removed
//! by a reload between the door's reading of the policy and the limiter's
//! is UNAVAILABLE, since the same request succeeds when retried.)
//!
//! # Known limitations
//!
//! - Each descriptor is decided on its own, in order, not all or nothing:
//!   when a later descriptor is OVER_LIMIT, the earlier ones were still
//!   counted (Envoy's reference service behaves the same way).
//! - A descriptor's `limit` override is ignored: limits come from the config.
//! - Server reflection does not list this service: `envoy-types` ships no
//!   encoded descriptors. Point grpcurl or ghz at Envoy's `.proto` files.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue,
        extensions::common::ratelimit::v3::RateLimitDescriptor,
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit},
            rate_limit_service_server::RateLimitService,
        },
    },
    google::protobuf::Duration as WireDuration,
};
use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use crate::{
    headers,
    limiter::{self, CheckRequest, Limiter},
    metrics::UntrustedValue,
    rules::{EnvoyHeaders, EnvoyMatch, Policy, Rule},
    store::Store,
};

/// Serves ShouldRateLimit from a shared limiter.
#[derive(Debug)]
pub struct EnvoyService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> EnvoyService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

#[tonic::async_trait]
impl<S: Store> RateLimitService for EnvoyService<S> {
    #[instrument(
        name = "ShouldRateLimit",
        skip_all,
        fields(
            domain = %request.get_ref().domain,
            descriptors = request.get_ref().descriptors.len(),
            overall,
        )
    )]
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.get_ref();
        let policy = self.limiter.policy();
        let mut headers = match policy.envoy_headers() {
            EnvoyHeaders::Draft11 => Some(HeaderLists::default()),
            EnvoyHeaders::None => None,
        };
        let statuses = if request.domain == policy.envoy_domain() {
            let mut statuses = Vec::with_capacity(request.descriptors.len());
            for (index, descriptor) in request.descriptors.iter().enumerate() {
                statuses.push(
                    self.decide(
                        &policy,
                        index,
                        descriptor,
                        request.hits_addend,
                        headers.as_mut(),
                    )
                    .await?,
                );
            }
            statuses
        } else {
            tracing::debug!(
                domain = %request.domain,
                configured = %policy.envoy_domain(),
                "another domain: every descriptor OK, nothing counted"
            );
            vec![unmatched(); request.descriptors.len()]
        };
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        let overall = if over { Code::OverLimit } else { Code::Ok };
        Span::current().record("overall", overall.as_str_name());
        Ok(Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add: headers.map(HeaderLists::into_headers).unwrap_or_default(),
            ..RateLimitResponse::default()
        }))
    }
}

/// The `RateLimit-Policy` and `RateLimit` values of one response, one list
/// item per matched descriptor, in descriptor order.
#[derive(Debug, Default)]
struct HeaderLists {
    policy: String,
    ratelimit: String,
}

impl HeaderLists {
    fn push(&mut self, policy: &str, ratelimit: &str) {
        if !self.policy.is_empty() {
            self.policy.push_str(headers::LIST_SEPARATOR);
            self.ratelimit.push_str(headers::LIST_SEPARATOR);
        }
        self.policy.push_str(policy);
        self.ratelimit.push_str(ratelimit);
    }

    /// The headers for `response_headers_to_add`; none when no descriptor
    /// matched a rule.
    fn into_headers(self) -> Vec<HeaderValue> {
        if self.policy.is_empty() {
            return Vec::new();
        }
        vec![
            HeaderValue {
                key: POLICY_HEADER.to_owned(),
                value: self.policy,
                ..HeaderValue::default()
            },
            HeaderValue {
                key: RATELIMIT_HEADER.to_owned(),
                value: self.ratelimit,
                ..HeaderValue::default()
            },
        ]
    }
}

/// The header that carries the policies of the matched descriptors.
pub const POLICY_HEADER: &str = "RateLimit-Policy";

/// The header that carries the matched descriptors' remaining hits.
pub const RATELIMIT_HEADER: &str = "RateLimit";

impl<S: Store> EnvoyService<S> {
    /// The status of the descriptor at `index`.
    async fn decide(
        &self,
        policy: &Policy,
        index: usize,
        descriptor: &RateLimitDescriptor,
        request_hits: u32,
        headers: Option<&mut HeaderLists>,
    ) -> Result<DescriptorStatus, Status> {
        let Some(mapped) = map_descriptor(policy, descriptor, request_hits) else {
            return Ok(unmatched());
        };
        for &reason in &mapped.untrusted {
            tracing::debug!(
                rule = mapped.rule.name(),
                ?reason,
                "descriptor value taken other than as sent"
            );
            self.limiter.metrics().untrusted_value(reason);
        }
        let outcome = self
            .limiter
            .check_limit_untrusted(mapped.request())
            .await
            .map_err(|err| to_status(index, &mapped, err))?;
        let decision = outcome.decision;
        // The limiter reports what would be left after the hit; a check
        // that counts nothing reports what is left now. A shadow rule's
        // would-be denial is allowed, but the store's figure is already
        // what is left now.
        let remaining = if mapped.dry_run && decision.allowed && !outcome.shadowed {
            decision.remaining.saturating_add(u64::from(mapped.cost))
        } else {
            decision.remaining
        };
        if let Some(headers) = headers {
            let ratelimit =
                headers::ratelimit_item(mapped.rule.name(), remaining, decision.reset_after);
            headers.push(&outcome.ratelimit_policy, &ratelimit);
        }
        Ok(DescriptorStatus {
            code: if decision.allowed {
                Code::Ok
            } else {
                Code::OverLimit
            } as i32,
            current_limit: Some(RateLimit {
                name: mapped.rule.name().to_owned(),
                requests_per_unit: saturate(outcome.limit),
                unit: unit_for(mapped.rule.window()) as i32,
            }),
            limit_remaining: saturate(remaining),
            duration_until_reset: Some(wire_duration(decision.reset_after)),
            quota: None,
        })
    }
}

/// What one descriptor asks of the limiter, worked out from the policy
/// alone (no store, no metrics), by [`map_descriptor`].
#[derive(Debug, Clone)]
pub struct Mapped<'a> {
    /// The rule the descriptor falls under.
    pub rule: &'a Rule,
    /// That rule's Envoy mapping.
    pub mapping: &'a EnvoyMatch,
    /// The subject entry's value as sent, of any length, empty included:
    /// [`Limiter::check_limit_untrusted`] counts it under
    /// [`limiter::untrusted_subject`] of it.
    pub subject: &'a str,
    /// The tier entry's value when it names a configured tier, else empty:
    /// the default tier.
    pub tier: &'a str,
    /// Hits to spend, at least 1.
    pub cost: u32,
    /// Check without counting.
    pub dry_run: bool,
    /// The values taken other than as sent, one reason each.
    pub untrusted: Vec<UntrustedValue>,
}

impl Mapped<'_> {
    /// The question for [`Limiter::check_limit_untrusted`].
    pub fn request(&self) -> CheckRequest<'_> {
        CheckRequest {
            rule: self.rule.name(),
            subject: self.subject,
            tier: self.tier,
            cost: self.cost,
            dry_run: self.dry_run,
            request_id: "",
        }
    }
}

/// Maps a descriptor onto the first rule by name whose mapping it matches
/// (it holds every `match` entry and the subject entry), with the subject,
/// tier and cost to decide by; `None` when no rule applies. Any descriptor
/// maps, whatever its values: a bad value is noted in
/// [`Mapped::untrusted`], never refused. `request_hits` is the request's
/// `hits_addend`.
pub fn map_descriptor<'a>(
    policy: &'a Policy,
    descriptor: &'a RateLimitDescriptor,
    request_hits: u32,
) -> Option<Mapped<'a>> {
    let entries = descriptor
        .entries
        .iter()
        .map(|e| (e.key.as_str(), e.value.as_str()));
    let (rule, mapping, subject) = policy.rules().find_map(|rule| {
        let mapping = rule.envoy()?;
        if !mapping.matches(entries.clone()) {
            return None;
        }
        let subject = entry(descriptor, mapping.subject())?;
        Some((rule, mapping, subject))
    })?;
    let mut untrusted = Vec::new();
    if subject.is_empty() {
        untrusted.push(UntrustedValue::subject_empty);
    } else if subject.len() > limiter::MAX_ID_BYTES {
        untrusted.push(UntrustedValue::subject_too_long);
    }
    let sent_tier = mapping
        .tier()
        .and_then(|key| entry(descriptor, key))
        .unwrap_or("");
    let tier = if policy.tiers().resolve(sent_tier).is_some() {
        sent_tier
    } else {
        untrusted.push(UntrustedValue::tier_unknown);
        ""
    };
    let (cost, dry_run) = cost(descriptor.hits_addend.map(|h| h.value), request_hits);
    Some(Mapped {
        rule,
        mapping,
        subject,
        tier,
        cost,
        dry_run,
        untrusted,
    })
}

/// The value of the descriptor's first entry called `key`.
fn entry<'a>(descriptor: &'a RateLimitDescriptor, key: &str) -> Option<&'a str> {
    descriptor
        .entries
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The hits to spend and whether to only check: the descriptor's
/// `hits_addend` where set (0 = check without counting), else the request's
/// (0 = unset = 1). A cost above `u32::MAX` is clamped, which keeps it over
/// any limit Envoy can express.
fn cost(descriptor_hits: Option<u64>, request_hits: u32) -> (u32, bool) {
    match descriptor_hits {
        Some(0) => (1, true),
        Some(hits) => (u32::try_from(hits).unwrap_or(u32::MAX), false),
        None => (request_hits.max(1), false),
    }
}

/// Envoy's units, with their length as Envoy reads them (a month is 30 days,
/// a year 365).
const UNITS: [(Unit, u64); 7] = [
    (Unit::Second, 1),
    (Unit::Minute, 60),
    (Unit::Hour, 3_600),
    (Unit::Day, 86_400),
    (Unit::Week, 7 * 86_400),
    (Unit::Month, 30 * 86_400),
    (Unit::Year, 365 * 86_400),
];

/// The Envoy unit for a rule's window: the unit itself when the window is
/// exactly one of it, else the nearest on a logarithmic scale (5m is a
/// MINUTE, 15m an HOUR, 90s a MINUTE). Envoy's unit cannot say "per 15
/// minutes"; `requests_per_unit` stays the rule's limit, so the unit is a
/// hint for headers such as `X-RateLimit-Limit`, not the window itself.
pub fn unit_for(window: Duration) -> Unit {
    let seconds = window.as_secs_f64();
    // How many times longer or shorter than the unit: the distance on a
    // logarithmic scale, |ln(seconds / unit)|, without the logarithm (it is
    // monotonic), since this runs for every descriptor answered.
    let distance = |unit_seconds: u64| {
        let unit = unit_seconds as f64;
        if seconds >= unit {
            seconds / unit
        } else {
            unit / seconds
        }
    };
    UNITS
        .iter()
        .min_by(|a, b| distance(a.1).total_cmp(&distance(b.1)))
        .map_or(Unit::Second, |&(unit, _)| unit)
}

/// OK, with no `current_limit`: what Envoy expects for a descriptor that no
/// rule covers.
fn unmatched() -> DescriptorStatus {
    DescriptorStatus {
        code: Code::Ok as i32,
        ..DescriptorStatus::default()
    }
}

/// The limiter's errors, as this door reports them. The store's are always
/// UNAVAILABLE (Envoy's `failure_mode_deny` then decides). The limiter
/// refuses no descriptor value on this path, so its only other error is a
/// rule that a reload removed after [`map_descriptor`] found it: also
/// UNAVAILABLE, as a retry is decided by the new policy.
fn to_status(index: usize, mapped: &Mapped<'_>, err: limiter::Error) -> Status {
    let rule = mapped.rule.name();
    Status::unavailable(format!("descriptors[{index}]: rule {rule:?}: {err}"))
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Envoy's copy of `google.protobuf.Duration`; always set, zero included.
fn wire_duration(duration: Duration) -> WireDuration {
    WireDuration {
        seconds: i64::try_from(duration.as_secs()).unwrap_or(i64::MAX),
        // Below one billion, so it fits.
        nanos: duration.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_windows_get_their_unit() {
        let cases = [
            (1, Unit::Second),
            (60, Unit::Minute),
            (3_600, Unit::Hour),
            (86_400, Unit::Day),
            (7 * 86_400, Unit::Week),
        ];
        for (seconds, unit) in cases {
            assert_eq!(unit_for(Duration::from_secs(seconds)), unit, "{seconds}s");
        }
    }

    #[test]
    fn other_windows_get_the_nearest_unit() {
        let cases = [
            (Duration::from_millis(200), Unit::Second),
            (Duration::from_secs(5), Unit::Second),
            (Duration::from_secs(10), Unit::Minute),
            (Duration::from_secs(90), Unit::Minute),
            (Duration::from_secs(5 * 60), Unit::Minute),
            (Duration::from_secs(15 * 60), Unit::Hour),
            (Duration::from_secs(4 * 3_600), Unit::Hour),
            (Duration::from_secs(6 * 3_600), Unit::Day),
        ];
        for (window, unit) in cases {
            assert_eq!(unit_for(window), unit, "{window:?}");
        }
    }

    /// The ratio it compares picks the unit the logarithm picked, from a
    /// millisecond to two years.
    #[test]
    fn the_nearest_unit_is_nearest_on_a_logarithmic_scale() {
        let by_log = |window: Duration| {
            let seconds = window.as_secs_f64();
            let distance = |unit_seconds: u64| (seconds / unit_seconds as f64).ln().abs();
            UNITS
                .iter()
                .min_by(|a, b| distance(a.1).total_cmp(&distance(b.1)))
                .map_or(Unit::Second, |&(unit, _)| unit)
        };
        let mut millis: u64 = 1;
        while millis < 2 * 365 * 86_400_000 {
            let window = Duration::from_millis(millis);
            assert_eq!(unit_for(window), by_log(window), "{window:?}");
            millis += millis / 7 + 1;
        }
    }

    #[test]
    fn cost_prefers_the_descriptor_and_reads_zero_as_a_dry_run() {
        assert_eq!(cost(None, 0), (1, false));
        assert_eq!(cost(None, 7), (7, false));
        assert_eq!(cost(Some(3), 7), (3, false));
        assert_eq!(cost(Some(0), 7), (1, true));
        assert_eq!(cost(Some(u64::MAX), 0), (u32::MAX, false));
    }

    #[test]
    fn bad_values_map_and_are_noted() {
        use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
        let policy = crate::config::load_str(
            r#"
            [tiers]
            names = ["free", "premium"]
            default = "free"
            [rules.api]
            window = "1m"
            limit = 5
            envoy = { match = { generic_key = "api" }, subject = "user_id", tier = "tier" }
            [quotas]
            period = "24h"
            "#,
            "test",
        )
        .unwrap_or_else(|err| panic!("a valid policy: {err}"))
        .policy;
        let descriptor = |user: &str, tier: &str| RateLimitDescriptor {
            entries: [("generic_key", "api"), ("user_id", user), ("tier", tier)]
                .into_iter()
                .map(|(key, value)| Entry {
                    key: key.to_owned(),
                    value: value.to_owned(),
                })
                .collect(),
            ..RateLimitDescriptor::default()
        };
        let map = |d: RateLimitDescriptor| {
            map_descriptor(&policy, &d, 0)
                .map(|m| (m.subject.len(), m.tier.to_owned(), m.untrusted.clone()))
        };
        use UntrustedValue::*;
        assert_eq!(
            map(descriptor("jo", "premium")),
            Some((2, "premium".into(), vec![]))
        );
        assert_eq!(map(descriptor("jo", "")), Some((2, "".into(), vec![])));
        assert_eq!(
            map(descriptor("jo", "gold")),
            Some((2, "".into(), vec![tier_unknown]))
        );
        assert_eq!(
            map(descriptor("", "free")),
            Some((0, "free".into(), vec![subject_empty]))
        );
        let long = "x".repeat(257);
        assert_eq!(
            map(descriptor(&long, "gold")),
            Some((257, "".into(), vec![subject_too_long, tier_unknown]))
        );
    }

    #[test]
    fn durations_keep_their_nanos() {
        let wire = wire_duration(Duration::from_millis(1_500));
        assert_eq!((wire.seconds, wire.nanos), (1, 500_000_000));
    }
}
