# Test stand-in for the official `rust:<version>-slim-bookworm` image, for scripts/check-deploy-live
# only (no registry of container images is reachable where the tests run). It is what that image
# is made of: Debian bookworm with ca-certificates, gcc and libc6-dev (the base image passed in
# BASE was made with debootstrap from Debian's packages), plus the host's own Rust toolchain of the
# same version in the same places (RUSTUP_HOME=/usr/local/rustup, CARGO_HOME=/usr/local/cargo).
# The build context is a directory holding the toolchain under toolchain/ and, under extra-ca/, the
# CA certificates the host added to its trust store (/usr/local/share/ca-certificates): where the
# registries are reached through a TLS-inspecting proxy, cargo in the builder must trust what cargo
# on the host trusts, as on any build machine behind such a proxy.
ARG BASE
FROM ${BASE}
ARG RUST_VERSION
ARG TOOLCHAIN
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=${RUST_VERSION}
COPY extra-ca/ /usr/local/share/ca-certificates/
COPY toolchain/ /usr/local/rustup/toolchains/${TOOLCHAIN}/
RUN set -eu; \
    update-ca-certificates >/dev/null; \
    mkdir -p /usr/local/cargo/bin; \
    for b in cargo rustc rustdoc; do ln -s "/usr/local/rustup/toolchains/${TOOLCHAIN}/bin/$b" "/usr/local/cargo/bin/$b"; done; \
    cargo --version; rustc --version
LABEL org.pollvote.test-standin="rust:${RUST_VERSION} stand-in from Debian packages and the host toolchain"
