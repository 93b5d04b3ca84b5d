# One image, one binary: `sjob` is both the operator (`sjob operator`) and the engine that
# StatefulJob pods run (`sjob run JOB.yaml ...`; the operator starts engine containers with
# `command: ["sjob"]`, so the binary is on PATH).
#
#   docker build -t ghcr.io/sjob-dev/sjob:0.1.0 .
#   docker run --rm ghcr.io/sjob-dev/sjob:0.1.0 --help
#   docker run --rm ghcr.io/sjob-dev/sjob:0.1.0 crd
#
# Build arguments:
#   RUST_VERSION    the Rust toolchain of the builder (the crate is edition 2024 and uses
#                   let-chains: 1.88 or newer). Pinned so that builds are reproducible.
#   DEBIAN_RELEASE  the builder's Debian release; it must match the runtime image's C library
#                   (bookworm = Debian 12 = distroless cc-debian12; for Debian 13 pass
#                   DEBIAN_RELEASE=trixie and RUNTIME_IMAGE=gcr.io/distroless/cc-debian13:nonroot).
#   RUNTIME_IMAGE   the final base image. The default is distroless with glibc and libgcc,
#                   running as the `nonroot` user (uid 65532) with no shell. For an image with
#                   a shell use `--build-arg RUNTIME_IMAGE=debian:bookworm-slim` (the user
#                   below is numeric, so it exists in any base image).
#   CARGO_PROFILE   the Cargo profile (`release`).

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
ARG CARGO_PROFILE=release
WORKDIR /src

# 1. Dependencies only, cached as long as Cargo.toml and Cargo.lock do not change: build a
#    dummy crate with the same manifest. Every target the manifest declares (lib, bin, tests,
#    benches) gets a stub file, so Cargo accepts the manifest as is.
COPY Cargo.toml Cargo.lock ./
RUN set -eux; \
    for f in $(sed -n 's/^path *= *"\(.*\)"$/\1/p' Cargo.toml); do \
        mkdir -p "$(dirname "$f")"; \
        echo 'fn main() {}' > "$f"; \
    done; \
    : > src/lib.rs; \
    cargo build --profile "${CARGO_PROFILE}" --locked --bin sjob; \
    rm -rf src e2e \
        target/*/.fingerprint/sjob-* \
        target/*/deps/sjob-* target/*/deps/libsjob-* \
        target/*/sjob

# 2. The real source. config/rbac/role.yaml is compiled in (the local control plane enforces it).
COPY src ./src
COPY config ./config
COPY crds ./crds
RUN set -eux; \
    touch src/lib.rs src/main.rs; \
    cargo build --profile "${CARGO_PROFILE}" --locked --bin sjob; \
    install -D -m 0755 "target/${CARGO_PROFILE}/sjob" /out/sjob; \
    /out/sjob --version

# ---------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="sjob" \
      org.opencontainers.image.description="Kubernetes operator and stream engine for stateful jobs that survive upgrades" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/sjob /usr/local/bin/sjob
# Engine pods write savepoints and checkpoints to mounted volumes (or object storage); the
# working directory is only for relative paths in ad-hoc runs.
WORKDIR /tmp
# distroless's `nonroot`; numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532
# Operator: /metrics, /healthz, /readyz. Engine: the REST API.
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/sjob"]
CMD ["operator"]
