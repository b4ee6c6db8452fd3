# syntax=docker/dockerfile:1
#
# Switchyard container image: the `switchyard` binary on Debian slim, run as an
# unprivileged user. The same image serves as the proxy and as the built-in test
# backend (`switchyard backend --listen 0.0.0.0:8081 --name web-1`); docker-compose.yml
# uses it both ways.
#
#     docker build -t switchyard .
#     docker run --rm -p 8080:8080 -p 9090:9090 \
#         -v "$PWD/my.toml:/etc/switchyard/switchyard.toml:ro" switchyard
#
# The configuration's listeners must bind 0.0.0.0 (not 127.0.0.1) to be reachable from
# outside the container.

ARG RUST_VERSION=1

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY src ./src
# The registry and target caches persist between builds (BuildKit), so a rebuild after
# a source change recompiles only the crate itself.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin switchyard \
    && cp target/release/switchyard /usr/local/bin/switchyard

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 switchyard \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin switchyard
COPY --from=build /usr/local/bin/switchyard /usr/local/bin/switchyard
USER 10001:10001
# Read when no --config is given; mount a file or a folder there.
ENV SWITCHYARD_CONFIG=/etc/switchyard/switchyard.toml
# Client traffic and the admin listener (/metrics, /healthz, /readyz, /status, /reload).
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchyard"]
