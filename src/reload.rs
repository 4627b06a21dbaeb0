//! Hot reload of the policy (tiers, rules, quotas) on SIGHUP and when the
//! config file changes, without a restart and without losing counters.
//!
//! A new file is validated in full before it replaces anything; a file that
//! fails validation is rejected with one log line and the policy in force
//! stays. Process settings (listen address, store) take effect only on a
//! restart: a change to them is logged and otherwise ignored.
//!
//! The file is polled (its bytes compared every [`POLL_EVERY`]) rather than
//! watched with inotify: it works the same on every filesystem, including
//! the symlink swaps Kubernetes does for mounted ConfigMaps, and costs one
//! small read a second.
//!
//! The TLS files of `[server.tls]` are read again on the same beat (their
//! paths stay as at start-up): a renewed certificate is used for every
//! handshake from then on, see [`crate::tls`].

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    config::{self, Overrides, Settings},
    limiter::Limiter,
    store::Store,
    tls::ReloadableTls,
};

/// How often the config file is checked for changes.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// What the reloader watches and how to read it.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The config file.
    pub path: PathBuf,
    /// The command-line overrides, applied again on every load.
    pub overrides: Overrides,
    /// The settings in force, to tell operators when a change needs a restart.
    pub settings: Settings,
    /// The server's TLS files, when it serves TLS.
    pub tls: Option<Arc<ReloadableTls>>,
}

/// Reloads `limiter`'s policy whenever the file changes or SIGHUP arrives,
/// until the task is dropped.
pub async fn run<S: Store>(limiter: Arc<Limiter<S>>, watch: Watch) {
    let mut last_bytes = std::fs::read(&watch.path).ok();
    let mut hangups = hangup_signals();
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tls_refused = None;
    loop {
        let forced = tokio::select! {
            _ = poll.tick() => false,
            Some(()) = next_hangup(&mut hangups) => true,
        };
        if let Some(tls) = &watch.tls {
            reload_tls(tls, &mut tls_refused);
        }
        let bytes = std::fs::read(&watch.path).ok();
        if !forced && bytes == last_bytes {
            continue;
        }
        last_bytes = bytes;
        reload(
            &limiter,
            &watch,
            if forced { "SIGHUP" } else { "file changed" },
        );
    }
}

/// Loads the file and, if it is valid and its policy differs, puts it in
/// force. Returns whether the policy changed.
pub fn reload<S: Store>(limiter: &Limiter<S>, watch: &Watch, trigger: &str) -> bool {
    let config = match config::load_file(&watch.path, &watch.overrides) {
        Ok(config) => config,
        Err(err) => {
            tracing::error!(%trigger, error = %err, "config rejected; the policy in force stays");
            return false;
        }
    };
    if config.settings != watch.settings {
        tracing::warn!(
            %trigger,
            "server, store or log settings changed; they take effect on restart only"
        );
    }
    if *limiter.policy() == config.policy {
        tracing::info!(%trigger, "config reloaded; the policy is unchanged");
        return false;
    }
    let rules = config.policy.rules().count();
    let kinds = config.policy.quotas().kinds().len();
    limiter.replace_policy(Arc::new(config.policy));
    tracing::info!(%trigger, rules, kinds, "config reloaded; new policy in force");
    true
}

/// Puts changed TLS files in force. A refusal is logged once until the
/// files change again (a poll finds the same bad files every second).
fn reload_tls(tls: &ReloadableTls, refused: &mut Option<String>) {
    match tls.reload() {
        Ok(true) => {
            *refused = None;
            tracing::info!("TLS files reloaded; new connections use them");
        }
        Ok(false) => *refused = None,
        Err(err) => {
            let message = err.to_string();
            if refused.as_deref() != Some(message.as_str()) {
                tracing::error!(error = %message, "TLS files rejected; the ones in force stay");
                *refused = Some(message);
            }
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangup_signals() -> Hangups {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(err) => {
            tracing::warn!(%err, "cannot watch SIGHUP; reloading on file changes only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signals() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) -> Option<()> {
    match hangups {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) -> Option<()> {
    std::future::pending().await
}
