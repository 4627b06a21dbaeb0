//! Any ShouldRateLimit request, under the shipped config: every descriptor
//! maps (or matches no rule) without an error, and the door answers it in
//! full, on the memory store, never with an error or a panic.

#![no_main]

use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use envoy_types::pb::{
    envoy::{
        extensions::common::ratelimit::v3::{RateLimitDescriptor, rate_limit_descriptor::Entry},
        service::ratelimit::v3::{RateLimitRequest, rate_limit_service_server::RateLimitService},
    },
    google::protobuf::UInt64Value,
};
use libfuzzer_sys::fuzz_target;
use tollgate::{
    limiter::{DIGEST_MARK, Limiter, MAX_ID_BYTES, untrusted_subject},
    metrics::UntrustedValue,
    rules::Policy,
    service::envoy::{EnvoyService, map_descriptor},
    store::memory::MemoryStore,
};

/// The shipped config: its `[rules.*.envoy]` mappings are what Envoy meets.
const CONFIG: &str = include_str!("../../config/tollgate.toml");

/// A string the policy knows (a key, a match value, a tier) by index, so the
/// fuzzer reaches matching descriptors at once, or any other string.
#[derive(Debug, Arbitrary)]
enum Text {
    Known(u8),
    /// This text repeated: long values without long inputs.
    Repeated(u16, String),
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct FuzzDescriptor {
    entries: Vec<(Text, Text)>,
    hits_addend: Option<u64>,
}

#[derive(Debug, Arbitrary)]
struct FuzzRequest {
    other_domain: Option<String>,
    descriptors: Vec<FuzzDescriptor>,
    hits_addend: u32,
}

struct Fixture {
    policy: Arc<Policy>,
    /// Every key, match value and tier name of the policy.
    known: Vec<String>,
    runtime: tokio::runtime::Runtime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let policy = match tollgate::config::load_str(CONFIG, "shipped") {
            Ok(config) => Arc::new(config.policy),
            Err(err) => panic!("the shipped config is valid: {err}"),
        };
        let mut known: Vec<String> = policy.tiers().names().to_vec();
        for mapping in policy.rules().filter_map(|rule| rule.envoy()) {
            for (key, value) in mapping.entries() {
                known.extend([key.clone(), value.clone()]);
            }
            known.push(mapping.subject().to_owned());
            known.extend(mapping.tier().map(str::to_owned));
        }
        known.sort();
        known.dedup();
        let runtime = match tokio::runtime::Builder::new_current_thread().build() {
            Ok(runtime) => runtime,
            Err(err) => panic!("a runtime: {err}"),
        };
        Fixture {
            policy,
            known,
            runtime,
        }
    })
}

impl Text {
    fn build(&self, known: &[String]) -> String {
        match self {
            Text::Known(i) => known[usize::from(*i) % known.len()].clone(),
            Text::Repeated(times, text) => text.repeat(usize::from(*times) % 512),
            Text::Other(text) => text.clone(),
        }
    }
}

/// What the mapping promises for a descriptor.
fn check_mapping(policy: &Policy, descriptor: &RateLimitDescriptor, request_hits: u32) {
    let Some(mapped) = map_descriptor(policy, descriptor, request_hits) else {
        return;
    };
    assert!(mapped.cost >= 1, "{mapped:?}");
    assert!(policy.tiers().resolve(mapped.tier).is_some(), "{mapped:?}");
    assert!(policy.rule(mapped.rule.name()).is_some(), "{mapped:?}");
    let long = mapped.subject.len() > MAX_ID_BYTES;
    assert_eq!(
        mapped.untrusted.contains(&UntrustedValue::subject_too_long),
        long
    );
    assert_eq!(
        mapped.untrusted.contains(&UntrustedValue::subject_empty),
        mapped.subject.is_empty()
    );
    let counted = untrusted_subject(mapped.subject);
    if long {
        // A digested subject lies beyond every subject counted as sent.
        assert!(counted.len() > MAX_ID_BYTES, "{counted:?}");
        let tail = &counted[counted.len() - 64 - DIGEST_MARK.len()..];
        assert!(tail.starts_with(DIGEST_MARK), "{counted:?}");
        assert_eq!(counted, untrusted_subject(mapped.subject));
    } else {
        assert_eq!(counted, mapped.subject);
    }
}

fuzz_target!(|input: FuzzRequest| {
    let fixture = fixture();
    let policy = &fixture.policy;
    let descriptors: Vec<RateLimitDescriptor> = input
        .descriptors
        .iter()
        .take(8)
        .map(|d| RateLimitDescriptor {
            entries: d
                .entries
                .iter()
                .take(8)
                .map(|(key, value)| Entry {
                    key: key.build(&fixture.known),
                    value: value.build(&fixture.known),
                })
                .collect(),
            hits_addend: d.hits_addend.map(|value| UInt64Value { value }),
            ..RateLimitDescriptor::default()
        })
        .collect();
    for descriptor in &descriptors {
        check_mapping(policy, descriptor, input.hits_addend);
    }
    let count = descriptors.len();
    let request = RateLimitRequest {
        domain: input
            .other_domain
            .clone()
            .unwrap_or_else(|| policy.envoy_domain().to_owned()),
        descriptors,
        hits_addend: input.hits_addend,
    };
    // A fresh store per input, so memory does not grow with the run.
    let limiter = Arc::new(Limiter::new(MemoryStore::new(), Arc::clone(policy)));
    let service = EnvoyService::new(limiter);
    let answer = fixture
        .runtime
        .block_on(service.should_rate_limit(tonic::Request::new(request)));
    match answer {
        Ok(response) => assert_eq!(response.get_ref().statuses.len(), count),
        Err(status) => panic!("ShouldRateLimit refused a request: {status:?}"),
    }
});
