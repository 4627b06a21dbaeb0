//! Operating tollgate: hot reload, metrics, a hanging store and graceful
//! shutdown, over real sockets against real redis-server processes.

#![allow(unreachable_pub)]

mod common;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use common::redis_server::RedisServer;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tollgate::{
    config::{self, Overrides},
    limiter::Limiter,
    metrics::{self, Metrics},
    proto::{CheckLimitRequest, CheckLimitResponse, rate_limiter_client::RateLimiterClient},
    reload, server,
    store::{
        Store,
        breaker::CircuitBreaker,
        memory::{MemoryOptions, MemoryStore},
        redis::{RedisOptions, RedisStore},
    },
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const POLICY: &str = r#"
[tiers]
names = ["free", "premium"]

[rules.burst]
window = "60s"
limit = LIMIT

[rules.login]
window = "60s"
limit = 1
block_for = "60s"

[quotas.kinds]
text = 3
"#;

fn policy_with_limit(limit: u32) -> String {
    POLICY.replace("LIMIT", &limit.to_string())
}

/// A tollgate serving `limiter` on a loopback port.
struct Served<S> {
    limiter: Arc<Limiter<S>>,
    rate: RateLimiterClient<Channel>,
    health: HealthClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), server::ServerError>>,
}

impl<S: Store> Served<S> {
    async fn start(store: S, toml: &str) -> Self {
        Self::start_with_metrics(store, toml, Arc::new(Metrics::new())).await
    }

    /// [`Served::start`], recording into `metrics` (which the store may
    /// also count into, as `main` wires it).
    async fn start_with_metrics(store: S, toml: &str, metrics: Arc<Metrics>) -> Self {
        let config = config::load_str(toml, "test").expect("the test config is valid");
        let limiter = Arc::new(Limiter::new(store, Arc::new(config.policy)).with_metrics(metrics));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(limiter.clone(), listener, async {
            let _ = stop.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a loopback URL")
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            limiter,
            rate: RateLimiterClient::new(channel.clone()),
            health: HealthClient::new(channel),
            shutdown: Some(shutdown),
            task,
        }
    }

    async fn check(&self, rule: &str, subject: &str) -> CheckLimitResponse {
        self.rate
            .clone()
            .check_limit(CheckLimitRequest {
                rule: rule.to_owned(),
                subject: subject.to_owned(),
                ..CheckLimitRequest::default()
            })
            .await
            .expect("CheckLimit answers")
            .into_inner()
    }

    async fn health(&self) -> ServingStatus {
        self.health
            .clone()
            .check(HealthCheckRequest::default())
            .await
            .expect("health answers")
            .into_inner()
            .status()
    }
}

fn redis_store_options(redis: &RedisServer, timeout: Duration) -> RedisOptions {
    RedisOptions {
        url: redis.url(),
        key_prefix: "lifecycle:".to_owned(),
        timeout,
        pool_size: 2,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    }
}

/// Polls `probe` every 50 ms until it returns true, for at most `within`.
async fn eventually(within: Duration, mut probe: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if probe().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_changed_file_reloads_the_policy_and_keeps_counters() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, policy_with_limit(2)).expect("write config");
    let served = Served::start(MemoryStore::new(), &policy_with_limit(2)).await;
    let watch = reload::Watch {
        path: path.clone(),
        overrides: Overrides::default(),
        settings: config::load_file(&path, &Overrides::default())
            .expect("valid")
            .settings,
        tls: None,
    };
    let reloader = tokio::spawn(reload::run(served.limiter.clone(), watch));

    assert!(served.check("burst", "u").await.allowed);
    assert!(served.check("burst", "u").await.allowed);
    assert!(!served.check("burst", "u").await.allowed, "2 per minute");

    std::fs::write(&path, policy_with_limit(5)).expect("write config");
    let reloaded = eventually(Duration::from_secs(3), async || {
        served
            .limiter
            .policy()
            .rule("burst")
            .map(|r| r.limit(tier0()))
            == Some(5)
    })
    .await;
    assert!(reloaded, "the new limit is in force within 3 s");
    // Counters survive: 2 of the 5 are used, so 3 more fit.
    let after = served.check("burst", "u").await;
    assert!(after.allowed);
    assert_eq!((after.limit, after.remaining), (5, 2));

    // An invalid file is rejected and the policy in force stays.
    std::fs::write(&path, "[tiers]\nnames = []\n").expect("write config");
    tokio::time::sleep(reload::POLL_EVERY * 2).await;
    let still = served.check("burst", "u").await;
    assert_eq!((still.allowed, still.limit, still.remaining), (true, 5, 1));
    reloader.abort();
}

fn tier0() -> tollgate::rules::Tier {
    config::load_str(&policy_with_limit(1), "t")
        .expect("valid")
        .policy
        .tiers()
        .default_tier()
}

/// The binary reloads on SIGHUP, logs it, and exits 0 on SIGTERM.
#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    reload_and_stop(&[]).await;
}

/// The same with one worker thread (the current-thread runtime) on Redis:
/// the store, its batching and its reset subscriber all run on the one
/// thread.
#[tokio::test]
async fn one_worker_thread_serves_reloads_and_stops_on_redis() {
    let redis = common::redis_server::RedisServer::start();
    reload_and_stop(&[
        ("TOLLGATE_SERVER__WORKER_THREADS", "1"),
        ("TOLLGATE_STORE__URL", &redis.url()),
    ])
    .await;
}

async fn reload_and_stop(env: &[(&str, &str)]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, policy_with_limit(1)).expect("write config");
    let port = common::redis_server::free_port();
    let log = dir.path().join("out.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tollgate starts");
    let guard = KillOnDrop(child.id());
    let channel = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
                .expect("url")
                .connect()
                .await
            {
                return channel;
            }
            assert!(Instant::now() < deadline, "tollgate did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    .await;
    let mut rate = RateLimiterClient::new(channel);
    let mut check = async || {
        rate.check_limit(CheckLimitRequest {
            rule: "burst".to_owned(),
            subject: "s".to_owned(),
            ..CheckLimitRequest::default()
        })
        .await
        .expect("CheckLimit answers")
        .into_inner()
    };
    assert_eq!(check().await.limit, 1);

    std::fs::write(&path, policy_with_limit(7)).expect("write config");
    signal(child.id(), "-HUP");
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        seen = check().await.limit;
        if seen == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, 7, "SIGHUP put the new limit in force");

    // Our connection stays open: the binary waits for requests in flight,
    // not for idle connections.
    signal(child.id(), "-TERM");
    let exited = wait_for_exit(&mut child, Duration::from_secs(3));
    std::mem::forget(guard);
    assert_eq!(exited.map(|s| s.code()), Some(Some(0)), "exit 0 on SIGTERM");
    let output = std::fs::read_to_string(&log).expect("log");
    assert!(
        output.contains("new policy in force"),
        "the reload is logged:\n{output}"
    );
}

struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        signal(self.0, "-KILL");
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
}

fn wait_for_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Reads `/metrics` over a plain HTTP/1.0 request.
fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("send");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("read");
    body
}

async fn serve_metrics<S: Store>(limiter: &Limiter<S>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(metrics::serve(
        limiter.metrics().clone(),
        listener,
        std::future::pending(),
    ));
    addr
}

#[tokio::test]
async fn metrics_count_decisions_by_rule_tier_and_outcome() {
    let served = Served::start(MemoryStore::new(), &policy_with_limit(1)).await;
    let addr = serve_metrics(&served.limiter).await;
    served.check("burst", "a").await;
    served.check("burst", "a").await;
    served.check("login", "b").await;
    served.check("login", "b").await;
    served.check("login", "b").await;
    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("scrape");
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    for line in [
        r#"tollgate_decisions_total{rule="burst",tier="free",outcome="allowed"} 1"#,
        r#"tollgate_decisions_total{rule="burst",tier="free",outcome="denied"} 1"#,
        r#"tollgate_decisions_total{rule="login",tier="free",outcome="allowed"} 1"#,
        r#"tollgate_decisions_total{rule="login",tier="free",outcome="blocked"} 2"#,
        r#"tollgate_store_call_duration_seconds_count{operation="check_limit"} 5"#,
        "tollgate_requests_in_flight 0",
        "tollgate_circuit_breaker_open 0",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    assert!(!body.contains("subject"), "subjects never become labels");
}

/// A memory store capped at 4 entries, fed 200 new subjects over gRPC:
/// every subject it no longer holds was evicted, and `/metrics` says so.
#[tokio::test]
async fn evictions_of_a_full_memory_store_reach_the_metrics() {
    let metrics = Arc::new(Metrics::new());
    let store =
        MemoryStore::with_options(MemoryOptions { max_entries: 4 }, metrics.store_evictions());
    let served = Served::start_with_metrics(store.clone(), &policy_with_limit(5), metrics).await;
    let addr = serve_metrics(&served.limiter).await;
    const SUBJECTS: usize = 200;
    for subject in 0..SUBJECTS {
        assert!(served.check("burst", &format!("s{subject}")).await.allowed);
    }
    // At most one over the cap per shard: a shard never evicts the counter
    // it is deciding on.
    let held = store.entries();
    assert!(held <= 4 + 64, "{held} held");
    let body = tokio::task::spawn_blocking(move || scrape(addr))
        .await
        .expect("scrape");
    let line = format!("tollgate_store_evictions_total {}", SUBJECTS - held);
    assert!(body.contains(&line), "missing {line:?} in:\n{body}");
}

/// Redis hangs (SIGSTOP): answers are degraded within the timeout, the
/// breaker opens so later answers come at once, health and the breaker
/// gauge say so; once Redis is back, normal answers and SERVING return
/// within 3 s, and the counter is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_store_degrades_fast_and_recovers() {
    let redis = RedisServer::start();
    let timeout = Duration::from_millis(200);
    let store = RedisStore::connect(&redis_store_options(&redis, timeout))
        .await
        .expect("connect");
    let store = CircuitBreaker::new(
        store,
        tollgate::store::breaker::BreakerOptions {
            failure_threshold: 3,
            cool_down: Duration::from_millis(500),
        },
    );
    let served = Served::start(store, &policy_with_limit(100)).await;
    let addr = serve_metrics(&served.limiter).await;
    for _ in 0..3 {
        assert!(!served.check("burst", "s").await.degraded);
    }

    redis.pause();
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let answer = served.check("burst", "s").await;
        slowest = slowest.max(started.elapsed());
        assert!(answer.degraded && answer.allowed, "allow on store error");
    }
    assert!(
        slowest < timeout + Duration::from_millis(300),
        "no answer waited past the timeout: {slowest:?}"
    );
    // The breaker is open now: an answer comes without waiting on Redis.
    let started = Instant::now();
    assert!(served.check("burst", "s").await.degraded);
    assert!(started.elapsed() < Duration::from_millis(100));
    let unhealthy = eventually(Duration::from_secs(2), async || {
        served.health().await == ServingStatus::NotServing
    })
    .await;
    assert!(unhealthy, "health is NOT_SERVING while the store hangs");
    let gauge_open = eventually(Duration::from_secs(2), async || {
        let body = tokio::task::spawn_blocking(move || scrape(addr))
            .await
            .expect("scrape");
        body.contains("tollgate_circuit_breaker_open 1")
    })
    .await;
    assert!(gauge_open, "the breaker gauge shows it open");

    redis.resume();
    let back = Instant::now();
    let recovered = eventually(Duration::from_secs(3), async || {
        !served.check("burst", "s").await.degraded
            && served.health().await == ServingStatus::Serving
    })
    .await;
    assert!(
        recovered,
        "normal answers and SERVING within 3 s of the store's return"
    );
    eprintln!("recovered {:?} after the store came back", back.elapsed());

    // Nothing was corrupted: the log holds the 3 + recovery hits counted
    // before and after, plus at most the hung calls Redis ran when thawed.
    let answer = served.check("burst", "s").await;
    assert!(!answer.degraded);
    let used = 100 - answer.remaining;
    assert!((5..=16).contains(&used), "used {used}");
}

/// On shutdown health turns NOT_SERVING at once, and an in-flight request
/// still finishes before `run` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_reports_not_serving_and_finishes_in_flight_requests() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis_store_options(&redis, Duration::from_secs(5)))
        .await
        .expect("connect");
    let mut served = Served::start(store, &policy_with_limit(10)).await;
    let mut watch = served
        .health
        .clone()
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("a status").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);

    redis.pause();
    let rate = served.rate.clone();
    let in_flight = tokio::spawn(async move {
        rate.clone()
            .check_limit(CheckLimitRequest {
                rule: "burst".to_owned(),
                subject: "late".to_owned(),
                ..CheckLimitRequest::default()
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    if let Some(shutdown) = served.shutdown.take() {
        let _ = shutdown.send(());
    }
    // The prober may repeat SERVING before the shutdown lands.
    let not_serving = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(update)) = watch.next().await {
            if update.status() == ServingStatus::NotServing {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(not_serving, Ok(true), "NOT_SERVING within 2 s of shutdown");

    redis.resume();
    let answer = in_flight
        .await
        .expect("the task")
        .expect("the in-flight request is answered")
        .into_inner();
    assert!(answer.allowed && !answer.degraded);
    // A Watch stream is itself a request in flight; closing it lets the
    // server finish.
    drop(watch);
    tokio::time::timeout(Duration::from_secs(5), served.task)
        .await
        .expect("run returns after in-flight requests finish")
        .expect("the server task")
        .expect("a clean stop");
}

#[test]
fn the_shipped_config_names_no_metrics_port_by_default() {
    let config = config::load_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml"),
        &Overrides::default(),
    )
    .expect("valid");
    assert_eq!(
        config.settings.metrics_listen, None,
        "off unless configured"
    );
}
