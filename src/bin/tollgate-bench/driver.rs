//! Drives load: `concurrency` workers, each with one request in flight,
//! spread over the connections, until a bound is reached.
//!
//! Each worker keeps its own [`Tally`] (histogram and counters), so the hot
//! path shares nothing but one atomic request counter; the tallies are
//! merged when the phase ends.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::{
    calls::Caller,
    cli::{Bounds, Pick},
};

/// How many gRPC status codes exist (OK = 0 .. Unauthenticated = 16).
pub(crate) const CODES: usize = 17;

/// The highest latency the histogram tells apart, in microseconds; slower
/// requests are recorded as this. Far above any request timeout.
const HISTOGRAM_MAX_MICROS: u64 = 120_000_000;

/// What one phase's requests came to.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    /// Latency of every completed request, errors included, in microseconds.
    pub(crate) latency: Histogram<u64>,
    /// Requests the server allowed.
    pub(crate) allowed: u64,
    /// Requests the server denied.
    pub(crate) denied: u64,
    /// Failed requests by gRPC status code.
    pub(crate) errors: [u64; CODES],
    /// The first message seen for each failing code, to tell the user why.
    pub(crate) first_error: [Option<String>; CODES],
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, HISTOGRAM_MAX_MICROS, 3)
                .expect("1 <= HISTOGRAM_MAX_MICROS and 3 significant figures are valid bounds"),
            allowed: 0,
            denied: 0,
            errors: [0; CODES],
            first_error: Default::default(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<bool, Status>) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros);
        match outcome {
            Ok(true) => self.allowed += 1,
            Ok(false) => self.denied += 1,
            Err(status) => {
                let code = code_index(status.code());
                self.errors[code] += 1;
                if self.first_error[code].is_none() {
                    self.first_error[code] = Some(status.message().to_owned());
                }
            }
        }
    }

    fn merge(&mut self, other: Self) {
        self.latency
            .add(&other.latency)
            .expect("every tally's histogram has the same bounds");
        self.allowed += other.allowed;
        self.denied += other.denied;
        for (code, (count, first)) in other.errors.into_iter().zip(other.first_error).enumerate() {
            self.errors[code] += count;
            if self.first_error[code].is_none() {
                self.first_error[code] = first;
            }
        }
    }

    /// Requests that completed, whatever the outcome.
    pub(crate) fn count(&self) -> u64 {
        self.allowed + self.denied + self.error_count()
    }

    /// Requests that failed.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// The index of `code` in [`Tally::errors`].
fn code_index(code: Code) -> usize {
    usize::try_from(code as i32).map_or(CODES - 1, |index| index.min(CODES - 1))
}

/// The [`Code`] at `index` of [`Tally::errors`].
pub(crate) fn code_at(index: usize) -> Code {
    Code::from_i32(i32::try_from(index).unwrap_or(i32::MAX))
}

/// One phase of load: its bounds and pacing.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phase {
    /// When to stop.
    pub(crate) bounds: Bounds,
    /// A fixed arrival rate, or as fast as the workers go.
    pub(crate) rps: Option<u32>,
    /// How requests pick subjects.
    pub(crate) pick: Pick,
    /// Workers, i.e. requests in flight.
    pub(crate) concurrency: u32,
}

/// Stops every phase early (Ctrl-C): an atomic flag for the hot path and a
/// watch channel to wake workers that sleep until their scheduled time.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    flag: Arc<AtomicBool>,
    wake: watch::Receiver<bool>,
}

impl Stop {
    /// A stop signal and the function that raises it.
    pub(crate) fn new() -> (Self, impl FnOnce()) {
        let flag = Arc::new(AtomicBool::new(false));
        let (sender, wake) = watch::channel(false);
        let raise = {
            let flag = flag.clone();
            move || {
                flag.store(true, Ordering::Relaxed);
                let _ = sender.send(true);
            }
        };
        (Self { flag, wake }, raise)
    }

    fn raised(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// What workers share: the request counter and the phase's clock.
struct Shared {
    next: AtomicU64,
    start: Instant,
    deadline: Instant,
    phase: Phase,
    subjects: Arc<[String]>,
}

/// Runs one phase with `callers` (one per connection; worker `w` uses
/// `callers[w % len]`) and returns the merged tally and the elapsed time.
pub(crate) async fn run_phase<C: Caller>(
    callers: &[C],
    subjects: Arc<[String]>,
    phase: Phase,
    stop: &Stop,
) -> (Tally, Duration) {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        start,
        deadline: start + phase.bounds.duration,
        phase,
        subjects,
    });
    let workers: Vec<_> = (0..phase.concurrency as usize)
        .map(|worker| {
            let caller = callers[worker % callers.len()].clone();
            tokio::spawn(work(caller, shared.clone(), stop.clone(), worker as u64))
        })
        .collect();
    let mut total = Tally::new();
    for worker in workers {
        match worker.await {
            Ok(tally) => total.merge(tally),
            // A worker only panics on a broken invariant; let it show.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        }
    }
    (total, start.elapsed())
}

/// One worker: claims request numbers until a bound is reached, sending one
/// request at a time.
async fn work<C: Caller>(mut caller: C, shared: Arc<Shared>, mut stop: Stop, seed: u64) -> Tally {
    let mut tally = Tally::new();
    let mut random = SplitMix64::new(seed);
    let subjects = &*shared.subjects;
    let phase = shared.phase;
    loop {
        if stop.raised() {
            break;
        }
        let number = shared.next.fetch_add(1, Ordering::Relaxed);
        if number >= phase.bounds.requests {
            break;
        }
        let began = match phase.rps {
            None => {
                let now = Instant::now();
                if now >= shared.deadline {
                    break;
                }
                now
            }
            Some(rps) => match scheduled_start(&shared, number, rps, &mut stop).await {
                Some(began) => began,
                None => break,
            },
        };
        let index = match phase.pick {
            Pick::RoundRobin => number % subjects.len() as u64,
            Pick::Random => random.below(subjects.len() as u64),
        };
        let outcome = caller.send(&subjects[index as usize]).await;
        tally.record(began.elapsed(), outcome);
    }
    tally
}

/// Waits for request `number`'s slot in a fixed-rate schedule and returns
/// the instant its latency counts from, or `None` when the phase is over.
///
/// Latency counts from the scheduled time when the worker is late for it
/// (all workers were busy: the server is behind, and that queueing is part
/// of the latency, so coordinated omission is avoided). A worker that was
/// idle and slept counts from when it woke, so the timer's millisecond
/// granularity is not charged to the server.
async fn scheduled_start(
    shared: &Shared,
    number: u64,
    rps: u32,
    stop: &mut Stop,
) -> Option<Instant> {
    let offset_nanos = u128::from(number) * 1_000_000_000 / u128::from(rps);
    let scheduled = shared.start + Duration::from_nanos(u64::try_from(offset_nanos).ok()?);
    if scheduled >= shared.deadline {
        return None;
    }
    if scheduled <= Instant::now() {
        return Some(scheduled);
    }
    tokio::select! {
        () = tokio::time::sleep_until(scheduled.into()) => Some(Instant::now()),
        _ = stop.wake.changed() => None,
    }
}

/// A small, fast generator for random subject picks; quality needs are low.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(nanos))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`; `bound` is at most ten million, so the modulo
    /// bias is negligible.
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_merge_counts_and_first_errors() {
        let mut a = Tally::new();
        a.record(Duration::from_micros(100), Ok(true));
        a.record(
            Duration::from_micros(300),
            Err(Status::unavailable("store down")),
        );
        let mut b = Tally::new();
        b.record(Duration::from_micros(200), Ok(false));
        b.record(
            Duration::from_micros(400),
            Err(Status::unavailable("later")),
        );
        b.record(
            Duration::from_micros(500),
            Err(Status::invalid_argument("rule")),
        );
        a.merge(b);
        assert_eq!(
            (a.allowed, a.denied, a.error_count(), a.count()),
            (1, 1, 3, 5)
        );
        assert_eq!(a.errors[Code::Unavailable as usize], 2);
        assert_eq!(
            a.first_error[Code::Unavailable as usize].as_deref(),
            Some("store down")
        );
        assert_eq!(a.latency.len(), 5);
        assert_eq!(
            code_at(Code::InvalidArgument as usize),
            Code::InvalidArgument
        );
    }

    #[test]
    fn random_picks_stay_in_range() {
        let mut random = SplitMix64::new(7);
        assert!((0..10_000).all(|_| random.below(10) < 10));
    }
}
