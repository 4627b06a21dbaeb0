//! The memory store's statistics: the same buckets Redis keeps, in process.
//!
//! Memory: per bucket (of each granularity, within its retention) and per
//! character active in it, the kind counts and a [`Distinct`] set of users,
//! which holds at most about 16 KiB (exact up to 1,024 users, then a
//! HyperLogLog). Buckets past their retention are dropped at the next flush
//! or read.

use std::collections::{BTreeMap, HashMap};

use crate::stats::{
    BucketFigures, Granularity, StatsBatch, StatsQuery, StatsReport, distinct::Distinct, rank,
};

/// Every retained bucket.
#[derive(Debug, Default)]
pub(super) struct MemoryStats {
    buckets: BTreeMap<(Granularity, i64), Bucket>,
}

#[derive(Debug, Default)]
struct Bucket {
    expires_at: i64,
    global: Figures,
    characters: HashMap<String, Figures>,
}

#[derive(Debug, Default)]
struct Figures {
    /// Kind -> (messages, denials).
    kinds: BTreeMap<String, (u64, u64)>,
    messages: u64,
    users: Distinct,
}

impl MemoryStats {
    /// Adds a flush.
    pub(super) fn flush(&mut self, batch: &StatsBatch) {
        self.expire(batch.now);
        for update in batch.updates() {
            let bucket = self
                .buckets
                .entry((update.granularity, update.start))
                .or_default();
            bucket.expires_at = update.expires_at;
            let figures = match update.character_id {
                None => &mut bucket.global,
                Some(id) => bucket.characters.entry(id.to_owned()).or_default(),
            };
            for (kind, (messages, denials)) in &update.kinds {
                let sums = figures.kinds.entry((*kind).to_owned()).or_default();
                sums.0 += messages;
                sums.1 += denials;
                figures.messages += messages;
            }
            for user in &update.users {
                figures.users.add(user);
            }
        }
    }

    /// Reads the buckets `query` names.
    pub(super) fn read(&mut self, query: &StatsQuery<'_>) -> StatsReport {
        self.expire(query.now);
        let buckets = query
            .starts
            .iter()
            .map(|&start| {
                let bucket = self.buckets.get(&(query.granularity, start));
                let figures = bucket.and_then(|bucket| match query.character_id {
                    None => Some(&bucket.global),
                    Some(id) => bucket.characters.get(id),
                });
                let mut read = BucketFigures {
                    start,
                    ..BucketFigures::default()
                };
                if let Some(figures) = figures {
                    for (kind, (messages, denials)) in &figures.kinds {
                        read.messages.insert(kind.clone(), *messages);
                        read.denials.insert(kind.clone(), *denials);
                    }
                    read.active_users = figures.users.count();
                }
                read
            })
            .collect();
        let top = match (query.top, query.starts.last()) {
            (0, _) | (_, None) => Vec::new(),
            (top, Some(&current)) => self
                .buckets
                .get(&(query.granularity, current))
                .map(|bucket| {
                    let counts = bucket
                        .characters
                        .iter()
                        .filter(|(_, figures)| figures.messages > 0)
                        .map(|(id, figures)| (id.clone(), figures.messages))
                        .collect();
                    rank(counts, top)
                })
                .unwrap_or_default(),
        };
        StatsReport { buckets, top }
    }

    fn expire(&mut self, now: i64) {
        self.buckets.retain(|_, bucket| bucket.expires_at > now);
    }
}
