//! `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, checked
//! through the Envoy protos' own tonic client (from `envoy-types`) over a
//! real socket, against both stores.
//!
//! Each behaviour is written once as `async fn case(backend: Backend)` and
//! expanded by [`both_stores!`] into `memory::case` and `redis::case`. The
//! shipped config is used, so its `[rules.*.envoy]` mappings are what is
//! tested.

// The shared helpers are `pub` for the test binaries that include them.
#[allow(unreachable_pub)]
mod common;

use std::time::Duration;

use common::server::{Backend, StoreKind, TestServer, shipped_config};
use envoy_types::pb::{
    envoy::{
        extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, RateLimit, rate_limit::Unit},
            rate_limit_service_client::RateLimitServiceClient,
        },
    },
    google::protobuf::UInt64Value,
};
use tollgate::{
    config,
    proto::{CheckLimitRequest, CheckLimitResponse},
    rules::EnvoyHeaders,
};
use tonic::{Status, transport::Channel};

/// Expands each case into a test per store.
macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Memory)).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Backend::new(super::StoreKind::Redis)).await;
                }
            )*
        }
    };
}

both_stores!(
    descriptors_map_onto_rules_subjects_and_tiers,
    hits_addend_is_the_cost,
    explicit_zero_hits_addend_counts_nothing,
    statuses_come_in_order_with_the_overall_code,
    unmatched_descriptors_are_ok_without_a_limit,
    other_domains_are_ok_and_uncounted,
    auth_block_is_seen_through_envoy_and_check_limit,
    envoy_and_check_limit_share_one_window,
    first_rule_by_name_wins_and_a_missing_subject_does_not_match,
    untrusted_descriptor_values_are_counted_not_refused,
);

const DOMAIN: &str = "tollgate";

// ---- Helpers -----------------------------------------------------------

/// An Envoy client on the server's port.
async fn envoy(server: &TestServer) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect the Envoy client to the test server")
}

/// A descriptor with these entries, in order.
fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|&(key, value)| Entry {
                key: key.to_owned(),
                value: value.to_owned(),
            })
            .collect(),
        ..RateLimitDescriptor::default()
    }
}

/// `descriptor` with its own `hits_addend` set.
fn with_hits(mut descriptor: RateLimitDescriptor, hits: u64) -> RateLimitDescriptor {
    descriptor.hits_addend = Some(UInt64Value { value: hits });
    descriptor
}

/// An `api` descriptor for `user`.
fn api(user: &str) -> RateLimitDescriptor {
    descriptor(&[("generic_key", "api"), ("user_id", user)])
}

async fn should(
    client: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    descriptors: Vec<RateLimitDescriptor>,
    hits_addend: u32,
) -> Result<RateLimitResponse, Status> {
    client
        .should_rate_limit(RateLimitRequest {
            domain: domain.to_owned(),
            descriptors,
            hits_addend,
        })
        .await
        .map(|r| r.into_inner())
}

/// ShouldRateLimit with one descriptor in the tollgate domain; its status.
async fn one(
    client: &mut RateLimitServiceClient<Channel>,
    descriptor: RateLimitDescriptor,
    hits_addend: u32,
) -> DescriptorStatus {
    let response = should(client, DOMAIN, vec![descriptor], hits_addend)
        .await
        .expect("ShouldRateLimit answers");
    assert_eq!(response.statuses.len(), 1, "{response:?}");
    let status = response.statuses[0].clone();
    assert_eq!(response.overall_code, status.code, "{response:?}");
    status
}

/// CheckLimit as a dry run of one hit, counting nothing.
async fn peek(server: &TestServer, rule: &str, subject: &str) -> CheckLimitResponse {
    server
        .check(CheckLimitRequest {
            rule: rule.to_owned(),
            subject: subject.to_owned(),
            dry_run: true,
            ..CheckLimitRequest::default()
        })
        .await
        .expect("CheckLimit answers")
}

/// Hits left in the subject's window now, seen through CheckLimit (whose
/// `remaining` is what would be left after the one hit it did not count).
async fn left(server: &TestServer, rule: &str, subject: &str) -> u64 {
    let check = peek(server, rule, subject).await;
    check.remaining + u64::from(check.allowed)
}

/// CheckLimit counting one hit.
async fn hit(server: &TestServer, rule: &str, subject: &str) -> CheckLimitResponse {
    server
        .check(CheckLimitRequest {
            rule: rule.to_owned(),
            subject: subject.to_owned(),
            ..CheckLimitRequest::default()
        })
        .await
        .expect("CheckLimit answers")
}

fn code(status: &DescriptorStatus) -> Code {
    Code::try_from(status.code).expect("a known code")
}

fn limit(name: &str, requests_per_unit: u32, unit: Unit) -> Option<RateLimit> {
    Some(RateLimit {
        name: name.to_owned(),
        requests_per_unit,
        unit: unit as i32,
    })
}

fn until_reset(status: &DescriptorStatus) -> Duration {
    let wire = status
        .duration_until_reset
        .expect("a matched descriptor has duration_until_reset");
    Duration::new(
        u64::try_from(wire.seconds).expect("not negative"),
        u32::try_from(wire.nanos).expect("not negative"),
    )
}

// ---- Cases -------------------------------------------------------------

async fn descriptors_map_onto_rules_subjects_and_tiers(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    // api: 15m window, free 100 (the default tier), premium 1000.
    let status = one(&mut client, api("ann"), 0).await;
    assert_eq!(code(&status), Code::Ok);
    assert_eq!(status.current_limit, limit("api", 100, Unit::Hour));
    assert_eq!(status.limit_remaining, 99);
    let reset = until_reset(&status);
    assert!(
        reset > Duration::from_secs(14 * 60) && reset <= Duration::from_secs(15 * 60),
        "{reset:?}"
    );

    let premium = descriptor(&[
        ("generic_key", "api"),
        ("user_id", "ann"),
        ("tier", "premium"),
    ]);
    let status = one(&mut client, premium, 0).await;
    assert_eq!(status.current_limit, limit("api", 1000, Unit::Hour));
    // Tiers share the subject's window: ann's first hit counts here too.
    assert_eq!(status.limit_remaining, 998);

    // The entries may come in any order, and extra entries do not matter.
    let messaging = descriptor(&[
        ("user_id", "ann"),
        ("path", "/send"),
        ("generic_key", "messaging"),
    ]);
    let status = one(&mut client, messaging, 0).await;
    assert_eq!(status.current_limit, limit("messaging", 10, Unit::Minute));
    assert_eq!(status.limit_remaining, 9);

    for (rule, requests, unit) in [("ai", 20, Unit::Minute), ("uploads", 20, Unit::Hour)] {
        let status = one(
            &mut client,
            descriptor(&[("generic_key", rule), ("user_id", "ann")]),
            0,
        )
        .await;
        assert_eq!(status.current_limit, limit(rule, requests, unit), "{rule}");
    }

    // The subject is the entry's value: the hit is ann's under api.
    assert_eq!(left(&server, "api", "ann").await, 98);
    assert_eq!(left(&server, "api", "bob").await, 100);
}

async fn hits_addend_is_the_cost(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    // The request's hits_addend is every descriptor's cost...
    let status = one(&mut client, api("cat"), 40).await;
    assert_eq!((code(&status), status.limit_remaining), (Code::Ok, 60));
    // ...unless the descriptor sets its own.
    let status = one(&mut client, with_hits(api("cat"), 10), 40).await;
    assert_eq!((code(&status), status.limit_remaining), (Code::Ok, 50));
    assert_eq!(left(&server, "api", "cat").await, 50);

    // A cost that does not fit is denied whole and counts nothing.
    let status = one(&mut client, with_hits(api("cat"), 51), 0).await;
    assert_eq!(
        (code(&status), status.limit_remaining),
        (Code::OverLimit, 50)
    );
    // A cost above u32::MAX is clamped, so still over the limit.
    let status = one(&mut client, with_hits(api("cat"), u64::MAX), 0).await;
    assert_eq!(code(&status), Code::OverLimit);
    assert_eq!(left(&server, "api", "cat").await, 50);

    let status = one(&mut client, with_hits(api("cat"), 50), 0).await;
    assert_eq!((code(&status), status.limit_remaining), (Code::Ok, 0));
}

async fn explicit_zero_hits_addend_counts_nothing(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    for _ in 0..3 {
        let status = one(&mut client, with_hits(api("dan"), 0), 25).await;
        assert_eq!(code(&status), Code::Ok);
        assert_eq!(status.current_limit, limit("api", 100, Unit::Hour));
        assert_eq!(status.limit_remaining, 100);
    }
    assert_eq!(left(&server, "api", "dan").await, 100);

    // A dry run still tells an exhausted subject that it is over the limit.
    one(&mut client, with_hits(api("dan"), 100), 0).await;
    let status = one(&mut client, with_hits(api("dan"), 0), 0).await;
    assert_eq!(
        (code(&status), status.limit_remaining),
        (Code::OverLimit, 0)
    );
}

async fn statuses_come_in_order_with_the_overall_code(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    let messaging = |user: &str| descriptor(&[("generic_key", "messaging"), ("user_id", user)]);
    let response = should(
        &mut client,
        DOMAIN,
        vec![
            api("eve"),
            descriptor(&[("generic_key", "nothing")]),
            with_hits(messaging("eve"), 11),
            messaging("eve"),
        ],
        0,
    )
    .await
    .expect("ShouldRateLimit answers");
    let codes: Vec<Code> = response.statuses.iter().map(code).collect();
    assert_eq!(
        codes,
        [Code::Ok, Code::Ok, Code::OverLimit, Code::Ok],
        "{response:?}"
    );
    let names: Vec<Option<&str>> = response
        .statuses
        .iter()
        .map(|s| s.current_limit.as_ref().map(|l| l.name.as_str()))
        .collect();
    assert_eq!(
        names,
        [Some("api"), None, Some("messaging"), Some("messaging")]
    );
    let remaining: Vec<u32> = response
        .statuses
        .iter()
        .map(|s| s.limit_remaining)
        .collect();
    assert_eq!(remaining, [99, 0, 10, 9]);
    assert_eq!(response.overall_code, Code::OverLimit as i32);

    // Each descriptor is decided on its own: the OK ones were counted even
    // though the request as a whole is over the limit.
    assert_eq!(left(&server, "api", "eve").await, 99);

    let response = should(&mut client, DOMAIN, vec![api("eve"), messaging("eve")], 0)
        .await
        .expect("ShouldRateLimit answers");
    assert_eq!(response.overall_code, Code::Ok as i32, "{response:?}");
    assert_eq!(response.statuses.len(), 2);

    // No descriptors at all: OK, with no statuses.
    let response = should(&mut client, DOMAIN, vec![], 0)
        .await
        .expect("ShouldRateLimit answers");
    assert_eq!(response.overall_code, Code::Ok as i32);
    assert!(response.statuses.is_empty());
}

async fn unmatched_descriptors_are_ok_without_a_limit(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    let unmatched = [
        descriptor(&[("generic_key", "nothing"), ("user_id", "fay")]),
        descriptor(&[("generic_key", "API"), ("user_id", "fay")]),
        descriptor(&[("destination_cluster", "api"), ("user_id", "fay")]),
        descriptor(&[]),
    ];
    for descriptor in unmatched {
        let status = one(&mut client, with_hits(descriptor.clone(), 1000), 0).await;
        assert_eq!(
            status,
            DescriptorStatus {
                code: Code::Ok as i32,
                ..DescriptorStatus::default()
            },
            "{descriptor:?}"
        );
    }
    assert_eq!(left(&server, "api", "fay").await, 100);
}

async fn other_domains_are_ok_and_uncounted(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    let auth = descriptor(&[("generic_key", "auth"), ("remote_address", "10.0.0.9")]);
    for domain in ["other", "", "Tollgate"] {
        let response = should(
            &mut client,
            domain,
            vec![with_hits(api("gus"), 1000), auth.clone()],
            0,
        )
        .await
        .expect("ShouldRateLimit answers");
        assert_eq!(response.overall_code, Code::Ok as i32, "{domain:?}");
        assert_eq!(
            response.statuses,
            vec![
                DescriptorStatus {
                    code: Code::Ok as i32,
                    ..DescriptorStatus::default()
                };
                2
            ],
            "{domain:?}"
        );
    }
    assert_eq!(left(&server, "api", "gus").await, 100);
    assert_eq!(left(&server, "auth", "10.0.0.9").await, 5);
}

async fn auth_block_is_seen_through_envoy_and_check_limit(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;
    let login = descriptor(&[("generic_key", "auth"), ("remote_address", "10.0.0.7")]);

    for attempt in 1..=5 {
        let status = one(&mut client, login.clone(), 0).await;
        assert_eq!(code(&status), Code::Ok, "attempt {attempt}");
        assert_eq!(status.current_limit, limit("auth", 5, Unit::Hour));
        assert_eq!(status.limit_remaining, 5 - attempt);
    }
    let status = one(&mut client, login.clone(), 0).await;
    assert_eq!(
        (code(&status), status.limit_remaining),
        (Code::OverLimit, 0)
    );

    // The block is the subject's, whichever door asks.
    let check = peek(&server, "auth", "10.0.0.7").await;
    assert!(!check.allowed && check.blocked, "{check:?}");
    let check = hit(&server, "auth", "10.0.0.7").await;
    assert!(!check.allowed && check.blocked, "{check:?}");
    assert_eq!(code(&one(&mut client, login, 0).await), Code::OverLimit);

    // Another address is not blocked.
    let other = descriptor(&[("generic_key", "auth"), ("remote_address", "10.0.0.8")]);
    assert_eq!(code(&one(&mut client, other, 0).await), Code::Ok);
}

async fn envoy_and_check_limit_share_one_window(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;

    for _ in 0..3 {
        one(&mut client, api("hal"), 0).await;
    }
    assert_eq!(hit(&server, "api", "hal").await.remaining, 96);
    assert_eq!(hit(&server, "api", "hal").await.remaining, 95);
    let status = one(&mut client, api("hal"), 0).await;
    assert_eq!(status.limit_remaining, 94);

    // Exhaust the window through CheckLimit; Envoy sees it over the limit.
    let spent = server
        .check(CheckLimitRequest {
            rule: "api".to_owned(),
            subject: "hal".to_owned(),
            cost: 94,
            ..CheckLimitRequest::default()
        })
        .await
        .expect("CheckLimit answers");
    assert!(spent.allowed && spent.remaining == 0, "{spent:?}");
    let status = one(&mut client, api("hal"), 0).await;
    assert_eq!(
        (code(&status), status.limit_remaining),
        (Code::OverLimit, 0)
    );
}

/// Two rules on the same descriptor entries, told apart by their subject.
const TWO_RULES: &str = r#"
[tiers]
names = ["free"]

[rules.a_by_user]
window = "1m"
limit = 3
envoy = { match = { generic_key = "login" }, subject = "user_id" }

[rules.b_by_address]
window = "1m"
limit = 7
envoy = { match = { generic_key = "login" }, subject = "remote_address" }

[quotas]
"#;

async fn first_rule_by_name_wins_and_a_missing_subject_does_not_match(backend: Backend) {
    let server = backend.serve_toml(TWO_RULES).await;
    let mut client = envoy(&server).await;

    let both = descriptor(&[
        ("generic_key", "login"),
        ("remote_address", "10.1.1.1"),
        ("user_id", "ida"),
    ]);
    let status = one(&mut client, both, 0).await;
    assert_eq!(status.current_limit, limit("a_by_user", 3, Unit::Minute));

    // Without user_id the first rule does not match; the next one does.
    let address_only = descriptor(&[("generic_key", "login"), ("remote_address", "10.1.1.1")]);
    let status = one(&mut client, address_only, 0).await;
    assert_eq!(status.current_limit, limit("b_by_address", 7, Unit::Minute));
    assert_eq!(status.limit_remaining, 6);

    // With neither, no rule matches and nothing is counted.
    let status = one(&mut client, descriptor(&[("generic_key", "login")]), 0).await;
    assert_eq!(status.current_limit, None);
    assert_eq!(left(&server, "a_by_user", "ida").await, 2);
}

async fn untrusted_descriptor_values_are_counted_not_refused(backend: Backend) {
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;
    let api_user = |user: &str| descriptor(&[("generic_key", "api"), ("user_id", user)]);
    // api: 100 per 15m for free, the default tier.
    let remaining = async |client: &mut RateLimitServiceClient<Channel>, d: RateLimitDescriptor| {
        let status = one(client, d, 0).await;
        assert_eq!(code(&status), Code::Ok, "{status:?}");
        assert_eq!(status.current_limit, limit("api", 100, Unit::Hour));
        status.limit_remaining
    };

    // An over-long subject is counted under its digest: the same value
    // shares a counter, a value with the same first 256 bytes does not.
    let long = "x".repeat(300);
    let long_too = format!("{}{}", "x".repeat(256), "y".repeat(44));
    assert_eq!(remaining(&mut client, api_user(&long)).await, 99);
    assert_eq!(remaining(&mut client, api_user(&long)).await, 98);
    assert_eq!(remaining(&mut client, api_user(&long_too)).await, 99);
    // Neither is confused with what it digests to: sent as a subject, the
    // digested form (over 256 bytes) is digested again, and a short value
    // ending in the same digest is itself.
    let digested = tollgate::limiter::untrusted_subject(&long).into_owned();
    assert!(digested.len() > 256, "{digested}");
    assert_eq!(remaining(&mut client, api_user(&digested)).await, 99);
    let tail = &digested[digested.len() - 72..];
    assert!(tail.starts_with("#sha256:"), "{digested}");
    assert_eq!(remaining(&mut client, api_user(tail)).await, 99);
    assert_eq!(left(&server, "api", tail).await, 99);

    // An empty subject is one subject like any other.
    assert_eq!(remaining(&mut client, api_user("")).await, 99);
    assert_eq!(remaining(&mut client, api_user("")).await, 98);

    // An unknown tier is the default tier, on the subject's one counter.
    assert_eq!(remaining(&mut client, api_user("jo")).await, 99);
    let gold = descriptor(&[("generic_key", "api"), ("user_id", "jo"), ("tier", "gold")]);
    assert_eq!(remaining(&mut client, gold).await, 98);
    // An empty tier entry is the default tier too, as in CheckLimit, and
    // is no untrusted value.
    let empty_tier = descriptor(&[("generic_key", "api"), ("user_id", "jo"), ("tier", "")]);
    assert_eq!(remaining(&mut client, empty_tier).await, 97);

    // Several bad values in one request: every descriptor gets its status.
    let response = should(
        &mut client,
        DOMAIN,
        vec![api_user(""), api_user(&long), api("jo")],
        0,
    )
    .await
    .expect("ShouldRateLimit answers");
    let left_now: Vec<u32> = response
        .statuses
        .iter()
        .map(|s| s.limit_remaining)
        .collect();
    assert_eq!(left_now, [97, 97, 96]);

    let metrics = server.metrics.encode();
    for line in [
        r#"tollgate_envoy_untrusted_values_total{reason="subject_too_long"} 5"#,
        r#"tollgate_envoy_untrusted_values_total{reason="subject_empty"} 3"#,
        r#"tollgate_envoy_untrusted_values_total{reason="tier_unknown"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }

    // In Redis: one counter per over-long value, under the encoded
    // `#sha256:` mark ("%23sha256%3A") after its head, its key bounded in
    // length; and the short lookalike's own counter.
    if backend.kind() == StoreKind::Redis {
        let keys = backend.redis().cli(&["KEYS", "*%23sha256%3A*"]);
        let mut keys: Vec<&str> = keys.lines().collect();
        keys.sort_by_key(|key| key.len());
        assert_eq!(keys.len(), 4, "{keys:?}");
        assert!(keys[0].contains("{rl:%23sha256%3A"), "{keys:?}");
        for key in &keys[1..] {
            assert!(key.contains(&format!("{{rl:{}%23sha256%3A", "x".repeat(256))));
            assert!(key.len() < 400, "{key}");
        }
    }

    // CheckLimit's callers are trusted services: the same values are their
    // bug, and INVALID_ARGUMENT tells them so.
    for (subject, tier, message) in [
        ("", "", "subject: must not be empty"),
        (
            long.as_str(),
            "",
            "subject: must be at most 256 bytes, got 300",
        ),
        (
            "jo",
            "gold",
            r#"tier: unknown tier "gold"; known: free, premium"#,
        ),
    ] {
        let err = server
            .check(CheckLimitRequest {
                rule: "api".to_owned(),
                subject: subject.to_owned(),
                tier: tier.to_owned(),
                ..CheckLimitRequest::default()
            })
            .await
            .expect_err("CheckLimit refuses a bad value");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(err.message(), message);
    }
}

// ---- Redis only --------------------------------------------------------

#[tokio::test]
async fn store_errors_are_unavailable() {
    let mut backend = Backend::new(StoreKind::Redis);
    let server = backend.serve_shipped().await;
    let mut client = envoy(&server).await;
    assert_eq!(code(&one(&mut client, api("kim"), 0).await), Code::Ok);

    backend.redis_mut().kill();
    for descriptors in [
        vec![api("kim")],
        vec![descriptor(&[("generic_key", "nothing")]), api("kim")],
    ] {
        let err = should(&mut client, DOMAIN, descriptors, 0)
            .await
            .expect_err("no store, no decision");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        assert!(err.message().contains(r#"rule "api""#), "{err:?}");
    }
    // A request that needs no decision still answers.
    let status = one(&mut client, descriptor(&[("generic_key", "nothing")]), 0).await;
    assert_eq!(code(&status), Code::Ok);
}

// ---- Config ------------------------------------------------------------

/// A minimal config with `extra` appended.
fn config_with(extra: &str) -> Result<config::Config, config::ConfigError> {
    let toml = format!(
        "[tiers]\nnames = [\"free\"]\n[quotas]\n[rules.api]\nwindow = \"1m\"\nlimit = 5\n{extra}"
    );
    config::load_str(&toml, "test.toml")
}

fn config_error(extra: &str) -> String {
    config_with(extra)
        .expect_err("the config is rejected")
        .to_string()
}

#[test]
fn shipped_config_maps_every_rule() {
    let config = shipped_config();
    assert_eq!(config.policy.envoy_domain(), "tollgate");
    assert_eq!(config.policy.envoy_headers(), EnvoyHeaders::Draft11);
    for rule in config.policy.rules() {
        let mapping = rule
            .envoy()
            .expect("every shipped rule has an envoy mapping");
        assert_eq!(
            mapping.entries(),
            [("generic_key".to_owned(), rule.name().to_owned())]
        );
    }
    let auth = config.policy.rule("auth").and_then(|r| r.envoy());
    assert_eq!(
        auth.map(|m| (m.subject(), m.tier())),
        Some(("remote_address", None))
    );
    let api = config.policy.rule("api").and_then(|r| r.envoy());
    assert_eq!(
        api.map(|m| (m.subject(), m.tier())),
        Some(("user_id", Some("tier")))
    );
}

#[test]
fn envoy_config_parses_as_the_issue_writes_it() {
    let config = config_with(
        "[envoy]\ndomain = \"edge\"\n[rules.api.envoy]\nmatch = { generic_key = \"api\", \"x-Route\" = \"Send\" }\nsubject = \"user_id\"\ntier = \"tier\"\n",
    )
    .expect("valid");
    assert_eq!(config.policy.envoy_domain(), "edge");
    let mapping = config
        .policy
        .rule("api")
        .and_then(|r| r.envoy())
        .expect("mapped");
    // Descriptor keys and values keep their case.
    assert_eq!(
        mapping.entries(),
        [
            ("generic_key".to_owned(), "api".to_owned()),
            ("x-Route".to_owned(), "Send".to_owned())
        ]
    );
    // Without [envoy], the domain is "tollgate"; without a mapping, a rule
    // takes no part.
    let config = config_with("").expect("valid");
    assert_eq!(config.policy.envoy_domain(), "tollgate");
    assert_eq!(config.policy.envoy_headers(), EnvoyHeaders::Draft11);
    let none = config_with("[envoy]\nheaders = \"none\"\n").expect("valid");
    assert_eq!(none.policy.envoy_headers(), EnvoyHeaders::None);
    assert!(config.policy.rule("api").and_then(|r| r.envoy()).is_none());
}

#[test]
fn bad_envoy_config_names_file_and_key() {
    let cases = [
        (
            "[envoy]\nheaders = \"draft-10\"\n",
            r#"test.toml: envoy.headers: "draft-10" is not a header format; known: draft-11, none"#,
        ),
        (
            "[envoy]\ndomain = \"\"\n",
            r#"test.toml: envoy.domain: must not be empty: it is the domain of Envoy's rate_limits (e.g. "tollgate")"#,
        ),
        (
            "[rules.api.envoy]\nmatch = {}\nsubject = \"user_id\"\n",
            r#"test.toml: rules.api.envoy.match: must hold at least one descriptor entry, e.g. { generic_key = "api" }"#,
        ),
        (
            "[rules.api.envoy]\nmatch = { generic_key = \"\" }\nsubject = \"user_id\"\n",
            r#"test.toml: rules.api.envoy.match: "generic_key" = "": descriptor keys and values must not be empty"#,
        ),
        (
            "[rules.api.envoy]\nmatch = { generic_key = \"api\" }\nsubject = \"\"\n",
            r#"test.toml: rules.api.envoy.subject: must name the descriptor entry that carries the subject, e.g. "user_id""#,
        ),
        (
            "[rules.api.envoy]\nmatch = { generic_key = \"api\" }\nsubject = \"user_id\"\ntier = \"user_id\"\n",
            r#"test.toml: rules.api.envoy.tier: "user_id" is also the subject entry; the tier needs its own entry"#,
        ),
        (
            "[rules.api.envoy]\nmatch = { generic_key = \"api\" }\nsubject = \"user_id\"\ntier = \"\"\n",
            "test.toml: rules.api.envoy.tier: must name a descriptor entry, or be left out for the default tier",
        ),
    ];
    for (extra, message) in cases {
        assert_eq!(config_error(extra), message, "{extra}");
    }

    // Errors the config crate finds still name the key.
    let missing = config_error("[rules.api.envoy]\nmatch = { generic_key = \"api\" }\n");
    assert!(
        missing.starts_with("test.toml: rules.api.envoy"),
        "{missing}"
    );
    assert!(missing.contains("subject"), "{missing}");
    let unknown = config_error(
        "[rules.api.envoy]\nmatch = { generic_key = \"api\" }\nsubject = \"u\"\nsubjects = \"u\"\n",
    );
    assert!(
        unknown.starts_with("test.toml: rules.api.envoy"),
        "{unknown}"
    );
    assert!(unknown.contains("subjects"), "{unknown}");
    let unknown = config_error("[envoy]\ndomain = \"x\"\nport = 1\n");
    assert!(unknown.starts_with("test.toml: envoy"), "{unknown}");
    assert!(unknown.contains("port"), "{unknown}");
}

// ---- RateLimit headers and shadow rules (issue 11, parts 4 and 5) -----

/// `response_headers_to_add`, read back with an RFC 8941 parser, and
/// shadow rules through the Envoy door, on both stores.
mod headers_and_shadow {
    use super::*;
    use common::ratelimit_headers::{self, HeaderItem};

    both_stores!(
        headers_list_every_matched_descriptor_in_order,
        headers_none_adds_no_headers,
        shadow_rules_are_always_ok,
    );

    /// The value of the response header `key`, if added.
    fn header<'a>(response: &'a RateLimitResponse, key: &str) -> Option<&'a str> {
        response
            .response_headers_to_add
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_str())
    }

    /// Both headers, parsed; panics unless both are there.
    fn headers(response: &RateLimitResponse) -> (Vec<HeaderItem>, Vec<HeaderItem>) {
        assert_eq!(
            response.response_headers_to_add.len(),
            2,
            "two headers: {response:?}"
        );
        let policy = header(response, "RateLimit-Policy").expect("RateLimit-Policy added");
        let ratelimit = header(response, "RateLimit").expect("RateLimit added");
        (
            ratelimit_headers::parse(policy),
            ratelimit_headers::parse(ratelimit),
        )
    }

    fn ceil_secs(d: Duration) -> i64 {
        i64::try_from(d.as_secs()).expect("fits") + i64::from(d.subsec_nanos() > 0)
    }

    /// The `RateLimit` item a matched descriptor's status implies.
    fn implied(rule: &str, status: &DescriptorStatus) -> (String, i64, i64) {
        (
            rule.to_owned(),
            i64::from(status.limit_remaining),
            ceil_secs(until_reset(status)),
        )
    }

    fn messaging(user: &str, tier: &str) -> RateLimitDescriptor {
        descriptor(&[
            ("generic_key", "messaging"),
            ("user_id", user),
            ("tier", tier),
        ])
    }

    async fn headers_list_every_matched_descriptor_in_order(backend: Backend) {
        let server = backend.serve_shipped().await;
        let mut client = envoy(&server).await;
        let response = should(
            &mut client,
            DOMAIN,
            vec![
                api("ann"),
                descriptor(&[("generic_key", "nothing")]),
                messaging("ann", "premium"),
            ],
            0,
        )
        .await
        .expect("ShouldRateLimit answers");
        // The exact values: one item per matched descriptor, in order.
        assert_eq!(
            header(&response, "RateLimit-Policy"),
            Some(r#""api";q=100;w=900, "messaging";q=60;w=60"#)
        );
        assert_eq!(
            header(&response, "RateLimit"),
            Some(r#""api";r=99;t=900, "messaging";r=59;t=60"#)
        );
        let (policy, ratelimit) = headers(&response);
        let policy: Vec<_> = policy.iter().map(ratelimit_headers::policy_of).collect();
        assert_eq!(
            policy,
            [
                ("api".to_owned(), 100, 900),
                ("messaging".to_owned(), 60, 60)
            ]
        );
        let ratelimit: Vec<_> = ratelimit
            .iter()
            .map(ratelimit_headers::ratelimit_of)
            .collect();
        let statuses = &response.statuses;
        assert_eq!(
            ratelimit,
            [
                implied("api", &statuses[0]),
                implied("messaging", &statuses[2])
            ]
        );

        // Over the limit: r is 0, and the values still parse.
        one(&mut client, with_hits(api("bo"), 100), 0).await;
        let response = should(&mut client, DOMAIN, vec![api("bo")], 0)
            .await
            .expect("ShouldRateLimit answers");
        assert_eq!(response.overall_code, Code::OverLimit as i32);
        let (_, ratelimit) = headers(&response);
        assert_eq!(
            ratelimit_headers::ratelimit_of(&ratelimit[0]),
            implied("api", &response.statuses[0])
        );
        assert_eq!(ratelimit_headers::ratelimit_of(&ratelimit[0]).1, 0);

        // A dry run (hits_addend 0): r is what is left now, as
        // limit_remaining says.
        let response = should(&mut client, DOMAIN, vec![with_hits(api("cy"), 0)], 0)
            .await
            .expect("ShouldRateLimit answers");
        let (_, ratelimit) = headers(&response);
        assert_eq!(ratelimit_headers::ratelimit_of(&ratelimit[0]).1, 100);

        // Nothing matched, or another domain: no headers.
        for (domain, descriptors) in [
            (DOMAIN, vec![descriptor(&[("generic_key", "nothing")])]),
            ("elsewhere", vec![api("ann")]),
        ] {
            let response = should(&mut client, domain, descriptors, 0)
                .await
                .expect("ShouldRateLimit answers");
            assert!(response.response_headers_to_add.is_empty(), "{response:?}");
        }
    }

    async fn headers_none_adds_no_headers(backend: Backend) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml");
        let shipped = std::fs::read_to_string(path).expect("the shipped config");
        let toml = shipped.replace("headers = \"draft-11\"", "headers = \"none\"");
        assert_ne!(toml, shipped, "the shipped config sets headers");
        let server = backend.serve_toml(&toml).await;
        let mut client = envoy(&server).await;
        let response = should(&mut client, DOMAIN, vec![api("ann"), api("bob")], 0)
            .await
            .expect("ShouldRateLimit answers");
        assert!(response.response_headers_to_add.is_empty(), "{response:?}");
        // Everything else as usual; CheckLimit still fills its values.
        assert_eq!(response.statuses[0].limit_remaining, 99);
        let check = hit(&server, "api", "ann").await;
        assert_eq!(check.ratelimit_policy, r#""api";q=100;w=900"#);
        assert_eq!(ratelimit_headers::ratelimit(&check.ratelimit).1, 98);
    }

    /// `api` is enforced, `watch` is a shadow rule; 1 per minute each.
    const SHADOW_TOML: &str = r#"
[tiers]
names = ["free"]

[rules.api]
window = "1m"
limit = 1
envoy = { match = { generic_key = "api" }, subject = "user_id" }

[rules.watch]
window = "1m"
limit = 1
shadow = true
envoy = { match = { generic_key = "watch" }, subject = "user_id" }

[quotas.kinds]
text = 3
"#;

    async fn shadow_rules_are_always_ok(backend: Backend) {
        let server = backend.serve_toml(SHADOW_TOML).await;
        let mut client = envoy(&server).await;
        let watch = |user: &str| descriptor(&[("generic_key", "watch"), ("user_id", user)]);

        let first = should(&mut client, DOMAIN, vec![watch("ann"), api("ann")], 0)
            .await
            .expect("ShouldRateLimit answers");
        assert_eq!(first.overall_code, Code::Ok as i32, "{first:?}");

        // Both over their limit: the shadow descriptor is OK all the same,
        // the enforced one decides the overall code.
        let second = should(&mut client, DOMAIN, vec![watch("ann"), api("ann")], 0)
            .await
            .expect("ShouldRateLimit answers");
        assert_eq!(code(&second.statuses[0]), Code::Ok, "{second:?}");
        assert_eq!(second.statuses[0].limit_remaining, 0, "the store's figure");
        assert_eq!(code(&second.statuses[1]), Code::OverLimit, "{second:?}");
        assert_eq!(second.overall_code, Code::OverLimit as i32);
        let (_, ratelimit) = headers(&second);
        assert_eq!(
            ratelimit_headers::ratelimit_of(&ratelimit[0]),
            implied("watch", &second.statuses[0])
        );

        // The shadow descriptor alone, again and again (the deny cache
        // answers the repeats): OK.
        for _ in 0..3 {
            let status = one(&mut client, watch("ann"), 0).await;
            assert_eq!(code(&status), Code::Ok, "{status:?}");
        }
        // A dry run of the full shadow rule: OK, and nothing is left now.
        let status = one(&mut client, with_hits(watch("ann"), 0), 0).await;
        assert_eq!((code(&status), status.limit_remaining), (Code::Ok, 0));
        // CheckLimit sees the same window: shadowed.
        let check = hit(&server, "watch", "ann").await;
        assert!(check.allowed && check.shadowed, "{check:?}");
        let text = server.metrics.encode();
        let line =
            r#"tollgate_decisions_total{rule="watch",tier="free",outcome="shadow_denied"} 6"#;
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}
