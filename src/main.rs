//! The `tollgate` binary: `serve` and `check-config`.
//!
//! Thin on purpose: it parses flags, loads the config, sets up logging,
//! builds the store and hands a bound listener to [`tollgate::server::run`].

use std::{path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tollgate::{
    config::{self, Config, Overrides},
    limiter::Limiter,
    server,
    store::{Store, breaker::CircuitBreaker, memory::MemoryStore, redis::RedisStore},
    telemetry,
};

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
    Health {
        /// The server's address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Give up after this long (humantime).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, overrides) = match cli.command {
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
        Command::Health { addr, timeout } => return health(&addr, timeout),
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message),
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let settings = &config.settings;
    let policy = Arc::new(config.policy);
    match settings.store.redis_options() {
        None => {
            tracing::info!("store: memory:// (embedded, this instance only)");
            serve_with(MemoryStore::new(), policy, &config.settings).await
        }
        Some(options) => {
            tracing::info!(url = ?options, "store: redis");
            let store = RedisStore::connect(&options)
                .await
                .map_err(|err| format!("cannot use the store: {err}"))?;
            let store = CircuitBreaker::new(store, settings.store.breaker);
            serve_with(store, policy, &config.settings).await
        }
    }
}

async fn serve_with<S: Store>(
    store: S,
    policy: Arc<tollgate::rules::Policy>,
    settings: &config::Settings,
) -> Result<(), String> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|err| format!("cannot listen on {}: {err}", settings.listen))?;
    tracing::info!(address = %settings.listen, "tollgate listening");
    let limiter = Arc::new(Limiter::new(store, policy));
    server::run(limiter, listener, shutdown_signal())
        .await
        .map_err(|err| err.to_string())?;
    tracing::info!("tollgate stopped");
    Ok(())
}

fn health(addr: &str, timeout: std::time::Duration) -> ExitCode {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&format!("cannot start the async runtime: {err}")),
    };
    let check = async {
        let endpoint = tonic::transport::Endpoint::from_shared(addr.to_owned())
            .map_err(|err| format!("{addr:?} is not a valid address: {err}"))?;
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

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(err) => {
                    tracing::warn!(%err, "cannot watch SIGTERM; stopping on Ctrl-C only");
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down: finishing in-flight requests");
}

fn fail(message: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {message}");
    ExitCode::FAILURE
}
