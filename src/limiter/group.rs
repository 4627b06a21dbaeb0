//! CheckLimits: several rate limits decided together, all or nothing (see
//! [`crate::store::group`] for what the stores promise).

use std::{sync::Arc, time::Duration};

use super::{
    CheckOutcome, CheckRequest, DEGRADED_RETRY_AFTER, Error, Limiter, join, resolve_tier,
    validate_id,
};
use crate::{
    metrics::Operation,
    rules::{FailureMode, Rule, Tier},
    store::{LimitCheck, LimitDecision, MAX_GROUP_CHECKS, Store, StoreError, group::all_allowed},
};

/// The longest group `request_id` accepted, in bytes.
pub const MAX_GROUP_REQUEST_ID_BYTES: usize = 128;

/// The answer to a CheckLimits group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOutcome {
    /// Every check allowed, and counted; when false nothing was counted.
    pub allowed: bool,
    /// One per check, in order: each check's own answer.
    pub checks: Vec<CheckOutcome>,
    /// The first answer to the group's request_id, given again; nothing
    /// was counted.
    pub replayed: bool,
}

/// One check of a group, resolved against the policy.
struct Resolved<'p> {
    rule: &'p Rule,
    tier: Tier,
    limit: u64,
}

impl<S: Store> Limiter<S> {
    /// Decides every check of `requests` together: all are counted, or
    /// none. A store failure is answered by each check's rule's
    /// `on_store_error`, marked `degraded` (and counts nothing); the group
    /// is allowed only if every such answer allows.
    ///
    /// Each check is validated as CheckLimit validates it, its errors
    /// naming `checks[<index>].<field>`; two checks on one counter (the
    /// same rule and subject) are refused, since a group counts each counter
    /// once. A non-empty `request_id` (at most
    /// [`MAX_GROUP_REQUEST_ID_BYTES`]) that was already answered for the
    /// same first subject, within the longest of the checks' windows, gets
    /// that answer again, `replayed`, counting nothing.
    pub async fn check_limits(
        &self,
        requests: &[CheckRequest<'_>],
        request_id: &str,
    ) -> Result<GroupOutcome, Error> {
        let _in_flight = self.metrics.in_flight();
        let in_force = self.in_force.load();
        let policy = &in_force.policy;
        if requests.is_empty() || requests.len() > MAX_GROUP_CHECKS {
            return Err(Error::InvalidArgument {
                field: "checks",
                problem: format!(
                    "must hold 1 to {MAX_GROUP_CHECKS} checks, got {}",
                    requests.len()
                ),
            });
        }
        if request_id.len() > MAX_GROUP_REQUEST_ID_BYTES {
            return Err(Error::InvalidArgument {
                field: "request_id",
                problem: format!(
                    "must be at most {MAX_GROUP_REQUEST_ID_BYTES} bytes, got {}",
                    request_id.len()
                ),
            });
        }
        let mut resolved = Vec::with_capacity(requests.len());
        for (index, request) in requests.iter().enumerate() {
            let in_check = |error| Error::InCheck {
                index,
                error: Box::new(error),
            };
            validate_id("subject", request.subject).map_err(in_check)?;
            let rule = policy.rule(request.rule).ok_or_else(|| {
                in_check(Error::Unknown {
                    field: "rule",
                    what: "rule",
                    name: request.rule.to_owned(),
                    known: join(policy.rules().map(|r| r.name())),
                })
            })?;
            let tier = resolve_tier(policy, request.tier).map_err(in_check)?;
            if let Some(first) = requests[..index]
                .iter()
                .position(|other| other.rule == request.rule && other.subject == request.subject)
            {
                return Err(in_check(Error::InvalidArgument {
                    field: "subject",
                    problem: format!(
                        "rule {:?} and this subject are already checks[{first}]; \
                         a group counts each counter once",
                        request.rule
                    ),
                }));
            }
            resolved.push(Resolved {
                rule,
                tier,
                limit: rule.limit(tier),
            });
        }

        let checks: Vec<LimitCheck<'_>> = requests
            .iter()
            .zip(&resolved)
            .map(|(request, resolved)| LimitCheck {
                rule: resolved.rule.name(),
                subject: request.subject,
                algorithm: resolved.rule.algorithm(),
                limit: resolved.limit,
                window: resolved.rule.window(),
                block_for: resolved.rule.block_for(),
                cost: u64::from(request.cost.max(1)),
                dry_run: request.dry_run,
            })
            .collect();
        // Shadow rules never deny, so they must not decide whether the
        // others are counted: the group proper is the enforced checks. A
        // shadow check is then decided on its own, as its CheckLimit would
        // be: counted if it fits and the group went ahead, else a dry run.
        let (enforced, shadow): (Vec<usize>, Vec<usize>) =
            (0..checks.len()).partition(|&i| !resolved[i].rule.shadow());
        let mut decided: Vec<Option<(LimitDecision, bool)>> = vec![None; checks.len()];
        let mut replayed = false;
        if !enforced.is_empty() {
            let group: Vec<LimitCheck<'_>> = enforced.iter().map(|&i| checks[i]).collect();
            let answer = self
                .metrics
                .store_call(
                    Operation::check_limits,
                    self.store
                        .check_limits(&group, (!request_id.is_empty()).then_some(request_id)),
                )
                .await
                .and_then(|answer| {
                    if answer.decisions.len() == group.len() {
                        Ok(answer)
                    } else {
                        Err(StoreError::Protocol(format!(
                            "{} decisions for {} checks",
                            answer.decisions.len(),
                            group.len()
                        )))
                    }
                });
            match answer {
                Ok(answer) => {
                    replayed = answer.replayed;
                    for (&i, decision) in enforced.iter().zip(answer.decisions) {
                        decided[i] = Some((decision, false));
                    }
                }
                Err(err) => {
                    tracing::debug!(error = %err, "store failed; degraded answers");
                    for &i in &enforced {
                        decided[i] = Some((degraded(&resolved[i]), true));
                    }
                }
            }
        }
        let went_ahead = !replayed
            && enforced
                .iter()
                .all(|&i| decided[i].is_some_and(|(d, _)| d.allowed));
        for &i in &shadow {
            let check = LimitCheck {
                dry_run: checks[i].dry_run || !went_ahead,
                ..checks[i]
            };
            let answer = self
                .metrics
                .store_call(Operation::check_limit, self.store.check_limit(&check))
                .await;
            decided[i] = Some(match answer {
                Ok(decision) => (decision, false),
                Err(err) => {
                    tracing::debug!(error = %err, rule = check.rule, "store failed; degraded answer");
                    (degraded(&resolved[i]), true)
                }
            });
        }

        let mut outcomes = Vec::with_capacity(checks.len());
        for (answer, resolved) in decided.into_iter().zip(&resolved) {
            let (mut decision, degraded) = answer.ok_or_else(|| {
                StoreError::Protocol("a check of a group got no answer".to_owned())
            })?;
            let shadowed = resolved.rule.shadow() && !decision.allowed;
            decision.allowed |= shadowed;
            outcomes.push(CheckOutcome {
                limit: resolved.limit,
                decision,
                degraded,
                replayed,
                shadowed,
                ratelimit_policy: Arc::clone(resolved.rule.ratelimit_policy(resolved.tier)),
            });
        }
        let decisions: Vec<LimitDecision> = outcomes.iter().map(|o| o.decision).collect();
        // An answer given again is no new decision.
        for (outcome, resolved) in outcomes.iter().zip(&resolved).filter(|_| !replayed) {
            in_force
                .counters
                .decision(resolved.rule.name(), resolved.tier, outcome.counted_as());
        }
        Ok(GroupOutcome {
            allowed: all_allowed(&decisions),
            checks: outcomes,
            replayed,
        })
    }
}

/// A check's answer without the store: its rule's `on_store_error`.
fn degraded(resolved: &Resolved<'_>) -> LimitDecision {
    let allowed = resolved.rule.on_store_error() == FailureMode::Allow;
    LimitDecision {
        allowed,
        remaining: 0,
        retry_after: if allowed {
            Duration::ZERO
        } else {
            DEGRADED_RETRY_AFTER
        },
        reset_after: Duration::ZERO,
        blocked: false,
    }
}
