//! The `tollgate-bench` binary against an in-process tollgate on the memory
//! store (or on a store that is down): exact counts through `--json`, and
//! the loopback guard.

use std::{process::Output, sync::Arc, time::Duration};

use tokio::{net::TcpListener, process::Command, sync::oneshot, task::JoinHandle};
use tollgate::{
    limiter::Limiter,
    store::{
        ConversationCounters, LimitCheck, LimitDecision, LimitInspect, LimitUsage, Store,
        StoreError, UsageDecision, UsageIncrement, memory::MemoryStore,
    },
};

/// No single run of the binary may take longer than this.
const RUN_TIMEOUT: Duration = Duration::from_secs(20);

/// A tollgate server on a free loopback port, stopped by [`Server::stop`].
struct Server {
    addr: String,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tollgate::server::ServerError>>,
}

impl Server {
    /// Serves the shipped config's policy on the memory store.
    async fn start() -> Self {
        Self::start_on(MemoryStore::new()).await
    }

    /// Serves the shipped config's policy on `store`.
    async fn start_on(store: impl Store) -> Self {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tollgate.toml");
        let toml = std::fs::read_to_string(path).expect("the shipped config is readable");
        let policy = tollgate::config::load_str(&toml, "shipped")
            .expect("the shipped config is valid")
            .policy;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a free loopback port");
        let addr = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        );
        let limiter = Arc::new(Limiter::new(store, Arc::new(policy)));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(tollgate::server::run(limiter, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the server stops within 5 s")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
    }
}

/// A store that is down: every call fails as an unreachable Redis does, so
/// every answer is the failure policy's, marked degraded.
struct Down;

impl Down {
    fn error() -> StoreError {
        StoreError::Unavailable("connection refused".to_owned())
    }
}

impl Store for Down {
    async fn check_limit(&self, _: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        Err(Self::error())
    }

    async fn increment_usage(&self, _: &UsageIncrement<'_>) -> Result<UsageDecision, StoreError> {
        Err(Self::error())
    }

    async fn get_usage(&self, _: &str, _: &str) -> Result<ConversationCounters, StoreError> {
        Err(Self::error())
    }

    async fn list_usage(
        &self,
        _: &str,
        _: usize,
    ) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
        Err(Self::error())
    }

    async fn inspect_limit(&self, _: &LimitInspect<'_>) -> Result<LimitUsage, StoreError> {
        Err(Self::error())
    }

    async fn reset_limit(&self, _: &str, _: &str) -> Result<bool, StoreError> {
        Err(Self::error())
    }

    async fn reset_usage(&self, _: &str, _: Option<&str>) -> Result<u32, StoreError> {
        Err(Self::error())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Err(Self::error())
    }
}

/// Runs `tollgate-bench` with `args`, bounded by [`RUN_TIMEOUT`].
async fn bench(args: &[&str]) -> Output {
    let run = Command::new(env!("CARGO_BIN_EXE_tollgate-bench"))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .expect("tollgate-bench finishes in time")
        .expect("tollgate-bench runs")
}

/// Runs a `--json` bench and returns its one line, failing on a bad exit.
async fn bench_json(args: &[&str]) -> String {
    let output = bench(args).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "tollgate-bench {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    stdout
}

/// The unsigned integer at top-level `key` of the bench's flat JSON line.
fn field(json: &str, key: &str) -> u64 {
    let needle = format!("\"{key}\":");
    let start = json
        .find(&needle)
        .unwrap_or_else(|| panic!("{key} in {json}"))
        + needle.len();
    let digits: String = json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{key} is a number in {json}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_limit_counts_are_exact() {
    let server = Server::start().await;
    // Rule api allows 100 per 15 minutes on the free tier; 2000 requests
    // round-robin over 10 subjects give each 200, so exactly 1000 pass.
    let json = bench_json(&[
        "--addr",
        &server.addr,
        "-n",
        "2000",
        "--concurrency",
        "20",
        "--subjects",
        "10",
        "--json",
    ])
    .await;
    assert_eq!(field(&json, "count"), 2000, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert_eq!(field(&json, "allowed"), 1000, "{json}");
    assert_eq!(field(&json, "denied"), 1000, "{json}");
    assert_eq!(field(&json, "degraded"), 0, "{json}");
    assert!(json.contains("\"call\":\"check-limit\""), "{json}");
    assert!(json.contains("\"errors_by_code\":{}"), "{json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increment_usage_counts_are_exact() {
    let server = Server::start().await;
    // Free text quota: 30 per conversation; 500 requests over 10 users with
    // one character each get 50 per conversation, so exactly 300 pass.
    let json = bench_json(&[
        "--addr",
        &server.addr,
        "--call",
        "increment-usage",
        "-n",
        "500",
        "--concurrency",
        "10",
        "--connections",
        "2",
        "--subjects",
        "10",
        "--json",
    ])
    .await;
    assert_eq!(field(&json, "count"), 500, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert_eq!(field(&json, "allowed"), 300, "{json}");
    assert_eq!(field(&json, "denied"), 200, "{json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn should_rate_limit_counts_are_exact() {
    let server = Server::start().await;
    // Through the Envoy door, the shipped messaging rule allows 10 per
    // minute on the free tier: 300 requests over 10 subjects give each 30,
    // so exactly 100 pass.
    let json = bench_json(&[
        "--addr",
        &server.addr,
        "--call",
        "should-rate-limit",
        "--rule",
        "messaging",
        "-n",
        "300",
        "--concurrency",
        "10",
        "--subjects",
        "10",
        "--json",
    ])
    .await;
    assert_eq!(field(&json, "count"), 300, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert_eq!(field(&json, "allowed"), 100, "{json}");
    assert_eq!(field(&json, "denied"), 200, "{json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_answers_are_counted_apart_from_errors() {
    let server = Server::start_on(Down).await;
    // With the store down, the shipped api rule and the quotas fail open
    // and auth (a lock-out) fails closed: every answer is the policy's,
    // marked degraded, and none is an error.
    for (args, allowed, denied) in [
        (&["--rule", "api"][..], 40, 0),
        (&["--rule", "auth"][..], 0, 40),
        (&["--call", "increment-usage"][..], 40, 0),
    ] {
        let mut all = vec!["--addr", &server.addr, "-n", "40", "-c", "4", "--json"];
        all.extend_from_slice(args);
        let json = bench_json(&all).await;
        assert_eq!(field(&json, "count"), 40, "{json}");
        assert_eq!(field(&json, "errors"), 0, "{json}");
        assert_eq!(field(&json, "allowed"), allowed, "{json}");
        assert_eq!(field(&json, "denied"), denied, "{json}");
        assert_eq!(field(&json, "degraded"), 40, "{json}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_rate_sends_exactly_its_arrivals_and_never_faster() {
    let server = Server::start().await;
    // 400 per second for 1 s: arrivals 0..400 fall inside the second.
    let json = bench_json(&[
        "--addr",
        &server.addr,
        "--rps",
        "400",
        "--duration",
        "1s",
        "--concurrency",
        "8",
        "--subjects",
        "1000",
        "--json",
    ])
    .await;
    assert_eq!(field(&json, "count"), 400, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert_eq!(field(&json, "target_rps"), 400, "{json}");
    // The last arrival is due 399/400 s after the first, so the achieved
    // rate can only exceed the target by that rounding, however fast the
    // server is.
    let rps = field(&json, "rps");
    assert!(rps <= 401, "paced at most 400/s: {json}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_up_is_reported_apart_and_not_counted() {
    let server = Server::start().await;
    // Rule api allows 100 per subject; the warm-up's few thousand requests
    // and the 300 measured ones over 1000 subjects stay far below that, so
    // every measured request is allowed and the count is exactly -n.
    let json = bench_json(&[
        "--addr",
        &server.addr,
        "--warmup",
        "200ms",
        "-n",
        "300",
        "--concurrency",
        "4",
        "--subjects",
        "1000",
        "--json",
    ])
    .await;
    assert_eq!(field(&json, "count"), 300, "{json}");
    assert_eq!(field(&json, "allowed"), 300, "{json}");
    assert_eq!(field(&json, "errors"), 0, "{json}");
    assert!(
        field(&json, "warmup_count") > 0,
        "the warm-up sent requests: {json}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_human_summary_and_a_duration_bound() {
    let server = Server::start().await;
    let output = bench(&[
        "--addr",
        &server.addr,
        "--duration",
        "300ms",
        "--warmup",
        "100ms",
        "--concurrency",
        "4",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for part in [
        "Warm-up:",
        "Requests/sec:",
        "p99",
        "allowed",
        "denied",
        "errors",
    ] {
        assert!(stdout.contains(part), "{part} in {stdout}");
    }
    server.stop().await;
}

#[tokio::test]
async fn refuses_a_non_loopback_address() {
    let output = bench(&["--addr", "http://10.1.2.3:50051", "-n", "1"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");
    assert!(stderr.contains("--allow-remote"), "{stderr}");
}

#[tokio::test]
async fn fails_clearly_when_no_server_answers() {
    // Bind a port, then free it: nothing listens there afterwards.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port")
        .local_addr()
        .expect("a bound listener has an address")
        .port();
    let output = bench(&["--addr", &format!("http://127.0.0.1:{port}"), "-n", "10"]).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}
