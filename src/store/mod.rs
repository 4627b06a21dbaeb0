//! Where counters live, behind one small trait.
//!
//! A [`Store`] makes each decision atomically: check and count happen in one
//! step, so concurrent callers (and, for Redis, concurrent tollgate
//! instances) can never both take the last hit. Stores see only validated
//! requests with limits already resolved for the caller's tier; which rule or
//! tier applies is the [`crate::limiter`]'s business.
//!
//! - [`memory`]: in-process, for one instance; the default.
//! - [`redis`]: Redis through Lua scripts, shared by every instance.
//! - [`breaker`]: a circuit breaker that wraps either.
//! - [`deny_cache`]: answers surely-denied checks locally; wraps any store.
//! - [`group`]: what deciding several limits at once promises.

use std::{future::Future, sync::Arc, time::Duration};

use crate::{
    rules::Algorithm,
    stats::{StatsBatch, StatsQuery, StatsReport},
};

pub use group::{GroupDecision, MAX_GROUP_CHECKS};

pub mod breaker;
pub mod deny_cache;
pub mod group;
pub mod memory;
mod memory_stats;
pub mod redis;

/// One rate-limit decision to make: may `subject` spend `cost` hits of `rule`?
#[derive(Debug, Clone, Copy)]
pub struct LimitCheck<'a> {
    /// The rule's name; with the algorithm and subject it names the counter.
    pub rule: &'a str,
    /// Whose counter: any bytes, 1 to 256 of them.
    pub subject: &'a str,
    /// How the window is counted.
    pub algorithm: Algorithm,
    /// Hits allowed per window for the caller's tier.
    pub limit: u64,
    /// The sliding window's length; at least one millisecond.
    pub window: Duration,
    /// Lock the subject out this long when it exceeds the limit.
    pub block_for: Option<Duration>,
    /// Hits this call spends; at least 1.
    pub cost: u64,
    /// Decide without counting anything (and without starting a block).
    pub dry_run: bool,
}

/// The store's answer to a [`LimitCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitDecision {
    /// Whether the hits were allowed (and, unless a dry run, counted).
    pub allowed: bool,
    /// Hits left in the window after this call.
    pub remaining: u64,
    /// Zero when allowed; else how long until `cost` hits fit or the block ends.
    pub retry_after: Duration,
    /// How long until the window holds no hits.
    pub reset_after: Duration,
    /// The subject is locked out.
    pub blocked: bool,
}

/// A store's answer to a call that carried a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Once<T> {
    /// The answer: this call's own, or the first one's when replayed.
    pub decision: T,
    /// The request id was already decided: `decision` is the first answer
    /// again, and nothing was counted.
    pub replayed: bool,
}

/// How many stored entries a sliding-log settle rewrites at most, besides
/// the settled call's own (see `lua/settle_log.lua`); both stores use it.
pub const SETTLE_REWRITES: u64 = 64;

/// Pay after use: the call counted with `request_id` now counts `actual`.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettle<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// Whose counter.
    pub subject: &'a str,
    /// How the rule counts now (a call counted under the other algorithm
    /// is not found).
    pub algorithm: Algorithm,
    /// The rule's window.
    pub window: Duration,
    /// The request id the call was counted with; never empty.
    pub request_id: &'a str,
    /// What the call counts from now on; 0 refunds it wholly.
    pub actual: u64,
}

/// Pay after use for a quota: the messages counted with `request_id` now
/// count `actual`.
#[derive(Debug, Clone, Copy)]
pub struct UsageSettle<'a> {
    /// The user.
    pub user_id: &'a str,
    /// The character.
    pub character_id: &'a str,
    /// The message kind.
    pub kind: &'a str,
    /// The request id the messages were counted with; never empty.
    pub request_id: &'a str,
    /// What the call counts from now on; 0 refunds it wholly.
    pub actual: u64,
}

/// Count `amount` messages of `kind` in one conversation, if within `limit`.
#[derive(Debug, Clone, Copy)]
pub struct UsageIncrement<'a> {
    /// The user; 1 to 256 bytes.
    pub user_id: &'a str,
    /// The character; 1 to 256 bytes.
    pub character_id: &'a str,
    /// The message kind.
    pub kind: &'a str,
    /// Messages to count; at least 1.
    pub amount: u64,
    /// The quota, or `None` for an unlimited tier (always allowed, still counted).
    pub limit: Option<u64>,
    /// Counters expire this long after the conversation's first counted message.
    pub period: Duration,
}

/// The store's answer to a [`UsageIncrement`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageDecision {
    /// Whether the messages were counted.
    pub allowed: bool,
    /// Messages of this kind counted in the conversation, after this call.
    pub used: u64,
    /// Time left until the conversation's counters reset; zero if none exist.
    pub resets_after: Duration,
}

/// The live counters of one conversation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationCounters {
    /// Messages counted per kind; kinds never counted are absent.
    pub used: Vec<(String, u64)>,
    /// Time left until the counters reset; zero if none exist.
    pub resets_after: Duration,
}

impl ConversationCounters {
    /// Messages counted of `kind`, 0 if none.
    pub fn used(&self, kind: &str) -> u64 {
        self.used
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(0, |(_, used)| *used)
    }
}

/// Which rate-limit counter to look at, without counting anything.
#[derive(Debug, Clone, Copy)]
pub struct LimitInspect<'a> {
    /// The rule's name.
    pub rule: &'a str,
    /// Whose counter.
    pub subject: &'a str,
    /// How the window is counted: which of the rule's counters is read.
    pub algorithm: Algorithm,
    /// The sliding window's length; at least one millisecond.
    pub window: Duration,
    /// The rule's lock-out, if it has one: a store reports a block as its
    /// own [`Store::check_limit`] would see it for this rule.
    pub block_for: Option<Duration>,
}

/// A rate-limit counter as it stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitUsage {
    /// Hits in the window now. For `sliding_counter`, the weighted estimate
    /// rounded up, so that `limit - used` is the `remaining` a check of
    /// cost 0 would report.
    pub used: u64,
    /// How long until the window holds no hits.
    pub reset_after: Duration,
    /// How long the subject stays locked out; `None` when it is not.
    pub blocked_for: Option<Duration>,
}

/// What an instance must forget because a counter was reset, by this
/// instance or by another one sharing the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetNotice {
    /// One subject's counters of one rule (every algorithm) were cleared.
    Limit {
        /// The rule's name.
        rule: String,
        /// The subject.
        subject: String,
    },
    /// Resets may have been missed (the channel that carries them broke):
    /// forget everything, and cache nothing until [`ResetNotice::Listening`].
    Deaf,
    /// The channel carries resets again; every reset from now on is heard.
    Listening,
}

/// Told of every [`ResetNotice`], on the task that hears it; must be quick
/// and must not block.
pub type ResetListener = Arc<dyn Fn(&ResetNotice) + Send + Sync>;

/// Why a store could not decide.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No answer within the configured store timeout.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store could not be reached or refused the connection.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The circuit breaker is open after repeated failures: the store was not
    /// asked. It lets a probe through again after the given time.
    #[error("store circuit breaker is open after repeated failures; next probe in {0:?}")]
    CircuitOpen(Duration),
    /// The store answered something tollgate does not understand (a bug, or
    /// a key overwritten by something else).
    #[error("unexpected reply from the store: {0}")]
    Protocol(String),
}

/// A place where counters live and decisions are made atomically.
///
/// Implementations must bound every call by their timeout and never panic on
/// any input that passed the [`crate::limiter`]'s validation.
pub trait Store: Send + Sync + 'static {
    /// Checks a rate limit and, when allowed and not a dry run, counts it.
    fn check_limit(
        &self,
        check: &LimitCheck<'_>,
    ) -> impl Future<Output = Result<LimitDecision, StoreError>> + Send;

    /// Decides several rate limits together, all or nothing: when every
    /// check is allowed, each is counted (unless its own dry run) and every
    /// decision says allowed; otherwise nothing at all is counted (no hit,
    /// no block started) and each decision is the check's own answer as a
    /// dry run would give it. Decisions come back one per check, in order.
    ///
    /// The limiter sends 1 to [`MAX_GROUP_CHECKS`] checks, no two on the
    /// same counter (rule and subject). With a `request_id`, a group whose
    /// id was already answered for the same first subject, within the
    /// longest of its checks' windows, gets that answer again, `replayed`,
    /// and counts nothing. See [`group`] for the contract.
    fn check_limits(
        &self,
        checks: &[LimitCheck<'_>],
        request_id: Option<&str>,
    ) -> impl Future<Output = Result<GroupDecision, StoreError>> + Send;

    /// Checks a usage quota and, when within it, counts the messages.
    fn increment_usage(
        &self,
        increment: &UsageIncrement<'_>,
    ) -> impl Future<Output = Result<UsageDecision, StoreError>> + Send;

    /// [`Self::check_limit`] remembered under `request_id` (never empty; never
    /// with a dry run) for one window: a request id already decided for
    /// this counter gets the first answer again and counts nothing. The
    /// lookup, the decision and the record are one atomic step.
    fn check_limit_once(
        &self,
        check: &LimitCheck<'_>,
        request_id: &str,
    ) -> impl Future<Output = Result<Once<LimitDecision>, StoreError>> + Send;

    /// Sets what a call counted by [`Self::check_limit_once`] counts; the
    /// hits left in its window (under the limit it was counted with), or
    /// `None` when its request id is unknown, expired or was denied.
    fn settle_limit(
        &self,
        settle: &LimitSettle<'_>,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// [`Self::increment_usage`] remembered under `request_id` (never empty)
    /// while the conversation's counters live.
    fn increment_usage_once(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: &str,
    ) -> impl Future<Output = Result<Once<UsageDecision>, StoreError>> + Send;

    /// Sets what messages counted by [`Self::increment_usage_once`] count;
    /// the kind's count after it, or `None` when the request id is unknown,
    /// expired or was denied.
    fn settle_usage(
        &self,
        settle: &UsageSettle<'_>,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// The live counters of one conversation (empty if it has none).
    fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> impl Future<Output = Result<ConversationCounters, StoreError>> + Send;

    /// Every conversation of `user_id` with live counters, sorted by
    /// character id, at most `max` of them.
    fn list_usage(
        &self,
        user_id: &str,
        max: usize,
    ) -> impl Future<Output = Result<Vec<(String, ConversationCounters)>, StoreError>> + Send;

    /// Adds one flush of usage statistics (see [`crate::stats`]): counts,
    /// distinct users and per-character totals of every bucket the batch
    /// touches, each bucket kept until its retention ends. Never called on
    /// a decision's path. A store that keeps no statistics (a test double)
    /// refuses.
    fn flush_stats(
        &self,
        batch: &StatsBatch,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = batch;
        std::future::ready(Err(no_statistics()))
    }

    /// The statistics of the buckets `query` names, and its top characters.
    fn read_stats(
        &self,
        query: &StatsQuery<'_>,
    ) -> impl Future<Output = Result<StatsReport, StoreError>> + Send {
        let _ = query;
        std::future::ready(Err(no_statistics()))
    }

    /// A rate-limit counter as it stands; reads only, counts nothing.
    fn inspect_limit(
        &self,
        inspect: &LimitInspect<'_>,
    ) -> impl Future<Output = Result<LimitUsage, StoreError>> + Send;

    /// Clears `subject`'s window of `rule` (under either algorithm, since an
    /// operator may have switched it) and any block; whether there was
    /// anything to clear. Stores shared by several instances announce the
    /// reset to each of them (see [`Store::on_reset`]).
    fn reset_limit(
        &self,
        rule: &str,
        subject: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the counters of one conversation of `user_id`, or of every
    /// conversation when `character_id` is `None`; a reset conversation is
    /// gone, from listings too. Returns how many had live counters.
    fn reset_usage(
        &self,
        user_id: &str,
        character_id: Option<&str>,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Registers `listener` to hear of limit resets made through any
    /// instance that shares this store. A store only this instance uses has
    /// nothing to announce and ignores it (the default); wrappers forward it.
    fn on_reset(&self, listener: ResetListener) {
        let _ = listener;
    }

    /// Succeeds when the store answers; drives the health service.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether a circuit breaker in this store is open, so calls are not
    /// reaching the backend; for metrics. Wrappers forward it.
    fn circuit_open(&self) -> bool {
        false
    }
}

fn no_statistics() -> StoreError {
    StoreError::Protocol("this store keeps no statistics".to_owned())
}
