//! The limiting policy as domain types: tiers, rate-limit rules and usage
//! quotas.
//!
//! A [`Policy`] is built only by [`crate::config`], which validates it in
//! full: every tier is covered by every rule and kind, windows are positive,
//! names are plain. Code that holds a `Policy` can therefore index limits by
//! [`Tier`] without checking.

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

/// A subscription tier, as an index into [`Tiers::names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tier(pub(crate) usize);

/// The configured tiers and which one applies when a request names none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tiers {
    pub(crate) names: Vec<String>,
    pub(crate) default: Tier,
}

impl Tiers {
    /// The tier a request names, or the default tier for an empty name.
    pub fn resolve(&self, name: &str) -> Option<Tier> {
        if name.is_empty() {
            return Some(self.default);
        }
        self.names.iter().position(|n| n == name).map(Tier)
    }

    /// Every tier name, in configuration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The name of `tier`.
    pub fn name(&self, tier: Tier) -> &str {
        &self.names[tier.0]
    }

    /// The tier used when a request names none.
    pub fn default_tier(&self) -> Tier {
        self.default
    }
}

/// How a rule counts hits inside its sliding window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Exact: one stored entry per counted hit inside the window.
    SlidingLog,
    /// Constant memory: the current and previous fixed-window counters, the
    /// previous one weighted by how much of it the sliding window still
    /// covers. It assumes the previous window's hits were spread evenly, so
    /// it can deny early when they came early and admit more when they came
    /// late: in the worst case (every hit of the previous window at its very
    /// end) a true sliding window can hold up to `2 * limit - 1` hits.
    SlidingCounter,
}

impl Algorithm {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::SlidingLog => "sliding_log",
            Algorithm::SlidingCounter => "sliding_counter",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named sliding-window rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub(crate) name: String,
    pub(crate) window: Duration,
    /// Hits per window, indexed by [`Tier`].
    pub(crate) limits: Vec<u64>,
    pub(crate) block_for: Option<Duration>,
    pub(crate) algorithm: Algorithm,
    pub(crate) envoy: Option<EnvoyMatch>,
    pub(crate) on_store_error: FailureMode,
    /// Counted as if enforced, but never denies (see [`Rule::shadow`]).
    pub(crate) shadow: bool,
    /// The `RateLimit-Policy` item per [`Tier`], built once with the policy
    /// ([`crate::headers::policy_item`]): it changes only on reload.
    pub(crate) ratelimit_policy: Vec<Arc<str>>,
}

/// What to answer, marked `degraded`, when the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Let the call through: availability over strictness.
    Allow,
    /// Refuse the call: strictness over availability (lockout rules).
    Deny,
}

impl FailureMode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Allow => "allow",
            FailureMode::Deny => "deny",
        }
    }
}

impl Rule {
    /// What to answer when the store fails.
    pub fn on_store_error(&self) -> FailureMode {
        self.on_store_error
    }

    /// The rule's name, as callers send it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The length of the sliding window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Hits allowed per window for `tier`.
    pub fn limit(&self, tier: Tier) -> u64 {
        self.limits[tier.0]
    }

    /// How long a subject is locked out after exceeding the limit, if at all.
    pub fn block_for(&self) -> Option<Duration> {
        self.block_for
    }

    /// How the rule counts.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Which Envoy rate-limit descriptors the rule applies to, if any.
    pub fn envoy(&self) -> Option<&EnvoyMatch> {
        self.envoy.as_ref()
    }

    /// A shadow rule: the store counts and decides exactly as if it were
    /// enforced (a would-be denial counts nothing, and a `block_for` block
    /// starts), but the limiter answers every call allowed, marking a
    /// would-be denial `shadowed`. Turning it off enforces the same window.
    pub fn shadow(&self) -> bool {
        self.shadow
    }

    /// The `RateLimit-Policy` header item for `tier`, e.g.
    /// `"api";q=100;w=900`.
    pub fn ratelimit_policy(&self, tier: Tier) -> &Arc<str> {
        &self.ratelimit_policy[tier.0]
    }
}

/// Which rate-limit headers the Envoy door adds to responses
/// (`[envoy] headers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyHeaders {
    /// `RateLimit-Policy` and `RateLimit` as draft-ietf-httpapi-ratelimit-headers-11
    /// writes them: `"draft-11"`, the default.
    Draft11,
    /// None: `"none"`.
    None,
}

impl EnvoyHeaders {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            EnvoyHeaders::Draft11 => "draft-11",
            EnvoyHeaders::None => "none",
        }
    }
}

/// How an Envoy rate-limit descriptor maps onto a [`Rule`]: the entries it
/// must hold, and which of its entries carry the subject and the tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyMatch {
    /// `(key, value)` pairs the descriptor must all hold; never empty.
    pub(crate) entries: Vec<(String, String)>,
    pub(crate) subject: String,
    pub(crate) tier: Option<String>,
}

impl EnvoyMatch {
    /// The `(key, value)` entries a descriptor must all hold, sorted by key.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// The key of the descriptor entry whose value is the subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The key of the descriptor entry whose value names the tier; without
    /// it (or without that entry) the default tier applies.
    pub fn tier(&self) -> Option<&str> {
        self.tier.as_deref()
    }

    /// Whether a descriptor with these `(key, value)` entries holds every
    /// entry of the match.
    pub fn matches<'a>(
        &self,
        descriptor: impl Iterator<Item = (&'a str, &'a str)> + Clone,
    ) -> bool {
        self.entries.iter().all(|(key, value)| {
            descriptor
                .clone()
                .any(|(k, v)| k == key.as_str() && v == value.as_str())
        })
    }
}

/// A tier's quota for one message kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    /// At most this many messages per conversation and period.
    Limited(u64),
    /// Counted but never denied (the premium bypass).
    Unlimited,
}

impl Quota {
    /// The limit, or `None` when unlimited.
    pub fn limit(self) -> Option<u64> {
        match self {
            Quota::Limited(limit) => Some(limit),
            Quota::Unlimited => None,
        }
    }
}

/// One message kind (text, audio, image, ...) and its quota per tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kind {
    pub(crate) name: String,
    /// Indexed by [`Tier`].
    pub(crate) quotas: Vec<Quota>,
}

impl Kind {
    /// The kind's name, as callers send it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The quota of `tier` for this kind.
    pub fn quota(&self, tier: Tier) -> Quota {
        self.quotas[tier.0]
    }
}

/// Per-conversation message quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quotas {
    /// Counters reset this long after a conversation's first counted message.
    pub(crate) period: Duration,
    /// Sorted by name, the order GetUsage reports them in.
    pub(crate) kinds: Vec<Kind>,
    /// What IncrementUsage answers when the store fails.
    pub(crate) on_store_error: FailureMode,
}

impl Quotas {
    /// How long a conversation's counters live after its first message.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// What IncrementUsage answers when the store fails.
    pub fn on_store_error(&self) -> FailureMode {
        self.on_store_error
    }

    /// Every kind, sorted by name.
    pub fn kinds(&self) -> &[Kind] {
        &self.kinds
    }

    /// The kind called `name`.
    pub fn kind(&self, name: &str) -> Option<&Kind> {
        self.kinds.iter().find(|k| k.name == name)
    }
}

/// Everything that decides an answer: tiers, rules and quotas. Process
/// settings (addresses, store URL) live apart, in [`crate::config::Settings`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub(crate) tiers: Tiers,
    pub(crate) rules: BTreeMap<String, Rule>,
    pub(crate) quotas: Quotas,
    pub(crate) envoy_domain: String,
    pub(crate) envoy_headers: EnvoyHeaders,
}

impl Policy {
    /// The configured tiers.
    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// The rule called `name`.
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.get(name)
    }

    /// Every rule, by name.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.values()
    }

    /// The message quotas.
    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    /// The Envoy rate-limit domain tollgate answers for; requests for other
    /// domains are allowed without counting.
    pub fn envoy_domain(&self) -> &str {
        &self.envoy_domain
    }

    /// Which rate-limit headers the Envoy door adds to its responses.
    pub fn envoy_headers(&self) -> EnvoyHeaders {
        self.envoy_headers
    }
}

impl Policy {
    /// A readable table of the effective rules and quotas per tier, as
    /// `tollgate check-config` prints it.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let tiers = self.tiers.names();
        let mut out = String::new();
        let header = |out: &mut String, first: &str, extra: &[&str]| {
            let _ = write!(out, "{first:<16}");
            for tier in tiers {
                let _ = write!(out, " {tier:>12}");
            }
            for column in extra {
                let _ = write!(out, " {column:>16}");
            }
            out.push('\n');
        };
        let _ = writeln!(
            out,
            "tiers: {} (default: {})\n",
            tiers.join(", "),
            self.tiers.name(self.tiers.default)
        );
        header(&mut out, "rule", &["window", "block_for", "algorithm"]);
        for rule in self.rules() {
            let _ = write!(out, "{:<16}", rule.name);
            for limit in &rule.limits {
                let _ = write!(out, " {limit:>12}");
            }
            let block = rule.block_for.map_or("-".to_owned(), |d| {
                humantime::format_duration(d).to_string()
            });
            let _ = writeln!(
                out,
                " {:>16} {:>16} {:>16}{}",
                humantime::format_duration(rule.window).to_string(),
                block,
                rule.algorithm.as_str(),
                if rule.shadow { " (shadow)" } else { "" }
            );
        }
        let _ = writeln!(
            out,
            "\nenvoy: domain {:?}; descriptor -> rule (first by name)",
            self.envoy_domain
        );
        for rule in self.rules() {
            let Some(envoy) = &rule.envoy else { continue };
            let _ = write!(out, "{:<16} ", rule.name);
            for (key, value) in &envoy.entries {
                let _ = write!(out, "{key}={value} ");
            }
            let _ = write!(out, "subject={}", envoy.subject);
            if let Some(tier) = &envoy.tier {
                let _ = write!(out, " tier={tier}");
            }
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "\nquotas per conversation, reset {} after its first message:",
            humantime::format_duration(self.quotas.period)
        );
        header(&mut out, "kind", &[]);
        for kind in self.quotas.kinds() {
            let _ = write!(out, "{:<16}", kind.name);
            for quota in &kind.quotas {
                let cell = match quota {
                    Quota::Limited(n) => n.to_string(),
                    Quota::Unlimited => "unlimited".to_owned(),
                };
                let _ = write!(out, " {cell:>12}");
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> Policy {
        crate::config::load_str(toml, "test")
            .unwrap_or_else(|err| panic!("a valid policy: {err}"))
            .policy
    }

    const TOML: &str = r#"
        [tiers]
        names = ["free", "premium"]
        [rules.api]
        window = "15m"
        limit = { free = 100, premium = 1000 }
        [rules.trial]
        window = "1500ms"
        limit = 2
        shadow = true
        [quotas]
        period = "24h"
    "#;

    #[test]
    fn policy_values_are_built_per_tier_with_the_rule() {
        let policy = policy(TOML);
        let tiers = policy.tiers();
        let api = policy.rule("api").expect("api is configured");
        let at = |name| tiers.resolve(name).expect("a configured tier");
        assert_eq!(&**api.ratelimit_policy(at("free")), r#""api";q=100;w=900"#);
        assert_eq!(
            &**api.ratelimit_policy(at("premium")),
            r#""api";q=1000;w=900"#
        );
        let trial = policy.rule("trial").expect("trial is configured");
        assert_eq!(&**trial.ratelimit_policy(at("free")), r#""trial";q=2;w=2"#);
        assert!(trial.shadow() && !api.shadow());
        assert_eq!(policy.envoy_headers(), EnvoyHeaders::Draft11);
    }

    #[test]
    fn the_summary_marks_shadow_rules() {
        let summary = policy(TOML).summary();
        let line = |rule: &str| {
            summary
                .lines()
                .find(|l| l.starts_with(rule))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line("trial").ends_with(" (shadow)"), "{summary}");
        assert!(!line("api ").contains("shadow"), "{summary}");
    }
}
