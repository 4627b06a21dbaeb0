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
    store::{Store, memory::MemoryStore, redis::RedisStore},
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
