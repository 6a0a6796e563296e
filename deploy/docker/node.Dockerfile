# syntax=docker/dockerfile:1.7
# The segnode node: DICOM SCP + workers + sender + /metrics and /healthz, OpenVINO runtime only (no torch).
#
# Build from the repository root (the build context is the whole repository; what it may send is
# narrowed by node.Dockerfile.dockerignore beside this file):
#
#     docker build -f deploy/docker/node.Dockerfile -t segnode-node:0.1.0 .
#
# Configuration comes from the environment: SEGNODE_CONFIG (default /etc/segnode/node.toml, this
# directory's node.toml), SEGNODE_DATABASE_URL (default: SQLite under SEGNODE_HOME=/var/lib/segnode),
# and any SEGNODE_<SECTION>_<KEY>. On start the entrypoint migrates the database, registers the shipped
# model and promotes it when its task has no active model yet (never over an admin's choice).


FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY converters ./converters
COPY db ./db
COPY trainer ./trainer
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
LABEL org.opencontainers.image.title="segnode-node" \
      org.opencontainers.image.description="Brain-tumour segmentation DICOM node (OpenVINO INT8 on CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
# SEGNODE_NODE_HOST / SEGNODE_METRICS_HOST: a container listens on all its interfaces even when the
# node.toml mounted over the image's one has no host (node/config.py's default, 127.0.0.1, is the
# container's own loopback: the PACS and Prometheus could not connect, while the health check, on
# 127.0.0.1, said healthy). Environment beats the file: `-e SEGNODE_NODE_HOST=...` to change it.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SEGNODE_HOME=/var/lib/segnode \
    SEGNODE_CONFIG=/etc/segnode/node.toml \
    SEGNODE_BOOTSTRAP_MODEL=/opt/segnode/models/default \
    SEGNODE_NODE_HOST=0.0.0.0 \
    SEGNODE_METRICS_HOST=0.0.0.0
COPY --from=build /wheels /wheels
# Core dependencies and the PostgreSQL driver only: the [train] extra (torch, onnx, nncf) stays out.
RUN wheel="$(ls /wheels/segnode-*.whl)" \
    && python -m pip install "${wheel}[postgres]" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 segnode \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segnode --shell /usr/sbin/nologin segnode \
    && mkdir -p /var/lib/segnode \
    && chown 10001:10001 /var/lib/segnode
COPY models/default /opt/segnode/models/default
COPY models/brain_extraction /opt/segnode/models/brain_extraction
COPY deploy/docker/node.toml /etc/segnode/node.toml
COPY --chmod=0755 deploy/docker/node-entrypoint.sh /usr/local/bin/segnode-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/segnode-healthcheck
USER 10001:10001
WORKDIR /var/lib/segnode
VOLUME ["/var/lib/segnode"]
# DICOM (node.port) and HTTP /metrics + /healthz (metrics.port), as in node.toml.
EXPOSE 11112 9108
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["segnode-healthcheck"]
ENTRYPOINT ["segnode-entrypoint"]
CMD ["segnode", "serve"]
