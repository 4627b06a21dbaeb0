//! The limiting policy as domain types: tiers, rate-limit rules and usage
//! quotas.
//!
//! A [`Policy`] is built only by [`crate::config`], which validates it in
//! full: every tier is covered by every rule and kind, windows are positive,
//! names are plain. Code that holds a `Policy` can therefore index limits by
//! [`Tier`] without checking.

use std::{collections::BTreeMap, fmt, time::Duration};

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
}

impl Rule {
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
}

impl Quotas {
    /// How long a conversation's counters live after its first message.
    pub fn period(&self) -> Duration {
        self.period
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
            let block = rule
                .block_for
                .map_or("-".to_owned(), |d| humantime::format_duration(d).to_string());
            let _ = writeln!(
                out,
                " {:>16} {:>16} {:>16}",
                humantime::format_duration(rule.window).to_string(),
                block,
                rule.algorithm.as_str()
            );
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
