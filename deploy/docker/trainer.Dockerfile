# syntax=docker/dockerfile:1.7
# The segnode trainer for CPU and CUDA: `segnode train | export | evaluate | models ...`.
#
#     docker build -f deploy/docker/trainer.Dockerfile -t segnode-trainer:0.1.0 .
#
# The torch wheel from the default index carries its CUDA libraries, so the same image trains on CPU
# and, under the NVIDIA container runtime, on CUDA (`--device cuda`, several GPUs with torchrun). For a
# smaller CPU-only image pass a CPU wheel index: --build-arg TORCH_INDEX_URL=<index of CPU wheels>.


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
ARG TORCH_INDEX_URL=""
LABEL org.opencontainers.image.title="segnode-trainer" \
      org.opencontainers.image.description="segnode U-Net trainer, exporter and quantizer (CPU/CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SEGNODE_HOME=/var/lib/segnode
COPY --from=build /wheels /wheels
RUN wheel="$(ls /wheels/segnode-*.whl)" \
    && if [ -n "${TORCH_INDEX_URL}" ]; then \
         python -m pip install --extra-index-url "${TORCH_INDEX_URL}" "${wheel}[train,postgres]"; \
       else \
         python -m pip install "${wheel}[train,postgres]"; \
       fi \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 segnode \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segnode --shell /usr/sbin/nologin segnode \
    && mkdir -p /var/lib/segnode /data /runs \
    && chown 10001:10001 /var/lib/segnode /runs
USER 10001:10001
WORKDIR /runs
# A batch image: no server, so the health of a run is its exit status.
HEALTHCHECK NONE
ENTRYPOINT ["segnode"]
CMD ["--help"]
