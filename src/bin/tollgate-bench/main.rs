//! `tollgate-bench`: a ghz-style load generator for tollgate's gRPC API.
//!
//! Thin on purpose: [`cli`] checks the flags into a plan, [`calls`] knows
//! how to send each RPC, [`driver`] runs the workers and [`report`] prints
//! the summary. Loopback only unless `--allow-remote`; every run is bounded
//! in time and count.

mod calls;
mod cli;
mod driver;
mod report;

use std::{process::ExitCode, sync::Arc, time::Duration};

use clap::Parser;
use tonic::transport::{Channel, Endpoint};

use crate::{
    calls::{Caller, CheckLimit, CheckLimits, IncrementUsage, SettleLimit, ShouldRateLimit},
    cli::{Bounds, Call, Cli, MAX_REQUESTS, Plan},
    driver::{Phase, Stop},
    report::{Report, Warmup},
};

/// The load generator shares the machine with what it measures, so every
/// instruction it spends is taken from them: with glibc's allocator a fifth
/// of its instructions per request were malloc and free (callgrind), as
/// tollgate's were before it took mimalloc for the same reason.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long to wait for each connection before giving up on the run.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let plan = match Cli::parse().into_plan() {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("tollgate-bench: {message}");
            return ExitCode::from(2);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = plan.threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let report = match runtime.block_on(run(&plan)) {
        Ok(report) => report,
        Err(message) => return fail(&message),
    };
    if plan.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.human());
    }
    if report.all_failed() {
        return fail(&report.failure_message());
    }
    ExitCode::SUCCESS
}

/// Runs the plan's call: the one place that knows every [`Call`].
async fn run(plan: &Plan) -> Result<Report, String> {
    match plan.call {
        Call::CheckLimit => drive::<CheckLimit>(plan).await,
        Call::CheckLimits => drive::<CheckLimits>(plan).await,
        Call::IncrementUsage => drive::<IncrementUsage>(plan).await,
        Call::ShouldRateLimit => drive::<ShouldRateLimit>(plan).await,
        Call::SettleLimit => drive::<SettleLimit>(plan).await,
    }
}

/// Connects, warms up if asked, then measures one phase.
async fn drive<C: Caller>(plan: &Plan) -> Result<Report, String> {
    let channels = connect(plan).await?;
    let callers: Vec<C> = channels
        .into_iter()
        .map(|channel| C::new(channel, plan))
        .collect();
    // Built once: requests borrow these, so nothing is formatted per request.
    let subjects: Arc<[String]> = (0..plan.subjects).map(|i| format!("bench-{i}")).collect();

    let (stop, raise) = Stop::new();
    let interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            raise();
        }
    });
    let phase = Phase {
        bounds: plan.bounds,
        rps: plan.rps,
        pick: plan.pick,
        concurrency: plan.concurrency,
    };
    // The warm-up runs on the same connections as the measured phase, so
    // that a connection's first requests (its HTTP/2 windows opening, the
    // server's first allocations: tens of milliseconds, seen in every p99
    // at a fixed rate) fall in it and not in the figures.
    let mut warmed = None;
    if let Some(duration) = plan.warmup {
        let warmup = Phase {
            bounds: Bounds {
                duration,
                requests: MAX_REQUESTS,
            },
            ..phase
        };
        let (tally, elapsed) = driver::run_phase(&callers, subjects.clone(), warmup, &stop).await;
        warmed = Some(Warmup {
            count: tally.count(),
            elapsed,
        });
    }
    let (tally, elapsed) = driver::run_phase(&callers, subjects, phase, &stop).await;
    interrupt.abort();
    Ok(Report::new(plan, warmed, &tally, elapsed))
}

/// Opens `plan.connections` HTTP/2 connections, each its own [`Channel`].
async fn connect(plan: &Plan) -> Result<Vec<Channel>, String> {
    let endpoint = Endpoint::from(plan.addr.clone())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(plan.timeout)
        .tcp_nodelay(true);
    let mut channels = Vec::with_capacity(plan.connections as usize);
    for _ in 0..plan.connections {
        let channel = endpoint.connect().await.map_err(|err| {
            format!(
                "cannot connect to {}: {}; is tollgate serving there?",
                plan.addr,
                error_chain(&err)
            )
        })?;
        channels.push(channel);
    }
    Ok(channels)
}

/// An error and its sources, "outer: inner: innermost".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn fail(message: &str) -> ExitCode {
    eprintln!("tollgate-bench: {message}");
    ExitCode::FAILURE
}
