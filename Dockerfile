# syntax=docker/dockerfile:1
# tollgate: a release build, then a small non-root runtime image.

FROM rust:1-bookworm AS build
WORKDIR /src
# Build dependencies first so that source edits reuse the cached layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo.toml names a [[bench]], so every build needs its file.
COPY benches benches
RUN mkdir -p src/bin/tollgate-bench && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/tollgate-bench/main.rs && touch src/lib.rs \
    && cargo build --release --locked || true
COPY src src
COPY lua lua
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin tollgate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.toml /etc/tollgate/tollgate.toml
USER tollgate
# Inside a container the port must be reachable from outside it; everywhere
# else tollgate binds to loopback by default.
ENV TOLLGATE_SERVER__LISTEN=0.0.0.0:50051 \
    TOLLGATE_SERVER__METRICS_LISTEN=0.0.0.0:9464
# gRPC (CheckLimit, IncrementUsage, ShouldRateLimit, health, reflection) and
# Prometheus metrics.
EXPOSE 50051 9464
# With TLS on ([server.tls]), set TOLLGATE_HEALTH_CA to the CA that signed
# the server's certificate (and TOLLGATE_HEALTH_CERT / TOLLGATE_HEALTH_KEY for
# mutual TLS, TOLLGATE_HEALTH_DOMAIN when the certificate does not name
# 127.0.0.1): `--ca` makes health dial https:// (see README, "TLS").
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["tollgate", "health", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["tollgate"]
CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]
