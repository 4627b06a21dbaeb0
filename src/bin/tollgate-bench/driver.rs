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
use tokio::sync::{Mutex, mpsc};
use tonic::{Code, Status};

use crate::{
    calls::{Answer, Caller},
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
    /// Of the allowed and denied, those answered without the store.
    pub(crate) degraded: u64,
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
            degraded: 0,
            errors: [0; CODES],
            first_error: Default::default(),
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<Answer, Status>) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(micros);
        match outcome {
            Ok(answer) => {
                if answer.allowed {
                    self.allowed += 1;
                } else {
                    self.denied += 1;
                }
                self.degraded += u64::from(answer.degraded);
            }
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
        self.degraded += other.degraded;
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

/// Stops every phase early (Ctrl-C): an atomic flag that workers and the
/// pacer check before each request.
#[derive(Debug, Clone)]
pub(crate) struct Stop {
    flag: Arc<AtomicBool>,
}

impl Stop {
    /// A stop signal and the function that raises it.
    pub(crate) fn new() -> (Self, impl FnOnce()) {
        let flag = Arc::new(AtomicBool::new(false));
        let raise = {
            let flag = flag.clone();
            move || {
                flag.store(true, Ordering::Relaxed);
            }
        };
        (Self { flag }, raise)
    }

    fn raised(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// What workers share: the request counter and the phase's clock, and, at a
/// fixed rate, the queue of arrivals the pacer releases.
struct Shared {
    next: AtomicU64,
    deadline: Instant,
    phase: Phase,
    subjects: Arc<[String]>,
    arrivals: Option<Mutex<mpsc::Receiver<Arrival>>>,
}

/// One request released by the pacer: its number and the instant its
/// latency counts from.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    number: u64,
    at: Instant,
}

/// Arrivals the pacer may run ahead of the workers before it waits for them
/// (and stamps what follows late, so that the wait still counts).
const ARRIVAL_BACKLOG: usize = 65_536;

/// Runs one phase with `callers` (one per connection; worker `w` uses
/// `callers[w % len]`) and returns the merged tally and the elapsed time.
pub(crate) async fn run_phase<C: Caller>(
    callers: &[C],
    subjects: Arc<[String]>,
    phase: Phase,
    stop: &Stop,
) -> (Tally, Duration) {
    // Each worker's histogram is made before the clock starts: 200 of them
    // (about 150 KB each) made by the workers themselves held up the
    // phase's first 20-70 ms, and at a fixed rate those few slow requests
    // alone set the p99.
    let tallies: Vec<Tally> = (0..phase.concurrency).map(|_| Tally::new()).collect();
    let start = Instant::now();
    let deadline = start + phase.bounds.duration;
    let (arrivals, pacer) = match phase.rps {
        None => (None, None),
        Some(rps) => {
            let (sender, receiver) = mpsc::channel(ARRIVAL_BACKLOG);
            let stop = stop.clone();
            let requests = phase.bounds.requests;
            let pacer = std::thread::Builder::new()
                .name("pacer".to_owned())
                .spawn(move || pace(sender, start, deadline, requests, rps, &stop))
                .expect("the OS lets a load generator start one thread");
            (Some(Mutex::new(receiver)), Some(pacer))
        }
    };
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        deadline,
        phase,
        subjects,
        arrivals,
    });
    let workers: Vec<_> = tallies
        .into_iter()
        .enumerate()
        .map(|(worker, tally)| {
            let caller = callers[worker % callers.len()].clone();
            let seed = worker as u64;
            tokio::spawn(work(caller, shared.clone(), stop.clone(), seed, tally))
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
    // Dropping the queue's receiver (the workers' clones are gone) frees a
    // pacer blocked on a full queue after a stop; one that is sleeping
    // notices the stop within STOP_CHECK.
    drop(shared);
    if let Some(pacer) = pacer {
        let _ = pacer.join();
    }
    (total, start.elapsed())
}

/// One worker: takes requests until a bound is reached (or, at a fixed rate,
/// until the pacer stops releasing them), sending one at a time, and counts
/// them into `tally`.
async fn work<C: Caller>(
    mut caller: C,
    shared: Arc<Shared>,
    stop: Stop,
    seed: u64,
    mut tally: Tally,
) -> Tally {
    let mut random = SplitMix64::new(seed);
    let subjects = &*shared.subjects;
    let phase = shared.phase;
    loop {
        if stop.raised() {
            break;
        }
        let Some(Arrival { number, at }) = next_request(&shared).await else {
            break;
        };
        let index = match phase.pick {
            Pick::RoundRobin => number % subjects.len() as u64,
            Pick::Random => random.below(subjects.len() as u64),
        };
        let outcome = caller.send(&subjects[index as usize]).await;
        tally.record(at.elapsed(), outcome);
    }
    tally
}

/// The next request to send, or `None` when the phase is over: as fast as
/// the workers go, or the next arrival the pacer released.
async fn next_request(shared: &Shared) -> Option<Arrival> {
    match &shared.arrivals {
        None => {
            let number = shared.next.fetch_add(1, Ordering::Relaxed);
            let at = Instant::now();
            (number < shared.phase.bounds.requests && at < shared.deadline)
                .then_some(Arrival { number, at })
        }
        Some(arrivals) => arrivals.lock().await.recv().await,
    }
}

/// The pacer, on a thread of its own: releases request `n` at `start + n /
/// rps` until a bound is reached, then closes the queue.
///
/// Arrivals are spread evenly with the OS's sleep, which is accurate to tens
/// of microseconds. (Workers sleeping on tokio's timer, which wakes in whole
/// milliseconds, would instead send a burst of `rps / 1000` requests at every
/// millisecond tick and measure the bursts' queueing.) An arrival's latency
/// counts from its scheduled time when the pacer is late for it because the
/// workers fell behind (that queueing is the server's, so coordinated
/// omission is avoided); when the pacer only overslept, it counts from when
/// the pacer woke.
fn pace(
    sender: mpsc::Sender<Arrival>,
    start: Instant,
    deadline: Instant,
    requests: u64,
    rps: u32,
    stop: &Stop,
) {
    for number in 0..requests {
        let offset_nanos = u128::from(number) * 1_000_000_000 / u128::from(rps);
        let Some(scheduled) = u64::try_from(offset_nanos)
            .ok()
            .map(|nanos| start + Duration::from_nanos(nanos))
        else {
            return;
        };
        if scheduled >= deadline || stop.raised() {
            return;
        }
        let at = if scheduled > Instant::now() {
            if !sleep_until(scheduled, stop) {
                return;
            }
            Instant::now()
        } else {
            scheduled
        };
        if sender.blocking_send(Arrival { number, at }).is_err() {
            return;
        }
    }
}

/// Sleeps the pacer's thread until `until`, in slices short enough to notice
/// a stop within [`STOP_CHECK`]; false if the stop came first.
fn sleep_until(until: Instant, stop: &Stop) -> bool {
    loop {
        if stop.raised() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(STOP_CHECK));
    }
}

/// How long a sleeping pacer may take to notice a stop.
const STOP_CHECK: Duration = Duration::from_millis(50);

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
        let allowed = Answer {
            allowed: true,
            degraded: false,
        };
        let mut a = Tally::new();
        a.record(Duration::from_micros(100), Ok(allowed));
        a.record(
            Duration::from_micros(300),
            Err(Status::unavailable("store down")),
        );
        let mut b = Tally::new();
        let degraded_denial = Answer {
            allowed: false,
            degraded: true,
        };
        b.record(Duration::from_micros(200), Ok(degraded_denial));
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
            (a.allowed, a.denied, a.degraded, a.error_count(), a.count()),
            (1, 1, 1, 3, 5)
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
