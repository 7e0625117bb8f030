# syntax=docker/dockerfile:1
#
# One Dockerfile, one final target per service:
#   docker build --target poll -t pollvote/poll:0.1.0 .
#   docker build --target vote -t pollvote/vote:0.1.0 .
#
# Linking choice: the binaries are built for the *musl* target of the build
# platform (x86_64 or aarch64) and are fully static, so the final stage is
# distroless/static (~2 MB: CA certificates, tzdata, /etc/passwd with the
# `nonroot` user, no shell, no libc). A glibc build would need
# distroless/cc (~23 MB) and leave too little room under the 40 MB budget per
# image. The builder is Alpine (musl is its native libc), so there is no
# cross-compilation: `linux-headers` is what aws-lc-sys needs (it fails with
# Debian's musl-gcc wrapper, aws/aws-lc-rs#894), and the same Dockerfile builds
# natively on amd64 and arm64 laptops. Trade-off: musl's allocator is slower
# under heavy multi-threaded allocation; these services are I/O bound. If
# profiling ever says otherwise, a global allocator (mimalloc) is a two-line
# change in the services, not here.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
# chef: toolchain + cargo-chef (pinned), shared by planner and builder
FROM rust:${RUST_VERSION}-alpine AS chef
# gcc/musl-dev/linux-headers: C deps (aws-lc-sys, ring); cmake/make: aws-lc-sys
# falls back to its CMake builder when the cc builder cannot be used.
RUN apk add --no-cache gcc musl-dev linux-headers cmake make \
 && cargo install cargo-chef --locked --version 0.1.78 \
 && rm -rf "${CARGO_HOME:-/usr/local/cargo}/registry"
WORKDIR /src

# ---------------------------------------------------------------------------
# planner: reduce the workspace to a dependency recipe. Only manifests and the
# lock file influence recipe.json, so source edits keep the next layer cached.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# builder: dependencies first (cached layer), then the workspace itself.
FROM chef AS builder
# Strip symbols from the release binaries without touching Cargo.toml.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json --bin poll --bin vote
COPY . .
# The last two lines fail the build if a binary is not static: the final
# image has no libc to load.
RUN cargo build --release --locked --bin poll --bin vote \
 && mkdir -p /out/data \
 && cp target/release/poll target/release/vote /out/ \
 && ! ldd /out/poll 2>&1 | grep -q '=>' \
 && ! ldd /out/vote 2>&1 | grep -q '=>'

# ---------------------------------------------------------------------------
# runtime: shared by both services. No shell, no package manager, uid 65532.
FROM gcr.io/distroless/static-debian12:nonroot AS runtime
# The binaries read config/default.toml (and config/$APP_ENV.toml) relative to
# the working directory.
WORKDIR /app
# Root-owned and not writable by the runtime user.
COPY --chown=0:0 config/ /app/config/
# DATA_DIR is only used when no MongoDB connection string is configured (the
# embedded store): give it a directory the non-root user owns.
COPY --from=builder --chown=65532:65532 /out/data /data
ENV PORT=8080 \
    DATA_DIR=/data \
    LOG_FORMAT=json
USER 65532:65532
EXPOSE 8080

# ---------------------------------------------------------------------------
FROM runtime AS poll
COPY --from=builder --chown=0:0 /out/poll /app/poll
# Exec form: `poll --health` GETs http://127.0.0.1:$PORT/healthz, exit 0 on 200.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/app/poll", "--health"]
ENTRYPOINT ["/app/poll"]

# ---------------------------------------------------------------------------
FROM runtime AS vote
COPY --from=builder --chown=0:0 /out/vote /app/vote
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["/app/vote", "--health"]
ENTRYPOINT ["/app/vote"]
