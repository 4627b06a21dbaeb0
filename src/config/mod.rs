//! The TOML config file, environment overrides and command-line overrides,
//! read once and validated in full into two values with different lives:
//! process [`Settings`] (where to listen, which store) and the limiting
//! [`Policy`] (tiers, rules, quotas).
//!
//! Every problem is reported as one [`ConfigError`] naming the file, the key
//! and what is wrong, e.g.
//! `config/tollgate.toml: rules.auth.limit: tier "premium" is not covered`,
//! and, when the value came from a `TOLLGATE_*` variable or a flag rather
//! than the file, which one.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    rules::Policy,
    stats::StatsSettings,
    store::{
        breaker::BreakerOptions,
        memory::MemoryOptions,
        redis::{RedisOptions, RedisTls, mask_url_password},
    },
};

mod raw;

use raw::RawConfig;

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
    /// The environment variable or command-line flag that set the key, when
    /// the value did not come from the file: the operator looks there.
    pub set_by: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.problem)?;
        } else {
            write!(f, "{}: {}: {}", self.origin, self.key, self.problem)?;
        }
        match &self.set_by {
            Some(source) => write!(f, " (set by {source})"),
            None => Ok(()),
        }
    }
}

/// The keys whose values come from somewhere other than the file, and from
/// where: `store.url` -> `TOLLGATE_STORE__URL` or `--store`.
type ValueSources = BTreeMap<String, String>;

/// What set `key`: the source of the key itself or of a table holding it
/// (`TOLLGATE_RULES__API__LIMIT` for `rules.api.limit.premium`).
fn set_by(sources: &ValueSources, key: &str) -> Option<String> {
    sources
        .iter()
        .filter(|(set, _)| {
            key.strip_prefix(set.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
        .max_by_key(|(set, _)| set.len())
        .map(|(_, source)| source.clone())
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
    /// Where Prometheus scrapes `/metrics`; `None` serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the admin door (`tollgate.v1.Admin`) listens; `None` (the
    /// default) serves none.
    pub admin_listen: Option<SocketAddr>,
    /// Threads that serve requests (`server.worker_threads`); `None`: one
    /// per CPU core.
    pub worker_threads: Option<usize>,
    /// TLS for the gRPC listener, from `[server.tls]`; `None` serves
    /// plaintext.
    pub tls: Option<ServerTls>,
    /// Where counters live.
    pub store: StoreSettings,
    /// How to log.
    pub log: LogSettings,
    /// `[stats]`: usage statistics.
    pub stats: StatsSettings,
}

/// `[server.tls]`: PEM files, every one checked readable when the config
/// loads. Relative paths are relative to the working directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The certificate's private key.
    pub key: PathBuf,
    /// When set, mutual TLS: a client must present a certificate this CA
    /// signed, or the handshake is refused.
    pub client_ca: Option<PathBuf>,
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
    /// `store.max_batch`: the most decisions sent to Redis in one script
    /// call when several wait for a connection; 1: no batching.
    pub max_batch: u32,
    /// When to stop waiting on a failing store, and for how long.
    pub breaker: BreakerOptions,
    /// PEM CA certificates that a `rediss://` server's certificate must
    /// chain to, instead of the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// The client certificate and key tollgate presents to a `rediss://`
    /// server that asks for one (`tls-auth-clients yes`).
    pub tls_client: Option<ClientCertFiles>,
    /// `store.max_entries`: the most counters and conversations the memory
    /// store holds before it evicts the least recently used.
    pub max_entries: usize,
}

/// A PEM certificate and its private key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    /// `store.tls_cert`: the certificate (chain).
    pub cert: PathBuf,
    /// `store.tls_key`: its private key. Only the path is kept; the key is
    /// read when the connection is made.
    pub key: PathBuf,
}

impl StoreSettings {
    /// The PEM files `store.tls_ca`, `store.tls_cert` and `store.tls_key`
    /// name, read (at every start; they were checked when the config
    /// loaded). An error names the key.
    pub fn redis_tls(&self) -> Result<RedisTls, String> {
        let read = |key: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|err| format!("{key}: cannot read {}: {err}", path.display()))
        };
        let ca = match &self.tls_ca {
            None => None,
            Some(path) => Some(read("store.tls_ca", path)?),
        };
        let client = match &self.tls_client {
            None => None,
            Some(files) => Some((
                read("store.tls_cert", &files.cert)?,
                read("store.tls_key", &files.key)?,
            )),
        };
        Ok(RedisTls { ca, client })
    }

    /// How the memory store bounds itself.
    pub fn memory_options(&self) -> MemoryOptions {
        MemoryOptions {
            max_entries: self.max_entries,
        }
    }

    /// Redis connection options, or `None` for the memory store.
    pub fn redis_options(&self) -> Option<RedisOptions> {
        match &self.backend {
            Backend::Memory => None,
            Backend::Redis(url) | Backend::RedisCluster(url) => Some(RedisOptions {
                url: url.expose().to_owned(),
                key_prefix: self.key_prefix.clone(),
                timeout: self.timeout,
                pool_size: self.pool_size,
                max_batch: self.max_batch,
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
    /// A Redis Cluster: `redis-cluster://host1:port1,host2:port2,...` or
    /// `rediss-cluster://...`, every seed node already checked.
    RedisCluster(SecretUrl),
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
        set_by: None,
    })?;
    let variables = override_variables(std::env::vars());
    let sources = value_sources(&variables, overrides);
    let builder = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(variables)),
        );
    let builder = apply_overrides(builder, overrides)
        .map_err(|err| from_config_crate(&origin, &sources, err))?;
    build(builder, &origin, &sources)
}

/// Which keys `variables` and `overrides` set; a flag beats a variable, as
/// it does when the values are merged.
fn value_sources(variables: &config::Map<String, String>, overrides: &Overrides) -> ValueSources {
    let prefix = format!("{ENV_PREFIX}_");
    let mut sources: ValueSources = variables
        .keys()
        .filter_map(|name| {
            let key = name
                .strip_prefix(&prefix)?
                .to_lowercase()
                .replace("__", ".");
            Some((key, name.clone()))
        })
        .collect();
    for (key, flag, value) in [
        ("server.listen", "--listen", &overrides.listen),
        ("store.url", "--store", &overrides.store_url),
    ] {
        if value.is_some() {
            sources.insert(key.to_owned(), flag.to_owned());
        }
    }
    sources
}

/// The `TOLLGATE_<SECTION>__<KEY>` variables among `vars`. Others that merely
/// start with `TOLLGATE_` are left alone: Kubernetes, for one, sets
/// `TOLLGATE_PORT` and `TOLLGATE_SERVICE_HOST` for a service called tollgate,
/// and those must not stop start-up as unknown keys.
fn override_variables(vars: impl Iterator<Item = (String, String)>) -> config::Map<String, String> {
    let prefix = format!("{ENV_PREFIX}_");
    vars.filter(|(name, _)| {
        name.strip_prefix(&prefix)
            .is_some_and(|rest| rest.contains("__"))
    })
    .collect()
}

/// Loads a config from TOML text alone (no environment), as tests and
/// embedders do. `origin` names it in errors.
pub fn load_str(toml: &str, origin: &str) -> Result<Config, ConfigError> {
    let builder = config::Config::builder()
        .add_source(config::File::from_str(toml, config::FileFormat::Toml));
    build(builder, origin, &ValueSources::new())
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
    sources: &ValueSources,
) -> Result<Config, ConfigError> {
    let raw: RawConfig = builder
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|err| from_config_crate(origin, sources, err))?;
    let at = |key: &str, problem: String| ConfigError {
        origin: origin.to_owned(),
        key: key.to_owned(),
        problem,
        set_by: set_by(sources, key),
    };
    raw.validate(&at)
}

/// Turns the config crate's error into ours, naming the key at fault:
/// the missing or unknown key itself, not its parent table.
fn from_config_crate(
    origin: &str,
    sources: &ValueSources,
    err: config::ConfigError,
) -> ConfigError {
    use config::ConfigError as E;
    let at = |key: String, problem: String| ConfigError {
        origin: origin.to_owned(),
        set_by: set_by(sources, &key),
        key,
        problem,
    };
    // `At` carries the table the inner error happened in.
    let (parent, err) = match err {
        E::At { error, key, .. } => (key.unwrap_or_default(), *error),
        other => (String::new(), other),
    };
    let join = |child: &str| match (parent.as_str(), child) {
        ("", child) => child.to_owned(),
        (parent, "") => parent.to_owned(),
        (parent, child) => format!("{parent}.{child}"),
    };
    match err {
        E::NotFound(key) => at(join(&key), "required but missing".to_owned()),
        E::Type {
            origin: from,
            unexpected,
            expected,
            key,
        } => {
            // Values from a file read as text have no origin; the
            // environment's do ("the environment"), but `set_by` names
            // the very variable.
            let key = join(key.as_deref().unwrap_or_default());
            let from = match from {
                Some(from) if set_by(sources, &key).is_none() => format!(" (from {from})"),
                _ => String::new(),
            };
            at(key, format!("expected {expected}, got {unexpected}{from}"))
        }
        // serde's wording for `deny_unknown_fields`.
        E::Message(message) => match message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once("`, "))
        {
            Some((field, expected)) => at(join(field), format!("unknown key; {expected}")),
            // serde names our private `Raw*` structs; the operator sees tables.
            None => match message.split_once(", expected struct ") {
                Some((got, _)) => at(parent, format!("{got}, expected a table")),
                None => at(parent, message),
            },
        },
        E::FileParse { cause, .. } => at(parent, one_line(&cause.to_string())),
        other => at(parent, other.to_string()),
    }
}

/// The TOML parser's message is a multi-line source snippet; keep its first
/// line (where) and the lines that say what, so the error stays one line.
fn one_line(message: &str) -> String {
    let is_snippet = |line: &str| {
        line.trim_start()
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|')
    };
    let mut lines = message.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    let what: Vec<&str> = lines.filter(|l| !is_snippet(l)).collect();
    if what.is_empty() {
        first.to_owned()
    } else {
        format!("{first}: {}", what.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_set_by_its_own_source_or_its_table_s_and_a_flag_beats_a_variable() {
        let variables: config::Map<String, String> = [
            ("TOLLGATE_RULES__API__LIMIT", "5"),
            ("TOLLGATE_STORE__URL", "redis://h:1/0"),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
        let overrides = Overrides {
            listen: None,
            store_url: Some("memory://".to_owned()),
        };
        let sources = value_sources(&variables, &overrides);
        let by = |key: &str| set_by(&sources, key);
        assert_eq!(
            by("rules.api.limit").as_deref(),
            Some("TOLLGATE_RULES__API__LIMIT")
        );
        assert_eq!(
            by("rules.api.limit.premium").as_deref(),
            Some("TOLLGATE_RULES__API__LIMIT")
        );
        assert_eq!(
            by("rules.api"),
            None,
            "a table is not blamed on one key in it"
        );
        assert_eq!(by("rules.api.limitless"), None, "whole key segments only");
        assert_eq!(by("store.url").as_deref(), Some("--store"));
        assert_eq!(by("server.listen"), None);
    }

    #[test]
    fn only_section_key_variables_override() {
        let vars = [
            ("TOLLGATE_STORE__URL", "redis://h:1/0"),
            ("TOLLGATE_PORT", "tcp://10.0.0.1:50051"),
            ("TOLLGATE_SERVICE_HOST", "10.0.0.1"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let kept = override_variables(vars.into_iter());
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["TOLLGATE_STORE__URL"]);
    }

    #[test]
    fn cluster_urls_select_the_cluster_backend() {
        let toml = |url: &str| {
            format!(
                "[store]\nurl = {url:?}\n[tiers]\nnames = [\"free\"]\n[quotas]\nperiod = \"1h\"\n"
            )
        };
        let url = "redis-cluster://:hunter2@h1:7000,h2:7001";
        let config = load_str(&toml(url), "t").expect("a valid cluster URL");
        assert!(matches!(
            config.settings.store.backend,
            Backend::RedisCluster(_)
        ));
        let options = config
            .settings
            .store
            .redis_options()
            .expect("a Redis store");
        assert_eq!(options.url, url);
        assert!(!format!("{config:?}").contains("hunter2"));

        let err = load_str(&toml("redis-cluster://:hunter2@h1:7000,h2:x"), "t")
            .expect_err("a node without a valid port");
        assert_eq!(err.key, "store.url");
        assert!(err.problem.contains("node 2 (\"h2:x\")"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn secret_url_never_prints_the_password() {
        let url = SecretUrl("redis://:hunter2@h:1/0".to_owned());
        assert!(!format!("{url} {url:?}").contains("hunter2"));
    }
}
