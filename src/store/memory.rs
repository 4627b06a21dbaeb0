//! The embedded store: the same decisions as the Redis scripts, made in
//! process, for a single tollgate instance. It is the default so that
//! tollgate runs anywhere with nothing else installed.
//!
//! State is split over shards, each behind a `std::sync::Mutex` rather than a
//! Tokio mutex: a decision is a few arithmetic operations and never waits, so
//! the lock is never held across an `.await`. Idle state is swept lazily:
//! each shard drops expired entries at most once per [`SWEEP_EVERY`], on its
//! next use.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    ConversationCounters, LimitCheck, LimitDecision, Store, StoreError, UsageDecision,
    UsageIncrement,
};
use crate::rules::Algorithm;

/// How often a shard drops state that has expired.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

const SHARDS: usize = 64;

/// Counters in this process's memory.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    clock: Clock,
    hasher: RandomState,
    limits: Box<[Mutex<Shard<LimitState>>]>,
    usage: Box<[Mutex<Shard<UserUsage>>]>,
}

/// Microseconds on a monotonic clock. Tests drive a manual one.
#[derive(Debug)]
enum Clock {
    System(Instant),
    Manual(Arc<AtomicU64>),
}

/// A clock that only moves when told to, for tests of the memory store.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(micros(by), Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Shard<T> {
    entries: HashMap<String, T>,
    next_sweep_us: u64,
}

impl<T> Shard<T> {
    fn many() -> Box<[Mutex<Self>]> {
        (0..SHARDS)
            .map(|_| {
                Mutex::new(Self {
                    entries: HashMap::new(),
                    next_sweep_us: 0,
                })
            })
            .collect()
    }
}

impl<T: Expiring> Shard<T> {
    fn sweep_if_due(&mut self, now: u64) {
        if now >= self.next_sweep_us {
            self.entries.retain(|_, entry| entry.is_live(now));
            self.next_sweep_us = now + micros(SWEEP_EVERY);
        }
    }
}

trait Expiring {
    /// Whether the entry still holds anything at `now`.
    fn is_live(&self, now: u64) -> bool;
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system's monotonic clock.
    pub fn new() -> Self {
        Self::with_clock(Clock::System(Instant::now()))
    }

    /// An empty store whose clock only moves when the returned handle says.
    pub fn with_manual_clock() -> (Self, ManualClock) {
        // Start well past zero so that "now - window" never underflows in a
        // way the system clock would not.
        let time = Arc::new(AtomicU64::new(1_000_000_000_000));
        (
            Self::with_clock(Clock::Manual(time.clone())),
            ManualClock(time),
        )
    }

    fn with_clock(clock: Clock) -> Self {
        Self {
            inner: Arc::new(Inner {
                clock,
                hasher: RandomState::new(),
                limits: Shard::many(),
                usage: Shard::many(),
            }),
        }
    }

    fn now(&self) -> u64 {
        match &self.inner.clock {
            Clock::System(epoch) => micros(epoch.elapsed()),
            Clock::Manual(time) => time.load(Ordering::SeqCst),
        }
    }

    fn shard<'a, T>(&self, shards: &'a [Mutex<Shard<T>>], key: &str) -> MutexGuard<'a, Shard<T>> {
        let index = (self.inner.hasher.hash_one(key) as usize) % shards.len();
        // A poisoned shard only means another thread panicked mid-update of
        // plain counters; the data is still usable, so carry on.
        shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Store for MemoryStore {
    async fn check_limit(&self, check: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        let now = self.now();
        let key = limit_key(check);
        let mut shard = self.shard(&self.inner.limits, &key);
        shard.sweep_if_due(now);
        let state = shard
            .entries
            .entry(key)
            .or_insert_with(|| LimitState::new(check.algorithm));
        Ok(state.decide(check, now))
    }

    async fn increment_usage(
        &self,
        increment: &UsageIncrement<'_>,
    ) -> Result<UsageDecision, StoreError> {
        let now = self.now();
        let mut shard = self.shard(&self.inner.usage, increment.user_id);
        shard.sweep_if_due(now);
        let user = shard
            .entries
            .entry(increment.user_id.to_owned())
            .or_default();
        Ok(user.increment(increment, now))
    }

    async fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> Result<ConversationCounters, StoreError> {
        let now = self.now();
        let shard = self.shard(&self.inner.usage, user_id);
        Ok(shard
            .entries
            .get(user_id)
            .and_then(|user| user.conversations.get(character_id))
            .filter(|conversation| conversation.is_live(now))
            .map(|conversation| conversation.counters(now))
            .unwrap_or_default())
    }

    async fn list_usage(
        &self,
        user_id: &str,
        max: usize,
    ) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
        let now = self.now();
        let shard = self.shard(&self.inner.usage, user_id);
        let Some(user) = shard.entries.get(user_id) else {
            return Ok(Vec::new());
        };
        Ok(user
            .conversations
            .iter()
            .filter(|(_, conversation)| conversation.is_live(now))
            .take(max)
            .map(|(character_id, conversation)| (character_id.clone(), conversation.counters(now)))
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Rule names never hold ':' (the config allows only `[a-z0-9_-]`) and the
/// subject comes last, so distinct (rule, algorithm, subject) never share a key.
fn limit_key(check: &LimitCheck<'_>) -> String {
    let algorithm = match check.algorithm {
        Algorithm::SlidingLog => "log",
        Algorithm::SlidingCounter => "ctr",
    };
    let mut key = String::with_capacity(check.rule.len() + check.subject.len() + 5);
    key.push_str(check.rule);
    key.push(':');
    key.push_str(algorithm);
    key.push(':');
    key.push_str(check.subject);
    key
}

// ---- Rate limits -----------------------------------------------------------

#[derive(Debug)]
struct LimitState {
    blocked_until: Option<u64>,
    /// Latest time (us) at which the counter still holds anything.
    live_until: u64,
    counter: Counter,
}

#[derive(Debug)]
enum Counter {
    /// Hits in the window, oldest first, as (time, hits at that time).
    Log(VecDeque<(u64, u64)>),
    /// Fixed-window counters: the window's index, its hits and the previous
    /// window's hits.
    Weighted {
        window_index: u64,
        current: u64,
        previous: u64,
    },
}

impl Expiring for LimitState {
    fn is_live(&self, now: u64) -> bool {
        now < self.live_until || self.blocked_until.is_some_and(|until| now < until)
    }
}

impl LimitState {
    fn new(algorithm: Algorithm) -> Self {
        let counter = match algorithm {
            Algorithm::SlidingLog => Counter::Log(VecDeque::new()),
            Algorithm::SlidingCounter => Counter::Weighted {
                window_index: 0,
                current: 0,
                previous: 0,
            },
        };
        Self {
            blocked_until: None,
            live_until: 0,
            counter,
        }
    }

    fn decide(&mut self, check: &LimitCheck<'_>, now: u64) -> LimitDecision {
        if let Some(until) = self.blocked_until.filter(|&until| now < until) {
            // Locked out: count nothing, only report when the window empties.
            let peek = self.count(
                &LimitCheck {
                    dry_run: true,
                    ..*check
                },
                now,
            );
            return LimitDecision {
                allowed: false,
                remaining: 0,
                retry_after: from_micros(until - now),
                reset_after: peek.reset_after,
                blocked: true,
            };
        }
        let mut decision = self.count(check, now);
        if check.dry_run {
            return decision;
        }
        if decision.allowed {
            self.live_until = now + micros(decision.reset_after);
        } else if let Some(block_for) = check.block_for {
            self.blocked_until = Some(now + micros(block_for));
            decision.blocked = true;
            decision.retry_after = block_for;
        }
        decision
    }

    fn count(&mut self, check: &LimitCheck<'_>, now: u64) -> LimitDecision {
        let window = micros(check.window).max(1);
        match &mut self.counter {
            Counter::Log(hits) => decide_log(hits, check, window, now),
            Counter::Weighted {
                window_index,
                current,
                previous,
            } => decide_weighted(window_index, current, previous, check, window, now),
        }
    }
}

/// The exact sliding log. A hit at time `t` leaves the window at `t + window`.
fn decide_log(
    hits: &mut VecDeque<(u64, u64)>,
    check: &LimitCheck<'_>,
    window: u64,
    now: u64,
) -> LimitDecision {
    if let Some(cutoff) = now.checked_sub(window) {
        while hits.front().is_some_and(|&(at, _)| at <= cutoff) {
            hits.pop_front();
        }
    }
    let count: u64 = hits.iter().map(|&(_, n)| n).sum();
    let until_empty = |hits: &VecDeque<(u64, u64)>| {
        hits.back()
            .map_or(0, |&(newest, _)| (newest + window).saturating_sub(now))
    };
    if count + check.cost <= check.limit {
        if !check.dry_run {
            hits.push_back((now, check.cost));
        }
        return LimitDecision {
            allowed: true,
            remaining: check.limit - count - check.cost,
            retry_after: Duration::ZERO,
            reset_after: from_micros(until_empty(hits)),
            blocked: false,
        };
    }
    let reset_after = until_empty(hits);
    let retry_after = if check.cost > check.limit {
        // It can never fit; the best answer is when the window is empty.
        reset_after
    } else {
        // The hits that must leave before `cost` more fit, oldest first.
        let must_leave = count + check.cost - check.limit;
        let mut left = 0;
        hits.iter()
            .find(|&&(_, n)| {
                left += n;
                left >= must_leave
            })
            .map_or(reset_after, |&(at, _)| (at + window).saturating_sub(now))
    };
    LimitDecision {
        allowed: false,
        remaining: check.limit.saturating_sub(count),
        retry_after: from_micros(retry_after),
        reset_after: from_micros(reset_after),
        blocked: false,
    }
}

/// The sliding counter: `previous * (window - elapsed) / window + current`.
fn decide_weighted(
    window_index: &mut u64,
    current: &mut u64,
    previous: &mut u64,
    check: &LimitCheck<'_>,
    window: u64,
    now: u64,
) -> LimitDecision {
    let index = now / window;
    if *window_index + 1 == index {
        *previous = *current;
        *current = 0;
    } else if *window_index != index {
        *previous = 0;
        *current = 0;
    }
    *window_index = index;
    let elapsed = now - index * window;
    let (w, e) = (window as f64, elapsed as f64);
    let (prev, cur) = (*previous as f64, *current as f64);
    let (limit, cost) = (check.limit as f64, check.cost as f64);
    let estimate = prev * (w - e) / w + cur;

    if estimate + cost <= limit {
        if !check.dry_run {
            *current += check.cost;
        }
        return LimitDecision {
            allowed: true,
            remaining: (limit - estimate - cost).floor().max(0.0) as u64,
            retry_after: Duration::ZERO,
            reset_after: from_micros(weighted_reset(*current, *previous, window, elapsed)),
            blocked: false,
        };
    }
    let reset_after = weighted_reset(*current, *previous, window, elapsed);
    // The same float expressions, in the same order, as
    // lua/sliding_counter.lua, so both stores round alike.
    let retry_after = if *current + check.cost <= check.limit {
        // Fits later in this window, once enough of `previous` has slid out
        // (denied although `current` leaves room, so `previous` > 0).
        (w - (limit - cost - cur) * w / prev - e).ceil().max(0.0) as u64
    } else if check.cost <= check.limit {
        // Fits only once `current` has become `previous` and decayed enough.
        (2.0 * w - e - (limit - cost) * w / cur).ceil().max(0.0) as u64
    } else {
        // It can never fit; the best answer is when the window is empty.
        reset_after
    };
    LimitDecision {
        allowed: false,
        remaining: (limit - estimate).floor().max(0.0) as u64,
        retry_after: from_micros(retry_after),
        reset_after: from_micros(reset_after),
        blocked: false,
    }
}

/// Time until the estimate reaches zero.
fn weighted_reset(current: u64, previous: u64, window: u64, elapsed: u64) -> u64 {
    if current > 0 {
        2 * window - elapsed
    } else if previous > 0 {
        window - elapsed
    } else {
        0
    }
}

// ---- Usage quotas ------------------------------------------------------------

#[derive(Debug, Default)]
struct UserUsage {
    /// By character id, so listing comes out sorted.
    conversations: BTreeMap<String, Conversation>,
}

#[derive(Debug)]
struct Conversation {
    expires_at: u64,
    used: Vec<(String, u64)>,
}

impl Expiring for UserUsage {
    fn is_live(&self, now: u64) -> bool {
        self.conversations.values().any(|c| c.is_live(now))
    }
}

impl Conversation {
    fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    fn counters(&self, now: u64) -> ConversationCounters {
        ConversationCounters {
            used: self.used.clone(),
            resets_after: from_micros(self.expires_at.saturating_sub(now)),
        }
    }
}

impl UserUsage {
    fn increment(&mut self, increment: &UsageIncrement<'_>, now: u64) -> UsageDecision {
        self.conversations.retain(|_, c| c.is_live(now));
        let existing = self.conversations.get(increment.character_id);
        let used = existing.map_or(0, |c| {
            c.used
                .iter()
                .find(|(kind, _)| kind == increment.kind)
                .map_or(0, |(_, n)| *n)
        });
        let over = increment
            .limit
            .is_some_and(|limit| used.saturating_add(increment.amount) > limit);
        if over {
            return UsageDecision {
                allowed: false,
                used,
                resets_after: from_micros(existing.map_or(0, |c| c.expires_at - now)),
            };
        }
        let conversation = self
            .conversations
            .entry(increment.character_id.to_owned())
            .or_insert_with(|| Conversation {
                expires_at: now + micros(increment.period),
                used: Vec::new(),
            });
        let used = match conversation
            .used
            .iter_mut()
            .find(|(kind, _)| kind == increment.kind)
        {
            Some((_, n)) => {
                *n = n.saturating_add(increment.amount);
                *n
            }
            None => {
                conversation
                    .used
                    .push((increment.kind.to_owned(), increment.amount));
                increment.amount
            }
        };
        UsageDecision {
            allowed: true,
            used,
            resets_after: from_micros(conversation.expires_at - now),
        }
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn from_micros(us: u64) -> Duration {
    Duration::from_micros(us)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(algorithm: Algorithm, limit: u64, window_ms: u64) -> LimitCheck<'static> {
        LimitCheck {
            rule: "r",
            subject: "s",
            algorithm,
            limit,
            window: Duration::from_millis(window_ms),
            block_for: None,
            cost: 1,
            dry_run: false,
        }
    }

    async fn hit(store: &MemoryStore, check: &LimitCheck<'_>, times: u32) -> Vec<bool> {
        let mut allowed = Vec::new();
        for _ in 0..times {
            allowed.push(store.check_limit(check).await.expect("memory").allowed);
        }
        allowed
    }

    #[tokio::test]
    async fn sliding_log_slides() {
        // The issue's example: 4 per 2 s.
        let (store, clock) = MemoryStore::with_manual_clock();
        let rule = check(Algorithm::SlidingLog, 4, 2000);
        assert_eq!(hit(&store, &rule, 2).await, [true, true]);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(hit(&store, &rule, 3).await, [true, true, false]);
        let denied = store.check_limit(&rule).await.expect("memory");
        assert_eq!(denied.retry_after, Duration::from_millis(500));
        assert_eq!(denied.reset_after, Duration::from_millis(2000));
        clock.advance(Duration::from_millis(700));
        assert_eq!(hit(&store, &rule, 3).await, [true, true, false]);
    }

    #[tokio::test]
    async fn sliding_counter_weights_the_previous_window() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let rule = check(Algorithm::SlidingCounter, 10, 1000);
        // Align to a window start so the weights are round numbers.
        let now = store.now();
        clock.advance(Duration::from_micros(1_000_000 - now % 1_000_000));
        assert_eq!(
            hit(&store, &rule, 11).await.iter().filter(|a| **a).count(),
            10
        );
        // Half-way through the next window, half the previous one counts.
        clock.advance(Duration::from_millis(1500));
        let allowed = hit(&store, &rule, 6).await;
        assert_eq!(allowed, [true, true, true, true, true, false]);
        let denied = store.check_limit(&rule).await.expect("memory");
        // 5 previous * 0.5 + 5 current = 10: one more fits once 1 previous
        // hit's worth (0.1 of the window) has slid out.
        assert_eq!(denied.retry_after, Duration::from_millis(100));
    }

    #[tokio::test]
    async fn block_locks_out_until_it_ends() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let rule = LimitCheck {
            block_for: Some(Duration::from_secs(60)),
            ..check(Algorithm::SlidingLog, 2, 1000)
        };
        assert_eq!(hit(&store, &rule, 2).await, [true, true]);
        let first_denial = store.check_limit(&rule).await.expect("memory");
        assert!(first_denial.blocked);
        assert_eq!(first_denial.retry_after, Duration::from_secs(60));
        clock.advance(Duration::from_secs(30));
        let during = store.check_limit(&rule).await.expect("memory");
        assert!(during.blocked && !during.allowed);
        assert_eq!(during.retry_after, Duration::from_secs(30));
        clock.advance(Duration::from_secs(30));
        assert_eq!(hit(&store, &rule, 1).await, [true]);
    }

    #[tokio::test]
    async fn idle_state_is_swept() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let rule = check(Algorithm::SlidingLog, 5, 1000);
        hit(&store, &rule, 1).await;
        let held = || -> usize {
            let now = store.now();
            store
                .inner
                .limits
                .iter()
                .map(|shard| {
                    let mut shard = shard.lock().expect("not poisoned");
                    shard.sweep_if_due(now);
                    shard.entries.len()
                })
                .sum()
        };
        assert_eq!(held(), 1, "a live entry survives a sweep");
        clock.advance(SWEEP_EVERY + Duration::from_secs(1));
        assert_eq!(held(), 0, "an expired entry is dropped");
    }
}
