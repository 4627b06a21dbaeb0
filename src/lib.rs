//! tollgate: rate limits and usage quotas over gRPC.
//!
//! Backend services ask tollgate two questions before doing something costly:
//! "may this subject make one more call under this rule?" (`CheckLimit`) and
//! "may this user send one more message of this kind in this conversation
//! today?" (`IncrementUsage`). Counters live in a [`store`]: Redis, where they
//! change only inside atomic Lua scripts so that many instances agree, or an
//! embedded in-memory store for a single instance.
//!
//! # Layout
//!
//! - [`config`]: the TOML file and environment, read once and validated into
//!   process [`config::Settings`] and the limiting [`rules::Policy`].
//! - [`rules`]: the policy as domain types: tiers, rules, quotas.
//! - [`limiter`]: the product. Validates a request against the policy and asks
//!   the store for a decision. gRPC is one door into it.
//! - [`store`]: the small [`store::Store`] trait and its backends,
//!   [`store::memory`] and [`store::redis`]; [`keys`] builds every Redis key.
//! - [`stats`]: usage statistics of IncrementUsage, aggregated in process
//!   and flushed to the store once a second, off the decision's path.
//! - [`service`]: the tonic services, mapping wire types to domain types and
//!   errors to gRPC status in one place.
//! - [`headers`]: the RateLimit header values (IETF draft 11) that
//!   CheckLimit returns and the Envoy door adds.
//! - [`server`]: binds everything together and serves until shutdown.
//! - [`tls`]: gRPC over TLS, with certificates replaced on reload.
//! - [`reload`]: hot reload of the policy (and of the TLS files) on SIGHUP
//!   and on file change.

pub mod config;
pub mod headers;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod reload;
pub mod rules;
pub mod server;
pub mod service;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod tls;

/// Generated protobuf and gRPC types of the `tollgate.v1` package.
pub mod proto {
    #![allow(missing_docs, unreachable_pub, clippy::all)]
    tonic::include_proto!("tollgate.v1");

    /// Encoded descriptors of every tollgate proto, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/tollgate_descriptor.bin"));

    /// Encoded descriptors of Envoy's rate limit service (trimmed copies
    /// under proto/envoy/), served by reflection so that ghz and grpcurl can
    /// call ShouldRateLimit with no proto files at hand.
    pub const ENVOY_FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptor.bin"));
}
