//! The client examples in the callers' languages, run for real: the Node.js
//! and Python clients (`examples/node/client.js`, `examples/python/client.py`)
//! and their HTTP middlewares (Express, Flask) against a live tollgate on a
//! loopback port, on the memory store and on a real redis-server.
//!
//! Each client prints one `step key=value ...` line per call; the tests
//! compare every line with what tollgate must have answered, as worked out
//! from `examples/tollgate.toml` (the config the README runs them with).
//! The middlewares are asked over plain HTTP/1.1 and their status and
//! `RateLimit`, `RateLimit-Policy` and `Retry-After` headers checked.
//!
//! They need `node` with `examples/node/node_modules` (`npm ci`) and the
//! virtual environment `examples/python/.venv` (`pip install -r
//! requirements.txt`); `scripts/test.sh` installs all of them and sets
//! `EXAMPLES_REQUIRED=1`, which makes a missing one a failure. Without that
//! variable (a plain `cargo test`), a test whose language is missing says so
//! on stderr, uncaptured, and passes without running.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

mod common;

use std::{
    fs::File,
    io::{Read, Seek, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use common::server::{Backend, StoreKind, TestServer, test_config};
use tollgate::proto::GetUsageRequest;

/// Set (to anything but `0`) by scripts/test.sh: every example must run.
const REQUIRED_VAR: &str = "EXAMPLES_REQUIRED";
/// The most a client run, or a middleware's start-up, may take.
const RUN_LIMIT: Duration = Duration::from_secs(30);
/// The most one HTTP exchange with a middleware may take.
const HTTP_LIMIT: Duration = Duration::from_secs(10);

/// What the middlewares are tested with: a limit small enough to reach.
const MIDDLEWARE_CONFIG: &str = r#"
[tiers]
names = ["free"]
default = "free"

[rules.api]
window = "1m"
limit = 3

[quotas]
period = "24h"

[quotas.kinds]
text = { free = 30 }
"#;

/// Expands each case into a test per store.
macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::StoreKind::Memory).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::StoreKind::Redis).await;
                }
            )*
        }
    };
}

on_every_store!(
    node_client,
    python_client,
    node_middleware,
    python_middleware
);

/// The languages the examples are written in.
#[derive(Debug, Clone, Copy)]
enum Language {
    Node,
    Python,
}

impl Language {
    /// The command that runs `script` (a file name under the language's
    /// example directory), from the project root; `None`, after saying why,
    /// when the language or the example's packages are missing and the test
    /// command did not ask for them.
    fn command(self, script: &str) -> Option<Command> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let (program, missing) = match self {
            Language::Node => {
                let modules = root.join("examples/node/node_modules/@grpc/grpc-js");
                let node_runs = Command::new("node")
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|status| status.success());
                let missing = if !node_runs {
                    Some("`node` is not on PATH".to_owned())
                } else if !modules.is_dir() {
                    Some("examples/node/node_modules is missing (`npm ci` there)".to_owned())
                } else {
                    None
                };
                (PathBuf::from("node"), missing)
            }
            Language::Python => {
                let python = root.join("examples/python/.venv/bin/python");
                let missing = (!python.is_file()).then(|| {
                    "examples/python/.venv is missing (`python3 -m venv examples/python/.venv` \
                     and `examples/python/.venv/bin/pip install -r examples/python/requirements.txt`)"
                        .to_owned()
                });
                (python, missing)
            }
        };
        if let Some(missing) = missing {
            let required = std::env::var(REQUIRED_VAR).is_ok_and(|value| value != "0");
            assert!(
                !required,
                "{self:?} example {script}: {missing}; scripts/test.sh installs it"
            );
            // Straight to stderr: the test harness captures eprintln! of a
            // passing test, and a skip must not go unseen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {self:?} example {script}: {missing}. \
                 scripts/test.sh installs it and sets {REQUIRED_VAR}=1."
            );
            return None;
        }
        let directory = match self {
            Language::Node => "examples/node",
            Language::Python => "examples/python",
        };
        let mut command = Command::new(program);
        command
            .arg(format!("{directory}/{script}"))
            .current_dir(root)
            .stdin(Stdio::null());
        Some(command)
    }

    fn client(self) -> &'static str {
        match self {
            Language::Node => "client.js",
            Language::Python => "client.py",
        }
    }

    fn middleware(self) -> &'static str {
        match self {
            Language::Node => "http-middleware.js",
            Language::Python => "http_middleware.py",
        }
    }
}

/// A child process with its output in files (a chatty child never blocks on
/// a full pipe), killed when dropped.
struct Process {
    child: Child,
    stdout: File,
    stderr: File,
}

impl Process {
    fn spawn(mut command: Command) -> Self {
        let stdout = tempfile::tempfile().expect("a temporary file for stdout");
        let stderr = tempfile::tempfile().expect("a temporary file for stderr");
        let child = command
            .stdout(stdout.try_clone().expect("a second handle to stdout"))
            .stderr(stderr.try_clone().expect("a second handle to stderr"))
            .spawn()
            .unwrap_or_else(|err| panic!("{command:?} starts: {err}"));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    /// Waits up to [`RUN_LIMIT`] for the exit; its success and stdout.
    fn finish(mut self) -> (bool, String, String) {
        let deadline = Instant::now() + RUN_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting on the child") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {RUN_LIMIT:?}: {}{}",
                self.stdout(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(10));
        };
        (status.success(), self.stdout(), self.stderr())
    }

    fn stdout(&mut self) -> String {
        read(&mut self.stdout)
    }

    fn stderr(&mut self) -> String {
        read(&mut self.stderr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Ignored: the child may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read(file: &mut File) -> String {
    let mut text = String::new();
    file.rewind().expect("rewind an output file");
    file.read_to_string(&mut text).expect("the output is UTF-8");
    text
}

/// A tollgate with the examples' own config on a fresh store of `kind`.
async fn serve_examples_config(backend: &Backend) -> TestServer {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tollgate.toml");
    let text =
        std::fs::read_to_string(&path).expect("examples/tollgate.toml ships with the examples");
    backend.serve(&test_config(&text)).await
}

/// Runs `f` off the runtime's threads, so that the in-process server keeps
/// answering while a test waits on a child process; its panic is the test's.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

/// Runs `language`'s client against `addr` for `subject` (also the user id):
/// its success, stdout and stderr; `None` if the language is missing (see
/// [`Language::command`]).
async fn run_client(
    language: Language,
    addr: SocketAddr,
    subject: &str,
) -> Option<(bool, String, String)> {
    let subject = subject.to_owned();
    blocking(move || {
        let mut command = language.command(language.client())?;
        command.args([
            "--addr",
            &addr.to_string(),
            "--subject",
            &subject,
            "--user",
            &subject,
            "--character",
            "luna",
            "--max-tokens",
            "4000",
            "--used-tokens",
            "1234",
        ]);
        Some(Process::spawn(command).finish())
    })
    .await
}

/// Checks a client's output against `expected`, line by line, so that a
/// failure names the first step that differs; then its exit status.
fn assert_lines(language: Language, run: &(bool, String, String), expected: &[String]) {
    let (success, stdout, stderr) = run;
    let lines: Vec<&str> = stdout.lines().collect();
    for (index, want) in expected.iter().enumerate() {
        let step = want.split(' ').next().unwrap_or_default();
        assert_eq!(
            lines.get(index).copied(),
            Some(want.as_str()),
            "{language:?} client, line {} (step {step}):\nstdout:\n{stdout}stderr:\n{stderr}",
            index + 1
        );
    }
    assert_eq!(
        lines.len(),
        expected.len(),
        "{language:?} client: {stdout}{stderr}"
    );
    assert!(success, "{language:?} client exits 0: {stdout}{stderr}");
}

/// What the client must print on its `run`-th run (from 1) for a subject
/// no one else used, under examples/tollgate.toml: `api` 100 per 15m, quota
/// `text` 30 a day, `tokens` 100000 per hour; each run reserves 4000
/// tokens and settles 1234.
fn expected_client_lines(run: u64) -> Vec<String> {
    let tokens_before = 100_000 - 1234 * (run - 1);
    vec![
        format!("check allowed=true limit=100 remaining={}", 100 - run),
        format!(
            "increment allowed=true used={run} limit=30 remaining={}",
            30 - run
        ),
        format!("usage kind=text used={run} limit=30 remaining={}", 30 - run),
        // The reservation counts the most the call may use...
        format!(
            "reserve allowed=true limit=100000 remaining={}",
            tokens_before - 4000
        ),
        // ...and the settle gives back all but what it used.
        format!("settle found=true remaining={}", tokens_before - 1234),
    ]
}

async fn client_case(language: Language, kind: StoreKind) {
    let backend = Backend::new(kind);
    let server = serve_examples_config(&backend).await;
    let subject = format!("{language:?}-client").to_lowercase();
    // Twice: the second run must see the first one's counts, so the lines
    // are tollgate's answers and not the client's own.
    for run in 1..=2 {
        let Some(output) = run_client(language, server.addr, &subject).await else {
            return;
        };
        assert_lines(language, &output, &expected_client_lines(run));
    }
    // And tollgate agrees with what the client printed.
    let usage = server
        .get_usage(GetUsageRequest {
            user_id: subject.clone(),
            character_id: "luna".to_owned(),
            tier: String::new(),
        })
        .await
        .expect("GetUsage answers");
    let text = usage
        .counters
        .iter()
        .find(|counter| counter.kind == "text")
        .expect("a text counter");
    assert_eq!(text.used, 2, "{usage:?}");
}

async fn node_client(kind: StoreKind) {
    client_case(Language::Node, kind).await;
}

async fn python_client(kind: StoreKind) {
    client_case(Language::Python, kind).await;
}

/// A middleware example, started on a free loopback port in front of a
/// tollgate; killed when dropped.
struct Middleware {
    process: Process,
    port: u16,
}

impl Middleware {
    /// Starts `language`'s middleware for `rule` and waits until it prints
    /// where it listens; `None` if the language is missing (see
    /// [`Language::command`]).
    fn start(language: Language, addr: SocketAddr) -> Option<Self> {
        let mut command = language.command(language.middleware())?;
        command.args([
            "--addr",
            &addr.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--rule",
            "api",
        ]);
        let mut process = Process::spawn(command);
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            let stdout = process.stdout();
            let port = stdout
                .lines()
                .find_map(|line| line.strip_prefix("listening http://127.0.0.1:"))
                .and_then(|port| port.trim().parse::<u16>().ok());
            if let Some(port) = port {
                return Some(Self { process, port });
            }
            if let Some(status) = process.child.try_wait().expect("waiting on the middleware") {
                panic!(
                    "{language:?} middleware exited ({status}): {stdout}{}",
                    process.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{language:?} middleware not listening after {RUN_LIMIT:?}: {stdout}{}",
                process.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /` with `headers` over HTTP/1.1, one connection per request:
    /// the status and the headers (names in lower case).
    fn get(&mut self, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>) {
        let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, self.port))
            .expect("connect to the middleware");
        stream
            .set_read_timeout(Some(HTTP_LIMIT))
            .expect("a read timeout");
        stream
            .set_write_timeout(Some(HTTP_LIMIT))
            .expect("a write timeout");
        let mut request = format!(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
            self.port
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .expect("send the request");
        // Connection: close, so the answer ends where the stream does.
        let mut answer = Vec::new();
        if let Err(err) = stream.read_to_end(&mut answer) {
            panic!(
                "reading the answer: {err}; middleware said: {}{}",
                self.process.stdout(),
                self.process.stderr()
            );
        }
        let answer = String::from_utf8_lossy(&answer);
        let head = answer.split("\r\n\r\n").next().unwrap_or_default();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("an HTTP status line: {answer}"));
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_lowercase(), value.trim().to_owned()))
            .collect();
        (status, headers)
    }
}

/// The one value of header `name` (lower case), if any.
fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut values = headers.iter().filter(|(n, _)| n == name);
    let value = values.next().map(|(_, v)| v.as_str());
    assert!(values.next().is_none(), "one {name} header: {headers:?}");
    value
}

/// Parses the one-item structured list tollgate writes (RFC 8941):
/// `"name";key=integer;...`, to its name and parameters in order.
fn parse_item(value: &str) -> (String, Vec<(String, u64)>) {
    let rest = value
        .strip_prefix('"')
        .unwrap_or_else(|| panic!("a quoted name first: {value:?}"));
    let (name, params) = rest
        .split_once('"')
        .unwrap_or_else(|| panic!("a closed quote: {value:?}"));
    let params = params
        .strip_prefix(';')
        .unwrap_or_else(|| panic!("parameters after the name: {value:?}"));
    let params = params
        .split(';')
        .map(|param| {
            let (key, number) = param
                .split_once('=')
                .unwrap_or_else(|| panic!("key=value parameters: {value:?}"));
            let number = number
                .parse()
                .unwrap_or_else(|_| panic!("integer parameters: {value:?}"));
            (key.to_owned(), number)
        })
        .collect();
    (name.to_owned(), params)
}

/// Checks one answer's RateLimit headers under MIDDLEWARE_CONFIG's `api`
/// (3 per minute) with `remaining` left.
fn assert_ratelimit_headers(language: Language, headers: &[(String, String)], remaining: u64) {
    let policy = header(headers, "ratelimit-policy")
        .unwrap_or_else(|| panic!("{language:?}: a RateLimit-Policy header: {headers:?}"));
    assert_eq!(policy, r#""api";q=3;w=60"#, "{language:?}");
    let ratelimit = header(headers, "ratelimit")
        .unwrap_or_else(|| panic!("{language:?}: a RateLimit header: {headers:?}"));
    let (name, params) = parse_item(ratelimit);
    assert_eq!(name, "api", "{language:?}: {ratelimit}");
    let keys: Vec<&str> = params.iter().map(|(key, _)| key.as_str()).collect();
    assert_eq!(keys, ["r", "t"], "{language:?}: {ratelimit}");
    assert_eq!(params[0].1, remaining, "{language:?}: {ratelimit}");
    // Seconds until the window is empty, rounded up: something was just
    // counted in a one-minute window.
    assert!((1..=60).contains(&params[1].1), "{language:?}: {ratelimit}");
}

async fn middleware_case(language: Language, kind: StoreKind) {
    let backend = Backend::new(kind);
    let server = backend.serve(&test_config(MIDDLEWARE_CONFIG)).await;
    let addr = server.addr;
    let exchanges = blocking(move || {
        let mut middleware = Middleware::start(language, addr)?;
        let key = [("X-API-Key", "key-1")];
        let mut answers: Vec<_> = (0..4).map(|_| middleware.get(&key)).collect();
        // No key: counted by address, apart from key-1.
        answers.push(middleware.get(&[]));
        // A key tollgate refuses as a subject (over 256 bytes) must never
        // skip the limit.
        let long = "k".repeat(300);
        answers.push(middleware.get(&[("X-API-Key", long.as_str())]));
        Some(answers)
    })
    .await;
    let Some(exchanges) = exchanges else {
        return;
    };

    for (index, (status, headers)) in exchanges[..3].iter().enumerate() {
        assert_eq!(
            *status,
            200,
            "{language:?} request {}: {headers:?}",
            index + 1
        );
        assert_eq!(
            header(headers, "retry-after"),
            None,
            "{language:?}: only when denied"
        );
        assert_ratelimit_headers(language, headers, 2 - index as u64);
    }
    let (status, headers) = &exchanges[3];
    assert_eq!(
        *status, 429,
        "{language:?}, the 4th request of 3: {headers:?}"
    );
    let retry_after: u64 = header(headers, "retry-after")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{language:?}: Retry-After in whole seconds: {headers:?}"));
    // Until the first of the three leaves the one-minute window.
    assert!(
        (1..=60).contains(&retry_after),
        "{language:?}: {retry_after}"
    );
    assert_ratelimit_headers(language, headers, 0);

    let (status, headers) = &exchanges[4];
    assert_eq!(*status, 200, "{language:?}, by address: {headers:?}");
    assert_ratelimit_headers(language, headers, 2);

    let (status, headers) = &exchanges[5];
    assert_eq!(*status, 400, "{language:?}, an over-long key: {headers:?}");
}

async fn node_middleware(kind: StoreKind) {
    middleware_case(Language::Node, kind).await;
}

async fn python_middleware(kind: StoreKind) {
    middleware_case(Language::Python, kind).await;
}
