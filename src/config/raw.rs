//! The config file's shape, as serde reads it (`Raw*`, every field
//! optional or defaulted, unknown keys refused), and its validation into the
//! domain types: every check that names a key lives here.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::{
    Backend, ClientCertFiles, Config, ConfigError, LogFormat, LogSettings, SecretUrl, ServerTls,
    Settings, StoreSettings,
};
use crate::{
    rules::{
        Algorithm, EnvoyHeaders, EnvoyMatch, FailureMode, Kind, Policy, Quota, Quotas, Rule, Tier,
        Tiers,
    },
    store::{
        breaker::BreakerOptions,
        memory::DEFAULT_MAX_ENTRIES,
        redis::{DEFAULT_MAX_BATCH, MAX_BATCH_LIMIT, mask_url_password},
    },
};
// Its own statement, apart from the list above that other sections extend.
use crate::stats::{Retention, StatsSettings};

/// Names what an untagged fallback caught. A table fails through one of its
/// entries, so that entry is named (the first by name, as the table's own
/// order is lost) rather than the whole table.
fn describe(value: &config::Value, entry_ok: fn(&config::ValueKind) -> bool) -> String {
    use config::ValueKind as V;
    let plain = |value: &config::Value| match &value.kind {
        V::String(text) => format!("{text:?}"),
        V::Array(_) => "a list".to_owned(),
        V::Table(_) => "a table".to_owned(),
        other => other.to_string(),
    };
    match &value.kind {
        V::Table(table) => table
            .iter()
            .filter(|(_, v)| !entry_ok(&v.kind))
            .min_by(|a, b| a.0.cmp(b.0))
            .map_or_else(
                || "a table".to_owned(),
                |(tier, v)| format!("{tier} = {}", plain(v)),
            ),
        _ => plain(value),
    }
}

/// A whole number, as TOML integers arrive.
fn is_count(kind: &config::ValueKind) -> bool {
    use config::ValueKind as V;
    matches!(kind, V::U64(_) | V::U128(_)) || matches!(kind, V::I64(n) if *n >= 0)
}

/// A whole number or a word (`quota_value` judges the word).
fn is_count_or_word(kind: &config::ValueKind) -> bool {
    is_count(kind) || matches!(kind, config::ValueKind::String(_))
}

// ---- The file's shape, as serde reads it -------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: RawLog,
    tiers: RawTiers,
    #[serde(default)]
    rules: BTreeMap<String, RawRule>,
    quotas: RawQuotas,
    #[serde(default)]
    envoy: RawEnvoy,
    #[serde(default)]
    stats: RawStats,
}

/// `[stats]`: usage statistics.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStats {
    enabled: bool,
    flush: String,
    hours: i64,
    days: i64,
    weeks: i64,
}

impl Default for RawStats {
    fn default() -> Self {
        let defaults = StatsSettings::default();
        Self {
            enabled: defaults.enabled,
            flush: "1s".to_owned(),
            hours: defaults.retention.hours.into(),
            days: defaults.retention.days.into(),
            weeks: defaults.retention.weeks.into(),
        }
    }
}

/// `[envoy]`: the Envoy rate-limit door.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawEnvoy {
    domain: String,
    headers: String,
}

impl Default for RawEnvoy {
    fn default() -> Self {
        Self {
            domain: "tollgate".to_owned(),
            headers: EnvoyHeaders::Draft11.as_str().to_owned(),
        }
    }
}

/// `[rules.<name>.envoy]`: which Envoy descriptors the rule applies to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvoyMatch {
    #[serde(rename = "match")]
    entries: BTreeMap<String, String>,
    subject: String,
    tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    tls: Option<RawServerTls>,
    metrics_listen: Option<String>,
    admin_listen: Option<String>,
    worker_threads: Option<i64>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_owned(),
            tls: None,
            metrics_listen: None,
            admin_listen: None,
            worker_threads: None,
        }
    }
}

/// `[server.tls]`. Every key optional here, so that a missing one is named
/// by our own check rather than as a missing field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: String,
    key_prefix: String,
    timeout: String,
    pool_size: u32,
    max_batch: i64,
    breaker_failures: u32,
    breaker_cool_down: String,
    tls_ca: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    max_entries: i64,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "memory://".to_owned(),
            key_prefix: "tollgate:".to_owned(),
            timeout: "250ms".to_owned(),
            // One multiplexed connection pipelines every request: faster
            // than several (README, "Performance").
            pool_size: 1,
            // Decisions that queue behind the script calls in flight go as
            // one script call (README, "Batching").
            max_batch: i64::from(DEFAULT_MAX_BATCH),
            breaker_failures: 5,
            breaker_cool_down: "1s".to_owned(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            max_entries: i64::try_from(DEFAULT_MAX_ENTRIES).unwrap_or(i64::MAX),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            format: "text".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTiers {
    names: Vec<String>,
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    window: String,
    limit: RawLimit,
    block_for: Option<String>,
    algorithm: Option<String>,
    envoy: Option<RawEnvoyMatch>,
    on_store_error: Option<String>,
    #[serde(default)]
    shadow: bool,
}

/// One number for every tier, or a table of tier = number. `Other` catches
/// anything else so the error can say what was expected.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Uniform(u64),
    PerTier(BTreeMap<String, u64>),
    Other(config::Value),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuotas {
    #[serde(default = "default_quota_period")]
    period: String,
    #[serde(default)]
    kinds: BTreeMap<String, RawQuota>,
    on_store_error: Option<String>,
}

fn default_quota_period() -> String {
    "24h".to_owned()
}

/// `30`, `"unlimited"`, or a table of tier = either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawQuota {
    Uniform(RawQuotaValue),
    PerTier(BTreeMap<String, RawQuotaValue>),
    Other(config::Value),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawQuotaValue {
    Count(u64),
    Word(String),
}

// ---- Validation into domain types --------------------------------------

/// Makes the error for a key: `at("store.url", problem)`.
pub(super) type At<'a> = &'a dyn Fn(&str, String) -> ConfigError;

impl RawConfig {
    /// Every check, in the file's order; the first failure names its key
    /// through `at`.
    pub(super) fn validate(self, at: At<'_>) -> Result<Config, ConfigError> {
        let server_tls = self
            .server
            .tls
            .as_ref()
            .map(|tls| tls.validate(at))
            .transpose()?;
        let metrics_listen = self
            .server
            .metrics_listen
            .as_deref()
            .map(|addr| parse_socket_addr(addr, "server.metrics_listen", "127.0.0.1:9464", at))
            .transpose()?;
        let admin_listen = self
            .server
            .admin_listen
            .as_deref()
            .map(|addr| parse_socket_addr(addr, "server.admin_listen", "127.0.0.1:50052", at))
            .transpose()?;
        let listen = self.server.validate(at)?;
        if let Some(admin) = admin_listen
            && admin.port() != 0
            && (admin == listen || Some(admin) == metrics_listen)
        {
            return Err(at(
                "server.admin_listen",
                format!(
                    "{admin} is also server.{}: the admin door needs a port of its own",
                    if admin == listen {
                        "listen"
                    } else {
                        "metrics_listen"
                    }
                ),
            ));
        }
        let worker_threads = self
            .server
            .worker_threads
            .map(|threads| worker_threads(threads, at))
            .transpose()?;
        let settings = Settings {
            listen,
            metrics_listen,
            admin_listen,
            worker_threads,
            tls: server_tls,
            store: self.store.validate(at)?,
            log: self.log.validate(at)?,
            stats: self.stats.validate(at)?,
        };
        let tiers = self.tiers.validate(at)?;
        let mut rules = BTreeMap::new();
        for (name, raw) in self.rules {
            let rule = raw.validate(&name, &tiers, at)?;
            rules.insert(name, rule);
        }
        let quotas = self.quotas.validate(&tiers, at)?;
        let (envoy_domain, envoy_headers) = self.envoy.validate(at)?;
        Ok(Config {
            settings,
            policy: Policy {
                tiers,
                rules,
                quotas,
                envoy_domain,
                envoy_headers,
            },
        })
    }
}

impl RawServer {
    fn validate(&self, at: At<'_>) -> Result<SocketAddr, ConfigError> {
        parse_socket_addr(&self.listen, "server.listen", "127.0.0.1:50051", at)
    }
}

/// The most threads `server.worker_threads` takes: far more than any machine
/// has cores, low enough to catch a typo.
const MAX_WORKER_THREADS: i64 = 1024;

fn worker_threads(threads: i64, at: At<'_>) -> Result<usize, ConfigError> {
    match usize::try_from(threads) {
        Ok(count) if (1..=MAX_WORKER_THREADS).contains(&threads) => Ok(count),
        _ => Err(at(
            "server.worker_threads",
            format!(
                "{threads} is not a thread count from 1 to {MAX_WORKER_THREADS} \
                 (leave it out for one per CPU core)"
            ),
        )),
    }
}

fn parse_socket_addr(
    text: &str,
    key: &str,
    example: &str,
    at: At<'_>,
) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| at(key, format!("{text:?} is not an address such as {example}")))
}

impl RawStore {
    fn validate(self, at: At<'_>) -> Result<StoreSettings, ConfigError> {
        let backend = parse_store_url(&self.url).map_err(|problem| at("store.url", problem))?;
        if self.key_prefix.contains(['{', '}']) {
            return Err(at(
                "store.key_prefix",
                "must not contain '{' or '}': tollgate places its own Redis Cluster hash tags"
                    .to_owned(),
            ));
        }
        let timeout = parse_duration(&self.timeout).map_err(|p| at("store.timeout", p))?;
        if self.pool_size == 0 {
            return Err(at("store.pool_size", "must be at least 1".to_owned()));
        }
        let max_batch = match u32::try_from(self.max_batch) {
            Ok(max) if (1..=MAX_BATCH_LIMIT).contains(&max) => max,
            _ => {
                return Err(at(
                    "store.max_batch",
                    format!(
                        "{} is not a batch size from 1 (no batching) to {MAX_BATCH_LIMIT}",
                        self.max_batch
                    ),
                ));
            }
        };
        if self.breaker_failures == 0 {
            return Err(at(
                "store.breaker_failures",
                "must be at least 1".to_owned(),
            ));
        }
        let max_entries = match usize::try_from(self.max_entries) {
            Ok(max) if max >= 1 => max,
            _ => {
                return Err(at(
                    "store.max_entries",
                    format!(
                        "{} is not an entry count of at least 1 (leave it out for {})",
                        self.max_entries, DEFAULT_MAX_ENTRIES
                    ),
                ));
            }
        };
        let tls = matches!(&backend, Backend::Redis(url) | Backend::RedisCluster(url)
            if url.expose().starts_with("rediss"));
        let tls_file = |key: &str, path: &Option<String>, kind: Pem| match path {
            None => Ok(None),
            Some(path) if tls => pem_file(path, kind).map(Some).map_err(|p| at(key, p)),
            Some(_) => Err(at(
                key,
                "applies only to a TLS store URL (rediss:// or rediss-cluster://)".to_owned(),
            )),
        };
        let tls_ca = tls_file("store.tls_ca", &self.tls_ca, Pem::Certificate)?;
        let tls_cert = tls_file("store.tls_cert", &self.tls_cert, Pem::Certificate)?;
        let tls_key = tls_file("store.tls_key", &self.tls_key, Pem::PrivateKey)?;
        let tls_client = match (tls_cert, tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(ClientCertFiles { cert, key }),
            (Some(_), None) => {
                return Err(at(
                    "store.tls_key",
                    "required with store.tls_cert: the certificate's private key".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(at(
                    "store.tls_cert",
                    "required with store.tls_key: the key's certificate".to_owned(),
                ));
            }
        };
        let breaker = BreakerOptions {
            failure_threshold: self.breaker_failures,
            cool_down: parse_duration(&self.breaker_cool_down)
                .map_err(|p| at("store.breaker_cool_down", p))?,
        };
        Ok(StoreSettings {
            backend,
            key_prefix: self.key_prefix,
            timeout,
            pool_size: self.pool_size,
            max_batch,
            breaker,
            tls_ca,
            tls_client,
            max_entries,
        })
    }
}

/// The most buckets of one granularity kept: ten years of hours, more than
/// anyone reads, low enough to catch a typo.
const MAX_STATS_BUCKETS: i64 = 87_600;

impl RawStats {
    fn validate(self, at: At<'_>) -> Result<StatsSettings, ConfigError> {
        let flush = parse_duration(&self.flush).map_err(|p| at("stats.flush", p))?;
        let count = |key: &str, value: i64| match u32::try_from(value) {
            Ok(count) if (1..=MAX_STATS_BUCKETS).contains(&value) => Ok(count),
            _ => Err(at(
                key,
                format!("{value} is not a bucket count from 1 to {MAX_STATS_BUCKETS}"),
            )),
        };
        Ok(StatsSettings {
            enabled: self.enabled,
            flush,
            retention: Retention {
                hours: count("stats.hours", self.hours)?,
                days: count("stats.days", self.days)?,
                weeks: count("stats.weeks", self.weeks)?,
            },
        })
    }
}

impl RawServerTls {
    fn validate(&self, at: At<'_>) -> Result<ServerTls, ConfigError> {
        let (cert, key) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => {
                return Err(at(
                    "server.tls.key",
                    "required with server.tls.cert: the certificate's private key (PEM)".to_owned(),
                ));
            }
            (None, _) => {
                return Err(at(
                    "server.tls.cert",
                    "required in [server.tls]: the server's certificate chain (PEM)".to_owned(),
                ));
            }
        };
        Ok(ServerTls {
            cert: pem_file(cert, Pem::Certificate).map_err(|p| at("server.tls.cert", p))?,
            key: pem_file(key, Pem::PrivateKey).map_err(|p| at("server.tls.key", p))?,
            client_ca: self
                .client_ca
                .as_deref()
                .map(|ca| pem_file(ca, Pem::Certificate))
                .transpose()
                .map_err(|p| at("server.tls.client_ca", p))?,
        })
    }
}

/// What a PEM file must hold.
#[derive(Debug, Clone, Copy)]
enum Pem {
    /// At least one certificate.
    Certificate,
    /// A private key (PKCS#8, PKCS#1 or SEC1).
    PrivateKey,
}

/// Checks that `path` is readable and holds PEM of the `expected` kind, so
/// that a wrong path stops start-up here, named by its key, rather than at
/// the first TLS handshake. The contents are not kept: the key is a secret,
/// and settings are printed in debug logs.
fn pem_file(path: &str, expected: Pem) -> Result<PathBuf, String> {
    if path.is_empty() {
        return Err("must name a PEM file".to_owned());
    }
    let text = std::fs::read(path).map_err(|err| {
        // "No such file or directory (os error 2)": the number says nothing
        // more to an operator.
        let err = err.to_string();
        let err = err.split(" (os error ").next().unwrap_or_default();
        format!("cannot read {path:?}: {err}")
    })?;
    let text = String::from_utf8_lossy(&text);
    let found = match expected {
        Pem::Certificate => text.contains("-----BEGIN CERTIFICATE-----"),
        Pem::PrivateKey => text
            .lines()
            .any(|line| line.starts_with("-----BEGIN ") && line.ends_with("PRIVATE KEY-----")),
    };
    if !found {
        let what = match expected {
            Pem::Certificate => "a PEM certificate (-----BEGIN CERTIFICATE-----)",
            Pem::PrivateKey => "a PEM private key (-----BEGIN PRIVATE KEY-----)",
        };
        return Err(format!("{path:?} does not hold {what}"));
    }
    Ok(PathBuf::from(path))
}

fn parse_store_url(url: &str) -> Result<Backend, String> {
    if url == "memory://" {
        return Ok(Backend::Memory);
    }
    if crate::store::redis::is_cluster_url(url) {
        return crate::store::redis::cluster_seed_urls(url)
            .map(|_| Backend::RedisCluster(SecretUrl(url.to_owned())));
    }
    if url.starts_with("redis://") || url.starts_with("rediss://") {
        return redis::parse_redis_url(url)
            .map(|_| Backend::Redis(SecretUrl(url.to_owned())))
            .ok_or_else(|| format!("{:?} is not a valid Redis URL", mask_url_password(url)));
    }
    Err(format!(
        "{:?} is not a store URL: use \"memory://\" or \"redis://host:6379/0\"",
        mask_url_password(url)
    ))
}

impl RawLog {
    fn validate(self, at: At<'_>) -> Result<LogSettings, ConfigError> {
        let format = match self.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(at(
                    "log.format",
                    format!("{other:?} is not a log format; known: text, json"),
                ));
            }
        };
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(at("log.level", format!("{:?}: {err}", self.level)));
        }
        Ok(LogSettings {
            level: self.level,
            format,
        })
    }
}

impl RawTiers {
    fn validate(self, at: At<'_>) -> Result<Tiers, ConfigError> {
        if self.names.is_empty() {
            return Err(at("tiers.names", "must name at least one tier".to_owned()));
        }
        for (i, name) in self.names.iter().enumerate() {
            check_name(name).map_err(|p| at("tiers.names", p))?;
            if self.names[..i].contains(name) {
                return Err(at("tiers.names", format!("tier {name:?} is named twice")));
            }
        }
        let default = match &self.default {
            None => Tier(0),
            Some(name) => self
                .names
                .iter()
                .position(|n| n == name)
                .map(Tier)
                .ok_or_else(|| {
                    at(
                        "tiers.default",
                        format!("{name:?} is not in tiers.names ({})", self.names.join(", ")),
                    )
                })?,
        };
        Ok(Tiers {
            names: self.names,
            default,
        })
    }
}

impl RawRule {
    fn validate(self, name: &str, tiers: &Tiers, at: At<'_>) -> Result<Rule, ConfigError> {
        let key = |field: &str| format!("rules.{name}.{field}");
        check_name(name).map_err(|p| at(&format!("rules.{name}"), p))?;
        let window = parse_duration(&self.window).map_err(|p| at(&key("window"), p))?;
        let block_for = self
            .block_for
            .as_deref()
            .map(parse_duration)
            .transpose()
            .map_err(|p| at(&key("block_for"), p))?;
        let algorithm = match self.algorithm.as_deref() {
            None | Some("sliding_log") => Algorithm::SlidingLog,
            Some("sliding_counter") => Algorithm::SlidingCounter,
            Some(other) => {
                return Err(at(
                    &key("algorithm"),
                    format!("{other:?} is not an algorithm; known: sliding_log, sliding_counter"),
                ));
            }
        };
        let limits = match self.limit {
            RawLimit::Uniform(limit) => vec![limit; tiers.names.len()],
            RawLimit::PerTier(table) => {
                per_tier(&table, tiers, |&n| Ok(n)).map_err(|p| at(&key("limit"), p))?
            }
            RawLimit::Other(value) => {
                return Err(at(
                    &key("limit"),
                    format!(
                        "expected a whole number or a table of tier = number, got {}",
                        describe(&value, is_count)
                    ),
                ));
            }
        };
        let envoy = self
            .envoy
            .map(|raw| raw.validate(&key("envoy"), at))
            .transpose()?;
        let ratelimit_policy = limits
            .iter()
            .map(|&limit| crate::headers::policy_item(name, limit, window).into())
            .collect();
        Ok(Rule {
            name: name.to_owned(),
            window,
            limits,
            block_for,
            algorithm,
            envoy,
            shadow: self.shadow,
            ratelimit_policy,
            // Lockout rules guard against brute force: fail closed unless
            // the operator says otherwise.
            on_store_error: failure_mode(
                self.on_store_error.as_deref(),
                if block_for.is_some() {
                    FailureMode::Deny
                } else {
                    FailureMode::Allow
                },
            )
            .map_err(|p| at(&key("on_store_error"), p))?,
        })
    }
}

impl RawEnvoy {
    fn validate(self, at: At<'_>) -> Result<(String, EnvoyHeaders), ConfigError> {
        if self.domain.is_empty() {
            return Err(at(
                "envoy.domain",
                "must not be empty: it is the domain of Envoy's rate_limits (e.g. \"tollgate\")"
                    .to_owned(),
            ));
        }
        let headers = match self.headers.as_str() {
            "draft-11" => EnvoyHeaders::Draft11,
            "none" => EnvoyHeaders::None,
            other => {
                return Err(at(
                    "envoy.headers",
                    format!("{other:?} is not a header format; known: draft-11, none"),
                ));
            }
        };
        Ok((self.domain, headers))
    }
}

impl RawEnvoyMatch {
    /// `key` is `rules.<name>.envoy`.
    fn validate(self, key: &str, at: At<'_>) -> Result<EnvoyMatch, ConfigError> {
        let field = |name: &str| format!("{key}.{name}");
        if self.entries.is_empty() {
            return Err(at(
                &field("match"),
                "must hold at least one descriptor entry, e.g. { generic_key = \"api\" }"
                    .to_owned(),
            ));
        }
        for (entry, value) in &self.entries {
            if entry.is_empty() || value.is_empty() {
                return Err(at(
                    &field("match"),
                    format!("{entry:?} = {value:?}: descriptor keys and values must not be empty"),
                ));
            }
        }
        if self.subject.is_empty() {
            return Err(at(
                &field("subject"),
                "must name the descriptor entry that carries the subject, e.g. \"user_id\""
                    .to_owned(),
            ));
        }
        match self.tier.as_deref() {
            Some("") => {
                return Err(at(
                    &field("tier"),
                    "must name a descriptor entry, or be left out for the default tier".to_owned(),
                ));
            }
            Some(tier) if tier == self.subject => {
                return Err(at(
                    &field("tier"),
                    format!("{tier:?} is also the subject entry; the tier needs its own entry"),
                ));
            }
            _ => {}
        }
        Ok(EnvoyMatch {
            entries: self.entries.into_iter().collect(),
            subject: self.subject,
            tier: self.tier,
        })
    }
}

impl RawQuotas {
    fn validate(self, tiers: &Tiers, at: At<'_>) -> Result<Quotas, ConfigError> {
        let period = parse_duration(&self.period).map_err(|p| at("quotas.period", p))?;
        let mut kinds = Vec::with_capacity(self.kinds.len());
        for (name, raw) in self.kinds {
            let key = format!("quotas.kinds.{name}");
            check_name(&name).map_err(|p| at(&key, p))?;
            let quotas = match raw {
                RawQuota::Uniform(value) => {
                    vec![quota_value(&value).map_err(|p| at(&key, p))?; tiers.names.len()]
                }
                RawQuota::PerTier(table) => {
                    per_tier(&table, tiers, quota_value).map_err(|p| at(&key, p))?
                }
                RawQuota::Other(value) => {
                    return Err(at(
                        &key,
                        format!(
                            "expected a whole number, \"unlimited\" or a table of tier = either, got {}",
                            describe(&value, is_count_or_word)
                        ),
                    ));
                }
            };
            kinds.push(Kind { name, quotas });
        }
        let on_store_error = failure_mode(self.on_store_error.as_deref(), FailureMode::Allow)
            .map_err(|p| at("quotas.on_store_error", p))?;
        Ok(Quotas {
            period,
            kinds,
            on_store_error,
        })
    }
}

fn failure_mode(text: Option<&str>, default: FailureMode) -> Result<FailureMode, String> {
    match text {
        None => Ok(default),
        Some("allow") => Ok(FailureMode::Allow),
        Some("deny") => Ok(FailureMode::Deny),
        Some(other) => Err(format!(
            "{other:?} is not a failure mode; known: allow, deny"
        )),
    }
}

fn quota_value(value: &RawQuotaValue) -> Result<Quota, String> {
    match value {
        RawQuotaValue::Count(n) => Ok(Quota::Limited(*n)),
        RawQuotaValue::Word(word) if word == "unlimited" => Ok(Quota::Unlimited),
        RawQuotaValue::Word(word) => Err(format!(
            "{word:?} is not a quota: use a whole number or \"unlimited\""
        )),
    }
}

/// Orders a tier = value table by tier, requiring every tier and no others.
fn per_tier<V, T>(
    table: &BTreeMap<String, V>,
    tiers: &Tiers,
    convert: impl Fn(&V) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    if let Some(unknown) = table.keys().find(|t| !tiers.names.contains(t)) {
        return Err(format!(
            "tier {unknown:?} is not in tiers.names ({})",
            tiers.names.join(", ")
        ));
    }
    tiers
        .names
        .iter()
        .map(|tier| match table.get(tier) {
            Some(value) => convert(value).map_err(|p| format!("{tier}: {p}")),
            None => Err(format!(
                "tier {tier:?} is not covered: give it a value, or use one number for every tier"
            )),
        })
        .collect()
}

/// Names of tiers, rules and kinds become part of Redis keys and metric
/// labels, so they are kept plain.
fn check_name(name: &str) -> Result<(), String> {
    let plain = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if name.is_empty() || name.len() > 64 || !name.bytes().all(plain) {
        return Err(format!(
            "{name:?} is not a valid name: use 1 to 64 of a-z, 0-9, '_' and '-'"
        ));
    }
    Ok(())
}

/// A humantime duration of at least one millisecond.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|err| {
        format!("{text:?} is not a duration such as 500ms, 2s, 15m or 24h ({err})")
    })?;
    if duration < Duration::from_millis(1) {
        return Err(format!("{text:?} is shorter than 1ms"));
    }
    Ok(duration)
}
