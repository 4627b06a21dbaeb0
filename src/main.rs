//! The `tollgate` binary: `serve`, `check-config`, `health`, `stats` and `admin`.
//!
//! Thin on purpose: it parses flags, loads the config, sets up logging,
//! builds the store and hands a bound listener to [`tollgate::server::run`].

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
};

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tollgate::{
    config::{self, Config, Overrides},
    limiter::Limiter,
    metrics::{self, Metrics},
    reload, server,
    store::{
        Store, breaker::CircuitBreaker, deny_cache::DenyCache, memory::MemoryStore,
        redis::RedisStore,
    },
    telemetry,
};

/// Every request allocates (HTTP/2 frames, protobuf strings, Redis
/// commands and replies); mimalloc does that for about half of glibc's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Rate limits and usage quotas over gRPC.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the gRPC API until SIGINT or SIGTERM.
    Serve {
        /// The config file.
        #[arg(long, default_value_os_t = config::default_path())]
        config: PathBuf,
        /// Listen address, overriding `server.listen`.
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Store URL (`memory://`, `redis://host:6379/0`), overriding `store.url`.
        #[arg(long, value_name = "URL")]
        store: Option<String>,
    },
    /// Validate a config file and print the rules and quotas it sets.
    CheckConfig {
        /// The config file.
        file: PathBuf,
    },
    /// Ask a running tollgate whether it is SERVING (exit 0) or not (exit 1),
    /// through the gRPC health service; for container health checks.
    ///
    /// Over TLS when the address is `https://` or `--ca` is given: the server's
    /// certificate must chain to `--ca` (else to the system's roots). For
    /// mutual TLS, `--cert` and `--key` are the client's certificate and key.
    Health {
        /// The server's address. By default, where `serve` listens by
        /// `TOLLGATE_SERVER__LISTEN` (on loopback when that is 0.0.0.0 or
        /// [::]), else http://127.0.0.1:50051.
        #[arg(long)]
        addr: Option<String>,
        /// Give up after this long (humantime).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        #[command(flatten)]
        tls: HealthTls,
    },
    /// Print a running tollgate's usage statistics: the last 24 hours and
    /// the last 7 days, per message kind.
    Stats {
        /// The server's address. By default the config's `server.listen`
        /// (on loopback when that is 0.0.0.0 or [::]).
        #[arg(long)]
        addr: Option<String>,
        /// The config file whose `server.listen` is the default address.
        #[arg(long, default_value_os_t = config::default_path())]
        config: PathBuf,
        /// Only this character's figures.
        #[arg(long)]
        character: Option<String>,
        /// Give up after this long (humantime).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Look at a rate-limit counter, or reset one or a user's usage
    /// counters, through a running tollgate's admin door
    /// (`server.admin_listen`).
    Admin {
        #[command(subcommand)]
        call: AdminCall,
        #[command(flatten)]
        target: AdminTarget,
    },
}

/// One call of the admin door.
#[derive(Debug, Subcommand)]
enum AdminCall {
    /// A subject's counter of a rule as it stands; counts nothing.
    Inspect {
        /// The rule.
        #[arg(long)]
        rule: String,
        /// Whose counter.
        #[arg(long)]
        subject: String,
        /// The tier whose limit to show; the default tier if left out.
        #[arg(long, default_value = "")]
        tier: String,
    },
    /// Clear a subject's window of a rule and any block, on every instance.
    ResetLimit {
        /// The rule.
        #[arg(long)]
        rule: String,
        /// Whose counter.
        #[arg(long)]
        subject: String,
    },
    /// Clear one conversation's usage counters, or every conversation's of
    /// the user when `--character` is left out.
    ResetUsage {
        /// The user.
        #[arg(long = "user")]
        user_id: String,
        /// The character of the one conversation to clear.
        #[arg(long = "character")]
        character_id: Option<String>,
    },
}

/// Where `tollgate admin` dials, and how.
#[derive(Debug, clap::Args)]
struct AdminTarget {
    /// The admin door's address. By default, `server.admin_listen` of
    /// `--config` (on loopback when it is 0.0.0.0 or [::]), over TLS when
    /// the config sets `[server.tls]`.
    #[arg(long, global = true)]
    addr: Option<String>,
    /// The config file whose `server.admin_listen` is the default address.
    #[arg(long, global = true, default_value_os_t = config::default_path())]
    config: PathBuf,
    /// Give up after this long (humantime).
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
    /// PEM CA certificate the server's certificate must chain to; implies TLS.
    #[arg(long, global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// The name to verify the server's certificate against, when it is not
    /// the address's host.
    #[arg(long, global = true, value_name = "NAME")]
    domain: Option<String>,
}

/// `tollgate health` over TLS. Each flag can come from the environment
/// instead, so that a container's fixed HEALTHCHECK works once TLS is on.
#[derive(Debug, clap::Args)]
struct HealthTls {
    /// PEM CA certificate the server's certificate must chain to; implies TLS.
    #[arg(long, value_name = "FILE", env = "TOLLGATE_HEALTH_CA")]
    ca: Option<PathBuf>,
    /// PEM client certificate, for a server that requires mutual TLS.
    #[arg(
        long,
        value_name = "FILE",
        requires = "key",
        env = "TOLLGATE_HEALTH_CERT"
    )]
    cert: Option<PathBuf>,
    /// PEM private key of `--cert`.
    #[arg(
        long,
        value_name = "FILE",
        requires = "cert",
        env = "TOLLGATE_HEALTH_KEY"
    )]
    key: Option<PathBuf>,
    /// The name to verify the server's certificate against, when it is not
    /// the address's host (e.g. checking 127.0.0.1 with a certificate for
    /// tollgate.example.com).
    #[arg(long, value_name = "NAME", env = "TOLLGATE_HEALTH_DOMAIN")]
    domain: Option<String>,
}

impl HealthTls {
    /// The TLS config `tollgate health` connects with, if any, and the
    /// address with `https://` when TLS is on.
    fn apply(
        &self,
        addr: &str,
    ) -> Result<(String, Option<tonic::transport::ClientTlsConfig>), String> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let https = addr.starts_with("https://");
        if !https && self.ca.is_none() && self.cert.is_none() {
            return Ok((addr.to_owned(), None));
        }
        let read = |flag: &str, path: &PathBuf| {
            std::fs::read(path)
                .map_err(|err| format!("{flag}: cannot read {}: {err}", path.display()))
        };
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(read("--ca", ca)?)),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            tls = tls.identity(Identity::from_pem(
                read("--cert", cert)?,
                read("--key", key)?,
            ));
        }
        if let Some(domain) = &self.domain {
            tls = tls.domain_name(domain.clone());
        }
        let addr = match addr.strip_prefix("http://") {
            Some(rest) => format!("https://{rest}"),
            None => addr.to_owned(),
        };
        Ok((addr, Some(tls)))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, overrides) = match cli.command {
        Command::Admin { call, target } => return admin(&call, &target),
        Command::CheckConfig { file } => {
            return match config::load_file(&file, &Overrides::default()) {
                Ok(config) => {
                    println!("{}: OK\n", file.display());
                    print!("{}", config.policy.summary());
                    ExitCode::SUCCESS
                }
                Err(err) => fail(&err),
            };
        }
        Command::Health { addr, timeout, tls } => {
            let addr = match addr {
                Some(addr) => addr,
                None => match default_health_addr(std::env::var(LISTEN_VARIABLE).ok().as_deref()) {
                    Ok(addr) => addr,
                    Err(message) => return fail(&message),
                },
            };
            return health(&addr, timeout, &tls);
        }
        Command::Stats {
            addr,
            config,
            character,
            timeout,
        } => {
            let addr = match addr {
                Some(addr) => addr,
                None => match config::load_file(&config, &Overrides::default()) {
                    Ok(loaded) => loopback_url(loaded.settings.listen),
                    Err(err) => return fail(&err),
                },
            };
            return stats(&addr, character.as_deref().unwrap_or_default(), timeout);
        }
        Command::Serve {
            config,
            listen,
            store,
        } => (
            config,
            Overrides {
                listen,
                store_url: store,
            },
        ),
    };
    let config = match config::load_file(&path, &overrides) {
        Ok(config) => config,
        Err(err) => return fail(&err),
    };
    telemetry::init(&config.settings.log);
    // One worker thread is one thread: the current-thread scheduler, whose
    // queue needs no atomics or stealing, rather than a work-stealing pool
    // of one worker beside the main thread.
    let mut runtime = match config.settings.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.worker_threads(threads);
            runtime
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let watch = reload::Watch {
        path,
        overrides,
        settings: config.settings.clone(),
        // Set once the TLS files are loaded, just before serving.
        tls: None,
    };
    match runtime.block_on(serve(config, watch)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

async fn serve(config: Config, watch: reload::Watch) -> Result<(), String> {
    let settings = &config.settings;
    let policy = Arc::new(config.policy);
    let metrics = Arc::new(Metrics::new());
    match settings.store.redis_options() {
        None => {
            let options = settings.store.memory_options();
            tracing::info!(
                max_entries = options.max_entries,
                "store: memory:// (embedded, this instance only)"
            );
            let store = MemoryStore::with_options(options, metrics.store_evictions());
            // Surely-denied subjects are answered without the store.
            serve_with(DenyCache::new(store), policy, watch, metrics).await
        }
        Some(options) => {
            tracing::info!(url = ?options, "store: redis");
            let tls = settings.store.redis_tls()?;
            let store = RedisStore::connect_with_tls(&options, &tls)
                .await
                .map_err(|err| format!("cannot use the store: {err}"))?;
            store.observe_batches(metrics.store_batch_sizes());
            let store = CircuitBreaker::new(store, settings.store.breaker);
            // In front of the breaker: a cached denial needs neither.
            serve_with(DenyCache::new(store), policy, watch, metrics).await
        }
    }
}

async fn serve_with<S: Store>(
    store: S,
    policy: Arc<tollgate::rules::Policy>,
    watch: reload::Watch,
    metrics: Arc<Metrics>,
) -> Result<(), String> {
    let settings = &watch.settings;
    let options = server::ServeOptions::from_settings(settings).map_err(|err| err.to_string())?;
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", settings.listen))?;
    tracing::info!(
        address = %settings.listen,
        tls = options.tls.is_some(),
        mutual_tls = settings.tls.as_ref().is_some_and(|tls| tls.client_ca.is_some()),
        "tollgate listening"
    );
    let admin = match settings.admin_listen {
        None => None,
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|err| format!("cannot listen for the admin door on {address}: {err}"))?;
            tracing::info!(
                %address,
                tls = options.tls.is_some(),
                "admin door (tollgate.v1.Admin) listening"
            );
            Some(listener)
        }
    };
    let limiter = Arc::new(
        Limiter::new(store, policy)
            .with_metrics(metrics)
            .with_stats(settings.stats),
    );
    let metrics = match settings.metrics_listen {
        None => None,
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .map_err(|err| format!("cannot listen for metrics on {address}: {err}"))?;
            tracing::info!(%address, "metrics at http://{address}/metrics");
            Some(tokio::spawn(metrics::serve(
                limiter.metrics().clone(),
                listener,
                std::future::pending(),
            )))
        }
    };
    let watch = reload::Watch {
        tls: options.tls.clone(),
        ..watch
    };
    let reloader = tokio::spawn(reload::run(limiter.clone(), watch));
    let served = serve_until_shutdown(limiter.clone(), listener, admin, options).await;
    // The statistics of the last interval, once more: the server may have
    // been dropped before its own last flush, once no request was in flight.
    if let Err(err) = limiter.flush_stats().await {
        tracing::warn!(error = %err, "cannot flush statistics at shutdown; the last interval is lost");
    }
    reloader.abort();
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    served.map_err(|err| err.to_string())?;
    tracing::info!("tollgate stopped");
    Ok(())
}

/// The variable that sets `server.listen` for `serve`.
const LISTEN_VARIABLE: &str = "TOLLGATE_SERVER__LISTEN";

/// Where `tollgate health` dials without `--addr`: where `serve` listens
/// when `listen` (the value of [`LISTEN_VARIABLE`]) is set, else at
/// `server.listen`'s default. A health check runs beside the server (a
/// container's HEALTHCHECK runs inside the container), so an address that
/// means every interface, 0.0.0.0 or [::], is dialled on loopback; without
/// this, a container told to listen on another port was reported unhealthy.
fn default_health_addr(listen: Option<&str>) -> Result<String, String> {
    let Some(listen) = listen else {
        return Ok("http://127.0.0.1:50051".to_owned());
    };
    let addr: SocketAddr = listen.parse().map_err(|_| {
        format!("{LISTEN_VARIABLE}: {listen:?} is not an address such as 0.0.0.0:50051")
    })?;
    Ok(loopback_url(addr))
}

/// `http://addr`, dialled on loopback when `addr` means every interface.
fn loopback_url(mut addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        let loopback: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        addr.set_ip(loopback);
    }
    format!("http://{addr}")
}

/// `tollgate stats`: two GetStats calls, printed as tables.
fn stats(addr: &str, character_id: &str, timeout: std::time::Duration) -> ExitCode {
    use tollgate::proto::{GetStatsRequest, Granularity, usage_stats_client::UsageStatsClient};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let read = async {
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .map_err(|err| format!("{addr:?} is not a valid address: {err}"))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
        let mut client = UsageStatsClient::new(channel);
        let mut tables = String::new();
        for (granularity, buckets, title, format) in [
            (
                Granularity::Hour,
                24,
                "Last 24 hours (UTC)",
                "%Y-%m-%d %H:00",
            ),
            (Granularity::Day, 7, "Last 7 days (UTC)", "%Y-%m-%d"),
        ] {
            let response = client
                .get_stats(GetStatsRequest {
                    granularity: granularity.into(),
                    buckets,
                    character_id: character_id.to_owned(),
                    top_characters: 0,
                })
                .await
                .map_err(|status| format!("GetStats failed: {}", status.message()))?
                .into_inner();
            tables.push_str(&stats_table(title, format, &response));
            tables.push('\n');
        }
        Ok::<_, String>(tables)
    };
    match runtime.block_on(async { tokio::time::timeout(timeout, read).await }) {
        Ok(Ok(tables)) => {
            print!("{tables}");
            ExitCode::SUCCESS
        }
        Ok(Err(message)) => fail(&message),
        Err(_) => fail(&format!("no answer from {addr} within {timeout:?}")),
    }
}

/// One table: a row per bucket, a column per kind's messages and denials,
/// and the active users.
fn stats_table(title: &str, format: &str, response: &tollgate::proto::GetStatsResponse) -> String {
    use std::fmt::Write as _;
    let mut kinds: Vec<&String> = response
        .buckets
        .iter()
        .flat_map(|bucket| bucket.messages.keys())
        .collect();
    kinds.sort();
    kinds.dedup();
    let mut out = format!("{title}\n{:<17}", "start");
    for kind in &kinds {
        let _ = write!(
            out,
            " {:>12} {:>12}",
            format!("{kind}"),
            format!("{kind} denied")
        );
    }
    let _ = writeln!(out, " {:>12}", "active users");
    for bucket in &response.buckets {
        let start = bucket.start.map_or(0, |start| start.seconds);
        let _ = write!(out, "{:<17}", utc(start, format));
        for kind in &kinds {
            let messages = bucket.messages.get(*kind).copied().unwrap_or(0);
            let denied = bucket.quota_denials.get(*kind).copied().unwrap_or(0);
            let _ = write!(out, " {messages:>12} {denied:>12}");
        }
        let _ = writeln!(out, " {:>12}", bucket.active_users);
    }
    out
}

/// `unix` as a UTC date (`%Y-%m-%d`), with the hour when `format` has one.
fn utc(unix: i64, format: &str) -> String {
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let days = unix.div_euclid(86_400);
    let hour = unix.rem_euclid(86_400) / 3600;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if format.contains("%H") {
        format!("{year:04}-{month:02}-{day:02} {hour:02}:00")
    } else {
        format!("{year:04}-{month:02}-{day:02}")
    }
}

fn health(addr: &str, timeout: std::time::Duration, tls: &HealthTls) -> ExitCode {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let (addr, tls) = match tls.apply(addr) {
        Ok(applied) => applied,
        Err(message) => return fail(&message),
    };
    let addr = addr.as_str();
    let check = async {
        let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .map_err(|err| format!("{addr:?} is not a valid address: {err}"))?;
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|err| format!("TLS for {addr}: {err}"))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
        let response = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .map_err(|status| format!("health check failed: {}", status.message()))?;
        Ok::<_, String>(response.into_inner().status())
    };
    match runtime.block_on(async { tokio::time::timeout(timeout, check).await }) {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => fail(&status.as_str_name()),
        Ok(Err(message)) => fail(&message),
        Err(_) => fail(&format!("no answer from {addr} within {timeout:?}")),
    }
}

/// `tollgate admin ...`: one call of the admin door, its answer printed.
fn admin(call: &AdminCall, target: &AdminTarget) -> ExitCode {
    let addr = match &target.addr {
        Some(addr) if addr.contains("://") => addr.clone(),
        Some(addr) => format!("http://{addr}"),
        None => match default_admin_addr(&target.config) {
            Ok(addr) => addr,
            Err(message) => return fail(&message),
        },
    };
    let tls = HealthTls {
        ca: target.ca.clone(),
        cert: target.cert.clone(),
        key: target.key.clone(),
        domain: target.domain.clone(),
    };
    let (addr, tls) = match tls.apply(&addr) {
        Ok(applied) => applied,
        Err(message) => return fail(&message),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let timeout = target.timeout;
    let answered = runtime.block_on(async {
        tokio::time::timeout(timeout, admin_call(&addr, tls, call))
            .await
            .unwrap_or_else(|_| Err(format!("no answer from {addr} within {timeout:?}")))
    });
    match answered {
        Ok(answer) => {
            print!("{answer}");
            ExitCode::SUCCESS
        }
        Err(message) => fail(&message),
    }
}

/// Where `tollgate admin` dials without `--addr`: `server.admin_listen` of
/// the config file (and its environment), on loopback when it means every
/// interface, over TLS when the server serves TLS.
fn default_admin_addr(path: &std::path::Path) -> Result<String, String> {
    let config = config::load_file(path, &Overrides::default()).map_err(|err| {
        format!(
            "no --addr given, and the config that would name the admin door does not load: {err}"
        )
    })?;
    let Some(mut addr) = config.settings.admin_listen else {
        return Err(format!(
            "no --addr given, and {} sets no server.admin_listen: the admin door is off",
            path.display()
        ));
    };
    if addr.ip().is_unspecified() {
        let loopback: IpAddr = match addr {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        addr.set_ip(loopback);
    }
    let scheme = if config.settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    Ok(format!("{scheme}://{addr}"))
}

async fn admin_call(
    addr: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    call: &AdminCall,
) -> Result<String, String> {
    use tollgate::proto::{
        InspectLimitRequest, ResetLimitRequest, ResetUsageRequest, admin_client::AdminClient,
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
        .map_err(|err| format!("{addr:?} is not a valid address: {err}"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|err| format!("TLS for {addr}: {err}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| format!("cannot connect to {addr}: {err}"))?;
    let mut client = AdminClient::new(channel);
    let refused = |status: tonic::Status| format!("{:?}: {}", status.code(), status.message());
    let duration = |d: Option<prost_types::Duration>| {
        let d = d.unwrap_or_default();
        let d = std::time::Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        );
        // Whole milliseconds read better than humantime's nanoseconds.
        humantime::format_duration(std::time::Duration::from_millis(
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX),
        ))
        .to_string()
    };
    match call {
        AdminCall::Inspect {
            rule,
            subject,
            tier,
        } => {
            let answer = client
                .inspect_limit(InspectLimitRequest {
                    rule: rule.clone(),
                    subject: subject.clone(),
                    tier: tier.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let tier = if tier.is_empty() { "default" } else { tier };
            let blocked = if answer.blocked {
                format!("yes, for {}", duration(answer.block_remaining))
            } else {
                "no".to_owned()
            };
            Ok(format!(
                "rule {rule}, subject {subject:?}, tier {tier}\n\
                 limit      {}\n\
                 used       {}\n\
                 remaining  {}\n\
                 blocked    {blocked}\n\
                 resets in  {}\n",
                answer.limit,
                answer.used,
                answer.remaining,
                duration(answer.reset_after),
            ))
        }
        AdminCall::ResetLimit { rule, subject } => {
            let answer = client
                .reset_limit(ResetLimitRequest {
                    rule: rule.clone(),
                    subject: subject.clone(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            Ok(if answer.existed {
                format!(
                    "reset rule {rule} for subject {subject:?}: its window and any block are cleared\n"
                )
            } else {
                format!(
                    "rule {rule} had nothing counted for subject {subject:?}: nothing to reset\n"
                )
            })
        }
        AdminCall::ResetUsage {
            user_id,
            character_id,
        } => {
            let answer = client
                .reset_usage(ResetUsageRequest {
                    user_id: user_id.clone(),
                    character_id: character_id.clone().unwrap_or_default(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            let which = match character_id {
                Some(character_id) => {
                    format!("conversation of user {user_id:?} with {character_id:?}")
                }
                None => format!("conversations of user {user_id:?}"),
            };
            Ok(format!(
                "reset the {which}: {} had live counters\n",
                answer.conversations
            ))
        }
    }
}

/// How long in-flight requests may take to finish once shutdown starts,
/// before tollgate exits anyway.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves until SIGINT or SIGTERM; then health turns NOT_SERVING, no new
/// connection or stream is accepted, and tollgate exits once the requests in
/// flight are answered (at most [`SHUTDOWN_GRACE`] later).
///
/// It waits for requests rather than connections: clients keep idle HTTP/2
/// connections open, and hyper's graceful shutdown can wait on those for as
/// long as they stay (hyperium/hyper#4170).
async fn serve_until_shutdown<S: Store>(
    limiter: Arc<Limiter<S>>,
    listener: TcpListener,
    admin: Option<TcpListener>,
    options: server::ServeOptions,
) -> Result<(), server::ServerError> {
    let (stopping, mut stop_seen) = tokio::sync::watch::channel(false);
    // The admin door stops taking calls with the server; its calls in
    // flight count among the requests drained below.
    let admin = admin.map(|listener| {
        let mut stop_seen = stop_seen.clone();
        let shutdown = async move {
            let _ = stop_seen.wait_for(|stopping| *stopping).await;
        };
        let served = server::run_admin(limiter.clone(), listener, shutdown, options.clone());
        tokio::spawn(async move {
            if let Err(err) = served.await {
                tracing::error!(error = %err, "the admin door stopped");
            }
        })
    });
    let _stop_admin = admin.map(|task| AbortOnDrop(task.abort_handle()));
    // Registered now, before anything is served.
    let signal = shutdown_signal();
    let shutdown = async move {
        signal.await;
        let _ = stopping.send(true);
    };
    let metrics = limiter.metrics().clone();
    let served = server::run_with(limiter, listener, shutdown, options);
    let drained = async move {
        let _ = stop_seen.wait_for(|stopping| *stopping).await;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        // A request that arrived just before the signal may not have
        // reached the limiter yet: give it a moment to be counted.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        while metrics.requests_in_flight() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        metrics.requests_in_flight()
    };
    tokio::select! {
        result = served => result,
        still_in_flight = drained => {
            if still_in_flight > 0 {
                tracing::warn!(still_in_flight, grace = ?SHUTDOWN_GRACE, "requests still in flight at the end of the grace period");
            }
            Ok(())
        }
    }
}

/// Aborts a task when dropped: the admin door ends with the server, however
/// the server ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are registered
/// when this is called, not when the future is first polled: until then
/// SIGTERM kills the process outright, and the server can answer requests
/// before it first polls its shutdown future (a test saw tollgate answer
/// CheckLimit and then die of the SIGTERM it sent).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let signals = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        match signals {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            (Err(err), _) | (_, Err(err)) => {
                tracing::warn!(%err, "cannot watch SIGINT and SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: finishing in-flight requests");
    }
}

fn fail(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {message}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::{default_health_addr, utc};

    #[test]
    fn bucket_starts_print_as_utc_dates() {
        assert_eq!(utc(0, "%Y-%m-%d"), "1970-01-01");
        assert_eq!(utc(1_796_043_600, "%Y-%m-%d %H:00"), "2026-11-30 13:00");
        assert_eq!(utc(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }

    #[test]
    fn health_dials_where_serve_listens_on_loopback() {
        assert_eq!(
            default_health_addr(None).as_deref(),
            Ok("http://127.0.0.1:50051")
        );
        assert_eq!(
            default_health_addr(Some("0.0.0.0:8080")).as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(
            default_health_addr(Some("[::]:8080")).as_deref(),
            Ok("http://[::1]:8080")
        );
        assert_eq!(
            default_health_addr(Some("10.1.2.3:50051")).as_deref(),
            Ok("http://10.1.2.3:50051")
        );
        assert_eq!(
            default_health_addr(Some("nowhere")),
            Err(
                "TOLLGATE_SERVER__LISTEN: \"nowhere\" is not an address such as 0.0.0.0:50051"
                    .to_owned()
            )
        );
    }
}
