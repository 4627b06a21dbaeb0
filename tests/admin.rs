//! The admin door over the wire, on every store: inspect a counter (which
//! counts nothing), unlock a blocked subject, including on a second instance
//! that had cached the denial, reset one and every conversation, bad input,
//! and that the door answers only on its own port.

// The shared helpers in tests/common are `pub` for every test binary that
// includes them; in one binary that is unreachable by construction.
#![allow(unreachable_pub)]

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use common::server::{Backend, StoreKind, TestServer, test_config};
use tokio::net::TcpListener;
use tollgate::{
    config::Config,
    limiter::Limiter,
    proto::{
        CheckLimitRequest, GetUsageRequest, IncrementUsageRequest, InspectLimitRequest,
        InspectLimitResponse, ListUsageRequest, ResetLimitRequest, ResetUsageRequest,
        admin_client::AdminClient, rate_limiter_client::RateLimiterClient,
    },
    store::{deny_cache::DenyCache, memory::MemoryStore},
};
use tonic::{Code, transport::Channel};

const TOML: &str = r#"
[tiers]
names = ["free", "premium"]
default = "free"

[quotas]
period = "1h"

[quotas.kinds]
text = 100

[rules.api]
window = "60s"
limit = { free = 3, premium = 10 }

[rules.smooth]
window = "60s"
limit = 5
algorithm = "sliding_counter"

[rules.auth]
window = "60s"
limit = 2
block_for = "5m"
"#;

fn config() -> Config {
    test_config(TOML)
}

on_every_store!(
    inspecting_counts_nothing,
    a_reset_unlocks_a_blocked_subject_at_once,
    one_conversation_and_every_conversation_are_reset,
    bad_input_is_invalid_argument,
    the_door_is_only_on_its_own_port,
);

fn check_request(rule: &str, subject: &str) -> CheckLimitRequest {
    CheckLimitRequest {
        rule: rule.to_owned(),
        subject: subject.to_owned(),
        ..Default::default()
    }
}

async fn allowed(server: &TestServer, rule: &str, subject: &str) -> bool {
    let response = server
        .check(check_request(rule, subject))
        .await
        .unwrap_or_else(|status| panic!("CheckLimit {rule}/{subject}: {status}"));
    assert!(!response.degraded, "{response:?}");
    response.allowed
}

async fn inspect(
    server: &TestServer,
    rule: &str,
    subject: &str,
    tier: &str,
) -> InspectLimitResponse {
    server
        .admin()
        .inspect_limit(InspectLimitRequest {
            rule: rule.to_owned(),
            subject: subject.to_owned(),
            tier: tier.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("InspectLimit {rule}/{subject}: {status}"))
        .into_inner()
}

async fn reset_limit(server: &TestServer, rule: &str, subject: &str) -> bool {
    server
        .admin()
        .reset_limit(ResetLimitRequest {
            rule: rule.to_owned(),
            subject: subject.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("ResetLimit {rule}/{subject}: {status}"))
        .into_inner()
        .existed
}

async fn reset_usage(server: &TestServer, user_id: &str, character_id: &str) -> u32 {
    server
        .admin()
        .reset_usage(ResetUsageRequest {
            user_id: user_id.to_owned(),
            character_id: character_id.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("ResetUsage {user_id}/{character_id}: {status}"))
        .into_inner()
        .conversations
}

fn duration(d: Option<prost_types::Duration>) -> Duration {
    let d = d.expect("tollgate always sends durations");
    Duration::new(
        u64::try_from(d.seconds).expect("non-negative"),
        u32::try_from(d.nanos).expect("non-negative"),
    )
}

async fn inspecting_counts_nothing(backend: Backend) {
    let server = backend.serve_with_admin(&config()).await;
    // Nothing counted yet: an empty counter.
    let fresh = inspect(&server, "api", "u1", "").await;
    assert_eq!(
        (fresh.limit, fresh.used, fresh.remaining, fresh.blocked),
        (3, 0, 3, false)
    );
    assert_eq!(duration(fresh.reset_after), Duration::ZERO);
    assert_eq!(duration(fresh.block_remaining), Duration::ZERO);

    assert!(allowed(&server, "api", "u1").await);
    assert!(allowed(&server, "api", "u1").await);
    for _ in 0..5 {
        let seen = inspect(&server, "api", "u1", "").await;
        assert_eq!(
            (seen.limit, seen.used, seen.remaining),
            (3, 2, 1),
            "{seen:?}"
        );
        let reset_after = duration(seen.reset_after);
        assert!(
            reset_after > Duration::from_secs(50) && reset_after <= Duration::from_secs(60),
            "{seen:?}"
        );
    }
    // The limit is the tier's.
    let premium = inspect(&server, "api", "u1", "premium").await;
    assert_eq!((premium.limit, premium.used, premium.remaining), (10, 2, 8));
    // Five inspections later, exactly one hit is left.
    assert!(allowed(&server, "api", "u1").await);
    assert!(!allowed(&server, "api", "u1").await);
    let full = inspect(&server, "api", "u1", "").await;
    assert_eq!((full.used, full.remaining), (3, 0));

    // The sliding counter reports its estimate.
    for _ in 0..4 {
        assert!(allowed(&server, "smooth", "u1").await);
    }
    let smooth = inspect(&server, "smooth", "u1", "").await;
    assert_eq!(
        (smooth.limit, smooth.used, smooth.remaining),
        (5, 4, 1),
        "{smooth:?}"
    );
    assert!(allowed(&server, "smooth", "u1").await);
    assert!(!allowed(&server, "smooth", "u1").await);
    server.stop().await;
}

async fn a_reset_unlocks_a_blocked_subject_at_once(backend: Backend) {
    let server = backend.serve_with_admin(&config()).await;
    assert!(allowed(&server, "auth", "10.0.0.7").await);
    assert!(allowed(&server, "auth", "10.0.0.7").await);
    assert!(!allowed(&server, "auth", "10.0.0.7").await);
    // Denied again: now from the deny cache.
    assert!(!allowed(&server, "auth", "10.0.0.7").await);
    let blocked = inspect(&server, "auth", "10.0.0.7", "").await;
    assert!(blocked.blocked, "{blocked:?}");
    let left = duration(blocked.block_remaining);
    assert!(
        left > Duration::from_secs(290) && left <= Duration::from_secs(300),
        "{left:?}"
    );
    assert_eq!((blocked.used, blocked.remaining), (2, 0));

    assert!(
        reset_limit(&server, "auth", "10.0.0.7").await,
        "there was a block"
    );
    // At once, on the instance that served the reset.
    assert!(allowed(&server, "auth", "10.0.0.7").await);
    let after = inspect(&server, "auth", "10.0.0.7", "").await;
    assert_eq!((after.used, after.blocked), (1, false), "{after:?}");

    // Nothing to reset: existed is false.
    assert!(!reset_limit(&server, "auth", "nobody").await);
    // A reset clears the rule's counters under both algorithms: an
    // instance whose config switched "api" to sliding_counter resets the
    // sliding log that another instance counted.
    assert!(allowed(&server, "api", "u2").await);
    let switched = backend
        .serve_with_admin(&test_config(&TOML.replace(
            "limit = { free = 3, premium = 10 }",
            "limit = { free = 3, premium = 10 }\nalgorithm = \"sliding_counter\"",
        )))
        .await;
    assert_eq!(inspect(&switched, "api", "u2", "").await.used, 0);
    assert!(reset_limit(&switched, "api", "u2").await);
    assert_eq!(inspect(&server, "api", "u2", "").await.used, 0);
    switched.stop().await;
    server.stop().await;
}

async fn increment(server: &TestServer, user_id: &str, character_id: &str) {
    let response = server
        .increment(IncrementUsageRequest {
            user_id: user_id.to_owned(),
            character_id: character_id.to_owned(),
            kind: "text".to_owned(),
            ..Default::default()
        })
        .await
        .expect("IncrementUsage answers");
    assert!(response.allowed && !response.degraded, "{response:?}");
}

async fn used(server: &TestServer, user_id: &str, character_id: &str) -> u64 {
    server
        .get_usage(GetUsageRequest {
            user_id: user_id.to_owned(),
            character_id: character_id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("GetUsage answers")
        .counters
        .iter()
        .map(|counter| counter.used)
        .sum()
}

async fn listed(server: &TestServer, user_id: &str) -> Vec<String> {
    server
        .list_usage(ListUsageRequest {
            user_id: user_id.to_owned(),
            ..Default::default()
        })
        .await
        .expect("ListUsage answers")
        .conversations
        .into_iter()
        .map(|conversation| conversation.character_id)
        .collect()
}

async fn one_conversation_and_every_conversation_are_reset(backend: Backend) {
    let server = backend.serve_with_admin(&config()).await;
    for character in ["ares", "luna", "mars"] {
        increment(&server, "u1", character).await;
    }
    increment(&server, "u1", "luna").await;
    increment(&server, "u2", "luna").await;
    assert_eq!(used(&server, "u1", "luna").await, 2);

    assert_eq!(reset_usage(&server, "u1", "luna").await, 1);
    assert_eq!(used(&server, "u1", "luna").await, 0);
    assert_eq!(listed(&server, "u1").await, ["ares", "mars"]);
    // Gone already, and never there: nothing to reset.
    assert_eq!(reset_usage(&server, "u1", "luna").await, 0);
    assert_eq!(reset_usage(&server, "nobody", "").await, 0);
    // Another user's conversation with the same character is untouched.
    assert_eq!(used(&server, "u2", "luna").await, 1);

    assert_eq!(reset_usage(&server, "u1", "").await, 2);
    assert!(listed(&server, "u1").await.is_empty());
    assert_eq!(used(&server, "u1", "mars").await, 0);
    assert_eq!(listed(&server, "u2").await, ["luna"]);
    // Counting starts over.
    increment(&server, "u1", "mars").await;
    assert_eq!(used(&server, "u1", "mars").await, 1);

    // More conversations than one batch of the Redis store (100).
    for i in 0..250 {
        increment(&server, "many", &format!("c{i:03}")).await;
    }
    assert_eq!(listed(&server, "many").await.len(), 250);
    assert_eq!(reset_usage(&server, "many", "").await, 250);
    assert!(listed(&server, "many").await.is_empty());
    server.stop().await;
}

async fn bad_input_is_invalid_argument(backend: Backend) {
    let server = backend.serve_with_admin(&config()).await;
    let mut admin = server.admin();
    let long = "x".repeat(257);
    let inspect_cases = [
        (
            "nope",
            "u1",
            "",
            "rule: unknown rule \"nope\"; known: api, auth, smooth",
        ),
        ("api", "", "", "subject: must not be empty"),
        (
            "api",
            long.as_str(),
            "",
            "subject: must be at most 256 bytes",
        ),
        (
            "api",
            "u1",
            "gold",
            "tier: unknown tier \"gold\"; known: free, premium",
        ),
    ];
    for (rule, subject, tier, message) in inspect_cases {
        let status = admin
            .inspect_limit(InspectLimitRequest {
                rule: rule.to_owned(),
                subject: subject.to_owned(),
                tier: tier.to_owned(),
            })
            .await
            .expect_err("bad input is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(message), "{status:?}");
    }
    let status = admin
        .reset_limit(ResetLimitRequest {
            rule: "nope".to_owned(),
            subject: "u1".to_owned(),
        })
        .await
        .expect_err("an unknown rule is refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("known: api, auth, smooth"),
        "{status:?}"
    );
    for (user_id, character_id, message) in [
        ("", "", "user_id: must not be empty"),
        (long.as_str(), "", "user_id: must be at most 256 bytes"),
        (
            "u1",
            long.as_str(),
            "character_id: must be at most 256 bytes",
        ),
    ] {
        let status = admin
            .reset_usage(ResetUsageRequest {
                user_id: user_id.to_owned(),
                character_id: character_id.to_owned(),
            })
            .await
            .expect_err("bad input is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(message), "{status:?}");
    }
    server.stop().await;
}

async fn the_door_is_only_on_its_own_port(backend: Backend) {
    let server = backend.serve_with_admin(&config()).await;
    // The callers' port does not serve Admin.
    let callers = Channel::from_shared(format!("http://{}", server.addr))
        .expect("a loopback URL is valid")
        .connect()
        .await
        .expect("connect to the callers' port");
    let status = AdminClient::new(callers)
        .reset_limit(ResetLimitRequest {
            rule: "auth".to_owned(),
            subject: "u1".to_owned(),
        })
        .await
        .expect_err("no admin door on the callers' port");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // And the admin port serves nothing but Admin (and reflection).
    let (admin_addr, _) = server.admin.as_ref().expect("started with the admin door");
    let door = Channel::from_shared(format!("http://{admin_addr}"))
        .expect("a loopback URL is valid")
        .connect()
        .await
        .expect("connect to the admin port");
    let status = RateLimiterClient::new(door)
        .check_limit(check_request("api", "u1"))
        .await
        .expect_err("no CheckLimit on the admin port");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    server.stop().await;
}

/// Two instances on one Redis: the second has cached the denial of a
/// blocked subject; a reset through the first reaches it within 1 s.
async fn a_reset_reaches_an_instance_that_cached_the_denial(kind: StoreKind, restart: bool) {
    let mut backend = Backend::new(kind);
    let config = config();
    let first = backend.serve_with_admin(&config).await;
    let second = backend.serve(&config).await;
    if restart {
        // Redis restarts under both instances: their subscriptions break,
        // and they must subscribe again by themselves to hear resets.
        assert!(allowed(&second, "api", "warm").await);
        backend.redis_mut().restart();
        for server in [&first, &second] {
            let up_by = Instant::now() + Duration::from_secs(10);
            while server
                .check(check_request("api", "warm"))
                .await
                .map_or(true, |response| response.degraded)
            {
                assert!(
                    Instant::now() < up_by,
                    "the instance never reached Redis again"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Resets are heard once the second instance has subscribed; until
    // then its cache caches nothing. Wait for the cache to answer.
    assert!(allowed(&second, "auth", "u9").await);
    assert!(allowed(&second, "auth", "u9").await);
    assert!(!allowed(&second, "auth", "u9").await);
    let cached_by = Instant::now() + Duration::from_secs(5);
    loop {
        let evalsha_before = evalsha_calls(&backend);
        assert!(!allowed(&second, "auth", "u9").await);
        if evalsha_calls(&backend) == evalsha_before {
            break;
        }
        assert!(
            Instant::now() < cached_by,
            "the second instance never cached the denial"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first instance has the denial cached too.
    assert!(!allowed(&first, "auth", "u9").await);
    assert!(!allowed(&first, "auth", "u9").await);

    let reset_at = Instant::now();
    assert!(reset_limit(&first, "auth", "u9").await);
    // At once on the instance that served it.
    let dry = CheckLimitRequest {
        dry_run: true,
        ..check_request("auth", "u9")
    };
    assert!(first.check(dry.clone()).await.expect("CheckLimit").allowed);
    // Within 1 s on the other; a dry run counts nothing while polling.
    loop {
        if second.check(dry.clone()).await.expect("CheckLimit").allowed {
            break;
        }
        assert!(
            reset_at.elapsed() < Duration::from_secs(1),
            "the second instance still denies 1 s after the reset"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen_after = reset_at.elapsed();
    assert!(allowed(&second, "auth", "u9").await, "{seen_after:?}");
    first.stop().await;
    second.stop().await;
}

/// EVALSHA calls so far, summed over every node: whether a check reached
/// Redis.
fn evalsha_calls(backend: &Backend) -> u64 {
    backend.evalsha_calls()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_reaches_an_instance_that_cached_the_denial_on_redis() {
    a_reset_reaches_an_instance_that_cached_the_denial(StoreKind::Redis, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_reaches_an_instance_that_cached_the_denial_after_a_redis_restart() {
    a_reset_reaches_an_instance_that_cached_the_denial(StoreKind::Redis, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reset_reaches_an_instance_that_cached_the_denial_on_a_cluster() {
    a_reset_reaches_an_instance_that_cached_the_denial(StoreKind::Cluster, false).await;
}

/// The admin door stops with its server when run on its own.
#[tokio::test]
async fn the_admin_door_stops_on_shutdown() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("an address");
    let limiter = std::sync::Arc::new(Limiter::new(
        DenyCache::new(MemoryStore::new()),
        std::sync::Arc::new(config().policy),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(tollgate::server::run_admin(
        limiter,
        listener,
        async {
            let _ = stopped.await;
        },
        tollgate::server::ServeOptions::default(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a loopback URL is valid")
        .connect()
        .await
        .expect("connect");
    let mut admin = AdminClient::new(channel);
    let answer = admin
        .reset_usage(ResetUsageRequest {
            user_id: "u1".to_owned(),
            character_id: String::new(),
        })
        .await
        .expect("ResetUsage answers");
    assert_eq!(answer.into_inner().conversations, 0);
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the admin door stops within 5 s")
        .expect("no panic")
        .expect("no error");
}

// ---- The binary: `serve` with admin_listen, and `tollgate admin` ----------

mod binary_and_cli {
    use std::{
        net::TcpStream,
        path::Path,
        process::Output,
        thread,
        time::{Duration, Instant},
    };

    use super::common::{
        binary::Tollgate,
        certs::{CertFiles, Pki},
        redis_server::free_port,
    };
    use tollgate::proto::{CheckLimitRequest, rate_limiter_client::RateLimiterClient};
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};

    /// How long the binary may take to start, or a CLI call to answer.
    const DEADLINE: Duration = Duration::from_secs(15);

    /// A config file for `serve`: the tests' rules, the memory store, the
    /// callers' and the admin ports, and `extra` TOML under `[server]`.
    fn write_config(dir: &Path, listen: u16, admin: Option<u16>, extra: &str) -> String {
        let admin = admin.map_or(String::new(), |port| {
            format!("admin_listen = \"127.0.0.1:{port}\"\n")
        });
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{listen}\"\n{admin}{extra}\n[store]\nurl = \"memory://\"\n{}",
            super::TOML
        );
        let path = dir.join("tollgate.toml");
        std::fs::write(&path, text).expect("write the config");
        path.to_string_lossy().into_owned()
    }

    fn serve(config: &str) -> Tollgate {
        let mut command = Tollgate::command();
        command.args(["serve", "--config", config]);
        Tollgate::spawn_command(command)
    }

    fn await_port(server: &mut Tollgate, port: u16) {
        let deadline = Instant::now() + DEADLINE;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.exited() {
                panic!("tollgate exited with {status}: {}", server.output());
            }
            assert!(Instant::now() < deadline, "nothing listens on {port}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `tollgate admin args...`, bounded by [`DEADLINE`] through
    /// `--timeout`.
    fn admin(args: &[&str]) -> Output {
        let mut command = Tollgate::command();
        command.arg("admin").args(args).args(["--timeout", "10s"]);
        command.output().expect("tollgate admin runs")
    }

    fn text(output: &Output) -> (bool, String, String) {
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Three `auth` checks on the callers' port: the third blocks `subject`.
    fn block(listen: u16, subject: &str, tls: Option<ClientTlsConfig>) -> Vec<bool> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut endpoint =
                tonic::transport::Endpoint::from_shared(format!("{scheme}://127.0.0.1:{listen}"))
                    .expect("a valid URL");
            if let Some(tls) = tls {
                endpoint = endpoint.tls_config(tls).expect("a valid TLS config");
            }
            let mut client = RateLimiterClient::new(endpoint.connect().await.expect("connect"));
            let mut allowed = Vec::new();
            for _ in 0..3 {
                let response = client
                    .check_limit(CheckLimitRequest {
                        rule: "auth".to_owned(),
                        subject: subject.to_owned(),
                        ..Default::default()
                    })
                    .await
                    .expect("CheckLimit answers")
                    .into_inner();
                allowed.push(response.allowed);
            }
            allowed
        })
    }

    #[test]
    fn the_cli_inspects_and_resets_through_a_running_binary() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (listen, admin_port) = (free_port(), free_port());
        let config = write_config(dir.path(), listen, Some(admin_port), "");
        let mut server = serve(&config);
        await_port(&mut server, admin_port);

        assert_eq!(block(listen, "u1", None), [true, true, false]);
        // --addr defaults to the config's admin_listen.
        let (ok, stdout, stderr) = text(&admin(&[
            "inspect",
            "--rule",
            "auth",
            "--subject",
            "u1",
            "--config",
            &config,
        ]));
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains("rule auth, subject \"u1\", tier default"),
            "{stdout}"
        );
        assert!(stdout.contains("limit      2"), "{stdout}");
        assert!(stdout.contains("used       2"), "{stdout}");
        assert!(stdout.contains("remaining  0"), "{stdout}");
        assert!(stdout.contains("blocked    yes, for 4m"), "{stdout}");

        let (ok, stdout, stderr) = text(&admin(&[
            "reset-limit",
            "--rule",
            "auth",
            "--subject",
            "u1",
            "--addr",
            &format!("127.0.0.1:{admin_port}"),
        ]));
        assert!(ok, "{stderr}");
        assert!(
            stdout.contains("reset rule auth for subject \"u1\""),
            "{stdout}"
        );
        assert_eq!(block(listen, "u1", None), [true, true, false]);

        let (ok, stdout, stderr) = text(&admin(&[
            "reset-usage",
            "--user",
            "u1",
            "--character",
            "luna",
            "--config",
            &config,
        ]));
        assert!(ok, "{stderr}");
        assert!(stdout.contains("0 had live counters"), "{stdout}");
        let (ok, stdout, stderr) = text(&admin(&[
            "reset-usage",
            "--user",
            "u1",
            "--config",
            &config,
        ]));
        assert!(ok, "{stderr}");
        assert!(stdout.contains("conversations of user \"u1\""), "{stdout}");

        // A refusal is one clear line and a failed exit.
        let (ok, _, stderr) = text(&admin(&[
            "inspect",
            "--rule",
            "nope",
            "--subject",
            "u1",
            "--config",
            &config,
        ]));
        assert!(!ok);
        assert!(
            stderr
                .contains("InvalidArgument: rule: unknown rule \"nope\"; known: api, auth, smooth"),
            "{stderr}"
        );

        // Every call is logged at info: the peer, the call, its arguments.
        let log = server.output();
        let reset = log
            .lines()
            .find(|line| line.contains("admin call") && line.contains("call=\"ResetLimit\""))
            .unwrap_or_else(|| panic!("no ResetLimit line in the log: {log}"));
        assert!(reset.contains("peer=127.0.0.1:"), "{reset}");
        assert!(
            reset.contains("rule=\"auth\"") && reset.contains("subject=\"u1\""),
            "{reset}"
        );
        assert!(reset.contains("existed true"), "{reset}");
        assert!(log.contains("call=\"InspectLimit\""), "{log}");
        assert!(log.contains("call=\"ResetUsage\""), "{log}");

        // The admin door stops with the server: a clean exit.
        server.stop(DEADLINE);
    }

    #[test]
    fn the_cli_says_when_no_admin_door_is_configured() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = write_config(dir.path(), free_port(), None, "");
        let (ok, _, stderr) = text(&admin(&[
            "inspect",
            "--rule",
            "auth",
            "--subject",
            "u1",
            "--config",
            &config,
        ]));
        assert!(!ok);
        assert!(
            stderr.contains("no --addr given, and")
                && stderr.contains("sets no server.admin_listen"),
            "{stderr}"
        );
    }

    fn tls_table(pki: &Pki) -> String {
        let path = |p: &Path| p.to_string_lossy().replace('\\', "/");
        format!(
            "[server.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            path(&pki.server.cert),
            path(&pki.server.key),
            path(&pki.ca)
        )
    }

    fn client_tls(pki: &Pki, identity: &CertFiles) -> ClientTlsConfig {
        let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&pki.ca)))
            .identity(Identity::from_pem(
                read(&identity.cert),
                read(&identity.key),
            ))
    }

    #[test]
    fn under_mutual_tls_the_door_wants_a_client_certificate_and_logs_its_subject() {
        let pki = Pki::new();
        let (listen, admin_port) = (free_port(), free_port());
        let config = write_config(pki.dir(), listen, Some(admin_port), &tls_table(&pki));
        let mut server = serve(&config);
        await_port(&mut server, admin_port);
        assert_eq!(
            block(listen, "u7", Some(client_tls(&pki, &pki.client))),
            [true, true, false]
        );
        let ca = pki.ca.to_string_lossy().into_owned();
        let cert = pki.client.cert.to_string_lossy().into_owned();
        let key = pki.client.key.to_string_lossy().into_owned();
        // With the client's certificate: served, over TLS (https by default
        // since the config sets [server.tls]).
        let (ok, stdout, stderr) = text(&admin(&[
            "reset-limit",
            "--rule",
            "auth",
            "--subject",
            "u7",
            "--config",
            &config,
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
        ]));
        assert!(ok, "{stderr}");
        assert!(stdout.contains("reset rule auth"), "{stdout}");
        // Without one: the handshake is refused.
        let (ok, _, _) = text(&admin(&[
            "reset-limit",
            "--rule",
            "auth",
            "--subject",
            "u7",
            "--config",
            &config,
            "--ca",
            &ca,
        ]));
        assert!(!ok, "a client without a certificate is refused");
        // A certificate from a CA the server does not trust: refused too.
        let other_cert = pki.other_client.cert.to_string_lossy().into_owned();
        let other_key = pki.other_client.key.to_string_lossy().into_owned();
        let (ok, _, _) = text(&admin(&[
            "reset-limit",
            "--rule",
            "auth",
            "--subject",
            "u7",
            "--config",
            &config,
            "--ca",
            &ca,
            "--cert",
            &other_cert,
            "--key",
            &other_key,
        ]));
        assert!(!ok, "a client certificate from another CA is refused");
        let log = server.output();
        let reset = log
            .lines()
            .find(|line| line.contains("call=\"ResetLimit\""))
            .unwrap_or_else(|| panic!("no ResetLimit line in the log: {log}"));
        assert!(
            reset.contains("client_certificate=\"CN=client\""),
            "{reset}"
        );
        assert!(reset.contains("peer=127.0.0.1:"), "{reset}");
        server.stop(DEADLINE);
    }
}

// ---- The scripts, run directly against a real redis-server --------------

mod scripts {
    use super::common::redis_server::RedisServer;

    const INSPECT: &str = include_str!("../lua/limit_inspect.lua");
    const RESET: &str = include_str!("../lua/limit_reset.lua");
    const USAGE_RESET: &str = include_str!("../lua/usage_reset.lua");

    fn redis_now_us(server: &RedisServer) -> i64 {
        let time = server.cli(&["TIME"]);
        let mut parts = time
            .lines()
            .map(|part| part.trim().parse::<i64>().expect("TIME"));
        let (seconds, micros) = (
            parts.next().expect("seconds"),
            parts.next().expect("micros"),
        );
        seconds * 1_000_000 + micros
    }

    fn numbers(reply: &str) -> Vec<i64> {
        reply
            .lines()
            .map(|line| {
                line.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("a number: {reply}"))
            })
            .collect()
    }

    #[test]
    fn the_scripts_assert_their_argument_counts() {
        let server = RedisServer::start();
        for (source, expected) in [
            (INSPECT, "expected 2 ARGV"),
            (RESET, "expected 3 KEYS"),
            (USAGE_RESET, "expected one KEY per character id"),
        ] {
            // No keys and one argument suit none of the scripts.
            let reply = server.cli(&["EVAL", source, "0", "x"]);
            assert!(reply.contains(expected), "{reply}");
        }
        let reply = server.cli(&["EVAL", INSPECT, "1", "{t}a", "sliding_window", "1000"]);
        assert!(reply.contains("unknown algorithm"), "{reply}");
    }

    /// The header's worked example: a log {"0:0" -> 0 (the base), "0:0" ->
    /// 2, "1500000:2" -> 4}, window 2 s, inspected at t = 2.2 s: {2,
    /// 1300000, 0, 0}, and nothing trimmed.
    #[test]
    fn limit_inspect_reads_a_log_without_trimming_it() {
        let server = RedisServer::start();
        let before = redis_now_us(&server);
        let t0 = before - 2_200_000;
        let log = "{rl:u1}:auth:calls";
        server.cli(&["ZADD", log, "0", "0:0"]);
        server.cli(&["ZADD", log, "2", &format!("{t0}:0")]);
        server.cli(&["ZADD", log, "4", &format!("{}:2", t0 + 1_500_000)]);
        let reply = numbers(&server.cli(&["EVAL", INSPECT, "1", log, "sliding_log", "2000000"]));
        let after = redis_now_us(&server);
        assert_eq!((reply[0], reply[2], reply[3]), (2, 0, 0), "{reply:?}");
        // 1.3 s at t = 2.2 s, less the time the script ran after that.
        let newest_leaves = t0 + 1_500_000 + 2_000_000;
        assert!(
            (newest_leaves - after..=newest_leaves - before).contains(&reply[1]),
            "{reply:?}"
        );
        assert_eq!(server.cli(&["ZCARD", log]), "3");
        // With the block key: reported while it lasts.
        let block = "{rl:u1}:auth:block";
        server.cli(&["SET", block, "1", "PX", "60000"]);
        let reply =
            numbers(&server.cli(&["EVAL", INSPECT, "2", log, block, "sliding_log", "2000000"]));
        assert_eq!(reply[2], 1, "{reply:?}");
        assert!((59_000_000..=60_000_000).contains(&reply[3]), "{reply:?}");
    }

    /// limit_reset deletes the three keys, counting those that existed.
    #[test]
    fn limit_reset_counts_the_keys_it_cleared() {
        let server = RedisServer::start();
        let keys = [
            "{rl:u1}:auth:calls",
            "{rl:u1}:auth:ctr",
            "{rl:u1}:auth:block",
        ];
        server.cli(&["ZADD", keys[0], "1", "1:0"]);
        server.cli(&["SET", keys[2], "1"]);
        let reset = |server: &RedisServer| {
            server.cli(&[&["EVAL", RESET, "3"][..], &keys, &["ch", "limit:auth:u1"]].concat())
        };
        assert_eq!(reset(&server), "2");
        assert_eq!(server.cli(&["EXISTS", keys[0], keys[1], keys[2]]), "0");
        assert_eq!(reset(&server), "0");
    }

    /// The header's worked example.
    #[test]
    fn usage_reset_names_the_next_ids_and_deletes_what_it_is_given() {
        let server = RedisServer::start();
        let now_ms = redis_now_us(&server) / 1000;
        let (index, by_id) = ("{uq:u1}:convs", "{uq:u1}:ids");
        let (luna, mars) = ("{uq:u1}:c:luna", "{uq:u1}:c:mars");
        server.cli(&["ZADD", index, &(now_ms - 1).to_string(), "mars"]);
        server.cli(&["ZADD", index, &(now_ms + 5000).to_string(), "luna"]);
        server.cli(&["ZADD", by_id, "0", "mars", "0", "luna"]);
        server.cli(&["HSET", luna, "text", "3"]);
        let first = server.cli(&["EVAL", USAGE_RESET, "2", index, by_id, "100"]);
        assert_eq!(
            first.lines().map(str::trim).collect::<Vec<_>>(),
            ["0", "mars", "luna"]
        );
        let second = server.cli(&[
            "EVAL",
            USAGE_RESET,
            "4",
            index,
            by_id,
            mars,
            luna,
            "100",
            "mars",
            "luna",
        ]);
        assert_eq!(second, "1");
        assert_eq!(server.cli(&["EXISTS", index, by_id, luna, mars]), "0");
    }
}
