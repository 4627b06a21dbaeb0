//! The product: validates a request against the [`Policy`], resolves the
//! caller's tier, and asks the [`Store`] for an atomic decision.
//!
//! gRPC is one door into the limiter ([`crate::service`]); anything else that
//! speaks to it (an Envoy rate-limit door, a benchmark) goes through the same
//! checks.

use std::{borrow::Cow, fmt::Write as _, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use sha2::{Digest as _, Sha256};

mod group;

pub use group::{GroupOutcome, MAX_GROUP_REQUEST_ID_BYTES};

use crate::{
    metrics::{Metrics, Operation, Outcome, PolicyCounters},
    rules::{FailureMode, Policy, Quota, Tier},
    stats::{Decided, Granularity, Stats, StatsClock, StatsQuery, StatsReport, StatsSettings},
    store::{
        ConversationCounters, LimitCheck, LimitDecision, LimitInspect, LimitSettle, LimitUsage,
        Once, Store, StoreError, UsageIncrement, UsageSettle,
    },
};

/// The longest subject, user id or character id accepted, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// The longest request id accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// Sits between the head of an over-long subject and the hex SHA-256 of the
/// whole value in its digested form (see [`untrusted_subject`]).
pub const DIGEST_MARK: &str = "#sha256:";

/// The subject a value from an untrusted caller is counted under: the value
/// itself when at most [`MAX_ID_BYTES`] (empty included), else a digest of
/// the whole value, so that no value is refused.
///
/// The digested form is the value's first [`MAX_ID_BYTES`] bytes (cut back
/// to a character boundary, so 253 to 256 bytes), then [`DIGEST_MARK`], then
/// the 64 hex digits of the SHA-256 of the whole value: 325 to 328 bytes.
/// - No subject counted as sent can equal a digested one: every subject
///   counted as sent, through either door, is at most [`MAX_ID_BYTES`] long,
///   every digested one longer. So a value that merely looks like a digest
///   (`…#sha256:<hex>`, at most 256 bytes) is its own subject, and a longer
///   one is digested again, never taken for the value it digests.
/// - Two digested subjects are equal exactly when their digests are (the
///   digest is the fixed-length tail, and the head follows from the value):
///   equal values share a counter, different values would need a SHA-256
///   collision to.
/// - The head keeps counters readable in `redis-cli`; the key length stays
///   bounded whatever the value's length.
pub fn untrusted_subject(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_ID_BYTES {
        return Cow::Borrowed(value);
    }
    // Index 0 is a boundary, so the loop ends; it runs at most 3 times.
    let mut head = MAX_ID_BYTES;
    while !value.is_char_boundary(head) {
        head -= 1;
    }
    let digest = Sha256::digest(value.as_bytes());
    let mut subject = String::with_capacity(head + DIGEST_MARK.len() + 2 * digest.len());
    subject.push_str(&value[..head]);
    subject.push_str(DIGEST_MARK);
    for byte in digest {
        // Writing to a String cannot fail.
        let _ = write!(subject, "{byte:02x}");
    }
    Cow::Owned(subject)
}

/// The `retry_after` of a degraded denial: the store is down, so there is
/// no window to compute from; this asks callers to back off briefly.
pub const DEGRADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The most conversations one ListUsage reports, so that no caller can make
/// one request arbitrarily expensive.
pub const MAX_LISTED_CONVERSATIONS: usize = 1000;

/// Why the limiter could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is malformed.
    #[error("{field}: {problem}")]
    InvalidArgument {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A rule, tier or kind that is not configured.
    #[error("{field}: unknown {what} {name:?}; known: {known}")]
    Unknown {
        /// The offending field, as named in the proto.
        field: &'static str,
        /// "rule", "tier" or "kind".
        what: &'static str,
        /// The name the caller sent.
        name: String,
        /// The configured names, comma-separated.
        known: String,
    },
    /// The store failed; the request may be retried.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// One check of a CheckLimits group is malformed: its own error, with
    /// the field named `checks[<index>].<field>`.
    #[error("checks[{index}].{error}")]
    InCheck {
        /// The check's place in the group, from 0.
        index: usize,
        /// What is wrong with it: an [`Error::InvalidArgument`] or
        /// [`Error::Unknown`].
        error: Box<Error>,
    },
}

/// A validated CheckLimit question, before tier and rule are resolved.
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckRequest<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// Who is counted.
    pub subject: &'a str,
    /// The tier's name; empty for the default tier.
    pub tier: &'a str,
    /// Hits to spend; 0 means 1.
    pub cost: u32,
    /// Decide without counting.
    pub dry_run: bool,
    /// Retries with the same id within the window get the first answer
    /// again and count nothing; empty: none. Ignored by a dry run, which
    /// counts nothing to protect.
    pub request_id: &'a str,
}

/// The answer to a [`CheckRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The rule's limit for the caller's tier.
    pub limit: u64,
    /// The store's decision, or the rule's failure mode when degraded; for
    /// a shadow rule always allowed, the store's other figures kept.
    pub decision: LimitDecision,
    /// The store failed; the decision is the rule's `on_store_error`.
    pub degraded: bool,
    /// The request id was already decided: this is the first answer again.
    pub replayed: bool,
    /// A shadow rule would have denied (the store denied, or, degraded, the
    /// rule's `on_store_error` is deny); `decision.allowed` is true.
    pub shadowed: bool,
    /// The rule's `RateLimit-Policy` item for the caller's tier, built with
    /// the policy that decided.
    pub ratelimit_policy: Arc<str>,
}

impl CheckOutcome {
    /// How `tollgate_decisions_total` counts this answer.
    fn counted_as(&self) -> Outcome {
        if self.degraded {
            Outcome::degraded
        } else if self.shadowed {
            Outcome::shadow_denied
        } else if self.decision.blocked {
            Outcome::blocked
        } else if self.decision.allowed {
            Outcome::allowed
        } else {
            Outcome::denied
        }
    }
}

/// An IncrementUsage question.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncrementRequest<'a> {
    /// The user.
    pub user_id: &'a str,
    /// The character.
    pub character_id: &'a str,
    /// The message kind's name.
    pub kind: &'a str,
    /// The tier's name; empty for the default tier.
    pub tier: &'a str,
    /// Messages to count; 0 means 1.
    pub amount: u32,
    /// Retries with the same id, while the conversation's counters live,
    /// get the first answer again and count nothing; empty: none.
    pub request_id: &'a str,
}

/// The answer to an [`IncrementRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncrementOutcome {
    /// Whether the messages were counted.
    pub allowed: bool,
    /// The tier's quota for the kind.
    pub quota: Quota,
    /// Messages of the kind counted so far, after this call (0 when
    /// degraded: unknown).
    pub used: u64,
    /// Time until the conversation's counters reset.
    pub resets_after: Duration,
    /// The store failed; `allowed` is the quotas' `on_store_error`.
    pub degraded: bool,
    /// The request id was already decided: this is the first answer again.
    pub replayed: bool,
}

/// A SettleLimit question: the call counted with `request_id` now costs
/// `actual_cost`.
#[derive(Debug, Clone, Copy, Default)]
pub struct SettleRequest<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// Whose counter.
    pub subject: &'a str,
    /// The id the call was counted with.
    pub request_id: &'a str,
    /// What it costs from now on; 0 refunds it.
    pub actual_cost: u32,
}

/// A SettleUsage question: the messages counted with `request_id` now
/// count `actual_amount`.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageSettleRequest<'a> {
    /// The user.
    pub user_id: &'a str,
    /// The character.
    pub character_id: &'a str,
    /// The message kind's name.
    pub kind: &'a str,
    /// The id the messages were counted with.
    pub request_id: &'a str,
    /// What they count from now on; 0 refunds them.
    pub actual_amount: u32,
}

/// A rate-limit counter as InspectLimit reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InspectOutcome {
    /// The rule's limit for the tier asked about.
    pub limit: u64,
    /// The counter as the store reads it.
    pub usage: LimitUsage,
}

impl InspectOutcome {
    /// Hits left in the window now: `limit - used`, not after one more hit.
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.usage.used)
    }
}

/// One kind's counter, as GetUsage and ListUsage report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindUsage {
    /// The kind's name.
    pub kind: String,
    /// Messages counted.
    pub used: u64,
    /// The tier's quota for the kind.
    pub quota: Quota,
    /// Time until the conversation's counters reset.
    pub resets_after: Duration,
}

impl KindUsage {
    /// Messages left, or `None` when unlimited.
    pub fn remaining(&self) -> Option<u64> {
        self.quota
            .limit()
            .map(|limit| limit.saturating_sub(self.used))
    }
}

/// Validates requests and asks the store for decisions.
///
/// The policy can be replaced while requests are in flight (hot reload):
/// each request reads it once, so it is decided wholly by the old policy or
/// wholly by the new one. Counters are keyed by rule and subject, never by
/// limit, so a reload keeps them and a changed limit applies to the next
/// decision.
#[derive(Debug)]
pub struct Limiter<S> {
    store: S,
    in_force: ArcSwap<InForce>,
    metrics: Arc<Metrics>,
    /// Usage statistics, or `None` when `stats.enabled` is false.
    stats: Option<Arc<Stats>>,
}

/// The policy in force and its metric counters, replaced together, so that
/// a request counts into the counters of the policy that decided it.
#[derive(Debug)]
struct InForce {
    policy: Arc<Policy>,
    counters: PolicyCounters,
}

impl InForce {
    fn new(policy: Arc<Policy>, metrics: &Arc<Metrics>) -> Arc<Self> {
        let counters = metrics.counters_for(&policy);
        Arc::new(Self { policy, counters })
    }
}

impl<S: Store> Limiter<S> {
    /// A limiter enforcing `policy` with counters in `store`, and usage
    /// statistics with the default settings.
    pub fn new(store: S, policy: Arc<Policy>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let stats = Arc::new(Stats::new(
            StatsSettings::default(),
            metrics.stats_dropped(),
        ));
        Self {
            store,
            in_force: ArcSwap::new(InForce::new(policy, &metrics)),
            metrics,
            stats: Some(stats),
        }
    }

    /// Records into `metrics` instead of a private set.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        let policy = self.policy();
        self.in_force = ArcSwap::new(InForce::new(policy, &metrics));
        self.metrics = metrics;
        if let Some(stats) = self.stats.take() {
            self = self.with_stats_clock(*stats.settings(), stats.clock().clone());
        }
        self
    }

    /// Keeps usage statistics as `settings` say (none when disabled), on
    /// the system clock.
    pub fn with_stats(self, settings: StatsSettings) -> Self {
        self.with_stats_clock(settings, StatsClock::System)
    }

    /// Keeps usage statistics as `settings` say, on `clock`.
    pub fn with_stats_clock(mut self, settings: StatsSettings, clock: StatsClock) -> Self {
        self.stats = settings.enabled.then(|| {
            Arc::new(Stats::with_clock(
                settings,
                clock,
                self.metrics.stats_dropped(),
            ))
        });
        self
    }

    /// The usage statistics, unless disabled.
    pub fn stats(&self) -> Option<&Arc<Stats>> {
        self.stats.as_ref()
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.in_force.load().policy)
    }

    /// Puts `policy` in force for every request that starts from now on.
    pub fn replace_policy(&self, policy: Arc<Policy>) {
        self.in_force.store(InForce::new(policy, &self.metrics));
    }

    /// The store behind the limiter.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The metrics the limiter records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Decides whether `request.subject` may spend `cost` hits of the rule.
    /// A store failure is an error: callers that must not degrade (the Envoy
    /// door, where Envoy's own `failure_mode_deny` decides) use this.
    pub async fn check_limit(&self, request: CheckRequest<'_>) -> Result<CheckOutcome, Error> {
        self.check(request, false, Trust::Trusted).await
    }

    /// Like [`Self::check_limit`], for a door whose values come from clients
    /// that cannot be told of a bad one (the Envoy door, where an error lets
    /// the request through): no subject or tier value is an error. The
    /// subject is counted under [`untrusted_subject`] of it, and an unknown
    /// tier is the default tier. An unknown rule is still an error: rules
    /// come from the door's own mapping, not from the client.
    pub async fn check_limit_untrusted(
        &self,
        request: CheckRequest<'_>,
    ) -> Result<CheckOutcome, Error> {
        self.check(request, false, Trust::Untrusted).await
    }

    /// Like [`Self::check_limit`], but a store failure is answered by the
    /// rule's `on_store_error`, marked `degraded`. Bad input is still an error.
    pub async fn check_limit_or_degrade(
        &self,
        request: CheckRequest<'_>,
    ) -> Result<CheckOutcome, Error> {
        self.check(request, true, Trust::Trusted).await
    }

    async fn check(
        &self,
        request: CheckRequest<'_>,
        degrade: bool,
        trust: Trust,
    ) -> Result<CheckOutcome, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        let subject = match trust {
            Trust::Trusted => {
                validate_id("subject", request.subject)?;
                Cow::Borrowed(request.subject)
            }
            Trust::Untrusted => untrusted_subject(request.subject),
        };
        let rule = policy.rule(request.rule).ok_or_else(|| Error::Unknown {
            field: "rule",
            what: "rule",
            name: request.rule.to_owned(),
            known: join(policy.rules().map(|r| r.name())),
        })?;
        let tier = match trust {
            Trust::Trusted => resolve_tier(policy, request.tier)?,
            Trust::Untrusted => {
                let tiers = policy.tiers();
                tiers
                    .resolve(request.tier)
                    .unwrap_or_else(|| tiers.default_tier())
            }
        };
        let request_id = validate_request_id(request.request_id, request.dry_run)?;
        let limit = rule.limit(tier);
        let check = LimitCheck {
            rule: rule.name(),
            subject: &subject,
            algorithm: rule.algorithm(),
            limit,
            window: rule.window(),
            block_for: rule.block_for(),
            cost: u64::from(request.cost.max(1)),
            dry_run: request.dry_run,
        };
        // Boxed: the store's future (the deny cache's, the breaker's and
        // Redis's, about 2.7 KB) would otherwise be a part of every future
        // above it, down to tonic's, and be copied with each of them; boxed,
        // it is copied once.
        let decided = self
            .metrics
            .store_call(
                Operation::check_limit,
                Box::pin(async {
                    match request_id {
                        Some(id) => self.store.check_limit_once(&check, id).await,
                        None => self.store.check_limit(&check).await.map(|decision| Once {
                            decision,
                            replayed: false,
                        }),
                    }
                }),
            )
            .await;
        let mut outcome = match decided {
            Ok(Once { decision, replayed }) => CheckOutcome {
                limit,
                decision,
                degraded: false,
                replayed,
                shadowed: false,
                ratelimit_policy: Arc::clone(rule.ratelimit_policy(tier)),
            },
            Err(err) if degrade => {
                tracing::debug!(error = %err, rule = rule.name(), "store failed; degraded answer");
                let allowed = rule.on_store_error() == FailureMode::Allow;
                CheckOutcome {
                    limit,
                    decision: LimitDecision {
                        allowed,
                        remaining: 0,
                        retry_after: if allowed {
                            Duration::ZERO
                        } else {
                            DEGRADED_RETRY_AFTER
                        },
                        reset_after: Duration::ZERO,
                        blocked: false,
                    },
                    degraded: true,
                    replayed: false,
                    shadowed: false,
                    ratelimit_policy: Arc::clone(rule.ratelimit_policy(tier)),
                }
            }
            Err(err) => return Err(err.into()),
        };
        // After the store (and its deny cache) answered, so that a cached
        // denial of a shadow rule is allowed too; the store's figures stay.
        if rule.shadow() && !outcome.decision.allowed {
            outcome.decision.allowed = true;
            outcome.shadowed = true;
        }
        // A replay is the first answer again, already counted once (as
        // CheckLimits does for a replayed group).
        if outcome.replayed {
            return Ok(outcome);
        }
        in_force
            .counters
            .decision(rule.name(), tier, outcome.counted_as());
        Ok(outcome)
    }

    /// Counts `amount` messages of `kind` in a conversation, if within quota.
    /// A store failure is answered by the quotas' `on_store_error`, marked
    /// `degraded`.
    pub async fn increment_usage(
        &self,
        request: IncrementRequest<'_>,
    ) -> Result<IncrementOutcome, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        validate_id("user_id", request.user_id)?;
        validate_id("character_id", request.character_id)?;
        let tier = resolve_tier(policy, request.tier)?;
        let quotas = policy.quotas();
        let kind = quotas.kind(request.kind).ok_or_else(|| Error::Unknown {
            field: "kind",
            what: "kind",
            name: request.kind.to_owned(),
            known: join(quotas.kinds().iter().map(|k| k.name())),
        })?;
        let request_id = validate_request_id(request.request_id, false)?;
        let quota = kind.quota(tier);
        let increment = UsageIncrement {
            user_id: request.user_id,
            character_id: request.character_id,
            kind: kind.name(),
            amount: u64::from(request.amount.max(1)),
            limit: quota.limit(),
            period: quotas.period(),
        };
        let decided = self
            .metrics
            // Boxed, as in `check`.
            .store_call(
                Operation::increment_usage,
                Box::pin(async {
                    match request_id {
                        Some(id) => self.store.increment_usage_once(&increment, id).await,
                        None => self
                            .store
                            .increment_usage(&increment)
                            .await
                            .map(|decision| Once {
                                decision,
                                replayed: false,
                            }),
                    }
                }),
            )
            .await;
        let outcome = match decided {
            Ok(Once { decision, replayed }) => IncrementOutcome {
                allowed: decision.allowed,
                quota,
                used: decision.used,
                resets_after: decision.resets_after,
                degraded: false,
                replayed,
            },
            Err(err) => {
                tracing::debug!(error = %err, "store failed; degraded answer");
                IncrementOutcome {
                    allowed: quotas.on_store_error() == FailureMode::Allow,
                    quota,
                    used: 0,
                    resets_after: Duration::ZERO,
                    degraded: true,
                    replayed: false,
                }
            }
        };
        // A replay is the first answer again, already counted once.
        if outcome.replayed {
            return Ok(outcome);
        }
        // A degraded answer is not a decision about usage (the store did
        // not count anything), so statistics leave it out.
        if let Some(stats) = &self.stats
            && !outcome.degraded
        {
            let decided = if outcome.allowed {
                Decided::Counted(u64::from(request.amount.max(1)))
            } else {
                Decided::Denied
            };
            stats.record(request.user_id, request.character_id, kind.name(), decided);
        }
        let counted_as = match (outcome.degraded, outcome.allowed) {
            (true, _) => Outcome::degraded,
            (false, true) => Outcome::allowed,
            (false, false) => Outcome::denied,
        };
        in_force.counters.increment(kind.name(), counted_as);
        Ok(outcome)
    }

    /// Pay after use: the call counted with `request.request_id` now costs
    /// `actual_cost`. The hits left in its window (under the limit it was
    /// counted with), or `None` when the id is unknown, expired or was
    /// denied. A store failure is an error: there is no answer to degrade to.
    pub async fn settle_limit(&self, request: SettleRequest<'_>) -> Result<Option<u64>, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        validate_id("subject", request.subject)?;
        let rule = policy.rule(request.rule).ok_or_else(|| Error::Unknown {
            field: "rule",
            what: "rule",
            name: request.rule.to_owned(),
            known: join(policy.rules().map(|r| r.name())),
        })?;
        let request_id = required_request_id(request.request_id)?;
        Ok(self
            .metrics
            .store_call(
                Operation::settle_limit,
                self.store.settle_limit(&LimitSettle {
                    rule: rule.name(),
                    subject: request.subject,
                    algorithm: rule.algorithm(),
                    window: rule.window(),
                    request_id,
                    actual: u64::from(request.actual_cost),
                }),
            )
            .await?)
    }

    /// Pay after use on a quota: the messages counted with
    /// `request.request_id` now count `actual_amount`. The kind's count
    /// after it, or `None` when the id is unknown, expired or was denied.
    pub async fn settle_usage(
        &self,
        request: UsageSettleRequest<'_>,
    ) -> Result<Option<u64>, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        validate_id("user_id", request.user_id)?;
        validate_id("character_id", request.character_id)?;
        let quotas = policy.quotas();
        let kind = quotas.kind(request.kind).ok_or_else(|| Error::Unknown {
            field: "kind",
            what: "kind",
            name: request.kind.to_owned(),
            known: join(quotas.kinds().iter().map(|k| k.name())),
        })?;
        let request_id = required_request_id(request.request_id)?;
        Ok(self
            .metrics
            .store_call(
                Operation::settle_usage,
                self.store.settle_usage(&UsageSettle {
                    user_id: request.user_id,
                    character_id: request.character_id,
                    kind: kind.name(),
                    request_id,
                    actual: u64::from(request.actual_amount),
                }),
            )
            .await?)
    }

    /// Every configured kind's counter in one conversation.
    pub async fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
        tier: &str,
    ) -> Result<Vec<KindUsage>, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        validate_id("user_id", user_id)?;
        validate_id("character_id", character_id)?;
        let tier = resolve_tier(policy, tier)?;
        let counters = self
            .metrics
            .store_call(
                Operation::get_usage,
                self.store.get_usage(user_id, character_id),
            )
            .await?;
        Ok(kind_usages(policy, &counters, tier))
    }

    /// Every conversation of `user_id` with live counters, by character id.
    pub async fn list_usage(
        &self,
        user_id: &str,
        tier: &str,
    ) -> Result<Vec<(String, Vec<KindUsage>)>, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        validate_id("user_id", user_id)?;
        let tier = resolve_tier(policy, tier)?;
        let conversations = self
            .metrics
            .store_call(
                Operation::list_usage,
                self.store.list_usage(user_id, MAX_LISTED_CONVERSATIONS),
            )
            .await?;
        Ok(conversations
            .into_iter()
            .map(|(character_id, counters)| {
                let usage = kind_usages(policy, &counters, tier);
                (character_id, usage)
            })
            .collect())
    }
}

/// A GetStats question, validated by [`Limiter::get_stats`].
#[derive(Debug, Clone, Copy)]
pub struct StatsRequest<'a> {
    /// The size of the buckets.
    pub granularity: Granularity,
    /// How many, ending with the current one; 0 means 1.
    pub buckets: u32,
    /// Empty: every character.
    pub character_id: &'a str,
    /// Also rank this many characters of the current bucket.
    pub top_characters: u32,
}

/// The most characters GetStats ranks.
pub const MAX_TOP_CHARACTERS: u32 = 100;

impl<S: Store> Limiter<S> {
    /// The statistics of the last `buckets` buckets, oldest first, every
    /// configured kind present in each (0 included), and the top
    /// characters of the current one. `Ok(None)` when statistics are
    /// disabled.
    pub async fn get_stats(&self, request: StatsRequest<'_>) -> Result<Option<StatsReport>, Error> {
        let Some(stats) = &self.stats else {
            return Ok(None);
        };
        let retention = stats.settings().retention.buckets(request.granularity);
        let buckets = request.buckets.max(1);
        if buckets > retention {
            return Err(Error::InvalidArgument {
                field: "buckets",
                problem: format!(
                    "{buckets} is more than the {retention} {:?} buckets kept (stats retention)",
                    request.granularity
                ),
            });
        }
        if request.top_characters > MAX_TOP_CHARACTERS {
            return Err(Error::InvalidArgument {
                field: "top_characters",
                problem: format!(
                    "must be at most {MAX_TOP_CHARACTERS}, got {}",
                    request.top_characters
                ),
            });
        }
        if request.character_id.len() > MAX_ID_BYTES {
            return Err(Error::InvalidArgument {
                field: "character_id",
                problem: format!(
                    "must be at most {MAX_ID_BYTES} bytes, got {}",
                    request.character_id.len()
                ),
            });
        }
        let now = stats.clock().now();
        let current = request.granularity.start_of(now);
        let size = request.granularity.seconds();
        let starts = (0..i64::from(buckets))
            .rev()
            .map(|back| current - back * size)
            .collect();
        let query = StatsQuery {
            granularity: request.granularity,
            starts,
            character_id: (!request.character_id.is_empty()).then_some(request.character_id),
            top: request.top_characters as usize,
            now,
        };
        let mut report = self
            .metrics
            .store_call(Operation::read_stats, self.store.read_stats(&query))
            .await?;
        // Every configured kind, and only those: a kind removed from the
        // config is no longer reported.
        let policy = self.policy();
        let kinds = policy.quotas().kinds();
        for bucket in &mut report.buckets {
            for figures in [&mut bucket.messages, &mut bucket.denials] {
                figures.retain(|kind, _| kinds.iter().any(|k| k.name() == kind));
                for kind in kinds {
                    figures.entry(kind.name().to_owned()).or_insert(0);
                }
            }
        }
        Ok(Some(report))
    }

    /// Writes the statistics recorded since the last flush to the store;
    /// on failure they wait for the next flush. Nothing to do when
    /// statistics are disabled.
    pub async fn flush_stats(&self) -> Result<(), StoreError> {
        let Some(stats) = &self.stats else {
            return Ok(());
        };
        let batch = stats.take();
        if batch.is_empty() {
            return Ok(());
        }
        match self
            .metrics
            .store_call(Operation::flush_stats, self.store.flush_stats(&batch))
            .await
        {
            Ok(()) => Ok(()),
            Err(err) => {
                stats.keep(batch);
                Err(err)
            }
        }
    }
}

/// The admin door's questions: look at a counter, clear one. Validated by
/// the same rules as CheckLimit and IncrementUsage; the store is asked
/// directly, with no degraded answer: an operator wants to know it failed.
impl<S: Store> Limiter<S> {
    /// `subject`'s counter of `rule` as it stands, with the limit of
    /// `tier` (empty: the default tier). Counts nothing.
    pub async fn inspect_limit(
        &self,
        rule: &str,
        subject: &str,
        tier: &str,
    ) -> Result<InspectOutcome, Error> {
        let _in_flight = self.metrics.in_flight();
        let policy = self.policy();
        validate_id("subject", subject)?;
        let rule = known_rule(&policy, rule)?;
        let tier = resolve_tier(&policy, tier)?;
        let usage = self
            .store
            .inspect_limit(&LimitInspect {
                rule: rule.name(),
                subject,
                algorithm: rule.algorithm(),
                window: rule.window(),
                block_for: rule.block_for(),
            })
            .await?;
        Ok(InspectOutcome {
            limit: rule.limit(tier),
            usage,
        })
    }

    /// Clears `subject`'s window of `rule` and any block, on every instance
    /// that shares the store; whether there was anything to clear.
    pub async fn reset_limit(&self, rule: &str, subject: &str) -> Result<bool, Error> {
        let _in_flight = self.metrics.in_flight();
        let policy = self.policy();
        validate_id("subject", subject)?;
        let rule = known_rule(&policy, rule)?;
        Ok(self.store.reset_limit(rule.name(), subject).await?)
    }

    /// Deletes one conversation's counters, or every conversation's when
    /// `character_id` is empty; how many had live counters.
    pub async fn reset_usage(&self, user_id: &str, character_id: &str) -> Result<u32, Error> {
        let _in_flight = self.metrics.in_flight();
        validate_id("user_id", user_id)?;
        let character_id = if character_id.is_empty() {
            None
        } else {
            validate_id("character_id", character_id)?;
            Some(character_id)
        };
        Ok(self.store.reset_usage(user_id, character_id).await?)
    }
}

fn known_rule<'p>(policy: &'p Policy, name: &str) -> Result<&'p crate::rules::Rule, Error> {
    policy.rule(name).ok_or_else(|| Error::Unknown {
        field: "rule",
        what: "rule",
        name: name.to_owned(),
        known: join(policy.rules().map(|r| r.name())),
    })
}

/// Whether a request's values come from a caller that can be told of a
/// bad one (an INVALID_ARGUMENT) or not (see
/// [`Limiter::check_limit_untrusted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trust {
    Trusted,
    Untrusted,
}

fn kind_usages(policy: &Policy, counters: &ConversationCounters, tier: Tier) -> Vec<KindUsage> {
    policy
        .quotas()
        .kinds()
        .iter()
        .map(|kind| KindUsage {
            kind: kind.name().to_owned(),
            used: counters.used(kind.name()),
            quota: kind.quota(tier),
            resets_after: counters.resets_after,
        })
        .collect()
}

fn resolve_tier(policy: &Policy, name: &str) -> Result<Tier, Error> {
    let tiers = policy.tiers();
    tiers.resolve(name).ok_or_else(|| Error::Unknown {
        field: "tier",
        what: "tier",
        name: name.to_owned(),
        known: join(tiers.names().iter().map(String::as_str)),
    })
}

fn validate_id(field: &'static str, id: &str) -> Result<(), Error> {
    let problem = if id.is_empty() {
        "must not be empty".to_owned()
    } else if id.len() > MAX_ID_BYTES {
        format!("must be at most {MAX_ID_BYTES} bytes, got {}", id.len())
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument { field, problem })
}

/// A request id to remember, if any: at most [`MAX_REQUEST_ID_BYTES`];
/// empty, or with a dry run (which counts nothing to protect), none.
fn validate_request_id(id: &str, dry_run: bool) -> Result<Option<&str>, Error> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::InvalidArgument {
            field: "request_id",
            problem: format!(
                "must be at most {MAX_REQUEST_ID_BYTES} bytes, got {}",
                id.len()
            ),
        });
    }
    Ok((!id.is_empty() && !dry_run).then_some(id))
}

/// The request id a settle names: required.
fn required_request_id(id: &str) -> Result<&str, Error> {
    validate_request_id(id, false)?.ok_or_else(|| Error::InvalidArgument {
        field: "request_id",
        problem: "must not be empty: a settle names the call it settles".to_owned(),
    })
}

fn join<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_up_to_the_limit_are_counted_as_sent() {
        for value in ["", "jo", &"x".repeat(MAX_ID_BYTES)] {
            assert!(matches!(untrusted_subject(value), Cow::Borrowed(v) if v == value));
        }
    }

    #[test]
    fn longer_subjects_are_their_head_and_the_digest_of_the_whole() {
        let value = "x".repeat(MAX_ID_BYTES + 1);
        let subject = untrusted_subject(&value);
        // The SHA-256 of 257 times "x".
        let digest = format!("{:x}", Sha256::digest(value.as_bytes()));
        assert_eq!(subject, format!("{}#sha256:{digest}", "x".repeat(256)));
        assert_eq!(untrusted_subject(&value), subject, "deterministic");
        // Same head, another tail: another subject.
        let other = format!("{}y", "x".repeat(MAX_ID_BYTES));
        assert_ne!(untrusted_subject(&other), subject);
    }

    #[test]
    fn a_head_never_splits_a_character() {
        // "é" is two bytes, after one "x": byte 256 falls inside one.
        let value = format!("x{}", "é".repeat(200));
        let subject = untrusted_subject(&value);
        let head = subject.split('#').next().unwrap_or_default();
        assert_eq!(head.len(), 255);
        assert_eq!(subject.len(), 255 + DIGEST_MARK.len() + 64);
    }

    #[test]
    fn no_value_is_confused_with_the_digest_of_another() {
        let long = "a".repeat(1000);
        let digested = untrusted_subject(&long).into_owned();
        // Every digested subject is longer than any subject counted as
        // sent, the shortest head included: 253 bytes, when a 4-byte
        // character starts there.
        let shortest = untrusted_subject(&format!("x{}", "😀".repeat(100))).into_owned();
        assert_eq!(shortest.len(), 253 + DIGEST_MARK.len() + 64);
        assert!(shortest.len() > MAX_ID_BYTES);
        // The digested form sent as a value is over-long itself: digested
        // again, it is another subject.
        assert_ne!(untrusted_subject(&digested), digested);
        // A value that ends like the digest, short enough to be counted as
        // sent, is its own subject.
        let lookalike = &digested[digested.len() - 72..];
        assert!(lookalike.starts_with(DIGEST_MARK));
        assert_eq!(untrusted_subject(lookalike), lookalike);
        assert_ne!(untrusted_subject(lookalike), digested);
        // As long as allowed and digest-shaped: still itself.
        let padded = format!("{}{lookalike}", "a".repeat(MAX_ID_BYTES - 72));
        assert_eq!(untrusted_subject(&padded), padded);
        assert_ne!(untrusted_subject(&padded), digested);
    }
}
