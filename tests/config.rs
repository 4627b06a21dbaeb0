//! The config file's contract: every bad config named by one fixture under
//! `tests/fixtures/config/` and pinned to its exact message, the shipped
//! config pinned to the documented defaults, and operator-added tiers, rules
//! and kinds working without code changes.
//!
//! `load_file` also reads `TOLLGATE_*` variables; these tests never set any
//! (the environment is process-wide), so environment overrides are tested
//! through the binary in `tests/cli.rs`.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use tollgate::{
    config::{self, Backend, ConfigError, LogFormat, Overrides},
    rules::{Algorithm, Quota},
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(name)
}

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tollgate.toml")
}

fn load_error(path: &Path) -> ConfigError {
    match config::load_file(path, &Overrides::default()) {
        Ok(_) => panic!("{} loaded, but it is broken", path.display()),
        Err(err) => err,
    }
}

/// `(fixture, dotted key, problem)`: the whole message is
/// `<path>: <key>: <problem>`, or `<path>: <problem>` for an empty key. A
/// problem ending in `...` is a prefix: the lists of known keys grow as
/// sections are added, and only their start is pinned.
const BROKEN: &[(&str, &str, &str)] = &[
    (
        "unknown_top_level_key.toml",
        "sever",
        "unknown key; expected one of `server`, `store`, `log`, `tiers`, `rules`, `quotas`...",
    ),
    (
        "unknown_rule_key.toml",
        "rules.api.burst",
        "unknown key; expected one of `window`, `limit`, `block_for`, `algorithm`...",
    ),
    (
        "bad_duration.toml",
        "rules.api.window",
        "\"15 fortnights\" is not a duration such as 500ms, 2s, 15m or 24h \
         (unknown time unit \"fortnights\", supported units: ns, us/µs, ms, sec, min, hours, \
         days, weeks, months, years (and few variations))",
    ),
    (
        "zero_window.toml",
        "rules.api.window",
        "\"0s\" is shorter than 1ms",
    ),
    (
        "tier_not_covered.toml",
        "rules.api.limit",
        "tier \"premium\" is not covered: give it a value, or use one number for every tier",
    ),
    (
        "unknown_tier_in_limit.toml",
        "rules.api.limit",
        "tier \"gold\" is not in tiers.names (free, premium)",
    ),
    (
        "default_tier_not_named.toml",
        "tiers.default",
        "\"basic\" is not in tiers.names (free, premium)",
    ),
    (
        "duplicate_tier.toml",
        "tiers.names",
        "tier \"free\" is named twice",
    ),
    (
        "bad_algorithm.toml",
        "rules.api.algorithm",
        "\"token_bucket\" is not an algorithm; known: sliding_log, sliding_counter",
    ),
    (
        "negative_limit.toml",
        "rules.api.limit",
        "expected a whole number or a table of tier = number, got -5",
    ),
    (
        "limit_wrong_type.toml",
        "rules.api.limit",
        "expected a whole number or a table of tier = number, got a list",
    ),
    (
        "bad_quota_word.toml",
        "quotas.kinds.text",
        "premium: \"infinite\" is not a quota: use a whole number or \"unlimited\"",
    ),
    (
        "quota_tier_not_covered.toml",
        "quotas.kinds.audio",
        "tier \"premium\" is not covered: give it a value, or use one number for every tier",
    ),
    (
        "bad_store_url.toml",
        "store.url",
        // The password in the fixture (s3cret) is masked.
        "\"postgres://app:***@127.0.0.1:5432/tollgate\" is not a store URL: \
         use \"memory://\" or \"redis://host:6379/0\"",
    ),
    (
        "prefix_with_hash_tag.toml",
        "store.key_prefix",
        "must not contain '{' or '}': tollgate places its own Redis Cluster hash tags",
    ),
    (
        "bad_listen.toml",
        "server.listen",
        "\"127.0.0.1\" is not an address such as 127.0.0.1:50051",
    ),
    (
        "bad_admin_listen.toml",
        "server.admin_listen",
        "\"localhost\" is not an address such as 127.0.0.1:50052",
    ),
    (
        "admin_listen_is_listen.toml",
        "server.admin_listen",
        "127.0.0.1:50051 is also server.listen: the admin door needs a port of its own",
    ),
    (
        "bad_rule_name.toml",
        "rules.Api!",
        "\"Api!\" is not a valid name: use 1 to 64 of a-z, 0-9, '_' and '-'",
    ),
    ("missing_tiers.toml", "tiers", "required but missing"),
    (
        // No key can be named in a file that does not parse: the line and
        // column stand in for it.
        "toml_syntax_error.toml",
        "",
        "TOML parse error at line 6, column 14: invalid basic string, expected `\"`",
    ),
    (
        "bad_log_format.toml",
        "log.format",
        "\"xml\" is not a log format; known: text, json",
    ),
    (
        "zero_pool_size.toml",
        "store.pool_size",
        "must be at least 1",
    ),
    (
        "big_max_batch.toml",
        "store.max_batch",
        "513 is not a batch size from 1 (no batching) to 512",
    ),
    (
        "zero_max_entries.toml",
        "store.max_entries",
        "0 is not an entry count of at least 1 (leave it out for 4000000)",
    ),
    (
        "zero_worker_threads.toml",
        "server.worker_threads",
        "0 is not a thread count from 1 to 1024 (leave it out for one per CPU core)",
    ),
    (
        "zero_stats_hours.toml",
        "stats.hours",
        "0 is not a bucket count from 1 to 87600",
    ),
    (
        "bad_stats_flush.toml",
        "stats.flush",
        "\"often\" is not a duration such as 500ms, 2s, 15m or 24h...",
    ),
    (
        "tls_cert_without_key.toml",
        "server.tls.key",
        "required with server.tls.cert: the certificate's private key (PEM)",
    ),
    (
        "tls_unreadable_cert.toml",
        "server.tls.cert",
        "cannot read \"/nope.pem\": No such file or directory",
    ),
    (
        "bad_envoy_headers.toml",
        "envoy.headers",
        "\"draft-10\" is not a header format; known: draft-11, none",
    ),
    (
        "shadow_not_a_bool.toml",
        "rules.api.shadow",
        "expected a boolean, got string \"maybe\"",
    ),
];

#[test]
fn every_broken_fixture_fails_with_its_exact_message() {
    for &(file, key, problem) in BROKEN {
        let path = fixture(file);
        let err = load_error(&path);
        let expected = if key.is_empty() {
            format!("{}: {problem}", path.display())
        } else {
            format!("{}: {key}: {problem}", path.display())
        };
        match expected.strip_suffix("...") {
            Some(prefix) => assert!(err.to_string().starts_with(prefix), "{file}: {err}"),
            None => assert_eq!(err.to_string(), expected, "{file}"),
        }
        assert_eq!(err.origin, path.display().to_string(), "{file}");
        assert_eq!(err.key, key, "{file}");
        assert_eq!(err.set_by, None, "{file}: the file set it");
        assert!(!err.to_string().contains('\n'), "{file}: one line");
    }
}

#[test]
fn every_fixture_is_in_the_table() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(fixture(""))
        .expect("tests/fixtures/config exists")
        .map(|entry| {
            entry
                .expect("a readable directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".toml"))
        .collect();
    let in_table: BTreeSet<String> = BROKEN.iter().map(|(f, _, _)| (*f).to_owned()).collect();
    assert_eq!(on_disk, in_table);
}

#[test]
fn a_masked_password_never_reaches_the_message() {
    let err = load_error(&fixture("bad_store_url.toml"));
    assert!(!format!("{err} {err:?}").contains("s3cret"), "{err}");
}

#[test]
fn a_missing_file_is_named() {
    let path = fixture("does_not_exist.toml");
    let err = load_error(&path);
    assert_eq!(err.origin, path.display().to_string());
    assert!(
        err.to_string()
            .starts_with(&format!("{}: cannot read the file: ", path.display())),
        "{err}"
    );
}

#[test]
fn the_shipped_config_holds_the_documented_defaults() {
    let config = config::load_file(&shipped(), &Overrides::default())
        .unwrap_or_else(|err| panic!("the shipped config must load: {err}"));

    let settings = &config.settings;
    assert_eq!(
        settings.listen,
        "127.0.0.1:50051".parse::<SocketAddr>().expect("an address")
    );
    assert_eq!(settings.store.backend, Backend::Memory);
    assert!(settings.store.redis_options().is_none());
    assert_eq!(settings.store.key_prefix, "aim:");
    assert_eq!(settings.store.timeout, Duration::from_millis(250));
    assert_eq!(settings.store.pool_size, 1);
    assert_eq!(settings.store.max_batch, 64);
    assert_eq!(
        settings.store.max_entries,
        tollgate::store::memory::DEFAULT_MAX_ENTRIES
    );
    assert_eq!(settings.worker_threads, None, "one thread per core");
    assert_eq!(settings.log.level, "info");
    assert_eq!(settings.log.format, LogFormat::Text);

    let policy = &config.policy;
    let tiers = policy.tiers();
    assert_eq!(tiers.names(), ["free", "premium"]);
    assert_eq!(tiers.name(tiers.default_tier()), "free");
    assert_eq!(tiers.resolve(""), tiers.resolve("free"));
    let free = tiers.resolve("free").expect("free is a tier");
    let premium = tiers.resolve("premium").expect("premium is a tier");

    const MIN: u64 = 60;
    // (rule, free limit, window, block_for, premium strictly higher)
    let expected = [
        ("ai", 20, 5 * MIN, None, true),
        ("api", 100, 15 * MIN, None, true),
        ("auth", 5, 15 * MIN, Some(15 * MIN), false),
        ("messaging", 10, MIN, None, true),
        ("uploads", 20, 60 * MIN, None, true),
    ];
    let names: Vec<&str> = policy.rules().map(|r| r.name()).collect();
    assert_eq!(names, ["ai", "api", "auth", "messaging", "uploads"]);
    for (name, limit, window, block_for, premium_higher) in expected {
        let rule = policy.rule(name).expect("a shipped rule");
        assert_eq!(rule.name(), name);
        assert_eq!(rule.limit(free), limit, "{name}");
        assert_eq!(rule.window(), Duration::from_secs(window), "{name}");
        assert_eq!(
            rule.block_for(),
            block_for.map(Duration::from_secs),
            "{name}"
        );
        assert_eq!(rule.algorithm(), Algorithm::SlidingLog, "{name}");
        if premium_higher {
            assert!(
                rule.limit(premium) > limit,
                "{name}: premium must be higher"
            );
        } else {
            assert!(rule.limit(premium) >= limit, "{name}: premium never lower");
        }
    }

    let quotas = policy.quotas();
    assert_eq!(quotas.period(), Duration::from_secs(24 * 60 * MIN));
    let kinds: Vec<&str> = quotas.kinds().iter().map(|k| k.name()).collect();
    assert_eq!(kinds, ["audio", "image", "text"]);
    for (kind, limit) in [("text", 30), ("audio", 5), ("image", 5)] {
        let kind_quotas = quotas.kind(kind).expect("a shipped kind");
        assert_eq!(kind_quotas.quota(free), Quota::Limited(limit), "{kind}");
        assert_eq!(kind_quotas.quota(premium), Quota::Unlimited, "{kind}");
    }
}

#[test]
fn command_line_overrides_win_over_the_file() {
    let overrides = Overrides {
        listen: Some("127.0.0.1:6001".to_owned()),
        store_url: Some("redis://:hunter2@127.0.0.1:6379/3".to_owned()),
    };
    let config = config::load_file(&shipped(), &overrides)
        .unwrap_or_else(|err| panic!("overrides must load: {err}"));
    let settings = &config.settings;
    assert_eq!(
        settings.listen,
        "127.0.0.1:6001".parse::<SocketAddr>().expect("an address")
    );
    let redis = settings
        .store
        .redis_options()
        .expect("a redis:// override selects Redis");
    assert_eq!(redis.url, "redis://:hunter2@127.0.0.1:6379/3");
    assert_eq!(redis.key_prefix, "aim:");
    // Debug (as logged) masks the password.
    assert!(!format!("{settings:?}").contains("hunter2"));
}

#[test]
fn a_bad_override_names_its_key_and_its_flag() {
    let overrides = Overrides {
        listen: Some("localhost".to_owned()),
        store_url: None,
    };
    let path = shipped();
    let err =
        config::load_file(&path, &overrides).expect_err("a listen address without a port fails");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: server.listen: \"localhost\" is not an address such as 127.0.0.1:50051 \
             (set by --listen)",
            path.display()
        )
    );
    assert_eq!(err.set_by.as_deref(), Some("--listen"));

    let overrides = Overrides {
        listen: None,
        store_url: Some("redis://:hunter2@".to_owned()),
    };
    let err = config::load_file(&path, &overrides).expect_err("a URL without a host fails");
    assert_eq!(err.key, "store.url", "{err}");
    assert_eq!(err.set_by.as_deref(), Some("--store"), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn operators_add_tiers_rules_and_kinds_without_code() {
    let toml = r#"
        [tiers]
        names = ["free", "premium", "enterprise"]
        default = "premium"

        [rules.api]
        window = "15m"
        limit = { free = 100, premium = 1000, enterprise = 10000 }

        [rules.search]
        window = "30s"
        limit = 7
        algorithm = "sliding_counter"

        [quotas]
        period = "12h"

        [quotas.kinds]
        text = { free = 30, premium = 300, enterprise = "unlimited" }
        video = 2
    "#;
    let config = config::load_str(toml, "operator.toml")
        .unwrap_or_else(|err| panic!("an operator's config must load: {err}"));
    let policy = &config.policy;
    let tiers = policy.tiers();
    assert_eq!(tiers.names(), ["free", "premium", "enterprise"]);
    assert_eq!(tiers.name(tiers.default_tier()), "premium");
    let enterprise = tiers.resolve("enterprise").expect("enterprise is a tier");
    assert_eq!(tiers.resolve("gold"), None);

    let api = policy.rule("api").expect("api");
    assert_eq!(api.limit(enterprise), 10000);
    let search = policy.rule("search").expect("search");
    assert_eq!(search.window(), Duration::from_secs(30));
    assert_eq!(search.algorithm(), Algorithm::SlidingCounter);
    // One number covers every tier, the added one too.
    for name in tiers.names() {
        let tier = tiers.resolve(name).expect("a named tier");
        assert_eq!(search.limit(tier), 7, "{name}");
    }

    let quotas = policy.quotas();
    assert_eq!(quotas.period(), Duration::from_secs(12 * 3600));
    let text = quotas.kind("text").expect("text");
    assert_eq!(text.quota(enterprise), Quota::Unlimited);
    assert_eq!(
        quotas
            .kind("video")
            .expect("video")
            .quota(enterprise)
            .limit(),
        Some(2)
    );

    // The same operator config with a rule that forgets the new tier fails.
    let forgetful = toml.replace(
        "limit = { free = 100, premium = 1000, enterprise = 10000 }",
        "limit = { free = 100, premium = 1000 }",
    );
    let err = config::load_str(&forgetful, "operator.toml").expect_err("enterprise is not covered");
    assert_eq!(
        err.to_string(),
        "operator.toml: rules.api.limit: tier \"enterprise\" is not covered: \
         give it a value, or use one number for every tier"
    );
}

#[test]
fn worker_threads_are_taken_as_given() {
    let toml = "[server]\nworker_threads = 3\n[tiers]\nnames = [\"free\"]\n\
                [rules.api]\nwindow = \"1m\"\nlimit = 1\n[quotas.kinds]\ntext = 1\n";
    let config = config::load_str(toml, "inline").unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.settings.worker_threads, Some(3));
}
