# tollgate: a release build, then a small non-root runtime image.

FROM rust:1-bookworm AS build
WORKDIR /src
# The release profile keeps line tables for profiling (Cargo.toml); in the
# image they were 38 of the binary's 46 MB. Build without them and strip
# the standard library's too, keeping the symbols that name a panic's
# frames. Set before the warm-up, so that both builds share one profile.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo
# Build dependencies first so that source edits reuse the cached layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo.toml names a [[bench]] and an [[example]]; every build gets their
# files, so that no cargo version can refuse the manifest for a missing one.
COPY benches benches
COPY bench/accuracy.rs bench/accuracy.rs
# An empty library and server stand in for the sources; the step fails if
# the build does, rather than leave the dependencies to the next step.
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --bin tollgate
COPY src src
COPY lua lua
# COPY keeps the files' own times, which may be older than the stand-ins'.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
# The group first, with the user's id: useradd --system would otherwise
# create one with the next free system id (999).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tollgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.toml /etc/tollgate/tollgate.toml
# Numeric, so that a runtime that must check the user is not root
# (Kubernetes' runAsNonRoot) can, without reading /etc/passwd.
USER 10001:10001
# Inside a container the port must be reachable from outside it; everywhere
# else tollgate binds to loopback by default.
ENV TOLLGATE_SERVER__LISTEN=0.0.0.0:50051 \
    TOLLGATE_SERVER__METRICS_LISTEN=0.0.0.0:9464
# gRPC (CheckLimit, IncrementUsage, ShouldRateLimit, health, reflection) and
# Prometheus metrics.
EXPOSE 50051 9464
# `tollgate health` dials the port TOLLGATE_SERVER__LISTEN names, on
# loopback, so a container told to listen elsewhere stays healthy. With TLS
# on ([server.tls]), set TOLLGATE_HEALTH_CA to the CA that signed the
# server's certificate (and TOLLGATE_HEALTH_CERT / TOLLGATE_HEALTH_KEY for
# mutual TLS, TOLLGATE_HEALTH_DOMAIN when the certificate does not name
# 127.0.0.1): `--ca` makes health dial https:// (see README, "TLS").
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["tollgate", "health"]
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
