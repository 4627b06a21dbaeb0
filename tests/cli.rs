//! The `tollgate` binary as operators run it: `check-config`, start-up
//! failures (one line naming the file and key, a non-zero exit, no panic),
//! environment and flag overrides, a real gRPC call over the socket, and a
//! clean exit on SIGTERM.
//!
//! Every child runs with a bounded wait and is killed when its guard drops,
//! so a hung binary fails the test instead of hanging it. Only loopback
//! addresses are used.

// The helpers' `pub` items are for the test crates that use them, not for
// export.
#[allow(unreachable_pub)]
mod common;

use std::{
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use common::binary::Tollgate;
use tollgate::{
    config::{self, Overrides},
    proto::{CheckLimitRequest, rate_limiter_client::RateLimiterClient},
};

/// Long enough for a debug build to start or stop, short enough that a hang
/// fails fast.
const DEADLINE: Duration = Duration::from_secs(5);

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new("tests/fixtures/config");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(dir))
            .expect("tests/fixtures/config exists")
            .map(|entry| dir.join(entry.expect("a readable directory entry").file_name()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
            .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

/// What a child printed and how it ended.
#[derive(Debug)]
struct Finished {
    status: ExitStatus,
    elapsed: Duration,
    stdout: String,
    stderr: String,
}

impl Finished {
    /// Asserts a failed start-up: a non-zero exit and exactly one line on
    /// stderr, `tollgate: <message>`, with no panic. Returns the message.
    fn failure_line(&self) -> &str {
        assert!(!self.status.success(), "expected a failure: {self:?}");
        assert_eq!(
            self.status.code(),
            Some(1),
            "a plain failure, not a crash: {self:?}"
        );
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("stack backtrace"),
            "{self:?}"
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {self:?}");
        lines[0]
            .strip_prefix("tollgate: ")
            .unwrap_or_else(|| panic!("the line starts with `tollgate: `: {self:?}"))
    }
}

/// Waits for the exit, failing the test (and killing the child) past
/// [`DEADLINE`].
fn finish(mut tollgate: Tollgate) -> Finished {
    let started = Instant::now();
    let Some(status) = tollgate.wait_at_most(DEADLINE) else {
        panic!(
            "tollgate still running after {DEADLINE:?}\n{}",
            tollgate.output()
        );
    };
    Finished {
        status,
        elapsed: started.elapsed(),
        stdout: tollgate.stdout(),
        stderr: tollgate.stderr(),
    }
}

fn run(args: &[&str]) -> Finished {
    let mut command = Tollgate::command();
    command.args(args);
    finish(Tollgate::spawn_command(command))
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
    listener.local_addr().expect("a bound address").port()
}

/// Calls CheckLimit on `port` once the server accepts, retrying the connect
/// until [`DEADLINE`]; panics if the server exits first.
fn check_limit_when_up(server: &mut Tollgate, port: u16, rule: &str) -> (bool, u64, u64) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let deadline = Instant::now() + DEADLINE;
    let mut client = loop {
        match runtime.block_on(RateLimiterClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))) {
            Ok(client) => break client,
            Err(err) => {
                if let Some(status) = server.exited() {
                    panic!(
                        "tollgate exited with {status} before serving: {}",
                        server.stderr()
                    );
                }
                assert!(Instant::now() < deadline, "nothing serves on {port}: {err}");
                thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let response = runtime
        .block_on(client.check_limit(CheckLimitRequest {
            rule: rule.to_owned(),
            subject: "cli-test".to_owned(),
            tier: String::new(),
            cost: 1,
            ..CheckLimitRequest::default()
        }))
        .expect("CheckLimit answers")
        .into_inner();
    (response.allowed, response.limit, response.remaining)
}

/// SIGTERM, then a clean exit (status 0) within [`DEADLINE`].
/// `tollgate serve` with the shipped config, told its port by
/// `TOLLGATE_SERVER__LISTEN` alone.
fn serve_on_port_from_environment(port: u16) -> Tollgate {
    let mut command = Tollgate::command();
    command
        .args(["serve", "--config", "config/tollgate.toml"])
        .env("TOLLGATE_SERVER__LISTEN", format!("127.0.0.1:{port}"));
    Tollgate::spawn_command(command)
}

fn stops_cleanly_on_sigterm(mut server: Tollgate) {
    server.signal("-TERM");
    let finished = {
        let started = Instant::now();
        let status = server.wait_at_most(DEADLINE);
        (status, started.elapsed())
    };
    match finished {
        (Some(status), _) => assert!(
            status.success(),
            "exit after SIGTERM: {status}; stderr: {}",
            server.stderr()
        ),
        (None, waited) => panic!("still running {waited:?} after SIGTERM"),
    }
}

#[test]
fn check_config_on_the_shipped_config_prints_every_rule_and_tier() {
    let done = run(&["check-config", "config/tollgate.toml"]);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(done.stderr, "", "{done:?}");
    assert!(
        done.stdout.starts_with("config/tollgate.toml: OK"),
        "{done:?}"
    );
    let config = config::load_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml"),
        &Overrides::default(),
    )
    .expect("the shipped config loads");
    let policy = &config.policy;
    for tier in policy.tiers().names() {
        assert!(
            done.stdout.contains(tier.as_str()),
            "tier {tier}: {}",
            done.stdout
        );
    }
    // Each rule and kind has a row starting with its name.
    let rows: Vec<&str> = done
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    let mut expected: Vec<&str> = vec!["api", "auth", "messaging", "ai", "uploads"];
    expected.extend(["text", "audio", "image"]);
    for name in expected {
        assert!(rows.contains(&name), "no row for {name}: {}", done.stdout);
    }
    for rule in policy.rules() {
        assert!(rows.contains(&rule.name()), "no row for {}", rule.name());
    }
}

#[test]
fn a_broken_config_stops_check_config_and_serve_with_one_clear_line() {
    for fixture in fixtures() {
        let path = fixture.to_str().expect("a UTF-8 path");
        // The library's message, pinned fixture by fixture in tests/config.rs.
        let expected = config::load_file(&fixture, &Overrides::default())
            .err()
            .unwrap_or_else(|| panic!("{path} is broken"))
            .to_string();
        assert!(expected.starts_with(&format!("{path}: ")), "{expected}");

        let checked = run(&["check-config", path]);
        assert_eq!(checked.failure_line(), expected, "check-config {path}");
        assert_eq!(checked.stdout, "", "check-config {path}");

        // No --listen: it would override (and so hide) bad_listen.toml.
        let served = run(&["serve", "--config", path]);
        assert_eq!(served.failure_line(), expected, "serve --config {path}");
    }
}

#[test]
fn serve_names_a_missing_config_file() {
    let done = run(&["serve", "--config", "missing.toml"]);
    let line = done.failure_line();
    assert!(
        line.starts_with("missing.toml: cannot read the file: "),
        "{line}"
    );
}

#[test]
fn environment_variables_override_the_file_and_are_named_when_bad() {
    // The shipped file says memory:// and 127.0.0.1:50051; these are checked
    // at load, so a failure proves the variable was read, and the message
    // sends the operator to the variable, not to the file.
    let cases = [
        (
            "TOLLGATE_STORE__URL",
            "bogus://",
            "config/tollgate.toml: store.url: \"bogus://\" is not a store URL: \
             use \"memory://\" or \"redis://host:6379/0\" (set by TOLLGATE_STORE__URL)",
        ),
        (
            "TOLLGATE_SERVER__LISTEN",
            "nowhere",
            "config/tollgate.toml: server.listen: \"nowhere\" is not an address such as \
             127.0.0.1:50051 (set by TOLLGATE_SERVER__LISTEN)",
        ),
        (
            "TOLLGATE_SERVER__WORKER_THREADS",
            "0",
            "config/tollgate.toml: server.worker_threads: 0 is not a thread count from 1 to \
             1024 (leave it out for one per CPU core) (set by TOLLGATE_SERVER__WORKER_THREADS)",
        ),
        (
            "TOLLGATE_SERVER__WORKER_THREADS",
            "many",
            "config/tollgate.toml: server.worker_threads: expected an integer, got string \
             \"many\" (set by TOLLGATE_SERVER__WORKER_THREADS)",
        ),
        (
            "TOLLGATE_RULES__API__WINDOW",
            "forever",
            "config/tollgate.toml: rules.api.window: \"forever\" is not a duration such as \
             500ms, 2s, 15m or 24h (expected number at 0) (set by TOLLGATE_RULES__API__WINDOW)",
        ),
    ];
    for (variable, value, line) in cases {
        let mut command = Tollgate::command();
        command
            .args(["check-config", "config/tollgate.toml"])
            .env(variable, value);
        let done = finish(Tollgate::spawn_command(command));
        assert_eq!(done.failure_line(), line, "{variable}={value}");
    }

    // A misspelt key is unknown, and so is named with its variable.
    let mut command = Tollgate::command();
    command
        .args(["check-config", "config/tollgate.toml"])
        .env("TOLLGATE_SERVER__WORKR_THREADS", "1");
    let done = finish(Tollgate::spawn_command(command));
    let line = done.failure_line();
    assert!(
        line.starts_with("config/tollgate.toml: server.workr_threads: unknown key; ")
            && line.ends_with(" (set by TOLLGATE_SERVER__WORKR_THREADS)"),
        "{line}"
    );
}

#[test]
fn serve_listens_where_the_environment_says() {
    let port = free_port();
    let mut server = serve_on_port_from_environment(port);
    assert_eq!(check_limit_when_up(&mut server, port, "auth"), (true, 5, 4));
    stops_cleanly_on_sigterm(server);
}

/// The container's HEALTHCHECK runs `tollgate health` with no address: it
/// dials the port `TOLLGATE_SERVER__LISTEN` names, on loopback when that is
/// every interface, so a container told to listen elsewhere stays healthy.
#[test]
fn health_dials_the_port_the_environment_names() {
    let port = free_port();
    let mut server = serve_on_port_from_environment(port);
    check_limit_when_up(&mut server, port, "auth");
    let mut health = Tollgate::command();
    health
        .arg("health")
        .env("TOLLGATE_SERVER__LISTEN", format!("0.0.0.0:{port}"));
    let done = finish(Tollgate::spawn_command(health));
    assert!(done.status.success(), "{done:?}");
    assert_eq!(done.stdout.trim(), "SERVING");

    let mut health = Tollgate::command();
    health
        .arg("health")
        .env("TOLLGATE_SERVER__LISTEN", "nowhere");
    let done = finish(Tollgate::spawn_command(health));
    assert_eq!(
        done.failure_line(),
        "TOLLGATE_SERVER__LISTEN: \"nowhere\" is not an address such as 0.0.0.0:50051"
    );
    stops_cleanly_on_sigterm(server);
}

#[test]
fn serve_answers_check_limit_and_stops_on_sigterm_with_flags_over_env() {
    let port = free_port();
    let mut command = Tollgate::command();
    command
        .args(["serve", "--config", "config/tollgate.toml"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--store", "memory://"])
        // Both would fail start-up if they applied: flags win over env.
        .env("TOLLGATE_SERVER__LISTEN", "nowhere")
        .env("TOLLGATE_STORE__URL", "bogus://");
    let mut server = Tollgate::spawn_command(command);
    assert_eq!(
        check_limit_when_up(&mut server, port, "api"),
        (true, 100, 99)
    );
    stops_cleanly_on_sigterm(server);
}

/// Nothing listens on port 1 of the loopback, so the store cannot connect;
/// start-up must fail fast with a message that masks the password.
fn assert_unreachable_redis_fails_masked(mut command: Command) {
    command.env("RUST_LOG", "debug");
    let done = finish(Tollgate::spawn_command(command));
    let line = done.failure_line().to_owned();
    assert!(
        !done.stdout.contains("hunter2") && !done.stderr.contains("hunter2"),
        "the password leaked: {done:?}"
    );
    assert!(done.elapsed < DEADLINE, "{done:?}");
    // It says where it tried, with the password masked.
    assert!(line.contains("127.0.0.1:1"), "{line}");
}

#[test]
fn serve_fails_fast_on_an_unreachable_redis_without_printing_its_password() {
    let mut command = Tollgate::command();
    command.args([
        "serve",
        "--store",
        "redis://:hunter2@127.0.0.1:1/0",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_unreachable_redis_fails_masked(command);

    // The same store from the environment: the file's memory:// would serve
    // (and overrun the deadline) had the variable not applied.
    let mut command = Tollgate::command();
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("TOLLGATE_STORE__URL", "redis://:hunter2@127.0.0.1:1/0");
    assert_unreachable_redis_fails_masked(command);
}
