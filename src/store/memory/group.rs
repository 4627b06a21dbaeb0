//! Several limits at once on the memory store: every shard a group touches
//! is locked, in ascending index order (so two groups can never each hold a
//! lock the other waits for, and a single check holds only one), before
//! anything is read; the group is then decided at one instant and counted
//! only if every check passes. No other caller sees any part of it.
//!
//! Answers given to a request_id are kept in one map, under its own lock,
//! taken after the shards' (a single check takes no such lock, so no cycle
//! can form). Each counts as one entry of `store.max_entries`: past the
//! cap the oldest record goes first.

use std::sync::{Mutex, MutexGuard, PoisonError};

use hashlink::LinkedHashMap;

use super::{LimitState, MemoryStore, SWEEP_EVERY, Shard, limit_key, lock_shard, micros};
use crate::store::{
    GroupDecision, LimitCheck, LimitDecision,
    group::{all_allowed, record_ttl},
};

/// Answers of groups sent with a request_id, oldest first.
#[derive(Debug, Default)]
pub(super) struct GroupRecords {
    entries: LinkedHashMap<String, Record>,
    next_sweep_us: u64,
}

#[derive(Debug)]
struct Record {
    /// Microseconds on the store's clock until which it is given again.
    until: u64,
    decisions: Vec<LimitDecision>,
}

/// A record's key: the subject's length first, so that no (subject, id)
/// pair can spell another.
fn record_key(subject: &str, request_id: &str) -> String {
    format!("{}:{subject}{request_id}", subject.len())
}

impl MemoryStore {
    /// See [`crate::store::group`] for the contract.
    pub(super) fn decide_group(
        &self,
        checks: &[LimitCheck<'_>],
        request_id: Option<&str>,
    ) -> GroupDecision {
        let shards = &self.inner.limits;
        let keys: Vec<String> = checks.iter().map(limit_key).collect();
        let indices: Vec<usize> = keys
            .iter()
            .map(|key| self.shard_index(shards, key))
            .collect();
        let mut order = indices.clone();
        order.sort_unstable();
        order.dedup();
        let mut locked: Vec<MutexGuard<'_, Shard<LimitState>>> =
            order.iter().map(|&i| lock_shard(&shards[i])).collect();
        // One instant for the whole group, read under the locks.
        let now = self.now();
        for shard in &mut locked {
            shard.sweep_if_due(now);
        }
        let mut records = request_id.map(|id| {
            let key = record_key(checks.first().map_or("", |c| c.subject), id);
            let records = lock_records(&self.inner.groups);
            (key, records)
        });
        if let Some((key, records)) = &mut records {
            self.sweep_records(records, now);
            if let Some(record) = records
                .entries
                .get(key.as_str())
                .filter(|record| now < record.until)
            {
                return GroupDecision {
                    decisions: record.decisions.clone(),
                    replayed: true,
                };
            }
        }
        let decisions = self.decide_locked(checks, &keys, &indices, &order, &mut locked, now);
        if let Some((key, mut records)) = records {
            let until = now.saturating_add(micros(record_ttl(checks)));
            let record = Record {
                until,
                decisions: decisions.clone(),
            };
            if records.entries.insert(key, record).is_none() {
                self.inner.budget.add(1);
            }
            while self.inner.budget.over() {
                match records.entries.pop_front() {
                    Some(_) => self.inner.budget.evicted(1),
                    None => break,
                }
            }
        }
        GroupDecision::decided(decisions)
    }

    fn sweep_records(&self, records: &mut GroupRecords, now: u64) {
        if now < records.next_sweep_us {
            return;
        }
        let before = records.entries.len();
        records.entries.retain(|_, record| now < record.until);
        self.inner.budget.release(before - records.entries.len());
        records.next_sweep_us = now.saturating_add(micros(SWEEP_EVERY));
    }

    /// Decides the group with every shard it touches locked, at `now`.
    fn decide_locked(
        &self,
        checks: &[LimitCheck<'_>],
        keys: &[String],
        indices: &[usize],
        order: &[usize],
        locked: &mut [MutexGuard<'_, Shard<LimitState>>],
        now: u64,
    ) -> Vec<LimitDecision> {
        let slot = |index: usize| order.binary_search(&index).unwrap_or_default();
        // First every check as a dry run: nothing changes that a decision
        // depends on (a log drops only hits that have left the window).
        let peeked: Vec<LimitDecision> = checks
            .iter()
            .zip(keys)
            .zip(indices)
            .map(|((check, key), &index)| {
                let dry = LimitCheck {
                    dry_run: true,
                    ..*check
                };
                let shard = &mut locked[slot(index)];
                match shard.entries.get_mut(key) {
                    Some(state) => state.decide(&dry, now),
                    None => LimitState::new(check.algorithm).decide(&dry, now),
                }
            })
            .collect();
        if !all_allowed(&peeked) {
            return peeked;
        }
        // Then count each, as `check_limit` does. The checks are on distinct
        // counters (the limiter's promise), so each sees the state its dry
        // run saw, at the same instant: allowed again.
        checks
            .iter()
            .zip(keys)
            .zip(indices)
            .map(|((check, key), &index)| {
                let shard = &mut locked[slot(index)];
                if let Some(state) = shard.entries.to_back(key) {
                    return state.decide(check, now);
                }
                let mut state = LimitState::new(check.algorithm);
                let decision = state.decide(check, now);
                if state.is_live(now) {
                    shard.budget.add(1);
                    shard.evict_for(key, now);
                    shard.entries.insert(key.clone(), state);
                }
                decision
            })
            .collect()
    }
}

/// A poisoned lock only means another thread panicked mid-update of plain
/// records; each is still whole, so carry on.
fn lock_records(records: &Mutex<GroupRecords>) -> MutexGuard<'_, GroupRecords> {
    records.lock().unwrap_or_else(PoisonError::into_inner)
}
