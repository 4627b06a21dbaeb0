//! Several rate limits decided together: what [`Store::check_limits`]
//! promises, whatever the store.
//!
//! - **All or nothing.** When every check is allowed, every check that is
//!   not a dry run is counted, exactly as [`Store::check_limit`] would count
//!   it. When any check is denied, nothing at all is counted: no hit, and no
//!   lock-out started (a `block_for` rule starts a block only on its own
//!   CheckLimit).
//! - **Each check's own answer.** Every check gets the decision it would get
//!   on its own at the same moment, as a dry run when the group is denied:
//!   a check that would pass still says allowed, with the `remaining` it
//!   would leave, inside a denied group.
//! - **No interleaving.** On the memory store and on one Redis server the
//!   group is decided in one step (every involved shard locked, or one
//!   script), so no other caller can see part of it. On a Redis Cluster,
//!   checks whose keys fall in different slots are counted slot by slot,
//!   and what earlier slots counted is taken back if a later one denies: no
//!   caller is ever admitted over a limit, but a concurrent caller may see
//!   less `remaining` (or a denial) while a group that ends denied briefly
//!   holds its hits.
//! - **Retries answered once.** With a request_id, the group's answer is
//!   recorded, in the slot of its first check's subject, for the longest of
//!   its checks' windows; a group with the same id and first subject then
//!   gets that answer again, marked replayed, and counts nothing. Two
//!   such groups at once: one decides, the other gets its answer.
//! - **One counter once.** The limiter never sends two checks on the same
//!   counter (rule and subject) in one group: the second would have to see
//!   the first's hits, which a dry run does not.
//!
//! [`Store::check_limits`]: super::Store::check_limits
//! [`Store::check_limit`]: super::Store::check_limit

use super::LimitDecision;

/// The most checks one group may hold.
pub const MAX_GROUP_CHECKS: usize = 16;

/// A store's answer to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDecision {
    /// One per check, in order.
    pub decisions: Vec<LimitDecision>,
    /// The answer recorded for the group's request_id, given again;
    /// nothing was counted.
    pub replayed: bool,
}

impl GroupDecision {
    /// A fresh answer.
    pub fn decided(decisions: Vec<LimitDecision>) -> Self {
        Self {
            decisions,
            replayed: false,
        }
    }
}

/// How long a group's answer is remembered under its request_id: the
/// longest window among its checks (at least 1 ms).
pub fn record_ttl(checks: &[super::LimitCheck<'_>]) -> std::time::Duration {
    checks
        .iter()
        .map(|check| check.window)
        .max()
        .unwrap_or_default()
        .max(std::time::Duration::from_millis(1))
}

/// Whether a group's decisions admit it: every one allowed.
pub fn all_allowed(decisions: &[LimitDecision]) -> bool {
    decisions.iter().all(|decision| decision.allowed)
}
