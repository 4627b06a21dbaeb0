//! Compiles proto/ with protox (pure Rust, so no system `protoc` is needed)
//! and keeps the encoded descriptor sets for gRPC server reflection.
//!
//! tollgate's own protos also generate code. The trimmed Envoy protos under
//! proto/envoy/ only feed reflection: the Envoy door's code comes from the
//! envoy-types crate, which ships no descriptors.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 4] = [
        "proto/tollgate/v1/rate_limiter.proto",
        "proto/tollgate/v1/usage_quota.proto",
        "proto/tollgate/v1/usage_stats.proto",
        "proto/tollgate/v1/admin.proto",
    ];
    const ENVOY_PROTOS: [&str; 2] = [
        "proto/envoy/service/ratelimit/v3/rls.proto",
        "proto/envoy/extensions/common/ratelimit/v3/ratelimit.proto",
    ];
    for proto in PROTOS.iter().chain(&ENVOY_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }

    let descriptors = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("tollgate_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    std::fs::write(
        out_dir.join("envoy_descriptor.bin"),
        prost::Message::encode_to_vec(&protox::compile(ENVOY_PROTOS, ["proto"])?),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
