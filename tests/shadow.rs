//! Shadow rules switched by a real hot reload of the config file, and the
//! RateLimit values and shadow answers of a degraded CheckLimit, over a real
//! socket, on both stores (each behind the deny cache, Redis behind the
//! circuit breaker, as `tollgate serve` builds them).

#![allow(unreachable_pub)]

mod common;

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{ratelimit_headers, redis_server::RedisServer};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tollgate::{
    config::{self, Overrides},
    limiter::Limiter,
    proto::{CheckLimitRequest, CheckLimitResponse, rate_limiter_client::RateLimiterClient},
    reload, server,
    store::{
        Store,
        breaker::CircuitBreaker,
        deny_cache::DenyCache,
        memory::MemoryStore,
        redis::{RedisOptions, RedisStore},
    },
};
use tonic::transport::Channel;

/// `watch`: LIMIT per minute, `shadow = SHADOW`; `lock`: 1 per minute, then
/// blocked for a minute, a shadow rule (on_store_error "deny", the default
/// with block_for); `open`: a shadow rule failing open.
const POLICY: &str = r#"
[tiers]
names = ["free"]

[store]
timeout = "100ms"
breaker_failures = 1000

[rules.watch]
window = "1m"
limit = LIMIT
shadow = SHADOW

[rules.lock]
window = "1m"
limit = 1
block_for = "1m"
shadow = true

[rules.open]
window = "1m"
limit = 1
shadow = true

[quotas.kinds]
text = 3
"#;

fn policy(limit: u32, shadow: bool) -> String {
    POLICY
        .replace("LIMIT", &limit.to_string())
        .replace("SHADOW", &shadow.to_string())
}

/// A tollgate serving a limiter whose policy reloads from a file.
struct Served<S> {
    limiter: Arc<Limiter<S>>,
    rate: RateLimiterClient<Channel>,
    path: PathBuf,
    _dir: tempfile::TempDir,
    reloader: JoinHandle<()>,
    _shutdown: oneshot::Sender<()>,
}

impl<S: Store> Served<S> {
    /// Serves `store` under the policy in a config file holding `toml`,
    /// reloaded as `tollgate serve` reloads it.
    async fn start(store: S, toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, toml).expect("write config");
        let config = config::load_file(&path, &Overrides::default()).expect("valid config");
        let limiter = Arc::new(Limiter::new(store, Arc::new(config.policy)));
        let reloader = tokio::spawn(reload::run(
            Arc::clone(&limiter),
            reload::Watch {
                path: path.clone(),
                overrides: Overrides::default(),
                settings: config.settings,
                tls: None,
            },
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, stop) = oneshot::channel::<()>();
        tokio::spawn(server::run(Arc::clone(&limiter), listener, async {
            let _ = stop.await;
        }));
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a loopback URL")
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            limiter,
            rate: RateLimiterClient::new(channel),
            path,
            _dir: dir,
            reloader,
            _shutdown: shutdown,
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

    /// Writes `toml` over the config file and waits (at most 5 s) until the
    /// reloader has put `watch`'s new shadow setting and limit in force.
    async fn reload_to(&self, toml: &str, shadow: bool, limit: u64) {
        std::fs::write(&self.path, toml).expect("write config");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let policy = self.limiter.policy();
            let rule = policy.rule("watch").expect("watch is configured");
            let tier = policy.tiers().default_tier();
            if rule.shadow() == shadow && rule.limit(tier) == limit {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the reload is in force within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `tollgate_decisions_total` of `rule` with `outcome`.
    fn decisions(&self, rule: &str, outcome: &str) -> u64 {
        let prefix = format!(
            r#"tollgate_decisions_total{{rule="{rule}",tier="free",outcome="{outcome}"}} "#
        );
        self.limiter
            .metrics()
            .encode()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .map_or(0, |n| n.trim().parse().expect("a counter is a number"))
    }
}

impl<S> Drop for Served<S> {
    fn drop(&mut self) {
        self.reloader.abort();
    }
}

fn memory_store() -> impl Store {
    DenyCache::new(MemoryStore::new())
}

async fn redis_store(redis: &RedisServer, toml: &str) -> impl Store + use<> {
    let config = config::load_str(toml, "test").expect("valid config");
    let store = RedisStore::connect(&RedisOptions {
        url: redis.url(),
        key_prefix: "shadow:".to_owned(),
        timeout: config.settings.store.timeout,
        pool_size: 1,
        max_batch: tollgate::store::redis::DEFAULT_MAX_BATCH,
    })
    .await
    .expect("connect to the test's redis-server");
    DenyCache::new(CircuitBreaker::new(store, config.settings.store.breaker))
}

// ---- Turning shadow off by reload ----------------------------------------

#[tokio::test]
async fn memory_turning_shadow_off_enforces_the_same_window_at_once() {
    shadow_off_enforces_the_same_window(memory_store()).await;
}

#[tokio::test]
async fn redis_turning_shadow_off_enforces_the_same_window_at_once() {
    let redis = RedisServer::start();
    shadow_off_enforces_the_same_window(redis_store(&redis, &policy(2, true)).await).await;
}

async fn shadow_off_enforces_the_same_window<S: Store>(store: S) {
    let served = Served::start(store, &policy(2, true)).await;
    for remaining in [1, 0] {
        let r = served.check("watch", "ann").await;
        assert!(
            r.allowed && !r.shadowed && r.remaining == remaining,
            "{r:?}"
        );
    }
    // Shadow: would-be denials, allowed, counting nothing.
    for _ in 0..3 {
        let r = served.check("watch", "ann").await;
        assert!(r.allowed && r.shadowed, "{r:?}");
    }
    assert_eq!(served.decisions("watch", "shadow_denied"), 3);

    // Enforced from the next call on: the 2 hits are still in the window.
    served.reload_to(&policy(2, false), false, 2).await;
    let denied = served.check("watch", "ann").await;
    assert!(!denied.allowed && !denied.shadowed, "{denied:?}");
    assert_eq!(denied.remaining, 0);
    assert_eq!(
        ratelimit_headers::ratelimit(&denied.ratelimit).1,
        0,
        "{denied:?}"
    );
    assert_eq!(served.decisions("watch", "denied"), 1);

    // Exactly 2 were counted, not 5: with a limit of 3, one more fits.
    served.reload_to(&policy(3, false), false, 3).await;
    let last = served.check("watch", "ann").await;
    assert!(last.allowed && last.remaining == 0, "{last:?}");
    assert_eq!(
        ratelimit_headers::policy(&last.ratelimit_policy),
        ("watch".to_owned(), 3, 60),
        "the policy value follows the reload"
    );
    assert!(!served.check("watch", "ann").await.allowed);

    // And back to shadow: allowed again, on the same full window.
    served.reload_to(&policy(3, true), true, 3).await;
    let r = served.check("watch", "ann").await;
    assert!(r.allowed && r.shadowed && r.remaining == 0, "{r:?}");
}

// ---- Degraded answers ------------------------------------------------------

/// With Redis gone, CheckLimit answers by each rule's on_store_error: a
/// shadow rule is allowed all the same (shadowed when an enforced one would
/// have been denied), and the values keep the rule's policy but have no
/// RateLimit item, since the window is unknown.
#[tokio::test]
async fn degraded_answers_keep_the_policy_value_and_allow_shadow_rules() {
    let mut redis = RedisServer::start();
    let toml = policy(1, false);
    let served = Served::start(redis_store(&redis, &toml).await, &toml).await;
    assert!(served.check("watch", "ann").await.allowed);
    redis.kill();

    // An enforced rule failing open.
    let r = served.check("watch", "ann").await;
    assert!(r.degraded && r.allowed && !r.shadowed, "{r:?}");
    assert_eq!(
        ratelimit_headers::policy(&r.ratelimit_policy),
        ("watch".to_owned(), 1, 60)
    );
    assert_eq!(r.ratelimit, "", "no figures without the store");

    // A shadow rule failing closed: allowed, and shadowed.
    let lock = served.check("lock", "ann").await;
    assert!(lock.degraded && lock.allowed && lock.shadowed, "{lock:?}");
    assert_eq!(lock.ratelimit, "");
    // A shadow rule failing open: allowed, not shadowed.
    let open = served.check("open", "ann").await;
    assert!(open.degraded && open.allowed && !open.shadowed, "{open:?}");
    assert_eq!(served.decisions("lock", "degraded"), 1);
    assert_eq!(served.decisions("lock", "shadow_denied"), 0);
}
