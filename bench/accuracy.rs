//! How far `sliding_counter` is from the exact `sliding_log`, measured:
//! `cargo run --release --example accuracy -- --help`.
//!
//! Replays a synthetic trace through two memory stores, one per algorithm,
//! on manual clocks: every subject's Poisson arrivals are merged into one
//! stream in time order, and both stores get exactly that stream, so the
//! only difference between them is the algorithm. Per trace it prints
//!
//! - the share of requests the two answer differently, split into allowed
//!   by the counter only and denied by the counter only;
//! - over-admission: per subject, the most hits the counter let into any
//!   window of the rule's length (sliding, so not only the fixed windows the
//!   counter keeps), as a multiple of the limit; worst and mean over
//!   subjects, and the share of subjects that ever passed 1.0;
//! - the same peak for the exact log, as a self-check of the measuring: it
//!   must never pass 1.0, and the program exits 1 if it does.
//!
//! Everything comes from a seeded splitmix64, one stream per subject, so a
//! run is repeatable bit for bit. A small generator in the file rather than
//! the `rand` crate: the trace needs only uniform draws, and the exact
//! stream then depends on nothing outside this file.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    error::Error,
    fmt,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::Parser;
use tollgate::{
    rules::Algorithm,
    store::{LimitCheck, Store, memory::MemoryStore},
};

/// Per-subject request rates, as multiples of the limit per window: the
/// issue's busy trace (many subjects above their limit) and its quiet one
/// (everyone at or below it).
const TRACES: [(f64, f64); 2] = [(0.2, 3.0), (0.05, 1.0)];

/// Bounds that keep a run finite in time and memory.
const MAX_SUBJECTS: usize = 1_000_000;
const MAX_WINDOWS: u32 = 1_000;
const MAX_LIMIT: u64 = 100_000;

#[derive(Debug, Parser)]
#[command(about = "Measure how far sliding_counter is from the exact sliding_log")]
struct Cli {
    /// Subjects in each trace.
    #[arg(long, env = "ACCURACY_SUBJECTS", default_value_t = 10_000)]
    subjects: usize,
    /// Hits allowed per window.
    #[arg(long, env = "ACCURACY_LIMIT", default_value_t = 100)]
    limit: u64,
    /// The rule's window (humantime: 1m, 10s, 500ms).
    #[arg(long, env = "ACCURACY_WINDOW", default_value = "1m", value_parser = humantime::parse_duration)]
    window: Duration,
    /// How many windows each trace lasts.
    #[arg(long, env = "ACCURACY_WINDOWS", default_value_t = 20)]
    windows: u32,
    /// Seed of the generator; the same seed gives the same figures.
    #[arg(long, env = "ACCURACY_SEED", default_value_t = 1)]
    seed: u64,
}

/// One trace's settings, checked.
#[derive(Debug, Clone, Copy)]
struct Trace {
    subjects: usize,
    limit: u64,
    /// The window, in microseconds: the memory store's resolution.
    window_us: u64,
    windows: u32,
    seed: u64,
    /// The slowest and fastest subject's rate, as multiples of the limit.
    rates: (f64, f64),
}

impl Cli {
    fn traces(&self) -> Result<Vec<Trace>, String> {
        if !(1..=MAX_SUBJECTS).contains(&self.subjects) {
            return Err(format!(
                "--subjects: {} is not from 1 to {MAX_SUBJECTS}",
                self.subjects
            ));
        }
        if !(1..=MAX_LIMIT).contains(&self.limit) {
            return Err(format!(
                "--limit: {} is not from 1 to {MAX_LIMIT}",
                self.limit
            ));
        }
        if !(1..=MAX_WINDOWS).contains(&self.windows) {
            return Err(format!(
                "--windows: {} is not from 1 to {MAX_WINDOWS}",
                self.windows
            ));
        }
        if self.window < Duration::from_millis(1) || self.window > Duration::from_secs(86_400) {
            return Err(format!(
                "--window: {} is not from 1ms to 1d",
                humantime::format_duration(self.window)
            ));
        }
        let window_us =
            u64::try_from(self.window.as_micros()).map_err(|_| "--window: too long".to_owned())?;
        Ok(TRACES
            .iter()
            .map(|&rates| Trace {
                subjects: self.subjects,
                limit: self.limit,
                window_us,
                windows: self.windows,
                seed: self.seed,
                rates,
            })
            .collect())
    }
}

fn main() -> ExitCode {
    let traces = match Cli::parse().traces() {
        Ok(traces) => traces,
        Err(message) => {
            eprintln!("accuracy: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("accuracy: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut exact = true;
    for trace in traces {
        let started = Instant::now();
        match runtime.block_on(replay(&trace)) {
            Ok(report) => {
                print!("{report}");
                println!(
                    "  took                     {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                exact &= report.log_exact();
            }
            Err(err) => {
                eprintln!("accuracy: the memory store failed: {err}");
                return ExitCode::FAILURE;
            }
        }
    }
    if !exact {
        eprintln!("accuracy: the sliding log passed its limit in some window: a bug");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Runs one trace through both algorithms and measures them.
async fn replay(trace: &Trace) -> Result<Report, Box<dyn Error>> {
    let (log_store, log_clock) = MemoryStore::with_manual_clock();
    let (counter_store, counter_clock) = MemoryStore::with_manual_clock();
    let names: Vec<String> = (0..trace.subjects).map(|i| format!("s{i}")).collect();
    let arrivals = Arrivals::new(trace);
    let mut log_peaks: Vec<PeakWindow> = (0..trace.subjects)
        .map(|_| PeakWindow::new(trace.window_us))
        .collect();
    let mut counter_peaks = log_peaks.clone();
    let mut report = Report::new(trace);
    let mut now = 0;
    for (at, subject) in arrivals {
        let step = Duration::from_micros(at - now);
        log_clock.advance(step);
        counter_clock.advance(step);
        now = at;
        let check = |algorithm| LimitCheck {
            rule: "accuracy",
            subject: &names[subject],
            algorithm,
            limit: trace.limit,
            window: Duration::from_micros(trace.window_us),
            block_for: None,
            cost: 1,
            dry_run: false,
        };
        let by_log = log_store.check_limit(&check(Algorithm::SlidingLog)).await?;
        let by_counter = counter_store
            .check_limit(&check(Algorithm::SlidingCounter))
            .await?;
        if by_log.allowed {
            log_peaks[subject].record(at);
        }
        // What an exact window over the hits the counter itself let in
        // would have answered: the counter's own error, free of the drift
        // between two limiters that let in different requests.
        let exact_would_allow = counter_peaks[subject].inside_at(at) < trace.limit as usize;
        if by_counter.allowed {
            counter_peaks[subject].record(at);
        }
        report.count(by_log.allowed, by_counter.allowed, exact_would_allow);
    }
    report.peaks(&log_peaks, &counter_peaks);
    Ok(report)
}

/// Every subject's Poisson arrivals, merged in time order (ties by subject).
struct Arrivals {
    /// Per subject: its generator and mean gap between arrivals, in us.
    subjects: Vec<(SplitMix64, f64)>,
    /// Per subject: the exact time of its next arrival, in us.
    next_at: Vec<f64>,
    /// (next arrival rounded to the store's microsecond, subject).
    queue: BinaryHeap<Reverse<(u64, usize)>>,
    end_us: f64,
}

impl Arrivals {
    fn new(trace: &Trace) -> Self {
        let (low, high) = trace.rates;
        let n = trace.subjects as f64;
        let subjects: Vec<(SplitMix64, f64)> = (0..trace.subjects)
            .map(|i| {
                // Rates evenly spread over [low, high], midpoints so one
                // subject alone sits in the middle.
                let rate = low + (high - low) * (i as f64 + 0.5) / n;
                let per_window = rate * trace.limit as f64;
                let mean_gap = trace.window_us as f64 / per_window;
                (SplitMix64::new(trace.seed, i as u64), mean_gap)
            })
            .collect();
        let mut arrivals = Self {
            next_at: vec![0.0; subjects.len()],
            subjects,
            queue: BinaryHeap::new(),
            end_us: trace.window_us as f64 * f64::from(trace.windows),
        };
        for subject in 0..arrivals.subjects.len() {
            arrivals.schedule(subject, 0.0);
        }
        arrivals
    }

    /// Queues `subject`'s first arrival after `after`, if within the trace.
    fn schedule(&mut self, subject: usize, after: f64) {
        let (rng, mean_gap) = &mut self.subjects[subject];
        let at = after + rng.exponential(*mean_gap);
        if at < self.end_us {
            self.next_at[subject] = at;
            self.queue.push(Reverse((at as u64, subject)));
        }
    }
}

impl Iterator for Arrivals {
    /// (time in us since the trace began, subject).
    type Item = (u64, usize);

    fn next(&mut self) -> Option<(u64, usize)> {
        let Reverse((at, subject)) = self.queue.pop()?;
        self.schedule(subject, self.next_at[subject]);
        Some((at, subject))
    }
}

/// splitmix64: tiny, fast and good enough for a synthetic trace.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    /// Subject `stream`'s own generator, so that a subject's arrivals do not
    /// depend on how many other subjects there are.
    fn new(seed: u64, stream: u64) -> Self {
        let mut mixer = Self(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Self(mixer.next_u64())
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// An exponential draw with mean `mean`.
    fn exponential(&mut self, mean: f64) -> f64 {
        // 53 random bits in (0, 1]: never 0, so the logarithm is finite.
        let uniform = ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64;
        -uniform.ln() * mean
    }
}

/// The most allowed hits inside any window of one length, as hits arrive in
/// time order. Bounds match the sliding log's: a hit at `t` counts for times
/// before `t + window` and has left at `t + window`, so two hits share a
/// window when they are less than `window` apart.
#[derive(Debug, Clone)]
struct PeakWindow {
    window: u64,
    /// The hits of the last `window`, oldest first.
    inside: VecDeque<u64>,
    peak: usize,
}

impl PeakWindow {
    fn new(window: u64) -> Self {
        Self {
            window,
            inside: VecDeque::new(),
            peak: 0,
        }
    }

    /// The hits recorded that are still inside the window at `at`, no
    /// earlier than the last hit recorded.
    fn inside_at(&mut self, at: u64) -> usize {
        while self
            .inside
            .front()
            .is_some_and(|&oldest| oldest + self.window <= at)
        {
            self.inside.pop_front();
        }
        self.inside.len()
    }

    /// Counts a hit at `at`, no earlier than the last one recorded.
    fn record(&mut self, at: u64) {
        self.inside_at(at);
        self.inside.push_back(at);
        self.peak = self.peak.max(self.inside.len());
    }
}

/// What one trace measured.
#[derive(Debug)]
struct Report {
    trace: Trace,
    requests: u64,
    allowed_by_log: u64,
    allowed_by_counter: u64,
    /// Allowed by the counter, denied by the log.
    counter_only_allowed: u64,
    /// Denied by the counter, allowed by the log.
    counter_only_denied: u64,
    /// Allowed by the counter although the hits it had let into the last
    /// window already reached the limit.
    wrongly_allowed: u64,
    /// Denied by the counter although the hits it had let into the last
    /// window left room.
    wrongly_denied: u64,
    /// The counter's peaks, as multiples of the limit.
    counter_worst: f64,
    counter_mean: f64,
    counter_subjects_over: usize,
    log_worst: f64,
    log_subjects_over: usize,
}

impl Report {
    fn new(trace: &Trace) -> Self {
        Self {
            trace: *trace,
            requests: 0,
            allowed_by_log: 0,
            allowed_by_counter: 0,
            counter_only_allowed: 0,
            counter_only_denied: 0,
            wrongly_allowed: 0,
            wrongly_denied: 0,
            counter_worst: 0.0,
            counter_mean: 0.0,
            counter_subjects_over: 0,
            log_worst: 0.0,
            log_subjects_over: 0,
        }
    }

    fn count(&mut self, by_log: bool, by_counter: bool, exact_would_allow: bool) {
        self.requests += 1;
        self.allowed_by_log += u64::from(by_log);
        self.allowed_by_counter += u64::from(by_counter);
        self.counter_only_allowed += u64::from(by_counter && !by_log);
        self.counter_only_denied += u64::from(by_log && !by_counter);
        self.wrongly_allowed += u64::from(by_counter && !exact_would_allow);
        self.wrongly_denied += u64::from(!by_counter && exact_would_allow);
    }

    fn peaks(&mut self, log: &[PeakWindow], counter: &[PeakWindow]) {
        let limit = self.trace.limit as usize;
        let ratio = |peak: &PeakWindow| peak.peak as f64 / limit as f64;
        self.counter_worst = counter.iter().map(ratio).fold(0.0, f64::max);
        self.counter_mean = counter.iter().map(ratio).sum::<f64>() / counter.len().max(1) as f64;
        self.counter_subjects_over = counter.iter().filter(|p| p.peak > limit).count();
        self.log_worst = log.iter().map(ratio).fold(0.0, f64::max);
        self.log_subjects_over = log.iter().filter(|p| p.peak > limit).count();
    }

    fn log_exact(&self) -> bool {
        self.log_subjects_over == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.trace;
        let share = |n: u64| 100.0 * n as f64 / self.requests.max(1) as f64;
        let subjects = |n: usize| 100.0 * n as f64 / t.subjects as f64;
        writeln!(
            f,
            "trace: rates {:.2}x to {:.2}x the limit; {} subjects, limit {} per {}, {} windows, seed {}",
            t.rates.0,
            t.rates.1,
            t.subjects,
            t.limit,
            humantime::format_duration(Duration::from_micros(t.window_us)),
            t.windows,
            t.seed
        )?;
        writeln!(f, "  requests                 {}", self.requests)?;
        writeln!(
            f,
            "  allowed                  sliding_log {:.3} %, sliding_counter {:.3} %",
            share(self.allowed_by_log),
            share(self.allowed_by_counter)
        )?;
        writeln!(
            f,
            "  answered differently     {:.3} % (allowed by the counter only {:.3} %, denied by the counter only {:.3} %)",
            share(self.counter_only_allowed + self.counter_only_denied),
            share(self.counter_only_allowed),
            share(self.counter_only_denied)
        )?;
        writeln!(
            f,
            "  counter vs its own exact window  {:.3} % wrong (wrongly allowed {:.3} %, wrongly denied {:.3} %)",
            share(self.wrongly_allowed + self.wrongly_denied),
            share(self.wrongly_allowed),
            share(self.wrongly_denied)
        )?;
        writeln!(
            f,
            "  counter peak per window  worst {:.2}x, mean {:.3}x the limit; subjects over 1.0: {:.1} %",
            self.counter_worst,
            self.counter_mean,
            subjects(self.counter_subjects_over)
        )?;
        writeln!(
            f,
            "  log peak per window      worst {:.2}x the limit; subjects over 1.0: {} (must be 0)",
            self.log_worst, self.log_subjects_over
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peak by brute force: every window that starts at a hit.
    fn brute_peak(hits: &[u64], window: u64) -> usize {
        hits.iter()
            .map(|&start| {
                hits.iter()
                    .filter(|&&at| at >= start && at < start + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    fn peak(hits: &[u64], window: u64) -> usize {
        let mut peak = PeakWindow::new(window);
        for &at in hits {
            peak.record(at);
        }
        peak.peak
    }

    #[test]
    fn a_hit_leaves_exactly_one_window_later() {
        // 0 and 10 are a full window apart: never together, as in the log.
        assert_eq!(peak(&[0, 10], 10), 1);
        assert_eq!(peak(&[0, 9], 10), 2);
        assert_eq!(peak(&[0, 5, 9, 10, 14, 15], 10), 4);
        assert_eq!(peak(&[3, 3, 3], 1), 3);
        assert_eq!(peak(&[], 10), 0);
    }

    #[test]
    fn matches_brute_force_on_random_hits() {
        let mut rng = SplitMix64::new(7, 0);
        for _ in 0..200 {
            let mut hits: Vec<u64> = (0..rng.next_u64() % 40)
                .map(|_| rng.next_u64() % 100)
                .collect();
            hits.sort_unstable();
            let window = 1 + rng.next_u64() % 30;
            assert_eq!(
                peak(&hits, window),
                brute_peak(&hits, window),
                "{hits:?} window {window}"
            );
        }
    }

    #[tokio::test]
    async fn the_log_never_passes_its_limit_and_the_counter_can() {
        // Short and bursty, so the counter's over-admission shows.
        let trace = Trace {
            subjects: 50,
            limit: 10,
            window_us: 1_000_000,
            windows: 10,
            seed: 3,
            rates: (0.5, 3.0),
        };
        let report = replay(&trace).await.expect("the memory store never fails");
        assert!(report.requests > 0);
        assert!(report.log_exact(), "{report}");
        assert!(report.log_worst <= 1.0, "{report}");
        assert!(report.counter_worst > 1.0, "{report}");
        assert_eq!(
            report.allowed_by_counter - report.counter_only_allowed,
            report.allowed_by_log - report.counter_only_denied,
            "both allowed, counted from either side"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_arrivals() {
        let trace = Trace {
            subjects: 20,
            limit: 5,
            window_us: 1_000,
            windows: 3,
            seed: 9,
            rates: (0.2, 3.0),
        };
        let first: Vec<_> = Arrivals::new(&trace).collect();
        let second: Vec<_> = Arrivals::new(&trace).collect();
        assert!(!first.is_empty());
        assert_eq!(first, second);
        assert!(
            first.windows(2).all(|pair| pair[0].0 <= pair[1].0),
            "time order"
        );
    }
}
