# Test stand-in for the `mongo` service of docker-compose.yml (scripts/check-deploy-live): the
# SecantusDB server (MongoDB wire protocol; GPL-2.0, run as its own process, never linked) in Debian
# bookworm made with debootstrap (BASE). The build context holds the secantusd-rs binary that
# `scripts/secantusdb build` made on the host (a glibc binary: the base has its libraries; the
# build fails if one is missing) and mongo-ping, the health check.
ARG BASE
FROM ${BASE}
COPY secantusd-rs mongo-ping /usr/local/bin/
RUN set -eu; \
    ! ldd /usr/local/bin/secantusd-rs | grep -q 'not found'; \
    groupadd --system --gid 999 mongodb; \
    useradd --system --uid 999 --gid 999 --home-dir /data/db --no-create-home mongodb; \
    mkdir -p /data/db; chown 999:999 /data/db
USER 999:999
EXPOSE 27017
ENTRYPOINT ["/usr/local/bin/secantusd-rs"]
CMD ["--host", "0.0.0.0", "--port", "27017", "--storage-path", "/data/db", "--sync-on-commit"]
LABEL org.pollvote.test-standin="mongo: SecantusDB 0.5.3-beta.196 on Debian bookworm"
