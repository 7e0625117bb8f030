# One Dockerfile, one final target per service:
#   docker build --target poll -t pollvote/poll:0.1.0 .
#   docker build --target vote -t pollvote/vote:0.1.0 .
# Needs BuildKit (the default builder since Docker 23; `DOCKER_BUILDKIT=1` on 20.10) for the
# cargo registry cache mounts. No `# syntax=` line on purpose: the builder's built-in Dockerfile
# frontend is used, so building pulls nothing but the two base images named below.
#
# Linking choice: the binaries are built for the build platform's *glibc* target (x86_64 or
# aarch64) on a Debian bookworm Rust image, and the final stage is `scratch` holding the two
# binaries' shared libraries, copied from that same builder (the dynamic loader, libc, libm,
# libgcc_s: what `ldd` lists, about 3 MB), the CA certificates, a passwd/group file naming the
# non-root user 65532 and an nsswitch.conf. No shell, no package manager, no other tool.
# Why glibc and not a static musl build on Alpine (the earlier choice): the build must also run
# where only Debian's packages and the Rust toolchain's own host target are available (our test
# machines: no Alpine packages, no musl target), and glibc's allocator is the one the benchmarks
# in the README measured. Each image is its binary plus ~3 MB, well under the 40 MB budget
# (scripts/check-deploy-live measures it). The libraries come from the same Debian release the
# binaries were linked against, so they always match; rebuild to pick up Debian's fixes.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
# chef: toolchain + cargo-chef (pinned), shared by planner and builder. The official image has
# gcc and libc6-dev, all that the C parts of the dependencies (aws-lc-sys, ring) need.
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# ---------------------------------------------------------------------------
# planner: reduce the workspace to a dependency recipe. Only manifests and the
# lock file influence recipe.json, so source edits keep the next layer cached.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# builder: dependencies first (cached layer), then the workspace itself. The cargo registry
# (downloaded crates) is a cache mount: a changed Cargo.lock downloads only what is new.
FROM chef AS builder
# Strip symbols from the release binaries without touching Cargo.toml.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY --from=planner /src/recipe.json recipe.json
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo chef cook --release --locked --recipe-path recipe.json --bin poll --bin vote
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    cargo build --release --locked --bin poll --bin vote \
 && mkdir -p /out/data \
 && cp target/release/poll target/release/vote /out/
# The final image's root filesystem, apart from /app and /data: every shared library the two
# binaries load (paths as ldd prints them: the dynamic loader's own path is baked into the
# binary), CA certificates for HTTPS to Key Vault and Entra ID, the non-root user, a world-writable
# /tmp (compose and Kubernetes mount a tmpfs/emptyDir over it), and the licences of what is copied.
# Then each binary is started in that root filesystem (an unknown option: it exits 2 with its
# usage once its libraries are loaded, 127 if one is missing), so a missing library fails here.
RUN set -eu; \
    root=/out/rootfs; \
    mkdir -p "$root/tmp" "$root/etc/ssl/certs" "$root/usr/share/doc"; \
    chmod 1777 "$root/tmp"; \
    libs=$( { ldd /out/poll; ldd /out/vote; } | grep -o '/[^ ]*' | sort -u); \
    [ -n "$libs" ]; \
    for lib in $libs; do cp --parents -L "$lib" "$root/"; done; \
    for pkg in libc6 libgcc-s1 ca-certificates; do \
      mkdir -p "$root/usr/share/doc/$pkg"; cp "/usr/share/doc/$pkg/copyright" "$root/usr/share/doc/$pkg/"; \
    done; \
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"; \
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$root/etc/passwd"; \
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"; \
    printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"; \
    for bin in poll vote; do \
      cp "/out/$bin" "$root/.check"; \
      rc=0; chroot "$root" /.check --no-such-option >/dev/null 2>&1 || rc=$?; \
      rm "$root/.check"; \
      [ "$rc" -eq 2 ] || { echo "$bin does not start in the final root filesystem (exit $rc)" >&2; exit 1; }; \
    done

# ---------------------------------------------------------------------------
# runtime: shared by both services. No shell, no package manager, uid 65532.
FROM scratch AS runtime
COPY --from=builder --chown=0:0 /out/rootfs/ /
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
