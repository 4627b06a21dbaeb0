//! The embedded store: the same decisions as the Redis scripts, made in
//! process, for a single tollgate instance. It is the default so that
//! tollgate runs anywhere with nothing else installed.
//!
//! State is split over shards, each behind a `std::sync::Mutex` rather than a
//! Tokio mutex: a decision is a few arithmetic operations and never waits, so
//! the lock is never held across an `.await`. Idle state is swept lazily:
//! each shard drops expired entries at most once per [`SWEEP_EVERY`], on its
//! next use.
//!
//! **Bounded.** The store holds at most [`MemoryOptions::max_entries`]
//! entries: one per (rule, subject) counter, however many hits its log
//! holds, plus one per (user, character) conversation, counted together.
//! A new entry past the cap evicts the least recently used entry of its own
//! shard: an approximate LRU, as Redis's `allkeys-lru` is, but a close one,
//! since each shard's oldest is the oldest of a random 1/64 of the store.
//! The count is store-wide, so the cap holds exactly except that a shard
//! never evicts the very entry it is deciding on: a shard holding nothing
//! else may be one entry over until the next insertion elsewhere evicts.
//! A remembered request id (see [`Store::check_limit_once`]) counts as one
//! more entry, for as long as it is remembered.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hashlink::LinkedHashMap;
use prometheus_client::metrics::counter::Counter as EvictionCounter;

use super::{
    ConversationCounters, GroupDecision, LimitCheck, LimitDecision, LimitInspect, LimitSettle,
    LimitUsage, Once, SETTLE_REWRITES, Store, StoreError, UsageDecision, UsageIncrement,
    UsageSettle, memory_stats::MemoryStats,
};
use crate::{
    rules::Algorithm,
    stats::{StatsBatch, StatsQuery, StatsReport},
};

/// How often a shard drops state that has expired.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The default of `store.max_entries`. A counter of the shipped `api` rule
/// with one hit costs 184 bytes of resident memory and a conversation 203
/// (measured: README, "Stores"), so 4 million entries hold about 800 MB,
/// leaving room for longer logs within about 1 GB.
pub const DEFAULT_MAX_ENTRIES: usize = 4_000_000;

/// How many live lock-outs an eviction passes over, from the least recently
/// used end, before it evicts one all the same. Evicting a blocked subject
/// ends its lock-out early; passing over a few keeps that to shards that
/// hold little else, and bounds the work of one eviction.
const PASS_OVER_BLOCKED: usize = 8;

const SHARDS: usize = 64;

mod group;

/// How the memory store bounds itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    /// The most entries held at once, rate-limit counters and conversations
    /// together; past it the least recently used is evicted. At least 1.
    pub max_entries: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

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
    /// CheckLimits answers remembered by request_id.
    groups: Mutex<group::GroupRecords>,
    budget: Arc<Budget>,
    /// Usage statistics: flushed once a second per instance, never on a
    /// decision's path, so one lock is enough.
    stats: Mutex<MemoryStats>,
}

/// The store-wide entry count against `store.max_entries`.
#[derive(Debug)]
struct Budget {
    max: usize,
    held: AtomicUsize,
    evictions: EvictionCounter,
}

impl Budget {
    fn add(&self, entries: usize) {
        self.held.fetch_add(entries, Ordering::Relaxed);
    }

    fn release(&self, entries: usize) {
        if entries > 0 {
            self.held.fetch_sub(entries, Ordering::Relaxed);
        }
    }

    fn over(&self) -> bool {
        self.held.load(Ordering::Relaxed) > self.max
    }

    fn evicted(&self, entries: usize) {
        self.release(entries);
        self.evictions.inc_by(entries as u64);
    }
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
    /// Least recently used first: a use moves an entry to the back.
    entries: LinkedHashMap<String, T, RandomState>,
    next_sweep_us: u64,
    budget: Arc<Budget>,
}

impl<T> Shard<T> {
    fn many(count: usize, budget: &Arc<Budget>) -> Box<[Mutex<Self>]> {
        (0..count)
            .map(|_| {
                Mutex::new(Self {
                    // SipHash with a random key, as std's HashMap: subjects
                    // are chosen by callers, so no crafted set of them may
                    // pile up in one bucket.
                    entries: LinkedHashMap::with_hasher(RandomState::new()),
                    next_sweep_us: 0,
                    budget: Arc::clone(budget),
                })
            })
            .collect()
    }
}

impl<T: Entry> Shard<T> {
    fn sweep_if_due(&mut self, now: u64) {
        if now >= self.next_sweep_us {
            let mut freed = 0;
            self.entries.retain(|_, entry| {
                let before = entry.weight();
                let live = entry.expire(now);
                freed += before - if live { entry.weight() } else { 0 };
                live
            });
            self.budget.release(freed);
            self.next_sweep_us = now.saturating_add(micros(SWEEP_EVERY));
        }
    }

    /// Evicts least recently used entries other than `current` while the
    /// store is over its cap; false if this shard has nothing else to give.
    fn evict_for(&mut self, current: &str, now: u64) -> bool {
        while self.budget.over() {
            match self.evict_one(current, now) {
                Some(evicted) => self.budget.evicted(evicted.weight()),
                None => return false,
            }
        }
        true
    }

    /// Removes the least recently used entry that is neither `current` nor
    /// protected, looking at most [`PASS_OVER_BLOCKED`] entries past the
    /// first; failing that, the least recently used other than `current`.
    fn evict_one(&mut self, current: &str, now: u64) -> Option<T> {
        let mut cursor = self.entries.cursor_front_mut();
        for _ in 0..=PASS_OVER_BLOCKED {
            let victim = match cursor.current() {
                None => break,
                Some((key, entry)) => key != current && !entry.protected(now),
            };
            if victim {
                return cursor.current_entry().ok().map(|entry| entry.remove());
            }
            cursor.move_next();
        }
        let mut cursor = self.entries.cursor_front_mut();
        if cursor.current().is_some_and(|(key, _)| key == current) {
            cursor.move_next();
        }
        cursor.current_entry().ok().map(|entry| entry.remove())
    }
}

/// What a shard holds, as the sweep and the cap see it.
trait Entry {
    /// Drops what has expired by `now`; whether anything is left.
    fn expire(&mut self, now: u64) -> bool;
    /// How many entries of `store.max_entries` this counts for.
    fn weight(&self) -> usize;
    /// Whether an eviction should pass over this entry if it can.
    fn protected(&self, _now: u64) -> bool {
        false
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store on the system's monotonic clock, with the default
    /// cap and an eviction counter of its own.
    pub fn new() -> Self {
        Self::with_options(MemoryOptions::default(), EvictionCounter::default())
    }

    /// An empty store on the system's monotonic clock, bounded by
    /// `options`, counting what it evicts in `evictions` (the
    /// `tollgate_store_evictions_total` handle from
    /// [`crate::metrics::Metrics::store_evictions`]).
    pub fn with_options(options: MemoryOptions, evictions: EvictionCounter) -> Self {
        Self::build(Clock::System(Instant::now()), options, evictions, SHARDS)
    }

    /// An empty store whose clock only moves when the returned handle says.
    pub fn with_manual_clock() -> (Self, ManualClock) {
        let (clock, handle) = manual_clock();
        (
            Self::build(
                clock,
                MemoryOptions::default(),
                EvictionCounter::default(),
                SHARDS,
            ),
            handle,
        )
    }

    fn build(
        clock: Clock,
        options: MemoryOptions,
        evictions: EvictionCounter,
        shards: usize,
    ) -> Self {
        let budget = Arc::new(Budget {
            max: options.max_entries.max(1),
            held: AtomicUsize::new(0),
            evictions,
        });
        Self {
            inner: Arc::new(Inner {
                clock,
                hasher: RandomState::new(),
                limits: Shard::many(shards, &budget),
                usage: Shard::many(shards, &budget),
                groups: Mutex::default(),
                budget,
                stats: Mutex::default(),
            }),
        }
    }

    /// Entries held now, counters and conversations together, swept or not.
    pub fn entries(&self) -> usize {
        self.inner.budget.held.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        match &self.inner.clock {
            Clock::System(epoch) => micros(epoch.elapsed()),
            Clock::Manual(time) => time.load(Ordering::SeqCst),
        }
    }

    fn shard<'a, T>(&self, shards: &'a [Mutex<Shard<T>>], key: &str) -> MutexGuard<'a, Shard<T>> {
        lock_shard(&shards[self.shard_index(shards, key)])
    }

    fn shard_index<T>(&self, shards: &[Mutex<Shard<T>>], key: &str) -> usize {
        (self.inner.hasher.hash_one(key) as usize) % shards.len()
    }
}

/// A poisoned shard only means another thread panicked mid-update of plain
/// counters; the data is still usable, so carry on.
fn lock_shard<T>(shard: &Mutex<Shard<T>>) -> MutexGuard<'_, Shard<T>> {
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryStore {
    /// One rate-limit decision, remembered under `request_id` when given.
    fn decide_limit(
        &self,
        check: &LimitCheck<'_>,
        request_id: Option<&str>,
    ) -> Once<LimitDecision> {
        let key = limit_key(check);
        let mut shard = self.shard(&self.inner.limits, &key);
        // Read under the lock, so that one counter's log is in time order.
        let now = self.now();
        shard.sweep_if_due(now);
        if let Some(state) = shard.entries.to_back(&key) {
            let before = state.weight();
            let once = state.decide_once(check, request_id, now);
            let after = state.weight();
            if after > before {
                shard.budget.add(after - before);
                shard.evict_for(&key, now);
            } else {
                shard.budget.release(before - after);
            }
            return once;
        }
        // A new counter is kept only if the call left something in it: a
        // dry run or a plain denial of an unknown subject costs no entry.
        let mut state = LimitState::new(check.algorithm);
        let once = state.decide_once(check, request_id, now);
        if state.is_live(now) {
            shard.budget.add(state.weight());
            // Before it is in: the new counter is never the one evicted.
            shard.evict_for(&key, now);
            shard.entries.insert(key, state);
        }
        once
    }

    /// One usage check-and-count, remembered under `request_id` when given.
    fn increment(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: Option<&str>,
    ) -> Once<UsageDecision> {
        let mut shard = self.shard(&self.inner.usage, increment.user_id);
        let now = self.now();
        shard.sweep_if_due(now);
        let (once, before, after) = match shard.entries.to_back(increment.user_id) {
            Some(user) => {
                let before = user.weight();
                let once = user.increment(increment, request_id, now);
                (once, before, user.weight())
            }
            None => {
                let mut user = UserUsage::default();
                let once = user.increment(increment, request_id, now);
                let after = user.weight();
                if !user.conversations.is_empty() {
                    shard.entries.insert(increment.user_id.to_owned(), user);
                }
                (once, 0, after)
            }
        };
        if after <= before {
            shard.budget.release(before - after);
        } else {
            shard.budget.add(after - before);
            if !shard.evict_for(increment.user_id, now) {
                // The user holds the whole shard: the cap is kept with
                // their own other conversations.
                let Shard {
                    entries, budget, ..
                } = &mut *shard;
                if let Some(user) = entries.get_mut(increment.user_id) {
                    while budget.over() {
                        match user.evict_other(increment.character_id) {
                            Some(weight) => budget.evicted(weight),
                            None => break,
                        }
                    }
                }
            }
        }
        once
    }
}

fn manual_clock() -> (Clock, ManualClock) {
    // Start well past zero so that "now - window" never underflows in a
    // way the system clock would not.
    let time = Arc::new(AtomicU64::new(1_000_000_000_000));
    (Clock::Manual(time.clone()), ManualClock(time))
}

impl Store for MemoryStore {
    async fn check_limit(&self, check: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        Ok(self.decide_limit(check, None).decision)
    }

    async fn check_limit_once(
        &self,
        check: &LimitCheck<'_>,
        request_id: &str,
    ) -> Result<Once<LimitDecision>, StoreError> {
        // A dry run keeps no record, as in the scripts.
        let request_id = Some(request_id).filter(|_| !check.dry_run);
        Ok(self.decide_limit(check, request_id))
    }

    async fn settle_limit(&self, settle: &LimitSettle<'_>) -> Result<Option<u64>, StoreError> {
        let key = key_of(settle.rule, settle.algorithm, settle.subject);
        let mut shard = self.shard(&self.inner.limits, &key);
        let now = self.now();
        Ok(shard
            .entries
            .to_back(&key)
            .and_then(|state| state.settle(settle, now)))
    }

    async fn check_limits(
        &self,
        checks: &[LimitCheck<'_>],
        request_id: Option<&str>,
    ) -> Result<GroupDecision, StoreError> {
        Ok(self.decide_group(checks, request_id))
    }

    async fn increment_usage(
        &self,
        increment: &UsageIncrement<'_>,
    ) -> Result<UsageDecision, StoreError> {
        Ok(self.increment(increment, None).decision)
    }

    async fn increment_usage_once(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: &str,
    ) -> Result<Once<UsageDecision>, StoreError> {
        Ok(self.increment(increment, Some(request_id)))
    }

    async fn settle_usage(&self, settle: &UsageSettle<'_>) -> Result<Option<u64>, StoreError> {
        let mut shard = self.shard(&self.inner.usage, settle.user_id);
        let now = self.now();
        Ok(shard
            .entries
            .to_back(settle.user_id)
            .and_then(|user| user.conversations.get_mut(settle.character_id))
            .filter(|conversation| conversation.is_live(now))
            .and_then(|conversation| conversation.settle(settle)))
    }

    async fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> Result<ConversationCounters, StoreError> {
        let now = self.now();
        // A read is a use, as it is for Redis's LRU.
        let mut shard = self.shard(&self.inner.usage, user_id);
        Ok(shard
            .entries
            .to_back(user_id)
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
        let mut shard = self.shard(&self.inner.usage, user_id);
        let Some(user) = shard.entries.to_back(user_id) else {
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

    async fn flush_stats(&self, batch: &StatsBatch) -> Result<(), StoreError> {
        lock(&self.inner.stats).flush(batch);
        Ok(())
    }

    async fn read_stats(&self, query: &StatsQuery<'_>) -> Result<StatsReport, StoreError> {
        Ok(lock(&self.inner.stats).read(query))
    }

    /// A read that is not a use: inspecting leaves the LRU order alone.
    async fn inspect_limit(&self, inspect: &LimitInspect<'_>) -> Result<LimitUsage, StoreError> {
        let key = key_of(inspect.rule, inspect.algorithm, inspect.subject);
        let shard = self.shard(&self.inner.limits, &key);
        let now = self.now();
        Ok(shard
            .entries
            .get(&key)
            .map(|state| state.inspect(micros(inspect.window).max(1), now))
            .unwrap_or_default())
    }

    async fn reset_limit(&self, rule: &str, subject: &str) -> Result<bool, StoreError> {
        let mut existed = false;
        for algorithm in [Algorithm::SlidingLog, Algorithm::SlidingCounter] {
            let key = key_of(rule, algorithm, subject);
            let mut shard = self.shard(&self.inner.limits, &key);
            let now = self.now();
            if let Some(state) = shard.entries.remove(&key) {
                // Its remembered request ids go with it (on Redis their
                // records stay until they expire; see the README).
                shard.budget.release(state.weight());
                existed |= state.is_live(now);
            }
        }
        Ok(existed)
    }

    async fn reset_usage(
        &self,
        user_id: &str,
        character_id: Option<&str>,
    ) -> Result<u32, StoreError> {
        let mut shard = self.shard(&self.inner.usage, user_id);
        let now = self.now();
        let removed: Vec<Conversation> = match character_id {
            None => shard
                .entries
                .remove(user_id)
                .map(|user| user.conversations.into_values())
                .unwrap_or_default(),
            Some(character_id) => {
                let Some(user) = shard.entries.get_mut(user_id) else {
                    return Ok(0);
                };
                let removed = user.conversations.remove(character_id);
                user.records -= removed.as_ref().map_or(0, Conversation::record_count);
                if user.conversations.is_empty() {
                    shard.entries.remove(user_id);
                }
                removed.into_iter().collect()
            }
        };
        // A conversation weighs one entry and one per request id it keeps.
        shard.budget.release(
            removed.len()
                + removed
                    .iter()
                    .map(Conversation::record_count)
                    .sum::<usize>(),
        );
        let live = removed.iter().filter(|c| c.is_live(now)).count();
        Ok(u32::try_from(live).unwrap_or(u32::MAX))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A poisoned lock only means a thread panicked mid-update of plain
/// counters; they are still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Rule names never hold ':' (the config allows only `[a-z0-9_-]`) and the
/// subject comes last, so distinct (rule, algorithm, subject) never share a key.
fn limit_key(check: &LimitCheck<'_>) -> String {
    key_of(check.rule, check.algorithm, check.subject)
}

/// The key of one (rule, algorithm, subject) counter; see [`limit_key`].
fn key_of(rule: &str, algorithm: Algorithm, subject: &str) -> String {
    let algorithm = match algorithm {
        Algorithm::SlidingLog => "log",
        Algorithm::SlidingCounter => "ctr",
    };
    let mut key = String::with_capacity(rule.len() + subject.len() + 5);
    key.push_str(rule);
    key.push(':');
    key.push_str(algorithm);
    key.push(':');
    key.push_str(subject);
    key
}

// ---- Rate limits -----------------------------------------------------------

#[derive(Debug)]
struct LimitState {
    blocked_until: Option<u64>,
    /// Latest time (us) at which the counter still holds anything.
    live_until: u64,
    counter: Counter,
    /// Remembered request ids; boxed, so a counter without any pays one
    /// pointer, not an empty map's 48 bytes. SipHash with a random key:
    /// ids are chosen by callers.
    #[allow(clippy::box_collection)]
    records: Option<Box<HashMap<Box<str>, LimitRecord>>>,
}

/// What a remembered request id keeps: the first answer, and what a settle
/// needs (the scripts' record strings hold the same).
#[derive(Debug)]
struct LimitRecord {
    first: LimitDecision,
    expires_at: u64,
    /// The limit the call was counted under.
    limit: u64,
    /// What the call counts now: its cost, or the figure last settled.
    settled: u64,
    /// Where it was counted: the log entry's absolute index ([`Log::popped`]
    /// counts from the first entry ever) or the counter's window index;
    /// `None` for a denial.
    spot: Option<u64>,
}

#[derive(Debug)]
enum Counter {
    /// The exact sliding log.
    Log(Log),
    /// Fixed-window counters: the window's index, its hits and the previous
    /// window's hits.
    Weighted {
        window_index: u64,
        current: u64,
        previous: u64,
    },
}

/// The hits in the window, oldest first, kept so that every question a
/// decision asks is answered without summing the log: the count in O(1),
/// when enough hits have left for a cost in O(log n).
///
/// Each counted call is one entry, `(time, total)`: `total` is the running
/// sum of every hit this log has counted, this call's included. Calls in the
/// same microsecond share one entry (they leave the window together, so no
/// answer can tell them apart). `trimmed` is the total of the newest entry
/// that has left. So the hits in the window are `newest total - trimmed`,
/// and the hits up to an entry `its total - trimmed`.
///
/// Totals wrap at 2^64: only differences are read, and a difference is the
/// sum of hits in the window, which each allowed call kept at most the
/// limit, a u64.
///
/// Pay after use ([`Log::settle`]) changes one entry's cost by shifting the
/// totals on one side of it, as `lua/settle_log.lua` does (its header gives
/// the reasoning and the bound); `trimmed` plays the script's base member.
#[derive(Debug, Default)]
struct Log {
    hits: VecDeque<(u64, u64)>,
    trimmed: u64,
    /// Entries ever dropped from the front, so that `popped + i` names
    /// entry `i` for as long as it lives.
    popped: u64,
}

impl Log {
    /// Drops the hits at or before `cutoff`. Each entry leaves once, so the
    /// calls that leave pay for this.
    fn trim(&mut self, cutoff: u64) {
        while let Some(&(at, total)) = self.hits.front() {
            if at > cutoff {
                break;
            }
            self.trimmed = total;
            self.hits.pop_front();
            self.popped += 1;
        }
    }

    /// Hits counted after `cutoff` (all of them when `None`), untrimmed.
    fn count_after(&self, cutoff: Option<u64>) -> u64 {
        let left = cutoff.map_or(0, |cutoff| {
            self.hits.partition_point(|&(at, _)| at <= cutoff)
        });
        let before = match left.checked_sub(1) {
            None => self.trimmed,
            Some(last_gone) => self.hits[last_gone].1,
        };
        self.count().wrapping_sub(before.wrapping_sub(self.trimmed))
    }

    /// Hits in the window.
    fn count(&self) -> u64 {
        self.hits
            .back()
            .map_or(0, |&(_, total)| total.wrapping_sub(self.trimmed))
    }

    fn push(&mut self, now: u64, cost: u64) {
        match self.hits.back_mut() {
            Some((at, total)) if *at == now => *total = total.wrapping_add(cost),
            last => {
                let total = last.map_or(self.trimmed, |&mut (_, total)| total);
                if self.hits.capacity() == 0 {
                    // Most counters see one call: room for one, not four.
                    self.hits.reserve_exact(1);
                }
                self.hits.push_back((now, total.wrapping_add(cost)));
            }
        }
    }

    /// The time of the oldest entry by which at least `hits` hits (> 0)
    /// have been counted, if the window holds that many.
    fn time_of_hit(&self, hits: u64) -> Option<u64> {
        // Hits up to each entry only grow along the log: a binary search.
        let index = self
            .hits
            .partition_point(|&(_, total)| total.wrapping_sub(self.trimmed) < hits);
        self.hits.get(index).map(|&(at, _)| at)
    }

    /// The absolute index of the newest entry, if any.
    fn newest_index(&self) -> Option<u64> {
        (self.hits.len() as u64)
            .checked_sub(1)
            .map(|i| self.popped + i)
    }

    /// Makes the entry at absolute `index` count `delta` more hits (never
    /// fewer than 0); false when the bound forbids a refund and nothing
    /// changed. `None` when the entry has left.
    fn settle(&mut self, index: u64, delta: i64) -> Option<bool> {
        let pos = usize::try_from(index.checked_sub(self.popped)?).ok()?;
        let &(_, total) = self.hits.get(pos)?;
        let prior = if pos == 0 {
            self.trimmed
        } else {
            self.hits[pos - 1].1
        };
        let own = total.wrapping_sub(prior);
        let delta = if delta < 0 && delta.unsigned_abs() > own {
            // own <= |delta| < 2^63, so this fits.
            -(own as i64)
        } else {
            delta
        };
        // Two's complement: adding it wraps to the right total.
        let up = delta as u64;
        let down = delta.wrapping_neg() as u64;
        let after = (self.hits.len() - pos - 1) as u64;
        let before = pos as u64 + 1;
        if after <= SETTLE_REWRITES && after <= before {
            for (_, total) in self.hits.range_mut(pos..) {
                *total = total.wrapping_add(up);
            }
        } else if before <= SETTLE_REWRITES {
            for (_, total) in self.hits.range_mut(..pos) {
                *total = total.wrapping_add(down);
            }
            self.trimmed = self.trimmed.wrapping_add(down);
        } else if delta > 0 {
            // Beyond the bound: the extra hits leave with the newest call.
            if let Some((_, total)) = self.hits.back_mut() {
                *total = total.wrapping_add(up);
            }
        } else {
            return Some(false);
        }
        Some(true)
    }

    /// Time until the newest hit leaves the window.
    fn until_empty(&self, window: u64, now: u64) -> u64 {
        self.hits.back().map_or(0, |&(newest, _)| {
            newest.saturating_add(window).saturating_sub(now)
        })
    }
}

impl Entry for LimitState {
    fn expire(&mut self, now: u64) -> bool {
        if let Some(records) = &mut self.records {
            records.retain(|_, record| now < record.expires_at);
            if records.is_empty() {
                self.records = None;
            }
        }
        self.is_live(now)
    }

    /// The counter, and each request id it remembers.
    fn weight(&self) -> usize {
        1 + self.records.as_ref().map_or(0, |records| records.len())
    }

    fn protected(&self, now: u64) -> bool {
        self.blocked_until.is_some_and(|until| now < until)
    }
}

impl LimitState {
    fn new(algorithm: Algorithm) -> Self {
        let counter = match algorithm {
            Algorithm::SlidingLog => Counter::Log(Log::default()),
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
            records: None,
        }
    }

    /// [`Self::decide`], remembered under `request_id` when given: a
    /// remembered id gets its first answer again and counts nothing.
    fn decide_once(
        &mut self,
        check: &LimitCheck<'_>,
        request_id: Option<&str>,
        now: u64,
    ) -> Once<LimitDecision> {
        let Some(request_id) = request_id else {
            return Once {
                decision: self.decide(check, now),
                replayed: false,
            };
        };
        if let Some(records) = &mut self.records {
            match records.get(request_id) {
                Some(record) if now < record.expires_at => {
                    return Once {
                        decision: record.first,
                        replayed: true,
                    };
                }
                Some(_) => {
                    records.remove(request_id);
                }
                None => {}
            }
        }
        let decision = self.decide(check, now);
        let spot = if decision.allowed {
            match &self.counter {
                Counter::Log(log) => log.newest_index(),
                Counter::Weighted { window_index, .. } => Some(*window_index),
            }
        } else {
            None
        };
        // As the scripts' PX: the window rounded up to whole milliseconds.
        let expires_at =
            now.saturating_add(micros(check.window).div_ceil(1000).saturating_mul(1000));
        self.live_until = self.live_until.max(expires_at);
        self.records.get_or_insert_default().insert(
            request_id.into(),
            LimitRecord {
                first: decision,
                expires_at,
                limit: check.limit,
                settled: check.cost,
                spot,
            },
        );
        Once {
            decision,
            replayed: false,
        }
    }

    /// Pay after use: see `lua/settle_log.lua` and `lua/settle_counter.lua`,
    /// whose semantics this keeps. The hits left, or `None` if not found.
    fn settle(&mut self, settle: &LimitSettle<'_>, now: u64) -> Option<u64> {
        let record = self
            .records
            .as_mut()?
            .get_mut(settle.request_id)
            .filter(|record| now < record.expires_at)?;
        let spot = record.spot?;
        let window = micros(settle.window).max(1);
        let delta = i64::try_from(i128::from(settle.actual) - i128::from(record.settled)).ok()?;
        match &mut self.counter {
            Counter::Log(log) => {
                if let Some(cutoff) = now.checked_sub(window) {
                    log.trim(cutoff);
                }
                if delta == 0 {
                    // Still found only while the entry is in the window.
                    usize::try_from(spot.checked_sub(log.popped)?)
                        .ok()
                        .filter(|&pos| pos < log.hits.len())?;
                } else if log.settle(spot, delta)? {
                    record.settled = settle.actual;
                }
                Some(record.limit.saturating_sub(log.count()))
            }
            Counter::Weighted {
                window_index,
                current,
                previous,
            } => {
                let field = if *window_index == spot {
                    &mut *current
                } else if *window_index == spot.wrapping_add(1) {
                    &mut *previous
                } else {
                    return None;
                };
                *field = if delta < 0 {
                    field.saturating_sub(delta.unsigned_abs())
                } else {
                    field.saturating_add(delta.unsigned_abs())
                };
                record.settled = settle.actual;
                // The estimate at now, as lua/settle_counter.lua reads it.
                let index = now / window;
                let (cur, prev) = if *window_index == index {
                    (*current, *previous)
                } else if window_index.wrapping_add(1) == index {
                    (0, *current)
                } else {
                    (0, 0)
                };
                let elapsed = now - index * window;
                let (w, e) = (window as f64, elapsed as f64);
                let estimate = prev as f64 * (w - e) / w + cur as f64;
                Some((record.limit as f64 - estimate).floor().max(0.0) as u64)
            }
        }
    }

    /// Whether the entry still holds anything at `now`.
    fn is_live(&self, now: u64) -> bool {
        now < self.live_until || self.blocked_until.is_some_and(|until| now < until)
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
            self.live_until = now.saturating_add(micros(decision.reset_after));
        } else if let Some(block_for) = check.block_for {
            self.blocked_until = Some(now.saturating_add(micros(block_for)));
            decision.blocked = true;
            decision.retry_after = block_for;
        }
        decision
    }

    /// The counter as it stands at `now`, changing nothing: the same
    /// questions as [`Self::decide`] asks, answered without trimming.
    fn inspect(&self, window: u64, now: u64) -> LimitUsage {
        let blocked_for = self
            .blocked_until
            .filter(|&until| now < until)
            .map(|until| from_micros(until - now));
        let (used, reset_after) = match &self.counter {
            Counter::Log(log) => (
                log.count_after(now.checked_sub(window)),
                log.until_empty(window, now),
            ),
            Counter::Weighted {
                window_index,
                current,
                previous,
            } => {
                let index = now / window;
                let (cur, prev) = if *window_index == index {
                    (*current, *previous)
                } else if *window_index + 1 == index {
                    (0, *current)
                } else {
                    (0, 0)
                };
                let elapsed = now - index * window;
                let (w, e) = (window as f64, elapsed as f64);
                // The float expression of decide_weighted and the script.
                let estimate = prev as f64 * (w - e) / w + cur as f64;
                (
                    estimate.ceil() as u64,
                    weighted_reset(cur, prev, window, elapsed),
                )
            }
        };
        LimitUsage {
            used,
            reset_after: from_micros(reset_after),
            blocked_for,
        }
    }

    fn count(&mut self, check: &LimitCheck<'_>, now: u64) -> LimitDecision {
        let window = micros(check.window).max(1);
        match &mut self.counter {
            Counter::Log(log) => decide_log(log, check, window, now),
            Counter::Weighted {
                window_index,
                current,
                previous,
            } => decide_weighted(window_index, current, previous, check, window, now),
        }
    }
}

/// The exact sliding log. A hit at time `t` leaves the window at `t + window`.
/// Amortised O(1) work, O(log n) when denied; no sum can overflow, whatever
/// the cost and limit.
fn decide_log(log: &mut Log, check: &LimitCheck<'_>, window: u64, now: u64) -> LimitDecision {
    if let Some(cutoff) = now.checked_sub(window) {
        log.trim(cutoff);
    }
    let count = log.count();
    let fits = count
        .checked_add(check.cost)
        .is_some_and(|total| total <= check.limit);
    if fits {
        if !check.dry_run {
            log.push(now, check.cost);
        }
        return LimitDecision {
            allowed: true,
            remaining: check.limit - count - check.cost,
            retry_after: Duration::ZERO,
            reset_after: from_micros(log.until_empty(window, now)),
            blocked: false,
        };
    }
    let reset_after = log.until_empty(window, now);
    let retry_after = if check.cost > check.limit {
        // It can never fit; the best answer is when the window is empty.
        reset_after
    } else {
        // The hits that must leave before `cost` more fit, oldest first:
        // `count + cost - limit`, written so that it cannot overflow (it
        // does not fit, so `count > limit - cost`).
        let must_leave = count - (check.limit - check.cost);
        log.time_of_hit(must_leave).map_or(reset_after, |at| {
            at.saturating_add(window).saturating_sub(now)
        })
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
            *current = current.saturating_add(check.cost);
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
        window.saturating_mul(2) - elapsed
    } else if previous > 0 {
        window - elapsed
    } else {
        0
    }
}

// ---- Usage quotas ------------------------------------------------------------

#[derive(Debug, Default)]
struct UserUsage {
    /// By character id, so listing comes out sorted. Expired conversations
    /// stay until the shard's sweep; every reader treats them as absent.
    conversations: Conversations,
    /// Request ids remembered in all conversations, kept up to date so
    /// that the weight is O(1).
    records: usize,
}

/// A user's conversations by character id. Most users talk to one
/// character, and a map's first node costs about 640 bytes where the one
/// conversation needs about 60: a map only from the second on.
#[derive(Debug, Default)]
enum Conversations {
    #[default]
    None,
    One(String, Conversation),
    Many(BTreeMap<String, Conversation>),
}

impl Conversations {
    fn len(&self) -> usize {
        match self {
            Self::None => 0,
            Self::One(..) => 1,
            Self::Many(map) => map.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, id: &str) -> Option<&Conversation> {
        match self {
            Self::One(key, conversation) if key == id => Some(conversation),
            Self::Many(map) => map.get(id),
            _ => None,
        }
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Conversation> {
        match self {
            Self::One(key, conversation) if key == id => Some(conversation),
            Self::Many(map) => map.get_mut(id),
            _ => None,
        }
    }

    /// In character id order: O(log n) to the first, O(1) to each next.
    fn iter(&self) -> impl Iterator<Item = (&String, &Conversation)> {
        let (one, many) = match self {
            Self::None => (None, None),
            Self::One(key, conversation) => (Some((key, conversation)), None),
            Self::Many(map) => (None, Some(map.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Puts `fresh()` under `id` unless a conversation is there; whether it
    /// did.
    fn insert_if_absent(&mut self, id: &str, fresh: impl FnOnce() -> Conversation) -> bool {
        let mut added = false;
        *self = match std::mem::take(self) {
            Self::None => {
                added = true;
                Self::One(id.to_owned(), fresh())
            }
            Self::One(key, conversation) if key == id => Self::One(key, conversation),
            Self::One(key, conversation) => {
                added = true;
                Self::Many(BTreeMap::from([
                    (key, conversation),
                    (id.to_owned(), fresh()),
                ]))
            }
            Self::Many(mut map) => {
                if !map.contains_key(id) {
                    added = true;
                    map.insert(id.to_owned(), fresh());
                }
                Self::Many(map)
            }
        };
        added
    }

    fn retain_live(&mut self, now: u64) {
        match self {
            Self::None => {}
            Self::One(_, conversation) => {
                if !conversation.is_live(now) {
                    *self = Self::None;
                }
            }
            Self::Many(map) => map.retain(|_, c| c.is_live(now)),
        }
    }

    /// Removes and returns the conversation under `id`.
    fn remove(&mut self, id: &str) -> Option<Conversation> {
        match std::mem::take(self) {
            Self::None => None,
            Self::One(key, conversation) if key == id => Some(conversation),
            one @ Self::One(..) => {
                *self = one;
                None
            }
            Self::Many(mut map) => {
                let removed = map.remove(id);
                *self = Self::Many(map);
                removed
            }
        }
    }

    /// Every conversation, taken out.
    fn into_values(self) -> Vec<Conversation> {
        match self {
            Self::None => Vec::new(),
            Self::One(_, conversation) => vec![conversation],
            Self::Many(map) => map.into_values().collect(),
        }
    }

    /// Drops one conversation other than `keep`, the first by character id;
    /// the request ids it remembered, or `None` if there is none.
    fn evict_other(&mut self, keep: &str) -> Option<usize> {
        let Self::Many(map) = self else {
            return None;
        };
        let victim = map.keys().find(|id| *id != keep).cloned()?;
        map.remove(&victim).map(|c| c.record_count())
    }
}

#[derive(Debug)]
struct Conversation {
    expires_at: u64,
    used: Vec<(String, u64)>,
    /// Remembered request ids by "<kind>:<request id>" (kinds hold no
    /// ':'); they live and die with the conversation, as the scripts'
    /// records expire with its hash. Boxed: one pointer when there are none.
    #[allow(clippy::box_collection)]
    records: Option<Box<HashMap<Box<str>, UsageRecord>>>,
}

/// A remembered IncrementUsage: its first answer and what it counts now.
#[derive(Debug)]
struct UsageRecord {
    first: UsageDecision,
    settled: u64,
}

/// The key of a request id's record within its conversation.
fn usage_record_key(kind: &str, request_id: &str) -> Box<str> {
    let mut key = String::with_capacity(kind.len() + request_id.len() + 1);
    key.push_str(kind);
    key.push(':');
    key.push_str(request_id);
    key.into_boxed_str()
}

impl Entry for UserUsage {
    fn expire(&mut self, now: u64) -> bool {
        self.conversations.retain_live(now);
        self.records = self
            .conversations
            .iter()
            .map(|(_, conversation)| conversation.record_count())
            .sum();
        !self.conversations.is_empty()
    }

    /// One entry per conversation and per request id remembered: a user's
    /// conversations are what grows.
    fn weight(&self) -> usize {
        self.conversations.len() + self.records
    }
}

impl Conversation {
    fn record_count(&self) -> usize {
        self.records.as_ref().map_or(0, |records| records.len())
    }

    /// Pay after use: see `lua/usage_settle.lua`. The kind's count after
    /// it, or `None` if the request id is not found or was denied.
    fn settle(&mut self, settle: &UsageSettle<'_>) -> Option<u64> {
        let key = usage_record_key(settle.kind, settle.request_id);
        let record = self.records.as_mut()?.get_mut(&key)?;
        if !record.first.allowed {
            return None;
        }
        let delta = i128::from(settle.actual) - i128::from(record.settled);
        record.settled = settle.actual;
        let slot = match self.used.iter_mut().find(|(kind, _)| kind == settle.kind) {
            Some((_, n)) => n,
            None => {
                self.used.push((settle.kind.to_owned(), 0));
                &mut self.used.last_mut().expect("just pushed").1
            }
        };
        let moved = (i128::from(*slot) + delta).clamp(0, i128::from(u64::MAX));
        *slot = u64::try_from(moved).unwrap_or(u64::MAX);
        Some(*slot)
    }

    fn is_live(&self, now: u64) -> bool {
        now < self.expires_at
    }

    fn used(&self, kind: &str) -> u64 {
        self.used
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(0, |(_, n)| *n)
    }

    fn counters(&self, now: u64) -> ConversationCounters {
        ConversationCounters {
            used: self.used.clone(),
            resets_after: from_micros(self.expires_at.saturating_sub(now)),
        }
    }
}

impl UserUsage {
    /// Counts `increment` if within its quota, remembered under
    /// `request_id` when given: O(log n) in the user's conversations.
    fn increment(
        &mut self,
        increment: &UsageIncrement<'_>,
        request_id: Option<&str>,
        now: u64,
    ) -> Once<UsageDecision> {
        let record_key = request_id.map(|id| usage_record_key(increment.kind, id));
        let existing = self
            .conversations
            .get(increment.character_id)
            .filter(|c| c.is_live(now));
        if let (Some(key), Some(conversation)) = (&record_key, existing) {
            if let Some(record) = conversation.records.as_ref().and_then(|r| r.get(key)) {
                return Once {
                    decision: record.first,
                    replayed: true,
                };
            }
        }
        let used = existing.map_or(0, |c| c.used(increment.kind));
        let over = increment
            .limit
            .is_some_and(|limit| used.saturating_add(increment.amount) > limit);
        if over {
            let decision = UsageDecision {
                allowed: false,
                used,
                resets_after: from_micros(existing.map_or(0, |c| c.expires_at - now)),
            };
            // Remembered only with a live conversation to live in, as the
            // script does.
            if let Some(key) = record_key {
                if let Some(conversation) = self
                    .conversations
                    .get_mut(increment.character_id)
                    .filter(|c| c.is_live(now))
                {
                    let record = UsageRecord {
                        first: decision,
                        settled: 0,
                    };
                    if conversation
                        .records
                        .get_or_insert_default()
                        .insert(key, record)
                        .is_none()
                    {
                        self.records += 1;
                    }
                }
            }
            return Once {
                decision,
                replayed: false,
            };
        }
        let fresh = || Conversation {
            expires_at: now.saturating_add(micros(increment.period)),
            used: Vec::new(),
            records: None,
        };
        self.conversations
            .insert_if_absent(increment.character_id, fresh);
        let conversation = self
            .conversations
            .get_mut(increment.character_id)
            .expect("insert_if_absent left a conversation under this id");
        if !conversation.is_live(now) {
            // Expired but not swept yet: it starts over, as if new.
            self.records -= conversation.record_count();
            *conversation = fresh();
        }
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
                if conversation.used.capacity() == 0 {
                    // Most conversations use one kind: room for one, not four.
                    conversation.used.reserve_exact(1);
                }
                conversation
                    .used
                    .push((increment.kind.to_owned(), increment.amount));
                increment.amount
            }
        };
        let decision = UsageDecision {
            allowed: true,
            used,
            resets_after: from_micros(conversation.expires_at - now),
        };
        if let Some(key) = record_key {
            let record = UsageRecord {
                first: decision,
                settled: increment.amount,
            };
            if conversation
                .records
                .get_or_insert_default()
                .insert(key, record)
                .is_none()
            {
                self.records += 1;
            }
        }
        Once {
            decision,
            replayed: false,
        }
    }

    /// Drops one conversation other than `keep`; the entries it weighed,
    /// or `None` if there is none.
    fn evict_other(&mut self, keep: &str) -> Option<usize> {
        let records = self.conversations.evict_other(keep)?;
        self.records -= records;
        Some(1 + records)
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

    /// The sliding log as it was before it kept running totals: a sum over
    /// every entry and a scan for `retry_after`. The new one must answer
    /// exactly as it did.
    fn reference_log(
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
            reset_after
        } else {
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

    /// A small deterministic generator (xorshift64*), so a failure repeats.
    struct Random(u64);

    impl Random {
        fn below(&mut self, bound: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
        }
    }

    /// Settles up and down, within the rewrite bound, keep every answer
    /// (count, retry_after, reset_after, trimming) exactly as a log that
    /// stores each call's cost and sums them.
    #[test]
    fn settled_logs_answer_exactly_as_the_summing_one() {
        let mut random = Random(0x2545_f491_4f6c_dd1d);
        for round in 0..200 {
            let window = 1 + random.below(5_000);
            let mut log = Log {
                trimmed: if round % 2 == 0 { 0 } else { u64::MAX - 20 },
                ..Log::default()
            };
            let mut reference: VecDeque<(u64, u64)> = VecDeque::new();
            // Entries ever pushed to the reference: the ones it still
            // holds are the last `reference.len()` of them.
            let mut ref_pushed = 0_u64;
            // Per counted call: its log entry, its reference entry, what
            // it counts now.
            let mut calls: Vec<(u64, u64, u64)> = Vec::new();
            let mut now = 1_000_000;
            for step in 0..300 {
                now += match random.below(4) {
                    0 => 0,
                    1 => random.below(5),
                    _ => random.below(window / 2 + 1),
                };
                if random.below(3) == 0 && !calls.is_empty() {
                    // Settle one of the last 20 calls: at most 20 entries
                    // after it, well within the bound.
                    let pick = calls.len() - 1 - random.below(calls.len().min(20) as u64) as usize;
                    let (entry, ref_index, counted) = calls[pick];
                    let actual = random.below(8);
                    if let Some(cutoff) = now.checked_sub(window) {
                        log.trim(cutoff);
                        while reference.front().is_some_and(|&(at, _)| at <= cutoff) {
                            reference.pop_front();
                        }
                    }
                    let delta = actual as i64 - counted as i64;
                    let settled = if delta == 0 {
                        entry
                            .checked_sub(log.popped)
                            .map(|pos| pos < log.hits.len() as u64)
                    } else {
                        log.settle(entry, delta)
                    };
                    let in_reference = ref_index
                        .checked_sub(ref_pushed - reference.len() as u64)
                        .and_then(|pos| reference.get_mut(pos as usize));
                    match (settled, in_reference) {
                        (Some(applied), Some(hit)) => {
                            assert!(applied, "round {round}, step {step}: within the bound");
                            hit.1 = actual;
                            calls[pick].2 = actual;
                        }
                        (None, None) => {}
                        other => panic!("round {round}, step {step}: found {other:?}"),
                    }
                    let count: u64 = reference.iter().map(|&(_, n)| n).sum();
                    assert_eq!(log.count(), count, "round {round}, step {step}: count");
                    continue;
                }
                let check = LimitCheck {
                    limit: 1 + random.below(12),
                    cost: 1 + random.below(4),
                    dry_run: random.below(5) == 0,
                    ..check(Algorithm::SlidingLog, 0, 1)
                };
                let decided = decide_log(&mut log, &check, window, now);
                assert_eq!(
                    decided,
                    reference_log(&mut reference, &check, window, now),
                    "round {round}, step {step}"
                );
                if decided.allowed && !check.dry_run {
                    ref_pushed += 1;
                    let entry = log.newest_index().expect("a counted call has an entry");
                    calls.push((entry, ref_pushed - 1, check.cost));
                }
            }
        }
    }

    #[test]
    fn the_running_total_log_answers_exactly_as_the_summing_one() {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let window = 1 + random.below(5_000);
            // Half the rounds start with a running total about to wrap.
            let mut log = Log {
                trimmed: if round % 2 == 0 { 0 } else { u64::MAX - 20 },
                ..Log::default()
            };
            let mut reference = VecDeque::new();
            let mut now = 1_000_000;
            for step in 0..300 {
                // Often no time passes at all: calls in one microsecond.
                now += match random.below(4) {
                    0 => 0,
                    1 => random.below(5),
                    _ => random.below(window / 2 + 1),
                };
                let check = LimitCheck {
                    // Limits change between calls, as a reload or another
                    // tier does.
                    limit: 1 + random.below(12),
                    cost: 1 + random.below(4),
                    dry_run: random.below(5) == 0,
                    ..check(Algorithm::SlidingLog, 0, 1)
                };
                assert_eq!(
                    decide_log(&mut log, &check, window, now),
                    reference_log(&mut reference, &check, window, now),
                    "round {round}, step {step}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_clock_that_stands_still_keeps_one_entry_and_exact_answers() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let rule = check(Algorithm::SlidingLog, 1000, 60_000);
        let allowed = hit(&store, &rule, 1001).await;
        assert_eq!(allowed.iter().filter(|a| **a).count(), 1000);
        assert!(!allowed[1000]);
        let key = limit_key(&rule);
        let entries = {
            let shard = store.shard(&store.inner.limits, &key);
            match shard.entries.get(&key).map(|state| &state.counter) {
                Some(Counter::Log(log)) => log.hits.len(),
                other => panic!("a sliding log, not {other:?}"),
            }
        };
        assert_eq!(entries, 1, "1000 calls in one microsecond share an entry");
        let denied = store.check_limit(&rule).await.expect("memory");
        assert_eq!(denied.retry_after, Duration::from_secs(60));
        clock.advance(Duration::from_secs(60));
        assert_eq!(hit(&store, &rule, 1).await, [true], "all left together");
    }

    #[test]
    fn costs_and_limits_at_the_top_of_u64_never_overflow() {
        let window = 1_000_000;
        let now = 5_000_000;
        let at_most = |limit: u64, cost: u64| LimitCheck {
            limit,
            cost,
            ..check(Algorithm::SlidingLog, 0, 1)
        };
        let mut log = Log::default();
        assert!(decide_log(&mut log, &at_most(u64::MAX, u64::MAX - 1), window, now).allowed);
        for cost in [5, u64::from(u32::MAX)] {
            // count + cost is past u64::MAX: denied, never a panic.
            let denied = decide_log(&mut log, &at_most(u64::MAX, cost), window, now);
            assert!(!denied.allowed);
            assert_eq!(denied.remaining, 1);
            assert_eq!(denied.retry_after, from_micros(window));
        }
        assert!(decide_log(&mut log, &at_most(u64::MAX, 1), window, now).allowed);
        // A limit lowered under a full window.
        let denied = decide_log(&mut log, &at_most(3, 2), window, now);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        assert_eq!(denied.retry_after, from_micros(window));
        // A window as long as a duration can be.
        let mut log = Log::default();
        let forever = LimitCheck {
            window: Duration::MAX,
            ..at_most(1, 1)
        };
        let mut state = LimitState::new(Algorithm::SlidingLog);
        assert!(state.decide(&forever, now).allowed);
        assert!(!state.decide(&forever, now).allowed);
        assert!(decide_log(&mut log, &forever, u64::MAX, now).allowed);
    }

    fn usage(user_id: &'static str, character_id: &'static str) -> UsageIncrement<'static> {
        UsageIncrement {
            user_id,
            character_id,
            kind: "text",
            amount: 1,
            limit: Some(3),
            period: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn a_user_with_20000_conversations_lists_the_first_1000_by_id() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let ids: Vec<String> = (0..20_000_u32)
            // Out of order, and of different lengths: byte order is not
            // insertion order, nor numeric order.
            .map(|i| format!("c{}", (i * 7919) % 20_000))
            .collect();
        for id in &ids {
            let increment = UsageIncrement {
                character_id: id,
                ..usage("u", "")
            };
            assert!(
                store
                    .increment_usage(&increment)
                    .await
                    .expect("memory")
                    .allowed
            );
        }
        clock.advance(Duration::from_secs(1));
        let listed = store.list_usage("u", 1000).await.expect("memory");
        let mut expected = ids.clone();
        expected.sort();
        expected.truncate(1000);
        let listed_ids: Vec<&str> = listed.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(listed_ids, expected);
        assert!(listed.iter().all(|(_, counters)| counters.used("text") == 1
            && counters.resets_after == Duration::from_secs(3599)));
    }

    #[tokio::test]
    async fn an_expired_conversation_starts_over_before_the_sweep() {
        let (store, clock) = MemoryStore::with_manual_clock();
        let increment = usage("u", "c");
        for _ in 0..3 {
            store.increment_usage(&increment).await.expect("memory");
        }
        assert!(
            !store
                .increment_usage(&increment)
                .await
                .expect("memory")
                .allowed
        );
        clock.advance(Duration::from_secs(3600));
        let after = store.increment_usage(&increment).await.expect("memory");
        assert_eq!(
            after,
            UsageDecision {
                allowed: true,
                used: 1,
                resets_after: Duration::from_secs(3600),
            }
        );
        assert_eq!(store.entries(), 1, "the same conversation, reset");
    }

    /// A store of one shard, so that its LRU order is the store's.
    /// Counts one message in the conversation, whatever the answer.
    async fn message(store: &MemoryStore, user_id: &'static str, character_id: &'static str) {
        store
            .increment_usage(&usage(user_id, character_id))
            .await
            .expect("memory");
    }

    fn bounded(max_entries: usize) -> (MemoryStore, ManualClock, EvictionCounter) {
        let (clock, handle) = manual_clock();
        let evictions = EvictionCounter::default();
        let store = MemoryStore::build(clock, MemoryOptions { max_entries }, evictions.clone(), 1);
        (store, handle, evictions)
    }

    fn subject(subject: &'static str) -> LimitCheck<'static> {
        LimitCheck {
            subject,
            ..check(Algorithm::SlidingLog, 2, 60_000)
        }
    }

    #[tokio::test]
    async fn a_full_store_evicts_the_least_recently_used_counter() {
        let (store, _clock, evictions) = bounded(3);
        for name in ["a", "b", "c"] {
            hit(&store, &subject(name), 1).await;
        }
        // "a" is used again, so "b" is now the least recently used.
        hit(&store, &subject("a"), 1).await;
        hit(&store, &subject("d"), 1).await;
        assert_eq!(evictions.get(), 1);
        assert_eq!(store.entries(), 3);
        assert_eq!(hit(&store, &subject("a"), 1).await, [false], "a kept its 2");
        assert_eq!(hit(&store, &subject("c"), 1).await, [true], "c kept its 1");
        assert_eq!(evictions.get(), 1, "nothing new, nothing evicted");
        assert_eq!(
            hit(&store, &subject("b"), 2).await,
            [true, true],
            "b started over"
        );
        assert_eq!(evictions.get(), 2, "b's return evicted d");
        // A dry run or a denial of an unknown subject takes no entry.
        let dry = LimitCheck {
            dry_run: true,
            ..subject("e")
        };
        assert!(store.check_limit(&dry).await.expect("memory").allowed);
        let too_big = LimitCheck {
            cost: 3,
            ..subject("f")
        };
        assert!(!store.check_limit(&too_big).await.expect("memory").allowed);
        assert_eq!((store.entries(), evictions.get()), (3, 2));
    }

    #[tokio::test]
    async fn eviction_passes_over_a_live_lockout() {
        let (store, clock, evictions) = bounded(2);
        let login = LimitCheck {
            block_for: Some(Duration::from_secs(900)),
            ..subject("attacker")
        };
        assert_eq!(hit(&store, &login, 3).await, [true, true, false]);
        hit(&store, &subject("x"), 1).await;
        // The locked-out subject is the least recently used, but passed over.
        hit(&store, &subject("y"), 1).await;
        assert_eq!(evictions.get(), 1);
        let still = store.check_limit(&login).await.expect("memory");
        assert!(still.blocked, "the lock-out holds");
        // Once the block ends, it expires as any other entry does.
        clock.advance(Duration::from_secs(900));
        hit(&store, &subject("z"), 1).await;
        assert_eq!(
            (store.entries(), evictions.get()),
            (1, 1),
            "swept, not evicted"
        );
    }

    #[tokio::test]
    async fn conversations_count_against_the_cap_and_evict_by_user() {
        let (store, _clock, evictions) = bounded(3);
        message(&store, "u1", "a").await;
        message(&store, "u1", "b").await;
        message(&store, "u2", "a").await;
        assert_eq!((store.entries(), evictions.get()), (3, 0));
        // One more conversation: u1, the least recently used, goes whole.
        message(&store, "u2", "b").await;
        assert_eq!((store.entries(), evictions.get()), (2, 2));
        assert!(store.list_usage("u1", 10).await.expect("memory").is_empty());
        // A user alone in the store gives up their own other conversations.
        for character in ["c", "d", "e"] {
            message(&store, "u2", character).await;
        }
        assert_eq!(store.entries(), 3);
        let listed = store.list_usage("u2", 10).await.expect("memory");
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().any(|(id, _)| id == "e"), "{listed:?}");
        // Shared with rate-limit counters: one budget. The counters' shard
        // holds nothing else to evict, so the store is one over until the
        // next new entry elsewhere evicts.
        hit(&store, &subject("s"), 1).await;
        assert_eq!(store.entries(), 4);
        message(&store, "u2", "f").await;
        assert_eq!((store.entries(), evictions.get()), (3, 6));
    }

    #[tokio::test]
    async fn reading_a_user_s_usage_is_a_use() {
        let (store, _clock, evictions) = bounded(2);
        message(&store, "u1", "a").await;
        message(&store, "u2", "a").await;
        assert_eq!(store.list_usage("u1", 10).await.expect("memory").len(), 1);
        message(&store, "u3", "a").await;
        assert_eq!(evictions.get(), 1);
        assert!(store.list_usage("u2", 10).await.expect("memory").is_empty());
        assert_eq!(
            store
                .get_usage("u1", "a")
                .await
                .expect("memory")
                .used("text"),
            1
        );
    }

    #[tokio::test]
    async fn the_sweep_gives_expired_entries_back_to_the_budget() {
        let (store, clock, evictions) = bounded(2);
        hit(&store, &subject("a"), 1).await;
        message(&store, "u", "c").await;
        assert_eq!(store.entries(), 2);
        clock.advance(Duration::from_secs(3600) + SWEEP_EVERY);
        // Both shards sweep on their next use, before the new entry counts.
        message(&store, "v", "c").await;
        hit(&store, &subject("b"), 1).await;
        assert_eq!((store.entries(), evictions.get()), (2, 0));
    }

    /// This process's resident memory in bytes, for the measurements below.
    fn rss() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("Linux");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("statm's resident pages");
        pages * 4096
    }

    /// Resident memory per counter of the shipped `api` rule (one hit each),
    /// an in-process cross-check of README's figure from a release server
    /// (here 196 bytes, debug build with the system allocator): `cargo test
    /// --lib store::memory::tests::bytes_per_entry -- --ignored --nocapture`,
    /// alone, as RSS is the whole process's.
    #[tokio::test]
    #[ignore = "a measurement, not a test"]
    async fn bytes_per_entry() {
        const N: usize = 1_000_000;
        let store = MemoryStore::new();
        let subjects: Vec<String> = (0..N).map(|i| format!("bench-{i}")).collect();
        let api = |subject| LimitCheck {
            rule: "api",
            subject,
            algorithm: Algorithm::SlidingLog,
            limit: 100,
            window: Duration::from_secs(900),
            block_for: None,
            cost: 1,
            dry_run: false,
        };
        let before = rss();
        for subject in &subjects {
            store.check_limit(&api(subject)).await.expect("memory");
        }
        let after = rss();
        println!(
            "{N} counters: {} bytes resident, {} bytes each",
            after - before,
            (after - before) / N as u64
        );
    }

    /// Resident memory per remembered request id (a 36-byte UUID, 100 per
    /// subject on 1000 subjects), beyond the counters themselves, for
    /// README's figure: `cargo test --lib
    /// store::memory::tests::bytes_per_request_id -- --ignored --nocapture`,
    /// alone, as RSS is the whole process's.
    #[tokio::test]
    #[ignore = "a measurement, not a test"]
    async fn bytes_per_request_id() {
        const N: usize = 100_000;
        let store = MemoryStore::new();
        let subjects: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
        let ids: Vec<String> = (0..N)
            .map(|i| format!("{:08x}-7a4d-4e2b-9c1a-{:012x}", i, i * 7919))
            .collect();
        let tokens = |subject| LimitCheck {
            rule: "tokens",
            subject,
            algorithm: Algorithm::SlidingLog,
            limit: u64::MAX,
            window: Duration::from_secs(60),
            block_for: None,
            cost: 1,
            dry_run: false,
        };
        // The counters first, with one call each, so that only the ids
        // (and their calls' log entries, 16 bytes each) are measured.
        for subject in &subjects {
            store.check_limit(&tokens(subject)).await.expect("memory");
        }
        let before = rss();
        for (i, id) in ids.iter().enumerate() {
            store
                .check_limit_once(&tokens(&subjects[i % 1000]), id)
                .await
                .expect("memory");
        }
        let after = rss();
        println!(
            "{N} request ids: {} bytes resident, {} bytes each",
            after - before,
            (after - before) / N as u64
        );
    }
}
