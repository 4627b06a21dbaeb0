//! Property tests against live servers.

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use proptest::test_runner::{Config, TestRunner};

/// A proptest runner of `cases` cases for properties checked against live
/// servers: shrinking replays sequences against them, so it is kept short,
/// and no failure file is written into the source tree.
pub(crate) fn live_runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..Config::default()
    })
}
