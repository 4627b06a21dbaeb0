//! Several limits at once on the memory store: every shard a group touches
//! is locked, in ascending index order (so two groups can never each hold a
//! lock the other waits for, and a single check holds only one), before
//! anything is read; the group is then decided at one instant and counted
//! only if every check passes. No other caller sees any part of it.

use std::sync::MutexGuard;

use super::{LimitState, MemoryStore, Shard, limit_key, lock_shard};
use crate::store::{LimitCheck, LimitDecision, group::all_allowed};

impl MemoryStore {
    /// See [`crate::store::group`] for the contract.
    pub(super) fn decide_group(&self, checks: &[LimitCheck<'_>]) -> Vec<LimitDecision> {
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
        let slot = |index: usize| order.binary_search(&index).unwrap_or_default();

        // First every check as a dry run: nothing changes that a decision
        // depends on (a log drops only hits that have left the window).
        let peeked: Vec<LimitDecision> = checks
            .iter()
            .zip(&keys)
            .zip(&indices)
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
            .zip(&indices)
            .map(|((check, key), &index)| {
                let shard = &mut locked[slot(index)];
                if let Some(state) = shard.entries.to_back(&key) {
                    return state.decide(check, now);
                }
                let mut state = LimitState::new(check.algorithm);
                let decision = state.decide(check, now);
                if state.is_live(now) {
                    shard.budget.add(1);
                    shard.evict_for(&key, now);
                    shard.entries.insert(key, state);
                }
                decision
            })
            .collect()
    }
}
