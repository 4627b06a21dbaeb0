//! The Redis store: counters shared by every tollgate instance, changed only
//! by the Lua scripts under `lua/`.
//!
//! Each decision is one `EVALSHA` of one script, which reads Redis's own
//! clock (`TIME`), so instances with skewed clocks still agree. The scripts'
//! headers are their contracts; [`crate::store::memory`] implements the same
//! semantics in Rust, and one conformance suite runs on both.
//!
//! # Connections
//!
//! One Redis server (`redis://`, `rediss://`): a [`bb8`] pool holds
//! `pool_size` multiplexed connections. A request takes a handle to one and
//! hands it straight back, so concurrent requests pipeline over the same few
//! sockets instead of waiting for a free one. Nothing PINGs on checkout:
//! instead, when a request fails because its connection died, the pool's
//! generation moves on and every connection opened before that is dropped at
//! its next checkout. One dead socket usually means Redis went away (a
//! restart, a failover), and its siblings died with it, so after a restart
//! about one request fails and the next reconnects.
//!
//! A Redis Cluster (`redis-cluster://host1:port1,host2:port2,...`): one
//! [`ClusterConnection`] holds a multiplexed connection per node, sends each
//! command to the master of its key's slot, follows `MOVED` and `ASK`,
//! waits and retries on `TRYAGAIN` and `CLUSTERDOWN`, and rereads the
//! topology when it changes; `pool_size` does not apply. Every key of one
//! script shares one hash tag ([`crate::keys`]), so each script runs whole on
//! one node, atomically, as on a single server. The client retries a
//! command whose connection broke; should the break come after the script
//! ran, that one decision may be counted twice. Redirections, `TRYAGAIN` and
//! failovers never do: Redis refuses those commands before running them.
//!
//! Both kinds hide behind one [`Link`], so each store method is written
//! once, and every call is bounded by the store timeout in [`RedisStore::call`].
//!
//! Credentials come in the URL (`redis://:password@host` or
//! `redis://user:password@host`), which reaches messages and logs only
//! masked. `rediss://` verifies the server's certificate against the
//! system's roots, or against the CA in the [`RedisTls`] that
//! [`RedisStore::connect_with_tls`] is given (`store.tls_ca`), with rustls,
//! and presents a client certificate when it holds one (`store.tls_cert`,
//! `store.tls_key`).
//!
//! # Scripts
//!
//! The scripts are loaded at start-up (on every node of a cluster: start-up
//! fails, as on one server, unless every node answers). A node that lost
//! them since (a restart, `SCRIPT FLUSH`, a replica promoted by a
//! failover, a node added by resharding) answers `NOSCRIPT`; the store then
//! sends the same call as `EVAL` with the script's source, which runs it and
//! caches it on that node. `EVAL` is routed by its keys like `EVALSHA`, so it
//! reaches exactly the node that said `NOSCRIPT`, however the rest of the
//! cluster is doing.
//!
//! # Resets
//!
//! A reset (`lua/limit_reset.lua`) publishes what it cleared on the channel
//! `<prefix>admin:resets` ([`KeyBuilder::reset_channel`]), in the same
//! script. Once something listens ([`Store::on_reset`]: the deny cache), a
//! task subscribes to that channel through a connection of its own, to the
//! server or to one seed of a cluster (a cluster's PUBLISH reaches the
//! subscribers of every node), and hands every announcement to the
//! listeners. It PINGs every [`RESET_PING_EVERY`]; when the connection
//! breaks it says [`ResetNotice::Deaf`] (announcements may be lost), and
//! reconnects, trying the next seed each time, backing off up to a second,
//! and says [`ResetNotice::Listening`] once subscribed again.
//!
//! Why not the cluster connection's own SUBSCRIBE (redis-rs 0.28 and later,
//! redis-rs/redis-rs#1449): it needs RESP3 on every connection, and it
//! resubscribes after a disconnection by itself, silently, so the deny
//! cache could not know that announcements were lost meanwhile. A plain
//! RESP2 subscription on one node says when it breaks.

use std::{
    collections::BTreeMap,
    fmt,
    future::Future,
    sync::{
        Arc, LazyLock, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::metrics::histogram::Histogram;
use redis::{
    Arg, AsyncConnectionConfig, Client, Cmd, ErrorKind, FromRedisValue, Pipeline, RedisError,
    RedisFuture, RedisResult, Script, ToRedisArgs, Value,
    aio::{ConnectionLike, MultiplexedConnection, PubSub},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr},
};
use tokio::time::{Instant, timeout_at};

use super::{
    ConversationCounters, GroupDecision, LimitCheck, LimitDecision, LimitInspect, LimitSettle,
    LimitUsage, Once, ResetListener, ResetNotice, SETTLE_REWRITES, Store, StoreError,
    UsageDecision, UsageIncrement, UsageSettle,
};
use crate::stats::{BucketFigures, StatsBatch, StatsQuery, StatsReport, rank};
use crate::{
    keys::{KeyBuilder, UsageKeys, cluster_slot},
    rules::Algorithm,
};

/// A decision script as a local function of (KEYS, ARGV, redis), to be
/// composed into another script: `lua/<name>.lua` is its body.
macro_rules! lua_function {
    ($name:literal) => {
        concat!(
            "local function ",
            $name,
            "(KEYS, ARGV, redis)\n",
            include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $name, ".lua")),
            "\nend\n",
        )
    };
}

/// A script that makes decisions inside itself (`lua/check_limits.lua`,
/// `lua/decide_batch.lua`), composed at build time: the decision scripts as
/// local functions (`lua_function!`), `lua/at_once.lua`, the optional
/// prelude (for `decide_batch.lua`, `lua/check_limits.lua` as a function),
/// then `lua/<file>`; see `lua/at_once.lua`.
macro_rules! composed_script {
    ($file:literal $(, $prelude:expr)?) => {
        LuaScript::new(
            $file,
            concat!(
                lua_function!("sliding_log"),
                lua_function!("sliding_counter"),
                lua_function!("usage_increment"),
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/at_once.lua")),
                $($prelude,)?
                include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/lua/", $file)),
            ),
        )
    };
}

mod batch;
mod group;

pub use batch::MAX_BATCH_LIMIT;

/// `store.max_batch` when the config does not say: under load, batches
/// of up to 64 decisions halve Redis's work per decision (README,
/// "Performance"), and 64 sliding-log decisions keep Redis busy well
/// under a millisecond.
pub const DEFAULT_MAX_BATCH: u32 = 64;

/// A Lua script under `lua/`: its source, for `EVAL`, and its SHA1, for
/// `EVALSHA`.
struct LuaScript {
    /// The file name, for error messages.
    name: &'static str,
    source: &'static str,
    /// Computes the SHA1.
    script: Script,
    /// For a decision script, the name of its function in
    /// `decide_batch.lua`, which can run it in a batch.
    function: Option<&'static str>,
}

impl LuaScript {
    fn new(name: &'static str, source: &'static str) -> Self {
        Self {
            name,
            source,
            script: Script::new(source),
            function: None,
        }
    }

    /// A decision script, which `decide_batch.lua` knows as `function`.
    fn decision(name: &'static str, source: &'static str, function: &'static str) -> Self {
        Self {
            function: Some(function),
            ..Self::new(name, source)
        }
    }
}

/// Exact sliding window; see the contract in `lua/sliding_log.lua`.
static SLIDING_LOG: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::decision(
        "sliding_log.lua",
        include_str!("../../lua/sliding_log.lua"),
        "sliding_log",
    )
});
/// Two-counter sliding window; see `lua/sliding_counter.lua`.
static SLIDING_COUNTER: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::decision(
        "sliding_counter.lua",
        include_str!("../../lua/sliding_counter.lua"),
        "sliding_counter",
    )
});
/// Usage quota check-and-count; see `lua/usage_increment.lua`.
static USAGE_INCREMENT: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::decision(
        "usage_increment.lua",
        include_str!("../../lua/usage_increment.lua"),
        "usage_increment",
    )
});
/// Pay after use on a sliding log; see `lua/settle_log.lua`.
static SETTLE_LOG: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("settle_log.lua", include_str!("../../lua/settle_log.lua")));
/// Pay after use on a sliding counter; see `lua/settle_counter.lua`.
static SETTLE_COUNTER: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "settle_counter.lua",
        include_str!("../../lua/settle_counter.lua"),
    )
});
/// Pay after use on a usage quota; see `lua/usage_settle.lua`.
static USAGE_SETTLE: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "usage_settle.lua",
        include_str!("../../lua/usage_settle.lua"),
    )
});
/// A user's live conversations; see `lua/usage_list.lua`.
static USAGE_LIST: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("usage_list.lua", include_str!("../../lua/usage_list.lua")));

/// A counter as it stands; see `lua/limit_inspect.lua`.
static LIMIT_INSPECT: LazyLock<LuaScript> = LazyLock::new(|| {
    LuaScript::new(
        "limit_inspect.lua",
        include_str!("../../lua/limit_inspect.lua"),
    )
});
/// Clears a subject's counters and announces it; see `lua/limit_reset.lua`.
static LIMIT_RESET: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("limit_reset.lua", include_str!("../../lua/limit_reset.lua")));
/// Deletes conversations a batch at a time; see `lua/usage_reset.lua`.
static USAGE_RESET: LazyLock<LuaScript> =
    LazyLock::new(|| LuaScript::new("usage_reset.lua", include_str!("../../lua/usage_reset.lua")));

/// Conversations one `usage_reset.lua` call deletes when resetting every
/// conversation of a user: bounds each call's work in Redis.
const RESET_BATCH: usize = 100;
/// The most batches one reset of every conversation runs (100,000
/// conversations), so that a user whose conversations are being opened as
/// fast as they are deleted cannot hold the call for ever.
const RESET_MAX_BATCHES: usize = 1000;

/// How often the reset subscriber PINGs its connection, to notice one that
/// died without a word (the announcements it would miss make resets late).
pub const RESET_PING_EVERY: Duration = Duration::from_secs(1);
/// The first wait before subscribing again after a failed attempt.
const RESET_MIN_BACKOFF: Duration = Duration::from_millis(20);
/// The longest wait between attempts to subscribe again.
const RESET_MAX_BACKOFF: Duration = Duration::from_secs(1);

/// The cluster client's wait before retrying after `TRYAGAIN` or
/// `CLUSTERDOWN` grows from 10 ms, doubling, and is capped here; the store
/// timeout bounds the retries as a whole. (The redis crate's defaults, 1.28 s
/// to 655 s, suit batch jobs, not a limiter that answers within its timeout.)
const CLUSTER_MAX_RETRY_WAIT_MS: u64 = 100;
/// The shortest such wait.
const CLUSTER_MIN_RETRY_WAIT_MS: u64 = 2;

/// Hash slots in a Redis Cluster.
const CLUSTER_SLOTS: usize = 16_384;

/// How to reach Redis. `Debug` masks the password in the URL.
#[derive(Clone)]
pub struct RedisOptions {
    /// `redis://[user:password@]host:port/db` (or `rediss://` for TLS), or
    /// `redis-cluster://[user:password@]host1:port1,host2:port2,...` (or
    /// `rediss-cluster://`) for a Redis Cluster; see [`cluster_seed_urls`].
    pub url: String,
    /// Every key starts with this.
    pub key_prefix: String,
    /// Every store call is bounded by this.
    pub timeout: Duration,
    /// Connections in the pool to a single server; a cluster keeps one
    /// multiplexed connection per node instead.
    pub pool_size: u32,
    /// The most decisions sent in one script call when several wait for
    /// the same connection (`store.max_batch`, at most
    /// [`MAX_BATCH_LIMIT`]); 1: every decision is its own `EVALSHA`.
    pub max_batch: u32,
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &mask_url_password(&self.url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("pool_size", &self.pool_size)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

/// PEM material for `rediss://`: a CA to trust instead of the system's
/// roots, and a client certificate with its key for a server that asks for
/// one. `Debug` shows what is set, never the bytes.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// CA certificates the server's certificate must chain to.
    pub ca: Option<Vec<u8>>,
    /// The client certificate (chain) and its private key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    /// What the redis crate takes, or `None` for its defaults (the system's
    /// roots, no client certificate).
    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        })
    }
}

/// The schemes of a Redis Cluster URL: plain and TLS.
const CLUSTER_SCHEMES: [(&str, &str); 2] = [
    ("redis-cluster://", "redis://"),
    ("rediss-cluster://", "rediss://"),
];

/// `url` with any password replaced by `***`, for logs and errors.
pub fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find('/')
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let user = userinfo.split_once(':').map_or("", |(user, _)| user);
    format!(
        "{}{user}:***@{}",
        &url[..authority_start],
        &url[authority_start + at + 1..]
    )
}

/// Whether `url` names a Redis Cluster (`redis-cluster://` or
/// `rediss-cluster://`) rather than one server.
pub fn is_cluster_url(url: &str) -> bool {
    CLUSTER_SCHEMES
        .iter()
        .any(|(scheme, _)| url.starts_with(scheme))
}

/// The seed nodes of a cluster URL, each as a `redis://` (or `rediss://`)
/// URL with the credentials, or what is wrong with it (the URL, if quoted,
/// masked).
///
/// The form is `redis-cluster://[user:password@]host1:port1,host2:port2,...`:
/// credentials once, for every node; any number of seed nodes, from which the
/// client learns the whole cluster; the port defaults to 6379; IPv6 hosts in
/// brackets. A cluster has only database 0, so a path may be empty, `/` or
/// `/0`; query options are not taken.
pub fn cluster_seed_urls(url: &str) -> Result<Vec<String>, String> {
    let masked = mask_url_password(url);
    let Some((rest, node_scheme)) = CLUSTER_SCHEMES.iter().find_map(|(scheme, node_scheme)| {
        url.strip_prefix(scheme).map(|rest| (rest, *node_scheme))
    }) else {
        return Err(format!(
            "{masked:?} is not a Redis Cluster URL: use \"redis-cluster://host1:port1,host2:port2\""
        ));
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    if !matches!(path, "" | "/" | "/0") {
        return Err(format!(
            "{masked:?}: a Redis Cluster URL takes no database or options after the nodes \
             (a cluster has only database 0)"
        ));
    }
    let (userinfo, nodes) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if nodes.is_empty() {
        return Err(format!(
            "{masked:?} names no node: use \"redis-cluster://host1:port1,host2:port2\""
        ));
    }
    nodes
        .split(',')
        .enumerate()
        .map(|(i, node)| {
            let problem = |what: &str| format!("{masked:?}: node {} ({node:?}) {what}", i + 1);
            check_node_address(node).map_err(|what| problem(&what))?;
            let node_url = format!("{node_scheme}{userinfo}{node}");
            redis::parse_redis_url(&node_url).ok_or_else(|| problem("is not a valid address"))?;
            Ok(node_url)
        })
        .collect()
}

/// Checks one `host[:port]` of a cluster URL.
fn check_node_address(node: &str) -> Result<(), String> {
    if node.is_empty() {
        return Err("is empty: separate nodes with single commas".to_owned());
    }
    let port = if let Some(v6) = node.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err("has an unclosed '[' around its IPv6 address".to_owned());
        };
        if host.is_empty() || !host.contains(':') || host.contains(['[', ']', ' ']) {
            return Err("has no valid IPv6 address in its brackets".to_owned());
        }
        match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("has text after its IPv6 address".to_owned()),
            },
        }
    } else {
        let (host, port) = match node.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (node, None),
        };
        if host.is_empty() {
            return Err("has no host".to_owned());
        }
        if host.contains([':', '[', ']', ' ']) {
            return Err("is not host:port (put an IPv6 address in brackets)".to_owned());
        }
        port
    };
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("has no valid port: {port:?}")),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Counters in Redis.
#[derive(Clone)]
pub struct RedisStore {
    connections: Connections,
    shared: Arc<Shared>,
}

/// Where requests go: a pool for one server, or one cluster connection.
#[derive(Clone)]
enum Connections {
    /// One Redis server.
    Server(bb8::Pool<Manager>),
    /// A Redis Cluster; the connection is a handle, cloned per request.
    Cluster(ClusterConnection),
}

/// What every clone of a store shares besides the connections.
struct Shared {
    keys: KeyBuilder,
    timeout: Duration,
    /// The URL with its password masked: the only form that reaches a
    /// message or a log.
    masked_url: String,
    health: Arc<Health>,
    resets: Arc<Resets>,
    /// Batches the decisions that wait for a connection; `None` with
    /// `max_batch = 1`.
    combiner: Option<batch::Combiner>,
}

/// Who listens for reset announcements, and the task that hears them.
struct Resets {
    channel: String,
    /// Where the subscriber subscribes: the server, or each seed of a
    /// cluster in turn; with each node's URL, masked, for logs.
    nodes: Vec<(Client, String)>,
    timeout: Duration,
    /// The runtime the store was connected on, where the subscriber runs.
    runtime: tokio::runtime::Handle,
    state: Mutex<ResetState>,
}

#[derive(Default)]
struct ResetState {
    listeners: Vec<ResetListener>,
    listening: bool,
    subscriber: Option<tokio::task::AbortHandle>,
}

impl Drop for Resets {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(subscriber) = state.subscriber.take() {
            subscriber.abort();
        }
    }
}

impl Resets {
    fn lock(&self) -> std::sync::MutexGuard<'_, ResetState> {
        // Listeners and a flag: whole even if a listener panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `listener`, telling it at once whether resets are heard now,
    /// and starts the subscriber if it is the first.
    fn listen(self: &Arc<Self>, listener: ResetListener) {
        let mut state = self.lock();
        listener(if state.listening {
            &ResetNotice::Listening
        } else {
            &ResetNotice::Deaf
        });
        state.listeners.push(listener);
        if state.subscriber.is_none() {
            let task = self.runtime.spawn(subscribe_to_resets(
                Arc::downgrade(self),
                self.nodes.clone(),
                self.channel.clone(),
                self.timeout,
            ));
            state.subscriber = Some(task.abort_handle());
        }
    }

    fn tell(&self, notice: &ResetNotice) {
        let mut state = self.lock();
        match notice {
            ResetNotice::Deaf => state.listening = false,
            ResetNotice::Listening => state.listening = true,
            ResetNotice::Limit { .. } => {}
        }
        for listener in &state.listeners {
            listener(notice);
        }
    }
}

/// Tells the listeners `notice`; false once the store is gone.
fn tell(resets: &std::sync::Weak<Resets>, notice: &ResetNotice) -> bool {
    match resets.upgrade() {
        Some(resets) => {
            resets.tell(notice);
            true
        }
        None => false,
    }
}

/// The message `lua/limit_reset.lua` publishes for a reset of `rule` for
/// `subject`. Rule names hold no ':', and the subject comes last, so any
/// subject reads back whole.
fn reset_message(rule: &str, subject: &str) -> String {
    format!("limit:{rule}:{subject}")
}

fn parse_reset_message(message: &str) -> Option<ResetNotice> {
    let (rule, subject) = message.strip_prefix("limit:")?.split_once(':')?;
    Some(ResetNotice::Limit {
        rule: rule.to_owned(),
        subject: subject.to_owned(),
    })
}

/// Subscribes to the reset channel and tells the listeners what it hears,
/// for as long as the store exists; see the module's "Resets".
async fn subscribe_to_resets(
    resets: std::sync::Weak<Resets>,
    nodes: Vec<(Client, String)>,
    channel: String,
    timeout: Duration,
) {
    // A connection, a SUBSCRIBE or a PING gets at least a second: hearing
    // resets is not on any request's path.
    let wait = timeout.max(Duration::from_secs(1));
    let mut backoff = RESET_MIN_BACKOFF;
    let mut failures: u64 = 0;
    for (client, node) in nodes.iter().cycle() {
        let pubsub = match subscribe(client, &channel, wait).await {
            Ok(pubsub) => pubsub,
            Err(err) => {
                failures += 1;
                // The first failure in a row is worth a warning; the rest
                // of an outage, a second apart, only at debug.
                if failures == 1 {
                    tracing::warn!(%node, error = %err, "cannot subscribe to resets; retrying");
                } else {
                    tracing::debug!(%node, error = %err, "cannot subscribe to resets");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RESET_MAX_BACKOFF);
                continue;
            }
        };
        if failures > 0 {
            tracing::info!(%node, "subscribed to resets again");
        }
        failures = 0;
        backoff = RESET_MIN_BACKOFF;
        let Some(why) = relay(&resets, pubsub, wait).await else {
            return;
        };
        tracing::warn!(%node, reason = %why, "reset subscription lost; resubscribing");
        if !tell(&resets, &ResetNotice::Deaf) {
            return;
        }
    }
}

/// A connection of its own to `client`'s node, subscribed to `channel`.
async fn subscribe(client: &Client, channel: &str, wait: Duration) -> Result<PubSub, String> {
    let subscribed = tokio::time::timeout(wait, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, RedisError>(pubsub)
    })
    .await;
    match subscribed {
        Ok(Ok(pubsub)) => Ok(pubsub),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err(format!("no answer within {wait:?}")),
    }
}

/// Tells the listeners they hear resets, then each reset `pubsub` brings,
/// PINGing it every [`RESET_PING_EVERY`], until it breaks: why it broke,
/// or `None` once the store is gone.
async fn relay(resets: &std::sync::Weak<Resets>, pubsub: PubSub, wait: Duration) -> Option<String> {
    use tokio_stream::StreamExt as _;
    if !tell(resets, &ResetNotice::Listening) {
        return None;
    }
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(RESET_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Some("the connection closed".to_owned());
                };
                let payload = message.get_payload_bytes();
                let notice = std::str::from_utf8(payload).ok().and_then(parse_reset_message);
                match notice {
                    Some(notice) => {
                        if !tell(resets, &notice) {
                            return None;
                        }
                    }
                    None => tracing::debug!(?payload, "ignoring an unknown reset message"),
                }
            }
            _ = ping.tick() => {
                match tokio::time::timeout(wait, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => return Some(format!("PING failed: {err}")),
                    Err(_) => return Some(format!("no answer to PING within {wait:?}")),
                }
            }
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("RedisStore");
        debug
            .field("url", &self.shared.masked_url)
            .field("key_prefix", &self.shared.keys.prefix())
            .field("timeout", &self.shared.timeout);
        match &self.connections {
            Connections::Server(pool) => {
                let state = pool.state();
                debug
                    .field("connections", &state.connections)
                    .field("idle_connections", &state.idle_connections);
            }
            Connections::Cluster(_) => {
                debug.field("connections", &"one per cluster node");
            }
        }
        debug.finish()
    }
}

impl RedisStore {
    /// Connects to Redis (to a cluster, when `options.url` is a cluster URL)
    /// and loads the scripts, so that the first request does not pay for
    /// them. Fails with [`StoreError::Unavailable`] when Redis cannot be
    /// reached within `options.timeout`.
    pub async fn connect(options: &RedisOptions) -> Result<Self, StoreError> {
        Self::connect_with_tls(options, &RedisTls::default()).await
    }

    /// [`connect`](Self::connect), trusting the PEM CA certificates `ca_pem`
    /// instead of the system's roots for a `rediss://` (or
    /// `rediss-cluster://`) server: `store.tls_ca`.
    pub async fn connect_with_ca(
        options: &RedisOptions,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, StoreError> {
        let tls = RedisTls {
            ca: ca_pem.map(<[u8]>::to_vec),
            client: None,
        };
        Self::connect_with_tls(options, &tls).await
    }

    /// [`connect`](Self::connect) over TLS as `tls` says: the CA to trust
    /// and the client certificate to present (`store.tls_ca`,
    /// `store.tls_cert`, `store.tls_key`).
    pub async fn connect_with_tls(
        options: &RedisOptions,
        tls: &RedisTls,
    ) -> Result<Self, StoreError> {
        let certificates = tls.certificates();
        let masked_url = mask_url_password(&options.url);
        let invalid = |err: &dyn fmt::Display| {
            StoreError::Unavailable(format!("invalid Redis URL {masked_url}: {err}"))
        };
        let health = Arc::new(Health::default());
        let keys = KeyBuilder::new(options.key_prefix.as_str());
        // Where the reset subscriber subscribes: made now, connected only
        // once something listens.
        let node_urls = if is_cluster_url(&options.url) {
            cluster_seed_urls(&options.url).map_err(|err| invalid(&err))?
        } else {
            vec![options.url.clone()]
        };
        let mut nodes = Vec::with_capacity(node_urls.len());
        for url in node_urls {
            let client = match tls.certificates() {
                None => Client::open(url.as_str()),
                Some(certificates) => Client::build_with_tls(url.as_str(), certificates),
            }
            .map_err(|err| invalid(&err))?;
            nodes.push((client, mask_url_password(&url)));
        }
        let resets = Arc::new(Resets {
            channel: keys.reset_channel(),
            nodes,
            timeout: options.timeout,
            runtime: tokio::runtime::Handle::current(),
            state: Mutex::default(),
        });
        let shared = Arc::new(Shared {
            keys,
            timeout: options.timeout,
            masked_url: masked_url.clone(),
            health: Arc::clone(&health),
            resets,
            combiner: (options.max_batch > 1).then(|| {
                let lanes = if is_cluster_url(&options.url) {
                    CLUSTER_SLOTS
                } else {
                    1
                };
                batch::Combiner::new(options.max_batch, lanes)
            }),
        });
        let unreachable = |err: StoreError| match err {
            StoreError::Timeout(timeout) => StoreError::Unavailable(format!(
                "Redis at {masked_url} did not answer within {timeout:?}"
            )),
            other => other,
        };

        if is_cluster_url(&options.url) {
            let seeds = cluster_seed_urls(&options.url).map_err(|err| invalid(&err))?;
            let mut builder = ClusterClient::builder(seeds);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder
                .connection_timeout(options.timeout)
                .response_timeout(options.timeout)
                .min_retry_wait(CLUSTER_MIN_RETRY_WAIT_MS)
                .max_retry_wait(CLUSTER_MAX_RETRY_WAIT_MS)
                .build()
                .map_err(|err| invalid(&err))?;
            let deadline = Instant::now() + options.timeout;
            let connection = match timeout_at(deadline, client.get_async_connection()).await {
                Ok(Ok(connection)) => connection,
                Ok(Err(err)) => {
                    return Err(StoreError::Unavailable(format!(
                        "cannot connect to Redis Cluster at {masked_url}: {err}"
                    )));
                }
                Err(_) => return Err(unreachable(StoreError::Timeout(options.timeout))),
            };
            let store = Self {
                connections: Connections::Cluster(connection),
                shared,
            };
            // The client has read the slot map from a seed; loading the
            // scripts on every node is also the check that each node
            // answers, as on one server. Without it a cluster whose nodes
            // cannot be reached at the addresses they announce (a TLS
            // certificate that names only the seed's host name, say) would
            // start and then time out on every call.
            store.load_scripts().await.map_err(|err| {
                let hint = if options.url.starts_with("rediss-cluster://") {
                    "; over TLS, every node's certificate must be valid for the \
                     address the node announces (CLUSTER SHARDS), usually its IP"
                } else {
                    ""
                };
                StoreError::Unavailable(format!(
                    "Redis Cluster at {masked_url}: not every node answered: {err}{hint}"
                ))
            })?;
            return Ok(store);
        }

        let client = match certificates {
            None => Client::open(options.url.as_str()),
            Some(certificates) => Client::build_with_tls(options.url.as_str(), certificates),
        }
        .map_err(|err| invalid(&err))?;
        let manager = Manager {
            client,
            // The connection timeout bounds a connect attempt (with its
            // AUTH and HELLO) made in the pool's background, where no
            // request's deadline applies. Every request is bounded by its own
            // deadline in `call` and `run_script`, so the connection's
            // per-request timer would only be a second timer per decision.
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(options.timeout))
                .set_response_timeout(None),
            health,
        };
        // bb8 panics on a pool of size 0; one connection is the least that works.
        let pool_size = options.pool_size.max(1);
        let pool = bb8::Pool::builder()
            .max_size(pool_size)
            // Keep every connection open: handles are handed back at once,
            // so the pool would otherwise rarely grow past one.
            .min_idle(Some(pool_size))
            // Checkout tests only the generation (no round trip); see
            // `Manager::is_valid`.
            .test_on_check_out(true)
            .connection_timeout(options.timeout)
            .build_unchecked(manager);
        let store = Self {
            connections: Connections::Server(pool),
            shared,
        };
        // On one server this is also the check that Redis answers.
        store.load_scripts().await.map_err(unreachable)?;
        Ok(store)
    }

    /// Sends every script with `SCRIPT LOAD`: to the server, or to every
    /// node of a cluster (masters and replicas, so that a failover finds
    /// them already loaded).
    async fn load_scripts(&self) -> Result<(), StoreError> {
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let scripts = [
            &*SLIDING_LOG,
            &*SLIDING_COUNTER,
            &*USAGE_INCREMENT,
            &*USAGE_LIST,
            &*SETTLE_LOG,
            &*SETTLE_COUNTER,
            &*USAGE_SETTLE,
            &*LIMIT_INSPECT,
            &*LIMIT_RESET,
            &*USAGE_RESET,
        ];
        for script in scripts
            .into_iter()
            .chain(group::scripts())
            .chain(batch::scripts())
        {
            let hash: String = self
                .call(
                    deadline,
                    conn.generation,
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(script.source)
                        .query_async(&mut conn.redis),
                )
                .await?;
            if hash != script.script.get_hash() {
                return Err(StoreError::Protocol(format!(
                    "SCRIPT LOAD of {} returned {hash}, expected {}",
                    script.name,
                    script.script.get_hash()
                )));
            }
        }
        Ok(())
    }

    /// Counts the decisions of every script call that batching sends into
    /// `sizes` (`tollgate_store_batch_size`): 1 for a decision sent alone,
    /// as every decision is while its lane has room for another call in
    /// flight. Nothing is counted with `max_batch = 1`.
    pub fn observe_batches(&self, sizes: Histogram) {
        if let Some(combiner) = &self.shared.combiner {
            combiner.observe(sizes);
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.shared.timeout
    }

    /// A handle to a connection. A pooled connection goes back to the pool
    /// at once: a multiplexed connection serves many requests at a time.
    async fn checkout(&self, deadline: Instant) -> Result<Checkout, StoreError> {
        let pool = match &self.connections {
            Connections::Cluster(cluster) => {
                return Ok(Checkout {
                    redis: Link::Cluster(cluster.clone()),
                    generation: None,
                });
            }
            Connections::Server(pool) => pool,
        };
        let pooled = match timeout_at(deadline, pool.get()).await {
            Ok(Ok(pooled)) => pooled,
            Ok(Err(bb8::RunError::User(err))) => return Err(self.classify(&err)),
            Ok(Err(bb8::RunError::TimedOut)) | Err(_) => return Err(self.no_connection()),
        };
        Ok(Checkout {
            redis: Link::Server(pooled.redis.clone()),
            generation: Some(pooled.generation),
        })
    }

    /// Runs one request until `deadline`, retiring the pooled connection's
    /// `generation` if the request shows the connection is dead.
    async fn call<T>(
        &self,
        deadline: Instant,
        generation: Option<u64>,
        request: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.settle(generation, timeout_at(deadline, request).await)
    }

    /// A request's outcome as the store reports it.
    fn settle<T>(
        &self,
        generation: Option<u64>,
        outcome: Result<RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, StoreError> {
        match outcome {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(err)) => {
                if let Some(generation) = generation
                    && breaks_connection(&err)
                {
                    self.shared.health.retire(generation);
                }
                Err(self.classify(&err))
            }
            // A timeout alone does not retire the connection: against a slow
            // Redis, reconnecting every socket would only add load.
            Err(_) => Err(StoreError::Timeout(self.shared.timeout)),
        }
    }

    /// Runs `invocation` with `EVALSHA`, and once more with `EVAL` if the
    /// node that holds its keys answers `NOSCRIPT`; both within one store
    /// timeout.
    async fn run_script(&self, invocation: &Invocation) -> Result<Value, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let first = timeout_at(
            deadline,
            invocation.evalsha().query_async::<Value>(&mut conn.redis),
        )
        .await;
        if !matches!(&first, Ok(Err(err)) if err.code() == Some("NOSCRIPT")) {
            return self.settle(conn.generation, first);
        }
        self.call(
            deadline,
            conn.generation,
            invocation.eval().query_async::<Value>(&mut conn.redis),
        )
        .await
    }

    /// The error when no connection came out of the pool in time: the
    /// reason the last connect attempt failed, if it did.
    fn no_connection(&self) -> StoreError {
        match self.shared.health.last_connect_error() {
            Some(reason) => StoreError::Unavailable(format!(
                "cannot connect to Redis at {}: {reason}",
                self.shared.masked_url
            )),
            None => StoreError::Timeout(self.shared.timeout),
        }
    }

    /// Every Redis error becomes a [`StoreError`] here, and only here.
    fn classify(&self, err: &RedisError) -> StoreError {
        if err.is_timeout() {
            return StoreError::Timeout(self.shared.timeout);
        }
        let transient = err.is_io_error()
            || err.is_connection_dropped()
            || matches!(
                err.kind(),
                ErrorKind::AuthenticationFailed
                    | ErrorKind::InvalidClientConfig
                    | ErrorKind::ClusterConnectionNotFound
            )
            || err
                .code()
                .is_some_and(|code| TRANSIENT_CODES.contains(&code));
        if transient {
            // The error's text comes from the socket or the server and holds
            // no part of the URL (a redirection names a node's address, never
            // a password); the URL is added masked.
            StoreError::Unavailable(format!("Redis at {}: {err}", self.shared.masked_url))
        } else {
            // CROSSSLOT lands here too: it would mean keys.rs broke its
            // one-hash-tag-per-script promise.
            StoreError::Protocol(format!("Redis replied with an error: {err}"))
        }
    }
}

/// A request's handle to a connection.
struct Checkout {
    redis: Link,
    /// For a pooled connection, the pool generation it was opened in.
    generation: Option<u64>,
}

/// One server's multiplexed connection or a cluster's connection: either
/// carries any command or pipeline, so each store method is written once.
enum Link {
    Server(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// One call of a script, packed once as `EVALSHA sha numkeys keys...
/// args...` straight into the command's own buffer (no per-key or per-arg
/// allocation: this is built for every decision); the `EVAL` twin is made
/// from it only after a `NOSCRIPT`. A cluster routes either by its first key.
struct Invocation {
    script: &'static LuaScript,
    evalsha: Cmd,
    numkeys: usize,
    /// Keys still to come before the arguments.
    keys_left: usize,
    /// Decisions it makes: 1, or a group's checks. A batch carries at most
    /// `store.max_batch` of them.
    decisions: usize,
}

/// `EVALSHA`, the hash and numkeys: what comes before a call's keys.
const EVALSHA_HEAD: usize = 3;

impl Invocation {
    fn new(script: &'static LuaScript, numkeys: usize) -> Self {
        // Room for the sliding-window scripts' 2 keys and 5 arguments, so
        // that building one never reallocates.
        Self::with_capacity(script, numkeys, 5, 192)
    }

    /// An invocation with room for `args` arguments and `bytes` bytes in
    /// all.
    fn with_capacity(
        script: &'static LuaScript,
        numkeys: usize,
        args: usize,
        bytes: usize,
    ) -> Self {
        let mut evalsha = Cmd::with_capacity(EVALSHA_HEAD + numkeys + args, bytes);
        evalsha
            .arg("EVALSHA")
            .arg(script.script.get_hash())
            .arg(numkeys);
        Self {
            script,
            evalsha,
            numkeys,
            keys_left: numkeys,
            decisions: 1,
        }
    }

    /// The same call, counted as `decisions` decisions (a group's checks).
    fn deciding(mut self, decisions: usize) -> Self {
        self.decisions = decisions.max(1);
        self
    }

    fn decisions(&self) -> usize {
        self.decisions
    }

    fn numkeys(&self) -> usize {
        self.numkeys
    }

    /// The keys, as packed.
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.evalsha
            .args_iter()
            .skip(EVALSHA_HEAD)
            .take(self.numkeys)
            .map(batch::arg_bytes)
    }

    /// The first key, by which a cluster routes the call.
    fn first_key(&self) -> Option<&[u8]> {
        self.keys().next()
    }

    /// The arguments after the keys, as packed.
    fn args(&self) -> impl Iterator<Item = &[u8]> {
        self.evalsha
            .args_iter()
            .skip(EVALSHA_HEAD + self.numkeys)
            .map(batch::arg_bytes)
    }

    /// The bytes of the keys and arguments.
    fn packed_len(&self) -> usize {
        self.keys().chain(self.args()).map(<[u8]>::len).sum()
    }

    fn key(mut self, key: impl ToRedisArgs) -> Self {
        debug_assert!(
            self.keys_left > 0,
            "{}: more keys than numkeys",
            self.script.name
        );
        self.keys_left = self.keys_left.saturating_sub(1);
        self.evalsha.arg(key);
        self
    }

    fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        debug_assert_eq!(
            self.keys_left, 0,
            "{}: an argument before a key",
            self.script.name
        );
        self.evalsha.arg(arg);
        self
    }

    /// `EVALSHA sha numkeys keys... args...`.
    fn evalsha(&self) -> &Cmd {
        &self.evalsha
    }

    /// `EVAL source numkeys keys... args...`: the same call with the
    /// script's source, for a node that has not cached it.
    fn eval(&self) -> Cmd {
        let mut eval = redis::cmd("EVAL");
        eval.arg(self.script.source);
        // Skip "EVALSHA" and the hash; numkeys, keys and arguments follow.
        for arg in self.evalsha.args_iter().skip(2) {
            if let Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        eval
    }
}

/// Server errors that mean "not now" rather than "not understood". The
/// cluster client follows MOVED and ASK and retries TRYAGAIN and CLUSTERDOWN
/// by itself; one of them reaches the store only when the slot kept moving
/// (or the cluster stayed down) through its retries.
const TRANSIENT_CODES: [&str; 11] = [
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "READONLY",
    "OOM",
    "NOAUTH",
    "WRONGPASS",
];

/// Each master's slot ranges: (first, last, "host:port").
async fn cluster_masters(cluster: &mut ClusterConnection) -> RedisResult<Vec<(u16, u16, String)>> {
    let reply: Vec<Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(cluster)
        .await?;
    let mut masters = Vec::with_capacity(reply.len());
    for range in reply {
        let Value::Array(parts) = range else { continue };
        let (Some(first), Some(last), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            continue;
        };
        let first: u16 = FromRedisValue::from_redis_value_ref(first)?;
        let last: u16 = FromRedisValue::from_redis_value_ref(last)?;
        let (Some(host), Some(port)) = (master.first(), master.get(1)) else {
            continue;
        };
        let host: String = FromRedisValue::from_redis_value_ref(host)?;
        let port: u16 = FromRedisValue::from_redis_value_ref(port)?;
        masters.push((first, last, format!("{host}:{port}")));
    }
    Ok(masters)
}

/// Whether `err` shows the connection itself is unusable (as opposed to a
/// request the server rejected).
fn breaks_connection(err: &RedisError) -> bool {
    !err.is_timeout() && (err.is_io_error() || err.is_unrecoverable_error())
}

/// A decision script's reply (`lua/sliding_log.lua`,
/// `lua/sliding_counter.lua`), with `replayed` when it kept a record.
fn decode_limit(
    what: &str,
    reply: Value,
    recorded: bool,
) -> Result<Once<LimitDecision>, StoreError> {
    let (allowed, remaining, retry_after_us, reset_after_us, blocked, replayed) = if recorded {
        decode::<(u64, u64, u64, u64, u64, u64)>(what, reply)?
    } else {
        let (a, r, retry, reset, b): (u64, u64, u64, u64, u64) = decode(what, reply)?;
        (a, r, retry, reset, b, 0)
    };
    Ok(Once {
        decision: LimitDecision {
            allowed: flag(what, allowed)?,
            remaining,
            retry_after: Duration::from_micros(retry_after_us),
            reset_after: Duration::from_micros(reset_after_us),
            blocked: flag(what, blocked)?,
        },
        replayed: flag(what, replayed)?,
    })
}

/// Decodes a reply into `T`, or says which reply did not fit.
fn decode<T: FromRedisValue>(what: &str, reply: Value) -> Result<T, StoreError> {
    redis::from_redis_value(reply)
        .map_err(|err| StoreError::Protocol(format!("malformed reply to {what}: {err}")))
}

/// A 0/1 flag from a script.
fn flag(what: &str, value: u64) -> Result<bool, StoreError> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(StoreError::Protocol(format!(
            "malformed reply to {what}: flag {other} is neither 0 nor 1"
        ))),
    }
}

/// A PTTL reply as time left: -1 (no TTL) and -2 (no key) mean none.
fn ttl(pttl_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(pttl_ms).unwrap_or(0))
}

/// Microseconds for a script argument, saturating (no real window is
/// anywhere near `u64::MAX` microseconds).
fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl Store for RedisStore {
    fn on_reset(&self, listener: ResetListener) {
        self.shared.resets.listen(listener);
    }

    async fn check_limit(&self, check: &LimitCheck<'_>) -> Result<LimitDecision, StoreError> {
        Ok(self.decide_limit(check, None).await?.decision)
    }

    async fn check_limit_once(
        &self,
        check: &LimitCheck<'_>,
        request_id: &str,
    ) -> Result<Once<LimitDecision>, StoreError> {
        self.decide_limit(check, Some(request_id)).await
    }

    async fn settle_limit(&self, settle: &LimitSettle<'_>) -> Result<Option<u64>, StoreError> {
        let keys = self
            .shared
            .keys
            .limit(settle.rule, settle.algorithm, settle.subject);
        let record = keys.request(settle.request_id);
        let invocation = match settle.algorithm {
            Algorithm::SlidingLog => Invocation::new(&SETTLE_LOG, 2)
                .key(keys.counter)
                .key(record)
                .arg(micros(settle.window))
                .arg(settle.actual)
                .arg(SETTLE_REWRITES),
            Algorithm::SlidingCounter => Invocation::new(&SETTLE_COUNTER, 2)
                .key(keys.counter)
                .key(record)
                .arg(micros(settle.window))
                .arg(settle.actual),
        };
        let what = invocation.script.name;
        let reply = self.run_script(&invocation).await?;
        let (found, remaining): (u64, u64) = decode(what, reply)?;
        Ok(flag(what, found)?.then_some(remaining))
    }

    async fn increment_usage_once(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: &str,
    ) -> Result<Once<UsageDecision>, StoreError> {
        self.increment(increment, Some(request_id)).await
    }

    async fn settle_usage(&self, settle: &UsageSettle<'_>) -> Result<Option<u64>, StoreError> {
        let keys = self.shared.keys.usage(settle.user_id);
        let invocation = Invocation::new(&USAGE_SETTLE, 2)
            .key(keys.conversation(settle.character_id))
            .key(keys.request(settle.character_id, settle.kind, settle.request_id))
            .arg(settle.kind)
            .arg(settle.actual);
        let what = USAGE_SETTLE.name;
        let reply = self.run_script(&invocation).await?;
        let (found, used): (u64, u64) = decode(what, reply)?;
        Ok(flag(what, found)?.then_some(used))
    }

    async fn check_limits(
        &self,
        checks: &[LimitCheck<'_>],
        request_id: Option<&str>,
    ) -> Result<GroupDecision, StoreError> {
        self.decide_group(checks, request_id).await
    }

    async fn increment_usage(
        &self,
        increment: &UsageIncrement<'_>,
    ) -> Result<UsageDecision, StoreError> {
        Ok(self.increment(increment, None).await?.decision)
    }

    async fn get_usage(
        &self,
        user_id: &str,
        character_id: &str,
    ) -> Result<ConversationCounters, StoreError> {
        let key = self.shared.keys.usage(user_id).conversation(character_id);
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let mut counters = self.read_conversations(deadline, &mut conn, &[key]).await?;
        Ok(counters.pop().flatten().unwrap_or_default())
    }

    async fn list_usage(
        &self,
        user_id: &str,
        max: usize,
    ) -> Result<Vec<(String, ConversationCounters)>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let keys = self.shared.keys.usage(user_id);
        // One deadline for the scripts and the reads after them.
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let mut listed = Vec::with_capacity(max.min(64));
        let mut offset = 0;
        while listed.len() < max {
            let wanted = max - listed.len();
            let invocation = Invocation::new(&USAGE_LIST, 2)
                .key(&keys.index)
                .key(&keys.by_id)
                .arg(wanted)
                .arg(offset);
            // The next ids in byte order (Redis orders members of equal
            // score bytewise): the same order in every store and locale.
            let ids: Vec<String> = decode(USAGE_LIST.name, self.run_script(&invocation).await?)?;
            let last_batch = ids.len() < wanted;
            offset += ids.len();
            if !ids.is_empty() {
                let batch_keys: Vec<String> = ids.iter().map(|id| keys.conversation(id)).collect();
                let counters = self
                    .read_conversations(deadline, &mut conn, &batch_keys)
                    .await?;
                // A conversation whose counters are gone (expired between
                // the two round trips, or deleted) is skipped, and the next
                // batch takes its place.
                listed.extend(
                    ids.into_iter()
                        .zip(counters)
                        .filter_map(|(id, counters)| Some((id, counters?))),
                );
            }
            if last_batch {
                break;
            }
        }
        Ok(listed)
    }

    /// One pipeline (per master, on a cluster) of HINCRBY for the counts,
    /// PFADD for the users, ZINCRBY for the characters' totals, and EXPIRE
    /// at the end of each bucket's retention.
    async fn flush_stats(&self, batch: &StatsBatch) -> Result<(), StoreError> {
        let mut commands = Vec::new();
        for update in batch.updates() {
            let keys =
                self.shared
                    .keys
                    .stats(update.granularity, update.start, update.character_id);
            // At least a second: a bucket about to expire is still written.
            let ttl = (update.expires_at - batch.now).max(1);
            let mut counted = false;
            for (kind, (messages, denials)) in &update.kinds {
                for (field, by) in [("m:", messages), ("d:", denials)] {
                    if *by > 0 {
                        let mut cmd = redis::cmd("HINCRBY");
                        cmd.arg(&keys.counts).arg(format!("{field}{kind}")).arg(*by);
                        commands.push((keys.counts.clone(), cmd));
                        counted = true;
                    }
                }
            }
            if counted {
                let mut cmd = redis::cmd("EXPIRE");
                cmd.arg(&keys.counts).arg(ttl);
                commands.push((keys.counts.clone(), cmd));
            }
            if !update.users.is_empty() {
                let mut cmd = redis::cmd("PFADD");
                cmd.arg(&keys.users);
                for user in &update.users {
                    cmd.arg(*user);
                }
                commands.push((keys.users.clone(), cmd));
                let mut cmd = redis::cmd("EXPIRE");
                cmd.arg(&keys.users).arg(ttl);
                commands.push((keys.users.clone(), cmd));
            }
            // A character's total goes to the global bucket's ranking.
            if let Some(id) = update.character_id
                && update.messages() > 0
            {
                let top = self
                    .shared
                    .keys
                    .stats(update.granularity, update.start, None);
                if let Some(top) = top.top {
                    let mut cmd = redis::cmd("ZINCRBY");
                    cmd.arg(&top).arg(update.messages()).arg(id);
                    commands.push((top.clone(), cmd));
                    let mut cmd = redis::cmd("EXPIRE");
                    cmd.arg(&top).arg(ttl);
                    commands.push((top, cmd));
                }
            }
        }
        if commands.is_empty() {
            return Ok(());
        }
        self.pipeline_per_node(&commands).await.map(|_| ())
    }

    /// HGETALL + PFCOUNT per bucket and ZREVRANGE of the current bucket's
    /// ranking, in one pipeline per master; a second round trip only when
    /// characters tie at the last place of the ranking.
    async fn read_stats(&self, query: &StatsQuery<'_>) -> Result<StatsReport, StoreError> {
        let mut commands = Vec::with_capacity(query.starts.len() * 2 + 1);
        for &start in &query.starts {
            let keys = self
                .shared
                .keys
                .stats(query.granularity, start, query.character_id);
            let mut cmd = redis::cmd("HGETALL");
            cmd.arg(&keys.counts);
            commands.push((keys.counts.clone(), cmd));
            let mut cmd = redis::cmd("PFCOUNT");
            cmd.arg(&keys.users);
            commands.push((keys.users, cmd));
        }
        let top_key = match (query.top, query.starts.last()) {
            (0, _) | (_, None) => None,
            (_, Some(&current)) => self.shared.keys.stats(query.granularity, current, None).top,
        };
        if let Some(top_key) = &top_key {
            let mut cmd = redis::cmd("ZREVRANGE");
            cmd.arg(top_key)
                .arg(0)
                .arg(query.top.saturating_sub(1))
                .arg("WITHSCORES");
            commands.push((top_key.clone(), cmd));
        }
        let mut replies = self.pipeline_per_node(&commands).await?.into_iter();
        let mut buckets = Vec::with_capacity(query.starts.len());
        for &start in &query.starts {
            let (Some(counts), Some(users)) = (replies.next(), replies.next()) else {
                return Err(StoreError::Protocol(
                    "statistics: fewer replies than commands".to_owned(),
                ));
            };
            let counts: BTreeMap<String, u64> = decode("HGETALL", counts)?;
            let mut figures = BucketFigures {
                start,
                active_users: decode("PFCOUNT", users)?,
                ..BucketFigures::default()
            };
            for (field, count) in counts {
                if let Some(kind) = field.strip_prefix("m:") {
                    figures.messages.insert(kind.to_owned(), count);
                } else if let Some(kind) = field.strip_prefix("d:") {
                    figures.denials.insert(kind.to_owned(), count);
                }
            }
            buckets.push(figures);
        }
        let mut top = Vec::new();
        if let (Some(top_key), Some(ranked)) = (top_key, replies.next()) {
            let ranked: Vec<(String, f64)> = decode("ZREVRANGE", ranked)?;
            let last = ranked.last().map(|(_, score)| *score);
            let full = ranked.len() >= query.top;
            top = ranked;
            // Characters tied with the last one may sort before it by id.
            if let (true, Some(last)) = (full, last) {
                let mut cmd = redis::cmd("ZRANGEBYSCORE");
                cmd.arg(&top_key).arg(last).arg(last).arg("WITHSCORES");
                let tied = self.pipeline_per_node(&[(top_key, cmd)]).await?;
                if let Some(tied) = tied.into_iter().next() {
                    let tied: Vec<(String, f64)> = decode("ZRANGEBYSCORE", tied)?;
                    top.retain(|(_, score)| *score != last);
                    top.extend(tied);
                }
            }
        }
        let top = top
            .into_iter()
            .map(|(id, score)| (id, score.max(0.0) as u64))
            .collect();
        Ok(StatsReport {
            buckets,
            top: rank(top, query.top),
        })
    }

    async fn inspect_limit(&self, inspect: &LimitInspect<'_>) -> Result<LimitUsage, StoreError> {
        let what = LIMIT_INSPECT.name;
        let keys = self
            .shared
            .keys
            .limit(inspect.rule, inspect.algorithm, inspect.subject);
        // The block key only with a lock-out, as the checking scripts read it.
        let invocation = if inspect.block_for.is_some() {
            Invocation::new(&LIMIT_INSPECT, 2)
                .key(keys.counter)
                .key(keys.block)
        } else {
            Invocation::new(&LIMIT_INSPECT, 1).key(keys.counter)
        }
        .arg(inspect.algorithm.as_str())
        .arg(micros(inspect.window));
        let reply = self.run_script(&invocation).await?;
        let (used, reset_after_us, blocked, block_remaining_us): (u64, u64, u64, u64) =
            decode(what, reply)?;
        Ok(LimitUsage {
            used,
            reset_after: Duration::from_micros(reset_after_us),
            blocked_for: flag(what, blocked)?.then(|| Duration::from_micros(block_remaining_us)),
        })
    }

    async fn reset_limit(&self, rule: &str, subject: &str) -> Result<bool, StoreError> {
        let [log, counter, block] = self.shared.keys.limit_all(rule, subject);
        let invocation = Invocation::new(&LIMIT_RESET, 3)
            .key(log)
            .key(counter)
            .key(block)
            .arg(self.shared.resets.channel.as_str())
            .arg(reset_message(rule, subject));
        let existed: u64 = decode(LIMIT_RESET.name, self.run_script(&invocation).await?)?;
        Ok(existed > 0)
    }

    async fn reset_usage(
        &self,
        user_id: &str,
        character_id: Option<&str>,
    ) -> Result<u32, StoreError> {
        let keys = self.shared.keys.usage(user_id);
        if let Some(character_id) = character_id {
            let (deleted, _) = self
                .reset_conversations(&keys, &[character_id.to_owned()], 0)
                .await?;
            return Ok(deleted);
        }
        let mut total: u32 = 0;
        let mut batch = Vec::new();
        for _ in 0..RESET_MAX_BATCHES {
            let (deleted, next) = self.reset_conversations(&keys, &batch, RESET_BATCH).await?;
            total = total.saturating_add(deleted);
            if next.is_empty() {
                return Ok(total);
            }
            batch = next;
        }
        tracing::warn!(
            user_id,
            reset = total,
            "conversations kept appearing while resetting; stopped after {RESET_MAX_BATCHES} batches"
        );
        Ok(total)
    }

    /// On a cluster, PING goes to every master and succeeds only if all
    /// answer: a master down means some subjects get no answer.
    async fn ping(&self) -> Result<(), StoreError> {
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let reply = self
            .call(
                deadline,
                conn.generation,
                redis::cmd("PING").query_async::<Value>(&mut conn.redis),
            )
            .await?;
        match reply {
            Value::SimpleString(pong) if pong == "PONG" => Ok(()),
            other => Err(StoreError::Protocol(format!(
                "PING answered {other:?}, not PONG"
            ))),
        }
    }
}

impl RedisStore {
    /// One rate-limit decision, remembered under `request_id` when given.
    async fn decide_limit(
        &self,
        check: &LimitCheck<'_>,
        request_id: Option<&str>,
    ) -> Result<Once<LimitDecision>, StoreError> {
        let (invocation, recorded) = self.limit_invocation(check, request_id);
        let what = invocation.script.name;
        decode_limit(what, self.run_decision(invocation).await?, recorded)
    }

    /// Decides `checks` in order, each remembered under its request_id when
    /// it has one, exactly as the same calls of [`Store::check_limit_once`]
    /// one after another would (see `lua/decide_batch.lua`), but in one
    /// script call: on a cluster, one per run of consecutive checks in one
    /// slot, at most `store.max_batch` per call. Batching does this for
    /// the decisions that queue for a connection; this sends exactly the
    /// batch given, which tests use to compare batched with sequential
    /// answers.
    pub async fn check_limit_batch(
        &self,
        checks: &[(LimitCheck<'_>, Option<&str>)],
    ) -> Vec<Result<Once<LimitDecision>, StoreError>> {
        let max_batch = self.shared.combiner.as_ref().map_or(1, |c| c.max_batch());
        let mut answers = Vec::with_capacity(checks.len());
        let mut run: Vec<(Invocation, bool)> = Vec::new();
        let mut run_slot = None;
        for (check, request_id) in checks {
            let (invocation, recorded) = self.limit_invocation(check, *request_id);
            let slot = self.lane_of(&invocation);
            if run_slot != Some(slot) || run.len() >= max_batch {
                self.decide_run(&mut run, &mut answers).await;
                run_slot = Some(slot);
            }
            run.push((invocation, recorded));
        }
        self.decide_run(&mut run, &mut answers).await;
        answers
    }

    /// Sends `run` (decisions of one slot) as one batch and appends the
    /// decoded answers.
    async fn decide_run(
        &self,
        run: &mut Vec<(Invocation, bool)>,
        answers: &mut Vec<Result<Once<LimitDecision>, StoreError>>,
    ) {
        if run.is_empty() {
            return;
        }
        let (invocations, recorded): (Vec<_>, Vec<_>) = run.drain(..).unzip();
        let replies = self.decide_together(&invocations).await;
        for ((invocation, recorded), reply) in invocations.iter().zip(recorded).zip(replies) {
            answers.push(
                reply.and_then(|reply| decode_limit(invocation.script.name, reply, recorded)),
            );
        }
    }

    /// The script call that decides `check`, and whether it keeps a record
    /// under `request_id` (which changes its reply's shape).
    fn limit_invocation(
        &self,
        check: &LimitCheck<'_>,
        request_id: Option<&str>,
    ) -> (Invocation, bool) {
        let script = match check.algorithm {
            Algorithm::SlidingLog => &*SLIDING_LOG,
            Algorithm::SlidingCounter => &*SLIDING_COUNTER,
        };
        let keys = self
            .shared
            .keys
            .limit(check.rule, check.algorithm, check.subject);
        let block_us = check.block_for.map_or(0, micros);
        // A dry run keeps no record (see the scripts' headers).
        let record = request_id
            .filter(|_| !check.dry_run)
            .map(|id| keys.request(id));
        let numkeys = 1 + usize::from(block_us > 0) + usize::from(record.is_some());
        // The block key goes only with a lock-out (see the scripts' headers):
        // a one-key script keeps deciding while its slot migrates.
        let mut invocation = Invocation::new(script, numkeys).key(keys.counter);
        if block_us > 0 {
            invocation = invocation.key(keys.block);
        }
        if let Some(record) = &record {
            invocation = invocation.key(record);
        }
        invocation = invocation
            .arg(check.limit)
            .arg(micros(check.window))
            .arg(check.cost)
            .arg(u8::from(check.dry_run))
            .arg(block_us);
        if record.is_some() {
            invocation = invocation.arg(1);
        }
        (invocation, record.is_some())
    }

    /// One usage check-and-count, remembered under `request_id` when given.
    async fn increment(
        &self,
        increment: &UsageIncrement<'_>,
        request_id: Option<&str>,
    ) -> Result<Once<UsageDecision>, StoreError> {
        let what = USAGE_INCREMENT.name;
        let keys = self.shared.keys.usage(increment.user_id);
        let period_ms = u64::try_from(increment.period.as_millis())
            .unwrap_or(u64::MAX)
            // PEXPIRE 0 would delete the counters at once.
            .max(1);
        let record = request_id.map(|id| keys.request(increment.character_id, increment.kind, id));
        let mut invocation = Invocation::new(&USAGE_INCREMENT, 3 + usize::from(record.is_some()))
            .key(keys.conversation(increment.character_id))
            .key(keys.index)
            .key(keys.by_id);
        if let Some(record) = &record {
            invocation = invocation.key(record);
        }
        invocation = invocation
            .arg(increment.kind)
            .arg(increment.amount)
            // -1: unlimited, counted all the same.
            .arg(
                increment
                    .limit
                    .map_or(-1, |limit| i64::try_from(limit).unwrap_or(i64::MAX)),
            )
            .arg(period_ms)
            .arg(increment.character_id);
        if record.is_some() {
            invocation = invocation.arg(1);
        }

        let reply = self.run_decision(invocation).await?;
        let (allowed, used, resets_after_ms, replayed) = if record.is_some() {
            decode::<(u64, u64, u64, u64)>(what, reply)?
        } else {
            let (a, u, r): (u64, u64, u64) = decode(what, reply)?;
            (a, u, r, 0)
        };
        Ok(Once {
            decision: UsageDecision {
                allowed: flag(what, allowed)?,
                used,
                resets_after: Duration::from_millis(resets_after_ms),
            },
            replayed: flag(what, replayed)?,
        })
    }

    /// Sends `commands` (each with the key it touches) and returns their
    /// replies in order, within one store timeout: to one server as one
    /// pipeline; to a cluster as one pipeline per master, after asking for
    /// the slot map (`CLUSTER SLOTS`), since a cluster pipeline must
    /// otherwise stay within one slot. Commands in different slots of one
    /// master may share a pipeline: only MULTI and multi-key commands must
    /// not cross slots. A reply that is an error fails the whole call.
    async fn pipeline_per_node(
        &self,
        commands: &[(String, Cmd)],
    ) -> Result<Vec<Value>, StoreError> {
        let deadline = self.deadline();
        let mut conn = self.checkout(deadline).await?;
        let replies = match &mut conn.redis {
            Link::Server(_) => {
                let mut pipe = redis::pipe();
                for (_, cmd) in commands {
                    pipe.add_command(cmd.clone());
                }
                self.call(
                    deadline,
                    conn.generation,
                    pipe.query_async::<Vec<Value>>(&mut conn.redis),
                )
                .await?
            }
            Link::Cluster(cluster) => {
                let mut cluster = cluster.clone();
                let masters = self
                    .call(deadline, None, cluster_masters(&mut cluster))
                    .await?;
                // Master -> (a slot it serves, indexes of its commands).
                let mut groups: BTreeMap<&str, (u16, Vec<usize>)> = BTreeMap::new();
                for (index, (key, _)) in commands.iter().enumerate() {
                    let slot = cluster_slot(key);
                    let owner = masters
                        .iter()
                        .find(|(first, last, _)| (*first..=*last).contains(&slot))
                        .map_or("", |(_, _, node)| node.as_str());
                    groups
                        .entry(owner)
                        .or_insert_with(|| (slot, Vec::new()))
                        .1
                        .push(index);
                }
                let mut sent = tokio::task::JoinSet::new();
                for (slot, indexes) in groups.into_values() {
                    let mut pipe = redis::pipe();
                    for &index in &indexes {
                        pipe.add_command(commands[index].1.clone());
                    }
                    let mut cluster = cluster.clone();
                    let route =
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    sent.spawn(async move {
                        let count = indexes.len();
                        let replies = cluster.route_pipeline(pipe, 0, count, route).await;
                        (indexes, replies)
                    });
                }
                let mut replies = vec![Value::Nil; commands.len()];
                let gathered = async {
                    while let Some(joined) = sent.join_next().await {
                        let Ok((indexes, answered)) = joined else {
                            return Err(StoreError::Protocol(
                                "a statistics pipeline task failed".to_owned(),
                            ));
                        };
                        let answered = answered.map_err(|err| self.classify(&err))?;
                        for (index, reply) in indexes.into_iter().zip(answered) {
                            replies[index] = reply;
                        }
                    }
                    Ok(())
                };
                match timeout_at(deadline, gathered).await {
                    Ok(result) => result?,
                    Err(_) => return Err(StoreError::Timeout(self.shared.timeout)),
                }
                replies
            }
        };
        if replies.len() != commands.len() {
            return Err(StoreError::Protocol(format!(
                "{} replies for {} statistics commands",
                replies.len(),
                commands.len()
            )));
        }
        if let Some(Value::ServerError(err)) = replies
            .iter()
            .find(|reply| matches!(reply, Value::ServerError(_)))
        {
            return Err(self.classify(&RedisError::from(err.clone())));
        }
        Ok(replies)
    }

    /// Deletes the conversations `ids` of a user with `usage_reset.lua`;
    /// how many had live counters, and up to `next` ids still listed.
    async fn reset_conversations(
        &self,
        keys: &UsageKeys,
        ids: &[String],
        next: usize,
    ) -> Result<(u32, Vec<String>), StoreError> {
        let what = USAGE_RESET.name;
        let mut invocation = Invocation::new(&USAGE_RESET, 2 + ids.len())
            .key(&keys.index)
            .key(&keys.by_id);
        for id in ids {
            invocation = invocation.key(keys.conversation(id));
        }
        invocation = invocation.arg(next);
        for id in ids {
            invocation = invocation.arg(id);
        }
        let reply: Vec<Value> = decode(what, self.run_script(&invocation).await?)?;
        let mut reply = reply.into_iter();
        let deleted: u32 = match reply.next() {
            Some(deleted) => decode(what, deleted)?,
            None => return Err(StoreError::Protocol(format!("{what} returned nothing"))),
        };
        let next = reply
            .map(|id| decode(what, id))
            .collect::<Result<Vec<String>, _>>()?;
        Ok((deleted, next))
    }

    /// The counters of each conversation hash in `keys`, `None` for one that
    /// has none, in one round trip (HGETALL + PTTL each, pipelined). The
    /// keys share the user's hash tag, so on a cluster the pipeline goes to
    /// the one node that holds them.
    async fn read_conversations(
        &self,
        deadline: Instant,
        conn: &mut Checkout,
        keys: &[String],
    ) -> Result<Vec<Option<ConversationCounters>>, StoreError> {
        const WHAT: &str = "HGETALL + PTTL";
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("HGETALL").arg(key).cmd("PTTL").arg(key);
        }
        let reply = self
            .call(
                deadline,
                conn.generation,
                pipe.query_async::<Value>(&mut conn.redis),
            )
            .await?;
        let replies: Vec<(BTreeMap<String, u64>, i64)> = decode(WHAT, reply)?;
        if replies.len() != keys.len() {
            return Err(StoreError::Protocol(format!(
                "{WHAT}: {} replies for {} conversations",
                replies.len(),
                keys.len()
            )));
        }
        Ok(replies
            .into_iter()
            .map(|(used, pttl_ms)| {
                // An expired hash reads as empty: no counters, nothing to report.
                (!used.is_empty()).then(|| ConversationCounters {
                    used: used.into_iter().collect(),
                    resets_after: ttl(pttl_ms),
                })
            })
            .collect())
    }
}

/// Opens the pool's connections and tells dead ones apart without a round
/// trip.
struct Manager {
    client: Client,
    config: AsyncConnectionConfig,
    health: Arc<Health>,
}

/// A pooled connection and the pool generation it was opened in.
struct PooledRedis {
    redis: MultiplexedConnection,
    generation: u64,
}

/// What the pool knows about Redis's reachability, shared with the store.
#[derive(Default)]
struct Health {
    /// Connections opened before the current generation are dropped at
    /// their next checkout or return.
    generation: AtomicU64,
    /// Why the last connect attempt failed; cleared by a successful one.
    last_connect_error: Mutex<Option<String>>,
}

impl Health {
    /// Retires every connection of `generation`, unless a newer generation
    /// already has (so that late failures on old connections do not retire
    /// fresh ones).
    fn retire(&self, generation: u64) {
        let _ = self.generation.compare_exchange(
            generation,
            generation.wrapping_add(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    fn is_current(&self, conn: &PooledRedis) -> bool {
        conn.generation == self.generation.load(Ordering::Acquire)
    }

    fn last_connect_error(&self) -> Option<String> {
        // The lock guards a plain Option; a panic elsewhere cannot leave it
        // half-written, so a poisoned lock is still good to read.
        self.last_connect_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_last_connect_error(&self, error: Option<String>) {
        *self
            .last_connect_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

impl bb8::ManageConnection for Manager {
    type Connection = PooledRedis;
    type Error = RedisError;

    async fn connect(&self) -> Result<PooledRedis, RedisError> {
        match self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
        {
            Ok(redis) => {
                self.health.set_last_connect_error(None);
                Ok(PooledRedis {
                    redis,
                    generation: self.health.generation.load(Ordering::Acquire),
                })
            }
            Err(err) => {
                self.health.set_last_connect_error(Some(err.to_string()));
                Err(err)
            }
        }
    }

    /// No PING: a connection is valid until a request on it (or on one of
    /// its generation) fails, which costs nothing per checkout.
    async fn is_valid(&self, conn: &mut PooledRedis) -> Result<(), RedisError> {
        if self.health.is_current(conn) {
            Ok(())
        } else {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "connection retired after a connection error",
            )))
        }
    }

    fn has_broken(&self, conn: &mut PooledRedis) -> bool {
        !self.health.is_current(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts composed into others (lua/at_once.lua) read Redis's TIME
    /// only as `redis.frozen_time or redis.call('TIME')`: a bare TIME in a
    /// batch would be a later instant than its neighbours'.
    #[test]
    fn composed_decision_scripts_read_the_frozen_time() {
        for (name, source) in [
            ("sliding_log.lua", include_str!("../../lua/sliding_log.lua")),
            (
                "sliding_counter.lua",
                include_str!("../../lua/sliding_counter.lua"),
            ),
            (
                "usage_increment.lua",
                include_str!("../../lua/usage_increment.lua"),
            ),
        ] {
            let reads = source.matches("redis.call('TIME')").count();
            let frozen = source
                .matches("redis.frozen_time or redis.call('TIME')")
                .count();
            assert!(reads > 0, "{name} reads no TIME");
            assert_eq!(reads, frozen, "{name} reads a TIME that is not frozen");
        }
    }

    #[test]
    fn a_reset_message_reads_back_whatever_the_subject() {
        for subject in ["u1", "a:b:c", "", "x}:{rl:y", "é\nnew line"] {
            assert_eq!(
                parse_reset_message(&reset_message("auth", subject)),
                Some(ResetNotice::Limit {
                    rule: "auth".to_owned(),
                    subject: subject.to_owned(),
                })
            );
        }
        assert_eq!(reset_message("auth", "u1"), "limit:auth:u1");
        assert_eq!(parse_reset_message("usage:u1"), None);
        assert_eq!(parse_reset_message("limit:auth"), None);
    }

    #[test]
    fn masks_passwords() {
        assert_eq!(
            mask_url_password("redis://:hunter2@localhost:6379/0"),
            "redis://:***@localhost:6379/0"
        );
        assert_eq!(
            mask_url_password("rediss://app:s3cr%40t@db.internal:6380"),
            "rediss://app:***@db.internal:6380"
        );
        assert_eq!(
            mask_url_password("redis://localhost:6379/0"),
            "redis://localhost:6379/0"
        );
        assert_eq!(mask_url_password("memory://"), "memory://");
    }

    #[test]
    fn cluster_urls_give_one_seed_url_per_node() {
        assert_eq!(
            cluster_seed_urls("redis-cluster://10.0.0.1:7000,10.0.0.2:7001,db.internal"),
            Ok(vec![
                "redis://10.0.0.1:7000".to_owned(),
                "redis://10.0.0.2:7001".to_owned(),
                "redis://db.internal".to_owned(),
            ])
        );
        // Credentials once, for every node; TLS for every node.
        assert_eq!(
            cluster_seed_urls("rediss-cluster://app:s3cr%40t@h1:7000,[::1]:7001/0"),
            Ok(vec![
                "rediss://app:s3cr%40t@h1:7000".to_owned(),
                "rediss://app:s3cr%40t@[::1]:7001".to_owned(),
            ])
        );
        assert!(is_cluster_url("redis-cluster://h:1"));
        assert!(is_cluster_url("rediss-cluster://h:1"));
        assert!(!is_cluster_url("redis://h:1/0"));
    }

    #[test]
    fn bad_cluster_urls_name_the_node_and_mask_the_password() {
        for (url, expected) in [
            (
                "redis-cluster://:hunter2@h1:7000,,h2:7001",
                "\"redis-cluster://:***@h1:7000,,h2:7001\": node 2 (\"\") is empty",
            ),
            (
                "redis-cluster://:hunter2@h1:7000,h2:70x1",
                "node 2 (\"h2:70x1\") has no valid port: \"70x1\"",
            ),
            (
                "redis-cluster://h1:0",
                "node 1 (\"h1:0\") has no valid port",
            ),
            ("redis-cluster://:7000", "node 1 (\":7000\") has no host"),
            (
                "redis-cluster://::1:7000",
                "is not host:port (put an IPv6 address in brackets)",
            ),
            ("redis-cluster://[::1:7000", "unclosed '['"),
            ("redis-cluster://", "names no node"),
            ("redis-cluster://:hunter2@", "names no node"),
            ("redis-cluster://h1:7000/3", "takes no database or options"),
            (
                "redis-cluster://h1:7000?protocol=resp3",
                "takes no database",
            ),
            ("redis://h1:7000", "is not a Redis Cluster URL"),
        ] {
            let err = cluster_seed_urls(url).expect_err(url);
            assert!(err.contains(expected), "{url}: {err}");
            assert!(!err.contains("hunter2"), "{url}: {err}");
        }
    }
}
