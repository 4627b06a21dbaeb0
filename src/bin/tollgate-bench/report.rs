//! The summary, in ghz's spirit: a human one and a one-line JSON one.

use std::{fmt::Write as _, time::Duration};

use crate::{
    cli::Plan,
    driver::{CODES, Tally, code_at},
};

/// Latency figures, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Latency {
    /// Mean.
    pub(crate) mean: f64,
    /// Fastest.
    pub(crate) min: u64,
    /// Median.
    pub(crate) p50: u64,
    /// 90th percentile.
    pub(crate) p90: u64,
    /// 99th percentile.
    pub(crate) p99: u64,
    /// Slowest.
    pub(crate) max: u64,
}

/// One failing status code: how often, and the first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorCount {
    /// The code's name, e.g. "Unavailable".
    pub(crate) code: String,
    /// Requests that failed with it.
    pub(crate) count: u64,
    /// The first message the server (or transport) gave.
    pub(crate) first_message: String,
}

/// What the uncounted warm-up sent before the measured phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Warmup {
    /// Requests sent, answered or failed.
    pub(crate) count: u64,
    /// How long it ran.
    pub(crate) elapsed: Duration,
}

/// The outcome of the measured phase.
#[derive(Debug, Clone)]
pub(crate) struct Report {
    call: &'static str,
    rpc: &'static str,
    addr: String,
    concurrency: u32,
    connections: u32,
    subjects: u32,
    target_rps: Option<u32>,
    warmup: Option<Warmup>,
    count: u64,
    elapsed: Duration,
    latency: Latency,
    allowed: u64,
    denied: u64,
    degraded: u64,
    errors: Vec<ErrorCount>,
}

impl Report {
    /// Summarises `tally`, measured over `elapsed` after `warmup`, for `plan`.
    pub(crate) fn new(
        plan: &Plan,
        warmup: Option<Warmup>,
        tally: &Tally,
        elapsed: Duration,
    ) -> Self {
        let histogram = &tally.latency;
        let errors = (0..CODES)
            .filter(|&code| tally.errors[code] > 0)
            .map(|code| ErrorCount {
                code: format!("{:?}", code_at(code)),
                count: tally.errors[code],
                first_message: tally.first_error[code].clone().unwrap_or_default(),
            })
            .collect();
        Self {
            call: plan.call.name(),
            rpc: plan.call.rpc(),
            addr: plan.addr.to_string(),
            concurrency: plan.concurrency,
            connections: plan.connections,
            subjects: plan.subjects,
            target_rps: plan.rps,
            warmup,
            count: tally.count(),
            elapsed,
            latency: Latency {
                mean: if histogram.is_empty() {
                    0.0
                } else {
                    histogram.mean()
                },
                min: histogram.min(),
                p50: histogram.value_at_quantile(0.50),
                p90: histogram.value_at_quantile(0.90),
                p99: histogram.value_at_quantile(0.99),
                max: histogram.max(),
            },
            allowed: tally.allowed,
            denied: tally.denied,
            degraded: tally.degraded,
            errors,
        }
    }

    /// Requests that failed.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.iter().map(|error| error.count).sum()
    }

    /// Requests per second over the phase.
    pub(crate) fn rps(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.count as f64 / seconds
        } else {
            0.0
        }
    }

    /// Whether nothing got an answer: no request was sent, or every one failed.
    pub(crate) fn all_failed(&self) -> bool {
        self.count == 0 || self.error_count() == self.count
    }

    /// Why every request failed, for stderr.
    pub(crate) fn failure_message(&self) -> String {
        match self.errors.first() {
            None => "no request completed".to_owned(),
            Some(first) => format!(
                "every request failed ({} x {}: {}); is tollgate serving at {}?",
                first.count, first.code, first.first_message, self.addr
            ),
        }
    }

    /// The multi-line summary.
    pub(crate) fn human(&self) -> String {
        let mut out = String::new();
        let l = &self.latency;
        let _ = writeln!(out, "Summary:");
        let _ = writeln!(out, "  Call:          {} ({})", self.call, self.rpc);
        let _ = writeln!(out, "  Target:        {}", self.addr);
        let _ = writeln!(
            out,
            "  Load:          {} in flight over {} connection(s), {} subjects{}",
            self.concurrency,
            self.connections,
            self.subjects,
            self.target_rps
                .map(|rps| format!(", paced at {rps} req/s"))
                .unwrap_or_default()
        );
        if let Some(warmup) = self.warmup {
            let _ = writeln!(
                out,
                "  Warm-up:       {} requests in {:.2} s, not counted below",
                warmup.count,
                warmup.elapsed.as_secs_f64()
            );
        }
        let _ = writeln!(out, "  Count:         {}", self.count);
        let _ = writeln!(out, "  Total:         {:.2} s", self.elapsed.as_secs_f64());
        let _ = writeln!(out, "  Requests/sec:  {:.1}", self.rps());
        let _ = writeln!(out);
        let _ = writeln!(out, "Latency (microseconds):");
        let _ = writeln!(
            out,
            "  mean {:.0}  min {}  p50 {}  p90 {}  p99 {}  max {}",
            l.mean, l.min, l.p50, l.p90, l.p99, l.max
        );
        let _ = writeln!(out);
        let _ = writeln!(out, "Outcomes:");
        let _ = writeln!(
            out,
            "  allowed  {:>10}  {:5.1} %",
            self.allowed,
            percent(self.allowed, self.count)
        );
        let _ = writeln!(
            out,
            "  denied   {:>10}  {:5.1} %",
            self.denied,
            percent(self.denied, self.count)
        );
        let _ = writeln!(
            out,
            "  errors   {:>10}  {:5.1} %",
            self.error_count(),
            percent(self.error_count(), self.count)
        );
        if self.degraded > 0 {
            let _ = writeln!(
                out,
                "  degraded {:>10}  {:5.1} %  (of the allowed and denied: answered without the store)",
                self.degraded,
                percent(self.degraded, self.count)
            );
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "Error distribution:");
            for error in &self.errors {
                let _ = writeln!(
                    out,
                    "  [{}] {} responses, first: {}",
                    error.code, error.count, error.first_message
                );
            }
        }
        out
    }

    /// One JSON line. Written by hand: the fields are few and flat, and the
    /// crate has no JSON dependency.
    pub(crate) fn json(&self) -> String {
        let l = &self.latency;
        let mut out = String::with_capacity(512);
        let _ = write!(
            out,
            "{{\"call\":{},\"addr\":{},\"concurrency\":{},\"connections\":{},\
             \"subjects\":{},\"target_rps\":{},\"warmup_count\":{},\"count\":{},\
             \"elapsed_s\":{:.6},\
             \"rps\":{:.1},\"latency_us\":{{\"mean\":{:.1},\"min\":{},\"p50\":{},\
             \"p90\":{},\"p99\":{},\"max\":{}}},\"allowed\":{},\"denied\":{},\
             \"degraded\":{},\"errors\":{},\"errors_by_code\":{{",
            json_string(self.call),
            json_string(&self.addr),
            self.concurrency,
            self.connections,
            self.subjects,
            self.target_rps
                .map_or_else(|| "null".to_owned(), |rps| rps.to_string()),
            self.warmup.map_or(0, |warmup| warmup.count),
            self.count,
            self.elapsed.as_secs_f64(),
            self.rps(),
            l.mean,
            l.min,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            self.allowed,
            self.denied,
            self.degraded,
            self.error_count(),
        );
        for (i, error) in self.errors.iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            let _ = write!(out, "{comma}{}:{}", json_string(&error.code), error.count);
        }
        out.push_str("}}");
        out
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
