//! Usage statistics: what IncrementUsage decided, per message kind, in hour,
//! day and week buckets (UTC; ISO weeks from Monday), globally and per
//! character, with the distinct users active in each bucket.
//!
//! Never on a decision's path. A decision adds to this instance's own
//! aggregates ([`Stats::record`]: a short lock on one of [`SHARDS`] maps, no
//! store call, no await); a task of the server
//! ([`crate::limiter::Limiter::flush_stats`]) hands them to the store
//! every `stats.flush` in one [`StatsBatch`] through
//! [`crate::store::Store::flush_stats`]. A failed flush keeps its batch and
//! retries it with the next one; what waits is bounded
//! ([`MAX_PENDING_ENTRIES`]), the oldest hours dropped first and counted in
//! `tollgate_stats_dropped_total`. A crash loses at most one flush interval.
//!
//! The aggregates are kept per (hour, character): day and week buckets, and
//! the global figures, are sums of those, expanded once per flush by
//! [`StatsBatch::updates`], so recording touches one entry whatever the
//! number of buckets.
//!
//! Time here is wall-clock UTC, in seconds since the Unix epoch, read from a
//! [`StatsClock`] that tests can set by hand.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{BuildHasher, RandomState},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::metrics::counter::Counter;

pub mod distinct;

/// Maps the aggregates are split over, so that concurrent decisions on
/// different characters rarely meet on one lock.
pub const SHARDS: usize = 16;

/// The most entries (a character's row in an hour, or a user in one) that
/// wait for the store, recorded and not yet flushed together: about 100 MB
/// at 100 bytes each. Past it new ones are dropped and counted.
pub const MAX_PENDING_ENTRIES: usize = 1_000_000;

const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;
const WEEK: i64 = 7 * DAY;

/// The size of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Granularity {
    /// One hour.
    Hour,
    /// One UTC day.
    Day,
    /// One ISO week, from Monday 00:00 UTC.
    Week,
}

impl Granularity {
    /// Every granularity, smallest first.
    pub const ALL: [Self; 3] = [Self::Hour, Self::Day, Self::Week];

    /// The bucket's length in seconds (fixed: UTC has no daylight saving).
    pub fn seconds(self) -> i64 {
        match self {
            Self::Hour => HOUR,
            Self::Day => DAY,
            Self::Week => WEEK,
        }
    }

    /// The start of the bucket holding `unix` (seconds since the epoch).
    pub fn start_of(self, unix: i64) -> i64 {
        match self {
            Self::Hour | Self::Day => unix - unix.rem_euclid(self.seconds()),
            // 1970-01-01 was a Thursday, three days after a Monday.
            Self::Week => {
                let days = unix.div_euclid(DAY);
                (days - (days + 3).rem_euclid(7)) * DAY
            }
        }
    }

    /// The one-letter code in Redis keys: `h`, `d` or `w`.
    pub fn code(self) -> char {
        match self {
            Self::Hour => 'h',
            Self::Day => 'd',
            Self::Week => 'w',
        }
    }
}

/// How many buckets of each granularity are kept, the current one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Hour buckets.
    pub hours: u32,
    /// Day buckets.
    pub days: u32,
    /// Week buckets.
    pub weeks: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            hours: 168,
            days: 90,
            weeks: 52,
        }
    }
}

impl Retention {
    /// Buckets of `granularity` kept.
    pub fn buckets(&self, granularity: Granularity) -> u32 {
        match granularity {
            Granularity::Hour => self.hours,
            Granularity::Day => self.days,
            Granularity::Week => self.weeks,
        }
    }

    /// When the bucket starting at `start` leaves the retained ones: once
    /// `buckets` newer ones have started.
    pub fn expires_at(&self, granularity: Granularity, start: i64) -> i64 {
        start + i64::from(self.buckets(granularity)) * granularity.seconds()
    }
}

/// `[stats]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatsSettings {
    /// Whether decisions are recorded at all.
    pub enabled: bool,
    /// How often aggregates go to the store.
    pub flush: Duration,
    /// Buckets kept per granularity.
    pub retention: Retention,
}

impl Default for StatsSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            flush: Duration::from_secs(1),
            retention: Retention::default(),
        }
    }
}

/// Wall-clock UTC seconds; tests move a manual one.
#[derive(Debug, Clone)]
pub enum StatsClock {
    /// The system's clock.
    System,
    /// A clock that reads what it was last set to.
    Manual(Arc<AtomicI64>),
}

impl StatsClock {
    /// A manual clock at `unix` seconds.
    pub fn manual(unix: i64) -> Self {
        Self::Manual(Arc::new(AtomicI64::new(unix)))
    }

    /// Seconds since the Unix epoch.
    pub fn now(&self) -> i64 {
        match self {
            Self::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| {
                    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
                }),
            Self::Manual(unix) => unix.load(Ordering::SeqCst),
        }
    }

    /// Sets a manual clock (the system's is left alone).
    pub fn set(&self, unix: i64) {
        if let Self::Manual(now) = self {
            now.store(unix, Ordering::SeqCst);
        }
    }
}

/// Messages counted and calls denied of one kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KindCount {
    /// The kind's name.
    pub kind: String,
    /// Messages counted.
    pub messages: u64,
    /// IncrementUsage calls denied by the quota.
    pub denials: u64,
}

/// One character's figures in one hour, as recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRow {
    /// The hour's start, in Unix seconds.
    pub hour: i64,
    /// The character.
    pub character_id: String,
    /// Per kind, those with anything to count.
    pub kinds: Vec<KindCount>,
    /// Users with a counted message.
    pub users: Vec<String>,
}

/// What one flush hands to the store.
#[derive(Debug, Clone, Default)]
pub struct StatsBatch {
    /// The time of the flush, in Unix seconds: retention counts from it.
    pub now: i64,
    /// Buckets kept per granularity.
    pub retention: Retention,
    /// The rows, in no particular order; one (hour, character) may appear
    /// more than once (a retried batch merged with a new one).
    pub rows: Vec<StatsRow>,
}

/// What a flush adds to one bucket, globally or for one character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketUpdate<'a> {
    /// The bucket's size.
    pub granularity: Granularity,
    /// Its start, in Unix seconds.
    pub start: i64,
    /// `None` for the figures of every character.
    pub character_id: Option<&'a str>,
    /// Kind -> (messages, denials).
    pub kinds: BTreeMap<&'a str, (u64, u64)>,
    /// Users with a counted message.
    pub users: BTreeSet<&'a str>,
    /// Unix seconds at which the bucket leaves the retained ones.
    pub expires_at: i64,
}

impl BucketUpdate<'_> {
    /// Messages of every kind.
    pub fn messages(&self) -> u64 {
        self.kinds.values().map(|(messages, _)| messages).sum()
    }
}

impl StatsBatch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Entries the batch holds (rows and users), against
    /// [`MAX_PENDING_ENTRIES`].
    pub fn entries(&self) -> usize {
        self.rows.iter().map(|row| 1 + row.users.len()).sum()
    }

    /// Every bucket the batch adds to, still retained at `now`: per
    /// granularity, the global figures and each character's, with the
    /// rows of one bucket summed.
    pub fn updates(&self) -> Vec<BucketUpdate<'_>> {
        let mut updates: BTreeMap<(Granularity, i64, Option<&str>), BucketUpdate<'_>> =
            BTreeMap::new();
        for row in &self.rows {
            for granularity in Granularity::ALL {
                let start = granularity.start_of(row.hour);
                let expires_at = self.retention.expires_at(granularity, start);
                if expires_at <= self.now {
                    continue;
                }
                for character_id in [None, Some(row.character_id.as_str())] {
                    let update = updates
                        .entry((granularity, start, character_id))
                        .or_insert_with(|| BucketUpdate {
                            granularity,
                            start,
                            character_id,
                            kinds: BTreeMap::new(),
                            users: BTreeSet::new(),
                            expires_at,
                        });
                    for count in &row.kinds {
                        let sums = update.kinds.entry(count.kind.as_str()).or_default();
                        sums.0 += count.messages;
                        sums.1 += count.denials;
                    }
                    update.users.extend(row.users.iter().map(String::as_str));
                }
            }
        }
        updates.into_values().collect()
    }

    /// Adds `other`'s rows (a retried batch taking in the next one).
    pub fn merge(&mut self, other: Self) {
        self.now = self.now.max(other.now);
        self.retention = other.retention;
        self.rows.extend(other.rows);
    }

    /// Drops rows of the oldest hours until at most `max` entries are
    /// left; returns the entries dropped.
    pub fn bound(&mut self, max: usize) -> usize {
        let mut held = self.entries();
        if held <= max {
            return 0;
        }
        self.rows.sort_by_key(|row| std::cmp::Reverse(row.hour));
        let mut dropped = 0;
        while held > max {
            let Some(row) = self.rows.pop() else { break };
            let entries = 1 + row.users.len();
            held -= entries;
            dropped += entries;
        }
        dropped
    }
}

/// Which buckets GetStats reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsQuery<'a> {
    /// Their size.
    pub granularity: Granularity,
    /// Their starts, oldest first; the last is the current bucket.
    pub starts: Vec<i64>,
    /// `None` for the figures of every character.
    pub character_id: Option<&'a str>,
    /// Also list this many characters with the most messages in the
    /// current bucket.
    pub top: usize,
    /// Now, in Unix seconds.
    pub now: i64,
}

/// One bucket's figures as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BucketFigures {
    /// The bucket's start, in Unix seconds.
    pub start: i64,
    /// Kind -> messages counted; kinds never counted may be absent.
    pub messages: BTreeMap<String, u64>,
    /// Kind -> calls denied; kinds never denied may be absent.
    pub denials: BTreeMap<String, u64>,
    /// Distinct users with a counted message (an estimate).
    pub active_users: u64,
}

/// The answer to a [`StatsQuery`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsReport {
    /// One per start asked for, in the same order.
    pub buckets: Vec<BucketFigures>,
    /// (character, messages) in the current bucket, most first, ties by
    /// character id, at most `top`.
    pub top: Vec<(String, u64)>,
}

/// Sorts `(character, messages)` most first, ties by id, and keeps `top`.
pub fn rank(mut counts: Vec<(String, u64)>, top: usize) -> Vec<(String, u64)> {
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    counts.truncate(top);
    counts
}

/// This instance's aggregates, waiting for the next flush.
#[derive(Debug)]
pub struct Stats {
    settings: StatsSettings,
    clock: StatsClock,
    hasher: RandomState,
    shards: Box<[Mutex<Pending>]>,
    /// A batch whose flush failed, retried with the next one.
    unflushed: Mutex<StatsBatch>,
    dropped: Counter,
}

/// One shard: hour -> character -> row.
#[derive(Debug, Default)]
struct Pending {
    hours: HashMap<i64, HashMap<String, Row>>,
    entries: usize,
}

#[derive(Debug, Default)]
struct Row {
    kinds: Vec<KindCount>,
    users: HashSet<String>,
}

impl Stats {
    /// Aggregates on the system clock, counting dropped entries in
    /// `dropped` (`tollgate_stats_dropped_total`).
    pub fn new(settings: StatsSettings, dropped: Counter) -> Self {
        Self::with_clock(settings, StatsClock::System, dropped)
    }

    /// Aggregates on `clock`.
    pub fn with_clock(settings: StatsSettings, clock: StatsClock, dropped: Counter) -> Self {
        Self {
            settings,
            clock,
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            unflushed: Mutex::default(),
            dropped,
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &StatsSettings {
        &self.settings
    }

    /// The clock buckets are read on.
    pub fn clock(&self) -> &StatsClock {
        &self.clock
    }

    /// Records one IncrementUsage decision: `messages` counted for `user_id`
    /// when allowed, else one denial. Cheap: one short lock, no I/O.
    pub fn record(&self, user_id: &str, character_id: &str, kind: &str, decided: Decided) {
        let hour = Granularity::Hour.start_of(self.clock.now());
        let per_shard = MAX_PENDING_ENTRIES / SHARDS;
        let mut shard = self.shard(character_id);
        let Pending { hours, entries } = &mut *shard;
        let rows = hours.entry(hour).or_default();
        let row = match rows.get_mut(character_id) {
            Some(row) => row,
            None => {
                if *entries >= per_shard {
                    drop(shard);
                    self.dropped.inc();
                    return;
                }
                *entries += 1;
                rows.entry(character_id.to_owned()).or_default()
            }
        };
        let count = match row.kinds.iter_mut().position(|k| k.kind == kind) {
            Some(at) => &mut row.kinds[at],
            None => {
                row.kinds.push(KindCount {
                    kind: kind.to_owned(),
                    ..KindCount::default()
                });
                let last = row.kinds.len() - 1;
                &mut row.kinds[last]
            }
        };
        match decided {
            Decided::Counted(messages) => {
                count.messages += messages;
                if !row.users.contains(user_id) {
                    if *entries >= per_shard {
                        drop(shard);
                        self.dropped.inc();
                        return;
                    }
                    *entries += 1;
                    row.users.insert(user_id.to_owned());
                }
            }
            Decided::Denied => count.denials += 1,
        }
    }

    /// Everything recorded since the last take, with any batch that failed
    /// to flush, bounded by [`MAX_PENDING_ENTRIES`].
    pub fn take(&self) -> StatsBatch {
        let now = self.clock.now();
        let mut batch = std::mem::take(&mut *lock(&self.unflushed));
        batch.now = now;
        batch.retention = self.settings.retention;
        for shard in self.shards.iter() {
            let pending = std::mem::take(&mut *lock(shard));
            for (hour, rows) in pending.hours {
                for (character_id, row) in rows {
                    batch.rows.push(StatsRow {
                        hour,
                        character_id,
                        kinds: row.kinds,
                        users: row.users.into_iter().collect(),
                    });
                }
            }
        }
        let dropped = batch.bound(MAX_PENDING_ENTRIES);
        if dropped > 0 {
            self.dropped.inc_by(dropped as u64);
        }
        batch
    }

    /// Keeps a batch whose flush failed, for the next flush.
    pub fn keep(&self, batch: StatsBatch) {
        let mut unflushed = lock(&self.unflushed);
        let mut kept = batch;
        kept.merge(std::mem::take(&mut *unflushed));
        *unflushed = kept;
    }

    fn shard(&self, character_id: &str) -> MutexGuard<'_, Pending> {
        let index = (self.hasher.hash_one(character_id) as usize) % self.shards.len();
        lock(&self.shards[index])
    }
}

/// What one IncrementUsage decision adds to the statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    /// Allowed (premium and unlimited included): this many messages counted.
    Counted(u64),
    /// Denied by the quota.
    Denied,
}

/// A poisoned lock only means a thread panicked mid-update of plain
/// counters; they are still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_align_in_utc_and_weeks_start_on_monday() {
        // 2026-11-30 is a Monday; 13:45:10 UTC.
        let t = 1_796_046_310;
        assert_eq!(Granularity::Hour.start_of(t), 1_796_043_600);
        assert_eq!(Granularity::Day.start_of(t), 1_795_996_800);
        assert_eq!(Granularity::Week.start_of(t), 1_795_996_800);
        // The Sunday before belongs to the previous week.
        assert_eq!(Granularity::Week.start_of(t - DAY), 1_795_996_800 - WEEK);
        // The epoch (a Thursday) is in the week of Monday 1969-12-29.
        assert_eq!(Granularity::Week.start_of(0), -3 * DAY);
    }

    #[test]
    fn recording_aggregates_per_hour_and_character() {
        let clock = StatsClock::manual(1_796_046_310);
        let stats = Stats::with_clock(StatsSettings::default(), clock.clone(), Counter::default());
        stats.record("u1", "luna", "text", Decided::Counted(2));
        stats.record("u1", "luna", "text", Decided::Counted(1));
        stats.record("u2", "luna", "text", Decided::Denied);
        stats.record("u2", "max", "image", Decided::Counted(1));
        let batch = stats.take();
        assert_eq!(batch.rows.len(), 2);
        let updates = batch.updates();
        let global_hour = updates
            .iter()
            .find(|u| u.granularity == Granularity::Hour && u.character_id.is_none())
            .expect("a global hour bucket");
        assert_eq!(global_hour.kinds["text"], (3, 1));
        assert_eq!(global_hour.kinds["image"], (1, 0));
        assert_eq!(global_hour.users.len(), 2);
        // 3 granularities x (global + 2 characters).
        assert_eq!(updates.len(), 9);
        assert!(stats.take().is_empty());
    }

    #[test]
    fn a_bounded_batch_drops_the_oldest_hours() {
        let mut batch = StatsBatch::default();
        for hour in 0..10 {
            batch.rows.push(StatsRow {
                hour: hour * HOUR,
                character_id: "c".to_owned(),
                kinds: Vec::new(),
                users: vec!["u".to_owned()],
            });
        }
        assert_eq!(batch.bound(6), 14);
        assert_eq!(batch.entries(), 6);
        assert!(batch.rows.iter().all(|row| row.hour >= 7 * HOUR));
    }
}
