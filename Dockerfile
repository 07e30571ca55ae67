# syntax=docker/dockerfile:1
#
# llama-serve container image.
#
#   CPU (default):  docker build -t llama-serve .
#   CUDA:           docker build -t llama-serve:cuda --build-arg VARIANT=cuda \
#                     --build-arg CUDA_COMPUTE_CAP=80 .     # 80 = A100, 86 = RTX 30xx/A10, 89 = L4/RTX 40xx, 90 = H100
#
# With no arguments the image serves the bundled tiny model offline on port 8000;
# pass `--model meta-llama/Llama-2-7b-chat-hf` (and HF_TOKEN) or mount a model
# directory for a real one. Hugging Face downloads go to /data/huggingface (a volume).

ARG VARIANT=cpu
ARG RUST_VERSION=1.90.0
ARG CUDA_VERSION=12.4.1
ARG UBUNTU_VERSION=22.04
ARG CARGO_CHEF_VERSION=0.1.71

# ---------------------------------------------------------------- toolchains
FROM rust:${RUST_VERSION}-bookworm AS toolchain-cpu

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS toolchain-cuda
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"

# ---------------------------------------------------------------- cargo-chef
# hadolint ignore=DL3006
FROM toolchain-${VARIANT} AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

# The dependency recipe: changes only when Cargo.toml/Cargo.lock change.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
ARG VARIANT
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
COPY --from=planner /src/recipe.json recipe.json
# Dependencies only: this layer is cached until the lockfile changes.
# `features` is empty or two words, so it is expanded unquoted on purpose.
# hadolint ignore=SC2086
RUN features=""; if [ "${VARIANT}" = "cuda" ]; then features="--features cuda"; fi; \
    cargo chef cook --release --locked -p llama-server ${features} --recipe-path recipe.json
COPY . .
# hadolint ignore=SC2086
RUN features=""; if [ "${VARIANT}" = "cuda" ]; then features="--features cuda"; fi; \
    cargo build --release --locked -p llama-server --bin llama-serve ${features} \
 && install -D -m 0755 target/release/llama-serve /out/llama-serve

# ---------------------------------------------------------------- runtimes
FROM debian:bookworm-slim AS runtime-cpu

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime-cuda

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
# curl only for the HEALTHCHECK; ca-certificates for Hugging Face downloads.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 llama \
 && useradd --system --uid 10001 --gid llama --home-dir /app --shell /usr/sbin/nologin llama \
 && mkdir -p /data/huggingface \
 && chown -R llama:llama /data
WORKDIR /app
COPY --from=builder /out/llama-serve /usr/local/bin/llama-serve
# The bundled model (served when no --model is given) and the default config.
COPY models/tiny-llama /app/models/tiny-llama
COPY config/default.toml /app/config/default.toml

ENV HF_HOME=/data/huggingface \
    LLAMA_SERVE_HOST=0.0.0.0 \
    LLAMA_SERVE_PORT=8000 \
    LLAMA_SERVE_LOG_FORMAT=json
VOLUME ["/data/huggingface"]
EXPOSE 8000
USER 10001:10001

# Liveness only: /ready (model loaded, not draining) is for load balancers.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/health"]

# SIGTERM drains in-flight requests for up to --shutdown-timeout (30 s by
# default); give `docker stop` more than that: docker stop -t 40.
STOPSIGNAL SIGTERM
ENTRYPOINT ["llama-serve"]
CMD ["--config", "/app/config/default.toml"]
