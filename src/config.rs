//! The TOML config file, environment overrides and command-line overrides,
//! read once and validated in full into two values with different lives:
//! process [`Settings`] (where to listen, which store) and the limiting
//! [`Policy`] (tiers, rules, quotas).
//!
//! Every problem is reported as one [`ConfigError`] naming the file, the key
//! and what is wrong, e.g.
//! `config/tollgate.toml: rules.auth.limit: tier "premium" is not covered`.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    rules::{Algorithm, Kind, Policy, Quota, Quotas, Rule, Tier, Tiers},
    store::redis::RedisOptions,
};

/// The environment variable prefix: `TOLLGATE_STORE__URL` overrides `store.url`.
pub const ENV_PREFIX: &str = "TOLLGATE";

/// A config that failed to load, naming where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The file (or other origin) the config came from.
    pub origin: String,
    /// The dotted key at fault, empty when the whole file is.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.problem)
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.problem)
        }
    }
}

/// A loaded and validated config.
#[derive(Debug, Clone)]
pub struct Config {
    /// How the process runs.
    pub settings: Settings,
    /// What it enforces.
    pub policy: Policy,
}

/// Process settings: where to listen, which store, how to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The gRPC listen address.
    pub listen: SocketAddr,
    /// Where counters live.
    pub store: StoreSettings,
    /// How to log.
    pub log: LogSettings,
}

/// Which store to use and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The backend, from `store.url`.
    pub backend: Backend,
    /// Every Redis key starts with this.
    pub key_prefix: String,
    /// Every store call is bounded by this.
    pub timeout: Duration,
    /// Redis connections in the pool.
    pub pool_size: u32,
}

impl StoreSettings {
    /// Redis connection options, or `None` for the memory store.
    pub fn redis_options(&self) -> Option<RedisOptions> {
        match &self.backend {
            Backend::Memory => None,
            Backend::Redis(url) => Some(RedisOptions {
                url: url.expose().to_owned(),
                key_prefix: self.key_prefix.clone(),
                timeout: self.timeout,
                pool_size: self.pool_size,
            }),
        }
    }
}

/// The store backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Embedded, in-process: `memory://`.
    Memory,
    /// A Redis server: `redis://` or `rediss://`.
    Redis(SecretUrl),
}

/// A URL that may hold a password: `Debug` and `Display` mask it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", mask_url_password(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_url_password(&self.0))
    }
}

/// How to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    /// A `tracing` filter such as `info` or `tollgate=debug`; `RUST_LOG`
    /// overrides it.
    pub level: String,
    /// Human-readable lines or JSON objects.
    pub format: LogFormat,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Values from the command line, which win over the file and environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--store`.
    pub store_url: Option<String>,
}

/// Loads `path`, applies `TOLLGATE_*` environment variables and then
/// `overrides`, and validates the result.
pub fn load_file(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        origin: origin.clone(),
        key: String::new(),
        problem: format!("cannot read the file: {err}"),
    })?;
    let builder = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
    let builder = apply_overrides(builder, overrides)
        .map_err(|err| from_config_crate(&origin, err))?;
    build(builder, &origin)
}

/// Loads a config from TOML text alone (no environment), as tests and
/// embedders do. `origin` names it in errors.
pub fn load_str(toml: &str, origin: &str) -> Result<Config, ConfigError> {
    let builder = config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml));
    build(builder, origin)
}

/// The default config file, relative to the working directory.
pub fn default_path() -> PathBuf {
    PathBuf::from("config/tollgate.toml")
}

fn apply_overrides(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    overrides: &Overrides,
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    builder
        .set_override_option("server.listen", overrides.listen.clone())?
        .set_override_option("store.url", overrides.store_url.clone())
}

fn build(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    origin: &str,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = builder
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|err| from_config_crate(origin, err))?;
    let at = |key: &str, problem: String| ConfigError {
        origin: origin.to_owned(),
        key: key.to_owned(),
        problem,
    };
    raw.validate(&at)
}

/// Turns the config crate's error into ours, pulling out the key it names.
fn from_config_crate(origin: &str, err: config::ConfigError) -> ConfigError {
    let message = err.to_string();
    // The config crate says `... for key `a.b` in <origin>`; keep the key and
    // drop its own origin (it has none for text sources).
    if let Some(start) = message.find(" for key `") {
        let rest = &message[start + " for key `".len()..];
        if let Some(end) = rest.find('`') {
            return ConfigError {
                origin: origin.to_owned(),
                key: rest[..end].to_owned(),
                problem: message[..start].to_owned(),
            };
        }
    }
    ConfigError {
        origin: origin.to_owned(),
        key: String::new(),
        problem: message,
    }
}

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

// ---- The file's shape, as serde reads it -------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".to_owned(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStore {
    url: String,
    key_prefix: String,
    timeout: String,
    pool_size: u32,
}

impl Default for RawStore {
    fn default() -> Self {
        Self {
            url: "memory://".to_owned(),
            key_prefix: "tollgate:".to_owned(),
            timeout: "250ms".to_owned(),
            pool_size: 8,
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

type At<'a> = &'a dyn Fn(&str, String) -> ConfigError;

impl RawConfig {
    fn validate(self, at: At<'_>) -> Result<Config, ConfigError> {
        let settings = Settings {
            listen: self.server.validate(at)?,
            store: self.store.validate(at)?,
            log: self.log.validate(at)?,
        };
        let tiers = self.tiers.validate(at)?;
        let mut rules = BTreeMap::new();
        for (name, raw) in self.rules {
            let rule = raw.validate(&name, &tiers, at)?;
            rules.insert(name, rule);
        }
        let quotas = self.quotas.validate(&tiers, at)?;
        Ok(Config {
            settings,
            policy: Policy {
                tiers,
                rules,
                quotas,
            },
        })
    }
}

impl RawServer {
    fn validate(self, at: At<'_>) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            at(
                "server.listen",
                format!("{:?} is not an address such as 127.0.0.1:50051", self.listen),
            )
        })
    }
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
        Ok(StoreSettings {
            backend,
            key_prefix: self.key_prefix,
            timeout,
            pool_size: self.pool_size,
        })
    }
}

fn parse_store_url(url: &str) -> Result<Backend, String> {
    if url == "memory://" {
        return Ok(Backend::Memory);
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
                        format!(
                            "{name:?} is not in tiers.names ({})",
                            self.names.join(", ")
                        ),
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
            RawLimit::PerTier(table) => per_tier(&table, tiers, |&n| Ok(n))
                .map_err(|p| at(&key("limit"), p))?,
            RawLimit::Other(value) => {
                return Err(at(
                    &key("limit"),
                    format!(
                        "expected a whole number or a table of tier = number, got {value}"
                    ),
                ));
            }
        };
        Ok(Rule {
            name: name.to_owned(),
            window,
            limits,
            block_for,
            algorithm,
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
                            "expected a whole number, \"unlimited\" or a table of tier = either, got {value}"
                        ),
                    ));
                }
            };
            kinds.push(Kind { name, quotas });
        }
        Ok(Quotas { period, kinds })
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn secret_url_never_prints_the_password() {
        let url = SecretUrl("redis://:hunter2@h:1/0".to_owned());
        assert!(!format!("{url} {url:?}").contains("hunter2"));
    }
}
