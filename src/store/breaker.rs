//! A circuit breaker around any [`Store`].
//!
//! When the store fails `failure_threshold` times in a row (timeouts or
//! refused connections, not protocol errors, which are bugs rather than
//! outages), the breaker opens: for `cool_down` every call fails at once with
//! [`StoreError::CircuitOpen`] instead of waiting out the store timeout, so
//! callers get their degraded answer immediately and a struggling Redis is
//! not hammered. After the cool-down one call is let through as a probe; if
//! it succeeds the breaker closes, otherwise it stays open for another
//! cool-down. The health prober's PING is such a call, so the breaker closes
//! by itself even with no traffic.
//!
//! The state is three atomics rather than a mutex because every decision
//! passes through here.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::{
    ConversationCounters, GroupDecision, LimitCheck, LimitDecision, LimitInspect, LimitSettle,
    LimitUsage, Once, ResetListener, Store, StoreError, UsageDecision, UsageIncrement, UsageSettle,
};
use crate::stats::{StatsBatch, StatsQuery, StatsReport};

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerOptions {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before letting one probe through.
    pub cool_down: Duration,
}

impl Default for BreakerOptions {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cool_down: Duration::from_secs(1),
        }
    }
}

/// The breaker's state, as metrics and health report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go to the store.
    Closed,
    /// Calls fail fast.
    Open,
}

/// A [`Store`] that stops waiting on its inner store after repeated failures.
#[derive(Debug, Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    options: BreakerOptions,
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// Milliseconds since `epoch` until which the breaker is open; 0 when
    /// closed. Times are stored plus one so that 0 always means closed.
    open_until: AtomicU64,
    probe_in_flight: AtomicBool,
}

/// What the breaker lets a call do.
enum Admission {
    Pass,
    Probe,
    Reject(Duration),
}

impl<S: Store> CircuitBreaker<S> {
    /// Wraps `inner`, starting closed.
    pub fn new(inner: S, options: BreakerOptions) -> Self {
        Self {
            inner,
            shared: Arc::new(Shared {
                options,
                epoch: Instant::now(),
                consecutive_failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                probe_in_flight: AtomicBool::new(false),
            }),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Whether calls currently reach the store.
    pub fn state(&self) -> BreakerState {
        if self.shared.open_until.load(Ordering::Acquire) == 0 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        }
    }

    async fn call<T>(
        &self,
        operation: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let probing = match self.shared.admit() {
            Admission::Pass => false,
            Admission::Probe => true,
            Admission::Reject(retry_in) => return Err(StoreError::CircuitOpen(retry_in)),
        };
        let result = operation.await;
        self.shared.record(&result, probing);
        result
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn admit(&self) -> Admission {
        let open_until = self.open_until.load(Ordering::Acquire);
        if open_until == 0 {
            return Admission::Pass;
        }
        let now = self.now_ms();
        if now < open_until {
            return Admission::Reject(Duration::from_millis(open_until - now));
        }
        // Cool-down over: exactly one caller probes, the rest keep failing
        // fast until it reports.
        if self
            .probe_in_flight
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            Admission::Probe
        } else {
            Admission::Reject(Duration::ZERO)
        }
    }

    fn record<T>(&self, result: &Result<T, StoreError>, probing: bool) {
        match result {
            Ok(_) | Err(StoreError::Protocol(_)) => {
                if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                }
                if (probing || self.open_until.load(Ordering::Relaxed) != 0)
                    && self.open_until.swap(0, Ordering::AcqRel) != 0
                {
                    tracing::info!("store answers again; circuit breaker closed");
                }
            }
            Err(StoreError::CircuitOpen(_)) => {}
            Err(err @ (StoreError::Timeout(_) | StoreError::Unavailable(_))) => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if probing || failures >= self.options.failure_threshold {
                    let until = self.now_ms() + millis(self.options.cool_down);
                    if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                        tracing::warn!(
                            error = %err,
                            failures,
                            cool_down = ?self.options.cool_down,
                            "circuit breaker opened: answering without the store"
                        );
                    }
                }
            }
        }
        if probing {
            self.probe_in_flight.store(false, Ordering::Release);
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX / 2)
}

impl<S: Store> Store for CircuitBreaker<S> {
    async fn check_limit(&self, check: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        self.call(self.inner.check_limit(check)).await
    }

    async fn check_limits(
        &self,
        checks: &[LimitCheck<'_>],
        request_id: Option<&str>,
    ) -> Result<GroupDecision, StoreError> {
        self.call(self.inner.check_limits(checks, request_id)).await
    }

    async fn increment_usage(
        &self,
        increment: &UsageIncrement<'_>,
    ) -> Result<UsageDecision, StoreError> {
        self.call(self.inner.increment_usage(increment)).await
    }

    async fn check_limit_once(
        &self,
        check: &LimitCheck<'_>,
        request_id: &str,
    ) -> Result<Once<LimitDecision>, StoreError> {
        self.call(self.inner.check_limit_once(check, request_id))
            .await
    }

    async fn settle_limit(&self, settle: &LimitSettle<'_>) -> Result<Option<u64>, StoreError> {
        self.call(self.inner.settle_limit(settle)).await
    }

    async fn increment_usage_once(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: &str,
    ) -> Result<Once<UsageDecision>, StoreError> {
        self.call(self.inner.increment_usage_once(increment, request_id))
            .await
    }

    async fn settle_usage(&self, settle: &UsageSettle<'_>) -> Result<Option<u64>, StoreError> {
        self.call(self.inner.settle_usage(settle)).await
    }

    async fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> Result<ConversationCounters, StoreError> {
        self.call(self.inner.get_usage(user_id, character_id)).await
    }

    async fn list_usage(
        &self,
        user_id: &str,
        max: usize,
    ) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
        self.call(self.inner.list_usage(user_id, max)).await
    }

    /// Not while the breaker is open (the store is failing; the batch waits
    /// for the next flush), and never counted towards opening it: a slow or
    /// failed flush must not change how decisions are answered.
    async fn flush_stats(&self, batch: &StatsBatch) -> Result<(), StoreError> {
        if self.state() == BreakerState::Open {
            return Err(StoreError::CircuitOpen(Duration::ZERO));
        }
        self.inner.flush_stats(batch).await
    }

    async fn read_stats(&self, query: &StatsQuery<'_>) -> Result<StatsReport, StoreError> {
        self.call(self.inner.read_stats(query)).await
    }

    async fn inspect_limit(&self, inspect: &LimitInspect<'_>) -> Result<LimitUsage, StoreError> {
        self.call(self.inner.inspect_limit(inspect)).await
    }

    async fn reset_limit(&self, rule: &str, subject: &str) -> Result<bool, StoreError> {
        self.call(self.inner.reset_limit(rule, subject)).await
    }

    async fn reset_usage(
        &self,
        user_id: &str,
        character_id: Option<&str>,
    ) -> Result<u32, StoreError> {
        self.call(self.inner.reset_usage(user_id, character_id))
            .await
    }

    fn on_reset(&self, listener: ResetListener) {
        self.inner.on_reset(listener);
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.call(self.inner.ping()).await
    }

    fn circuit_open(&self) -> bool {
        self.state() == BreakerState::Open || self.inner.circuit_open()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// A store whose health the test switches; it counts the calls it sees.
    #[derive(Debug, Default)]
    struct Switch {
        down: AtomicBool,
        calls: AtomicU32,
    }

    impl Store for Arc<Switch> {
        async fn check_limit(&self, _: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn check_limits(
            &self,
            _: &[LimitCheck<'_>],
            _: Option<&str>,
        ) -> Result<GroupDecision, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn increment_usage(
            &self,
            _: &UsageIncrement<'_>,
        ) -> Result<UsageDecision, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn get_usage(&self, _: &str, _: &str) -> Result<ConversationCounters, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn check_limit_once(
            &self,
            _: &LimitCheck<'_>,
            _: &str,
        ) -> Result<Once<LimitDecision>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn settle_limit(&self, _: &LimitSettle<'_>) -> Result<Option<u64>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn increment_usage_once(
            &self,
            _: &UsageIncrement<'_>,
            _: &str,
        ) -> Result<Once<UsageDecision>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn settle_usage(&self, _: &UsageSettle<'_>) -> Result<Option<u64>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn list_usage(
            &self,
            _: &str,
            _: usize,
        ) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn inspect_limit(&self, _: &LimitInspect<'_>) -> Result<LimitUsage, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn reset_limit(&self, _: &str, _: &str) -> Result<bool, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn reset_usage(&self, _: &str, _: Option<&str>) -> Result<u32, StoreError> {
            unreachable!("not used by these tests")
        }
        async fn ping(&self) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable("switched off".to_owned()))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let switch = Arc::new(Switch::default());
        let options = BreakerOptions {
            failure_threshold: 3,
            cool_down: Duration::from_secs(1),
        };
        let breaker = CircuitBreaker::new(switch.clone(), options);
        switch.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(matches!(
                breaker.ping().await,
                Err(StoreError::Unavailable(_))
            ));
        }
        assert_eq!(breaker.state(), BreakerState::Open);

        // Open: fails fast without touching the store.
        assert!(matches!(
            breaker.ping().await,
            Err(StoreError::CircuitOpen(_))
        ));
        assert_eq!(switch.calls.load(Ordering::SeqCst), 3);

        // After the cool-down a failed probe keeps it open for another one.
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(matches!(
            breaker.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(matches!(
            breaker.ping().await,
            Err(StoreError::CircuitOpen(_))
        ));

        // The store is back: the next probe closes the breaker.
        switch.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(breaker.ping().await.is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.ping().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_failure_count() {
        let switch = Arc::new(Switch::default());
        let breaker = CircuitBreaker::new(
            switch.clone(),
            BreakerOptions {
                failure_threshold: 2,
                cool_down: Duration::from_secs(1),
            },
        );
        switch.down.store(true, Ordering::SeqCst);
        assert!(breaker.ping().await.is_err());
        switch.down.store(false, Ordering::SeqCst);
        assert!(breaker.ping().await.is_ok());
        switch.down.store(true, Ordering::SeqCst);
        assert!(breaker.ping().await.is_err());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
