//! A real tollgate served in-process on a free loopback port, with tonic
//! clients connected to it over the socket.
//!
//! A [`Backend`] is one store (an embedded memory store, or a real
//! `redis-server` of its own) that any number of tollgate instances can
//! share, as instances in production share one Redis. Each test makes its own
//! backend, so tests never share counters.

// Several test binaries include this module and each uses a part of it.
#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::StreamExt;
use tollgate::{
    config::{self, Config},
    limiter::Limiter,
    metrics::Metrics,
    proto::{
        CheckLimitRequest, CheckLimitResponse, GetUsageRequest, GetUsageResponse,
        IncrementUsageRequest, IncrementUsageResponse, ListUsageRequest, ListUsageResponse,
        admin_client::AdminClient, rate_limiter_client::RateLimiterClient,
        usage_quota_client::UsageQuotaClient,
    },
    server::{self, ServerError},
    stats::StatsClock,
    store::{
        Store,
        breaker::CircuitBreaker,
        deny_cache::DenyCache,
        memory::MemoryStore,
        redis::{RedisOptions, RedisStore},
    },
};
use tonic::{Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::{v1, v1alpha};

use super::{cluster::RedisCluster, redis_server::RedisServer};

/// Every Redis key the tests make starts with this.
pub(crate) const KEY_PREFIX: &str = "conformance:";

/// The shipped config, as the service runs by default.
pub(crate) fn shipped_config() -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
    let text = std::fs::read_to_string(&path).expect("config/tollgate.toml ships with the crate");
    // load_str, not load_file: TOLLGATE_* variables in the test environment
    // must not change what the tests assert.
    config::load_str(&text, "config/tollgate.toml").expect("the shipped config is valid")
}

/// A test config from TOML text.
pub(crate) fn test_config(toml: &str) -> Config {
    config::load_str(toml, "test").expect("the test's own config is valid")
}

/// Which store a backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    /// The embedded store.
    Memory,
    /// A real `redis-server`, started for this backend alone.
    Redis,
    /// A real 3-master Redis Cluster, started for this backend alone.
    Cluster,
}

/// One store that tollgate instances share.
pub(crate) struct Backend {
    kind: StoreKind,
    /// Cloned into every instance: clones share one set of counters.
    memory: MemoryStore,
    redis: Option<RedisServer>,
    cluster: Option<RedisCluster>,
}

impl Backend {
    /// A fresh, empty store of `kind` (starting a redis-server for Redis).
    pub(crate) fn new(kind: StoreKind) -> Self {
        let redis = (kind == StoreKind::Redis).then(RedisServer::start);
        let cluster = (kind == StoreKind::Cluster).then(|| RedisCluster::start(0));
        Self {
            kind,
            memory: MemoryStore::new(),
            redis,
            cluster,
        }
    }

    /// The store's kind.
    pub(crate) fn kind(&self) -> StoreKind {
        self.kind
    }

    /// The redis-server behind a Redis backend.
    pub(crate) fn redis(&self) -> &RedisServer {
        self.redis
            .as_ref()
            .expect("only a Redis backend has a redis-server")
    }

    /// The redis-server behind a Redis backend, to kill or restart it.
    pub(crate) fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis
            .as_mut()
            .expect("only a Redis backend has a redis-server")
    }

    /// EVALSHA calls the backend's Redis has served so far, summed over
    /// every master of a cluster: whether a check reached Redis. 0 for the
    /// memory store.
    pub(crate) fn evalsha_calls(&self) -> u64 {
        if let Some(cluster) = &self.cluster {
            return cluster
                .masters()
                .iter()
                .map(|master| {
                    cluster
                        .command_counts(master.port)
                        .get("evalsha")
                        .copied()
                        .unwrap_or(0)
                })
                .sum();
        }
        let Some(redis) = &self.redis else {
            return 0;
        };
        redis
            .cli(&["INFO", "commandstats"])
            .lines()
            .find_map(|line| line.trim().strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    }

    /// The Redis connection options an instance of `config` uses: the
    /// config's timeout and pool size, this backend's server.
    pub(crate) fn redis_options(&self, config: &Config) -> RedisOptions {
        let url = match &self.cluster {
            Some(cluster) => cluster.url(),
            None => self.redis().url(),
        };
        RedisOptions {
            url,
            key_prefix: KEY_PREFIX.to_owned(),
            timeout: config.settings.store.timeout,
            pool_size: config.settings.store.pool_size,
            max_batch: config.settings.store.max_batch,
        }
    }

    /// Starts one more tollgate instance enforcing `config`'s policy on this
    /// backend's store, built as `tollgate serve` builds it: behind a deny
    /// cache, and Redis behind the circuit breaker configured in `[store]`.
    pub(crate) async fn serve(&self, config: &Config) -> TestServer {
        self.serve_with_stats_clock(config, StatsClock::System)
            .await
    }

    /// Like [`Self::serve`], with usage statistics on `clock`.
    pub(crate) async fn serve_with_stats_clock(
        &self,
        config: &Config,
        clock: StatsClock,
    ) -> TestServer {
        match self.kind {
            StoreKind::Memory => {
                TestServer::start_with(DenyCache::new(self.memory.clone()), config, clock).await
            }
            StoreKind::Redis | StoreKind::Cluster => {
                let store = RedisStore::connect(&self.redis_options(config))
                    .await
                    .expect("RedisStore connects to the test's redis-server");
                let batches = store.clone();
                let store = CircuitBreaker::new(store, config.settings.store.breaker);
                let server = TestServer::start_with(DenyCache::new(store), config, clock).await;
                // As `tollgate serve` does: batch sizes in the metrics.
                batches.observe_batches(server.metrics.store_batch_sizes());
                server
            }
        }
    }

    /// The cluster behind a Cluster backend.
    pub(crate) fn cluster(&self) -> &RedisCluster {
        self.cluster
            .as_ref()
            .expect("only a Cluster backend has a cluster")
    }

    /// [`Backend::serve`], with the admin door on a port of its own.
    pub(crate) async fn serve_with_admin(&self, config: &Config) -> TestServer {
        match self.kind {
            StoreKind::Memory => {
                TestServer::start_with_admin(DenyCache::new(self.memory.clone()), config).await
            }
            StoreKind::Redis | StoreKind::Cluster => {
                let store = RedisStore::connect(&self.redis_options(config))
                    .await
                    .expect("RedisStore connects to the test's redis-server");
                let store = CircuitBreaker::new(store, config.settings.store.breaker);
                TestServer::start_with_admin(DenyCache::new(store), config).await
            }
        }
    }

    /// An instance with the shipped config.
    pub(crate) async fn serve_shipped(&self) -> TestServer {
        self.serve(&shipped_config()).await
    }

    /// An instance with a test config given as TOML.
    pub(crate) async fn serve_toml(&self, toml: &str) -> TestServer {
        self.serve(&test_config(toml)).await
    }
}

/// A tollgate serving on a loopback port, and clients connected to it.
pub(crate) struct TestServer {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The store timeout the instance runs with.
    pub(crate) store_timeout: Duration,
    /// The metrics the instance records into.
    pub(crate) metrics: Arc<Metrics>,
    /// `tollgate.v1.RateLimiter`.
    pub(crate) rate: RateLimiterClient<Channel>,
    /// `tollgate.v1.UsageQuota`.
    pub(crate) quota: UsageQuotaClient<Channel>,
    /// `grpc.health.v1.Health`.
    pub(crate) health: HealthClient<Channel>,
    /// `grpc.reflection.v1.ServerReflection`.
    pub(crate) reflection_v1: v1::server_reflection_client::ServerReflectionClient<Channel>,
    /// `grpc.reflection.v1alpha.ServerReflection`.
    pub(crate) reflection_v1alpha:
        v1alpha::server_reflection_client::ServerReflectionClient<Channel>,
    /// The admin door's address and client, when started with one.
    pub(crate) admin: Option<(SocketAddr, AdminClient<Channel>)>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    admin_shutdown: Option<oneshot::Sender<()>>,
    admin_task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestServer {
    /// [`TestServer::start`], with the admin door on a second loopback port.
    pub(crate) async fn start_with_admin<S: Store>(store: S, config: &Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let limiter = Arc::new(
            Limiter::new(store, Arc::new(config.policy.clone())).with_stats(config.settings.stats),
        );
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run_admin(
            limiter.clone(),
            listener,
            async {
                let _ = stop.await;
            },
            server::ServeOptions::default(),
        ));
        let mut server = Self::start_limiter(limiter, config).await;
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a loopback URL is valid")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the test server's admin door");
        server.admin = Some((addr, AdminClient::new(channel)));
        server.admin_shutdown = Some(shutdown);
        server.admin_task = Some(task);
        server
    }

    /// The admin door's client; panics if started without one.
    pub(crate) fn admin(&self) -> AdminClient<Channel> {
        self.admin
            .as_ref()
            .expect("started with start_with_admin")
            .1
            .clone()
    }

    /// Serves `store` under `config`'s policy on a fresh loopback port.
    pub(crate) async fn start<S: Store>(store: S, config: &Config) -> Self {
        Self::start_with(store, config, StatsClock::System).await
    }

    /// Like [`Self::start`], with usage statistics on `clock`.
    pub(crate) async fn start_with<S: Store>(store: S, config: &Config, clock: StatsClock) -> Self {
        let limiter = Arc::new(
            Limiter::new(store, Arc::new(config.policy.clone()))
                .with_stats_clock(config.settings.stats, clock),
        );
        Self::start_limiter(limiter, config).await
    }

    async fn start_limiter<S: Store>(limiter: Arc<Limiter<S>>, config: &Config) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let metrics = Arc::clone(limiter.metrics());
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run(limiter, listener, async {
            // A dropped sender stops the server too.
            let _ = stop.await;
        }));
        // The listener is bound before the server task runs, so connecting
        // succeeds at once; the timeout only guards against a wedged server.
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a loopback URL is valid")
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            addr,
            store_timeout: config.settings.store.timeout,
            metrics,
            rate: RateLimiterClient::new(channel.clone()),
            quota: UsageQuotaClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            reflection_v1: v1::server_reflection_client::ServerReflectionClient::new(
                channel.clone(),
            ),
            reflection_v1alpha: v1alpha::server_reflection_client::ServerReflectionClient::new(
                channel,
            ),
            admin: None,
            shutdown: Some(shutdown),
            task: Some(task),
            admin_shutdown: None,
            admin_task: None,
        }
    }

    /// `CheckLimit`.
    pub(crate) async fn check(
        &self,
        request: CheckLimitRequest,
    ) -> Result<CheckLimitResponse, Status> {
        let mut client = self.rate.clone();
        client.check_limit(request).await.map(|r| r.into_inner())
    }

    /// `IncrementUsage`.
    pub(crate) async fn increment(
        &self,
        request: IncrementUsageRequest,
    ) -> Result<IncrementUsageResponse, Status> {
        let mut client = self.quota.clone();
        client
            .increment_usage(request)
            .await
            .map(|r| r.into_inner())
    }

    /// `GetUsage`.
    pub(crate) async fn get_usage(
        &self,
        request: GetUsageRequest,
    ) -> Result<GetUsageResponse, Status> {
        let mut client = self.quota.clone();
        client.get_usage(request).await.map(|r| r.into_inner())
    }

    /// `ListUsage`.
    pub(crate) async fn list_usage(
        &self,
        request: ListUsageRequest,
    ) -> Result<ListUsageResponse, Status> {
        let mut client = self.quota.clone();
        client.list_usage(request).await.map(|r| r.into_inner())
    }

    /// The health service's answer for `service` ("" for the whole server).
    pub(crate) async fn health_status(&self, service: &str) -> Result<ServingStatus, Status> {
        let mut client = self.health.clone();
        let response = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await?
            .into_inner();
        Ok(ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown))
    }

    /// Polls the health of `service` until it reports `want`, for at most
    /// `within`; returns the last status seen and how long it took.
    pub(crate) async fn await_health(
        &self,
        service: &str,
        want: ServingStatus,
        within: Duration,
    ) -> (ServingStatus, Duration) {
        let start = Instant::now();
        loop {
            let status = self
                .health_status(service)
                .await
                .unwrap_or(ServingStatus::Unknown);
            if status == want || start.elapsed() >= within {
                return (status, start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The services listed by reflection, v1 and v1alpha.
    pub(crate) async fn reflected_services(&self) -> (Vec<String>, Vec<String>) {
        let mut v1_client = self.reflection_v1.clone();
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            )),
        };
        let mut responses = v1_client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1 answers")
            .into_inner();
        let v1_names = match responses.next().await {
            Some(Ok(v1::ServerReflectionResponse {
                message_response:
                    Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)),
                ..
            })) => list.service.into_iter().map(|s| s.name).collect(),
            other => panic!("reflection v1 ListServices answered {other:?}"),
        };

        let mut alpha_client = self.reflection_v1alpha.clone();
        let request = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
            ),
        };
        let mut responses = alpha_client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection v1alpha answers")
            .into_inner();
        let alpha_names = match responses.next().await {
            Some(Ok(v1alpha::ServerReflectionResponse {
                message_response:
                    Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(
                        list,
                    )),
                ..
            })) => list.service.into_iter().map(|s| s.name).collect(),
            other => panic!("reflection v1alpha ListServices answered {other:?}"),
        };
        (v1_names, alpha_names)
    }

    /// Stops the server and asserts that it shut down cleanly.
    pub(crate) async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(shutdown) = self.admin_shutdown.take() {
            let _ = shutdown.send(());
        }
        let tasks = [self.task.take(), self.admin_task.take()];
        for task in tasks.into_iter().flatten() {
            let result = tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the server stops within 5 s of shutdown")
                .expect("the server task does not panic");
            result.expect("the server stops without error");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for shutdown in [self.shutdown.take(), self.admin_shutdown.take()]
            .into_iter()
            .flatten()
        {
            let _ = shutdown.send(());
        }
    }
}
