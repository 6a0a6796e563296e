# syntax=docker/dockerfile:1.7
# The segnode trainer for Intel Gaudi (HPU), FROM Habana's PyTorch image, where habana-frameworks and
# Habana's own torch build are already installed. segnode goes in on top WITHOUT replacing that torch:
# the requirement list is pyproject.toml's core + [train] + [postgres] minus torch.
#
#     docker build -f deploy/docker/trainer-gaudi.Dockerfile -t segnode-trainer-gaudi:0.1.0 .
#
# Train on every card of a node: torchrun --standalone --nproc-per-node 8 -m node train --device hpu ...
# (backend hccl; see trainer/devices.py). The Helm chart's Gaudi Job runs exactly that.
# The base must be a Habana PyTorch image with Python >= 3.11 (the Ubuntu 24.04 ones); change the
# second FROM to follow your cluster's Gaudi driver release.


FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node ./node
COPY converters ./converters
COPY db ./db
COPY trainer ./trainer
COPY deploy/docker/requirements_without.py /src/requirements_without.py
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python requirements_without.py pyproject.toml torch > /wheels/requirements-gaudi.txt

FROM vault.habana.ai/gaudi-docker/1.21.0/ubuntu24.04/habanalabs/pytorch-installer-2.6.0:1.21.0-555
LABEL org.opencontainers.image.title="segnode-trainer-gaudi" \
      org.opencontainers.image.description="segnode U-Net trainer on Intel Gaudi (HPU, hccl)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    SEGNODE_HOME=/var/lib/segnode \
    PT_HPU_LAZY_MODE=1
COPY --from=build /wheels /wheels
# Habana's torch stays: segnode itself with --no-deps, its other requirements from the filtered list,
# and a check that the torch that answers is still Habana's (habana_frameworks imports with it).
RUN python3 -m pip install -r /wheels/requirements-gaudi.txt \
    && python3 -m pip install --no-deps /wheels/segnode-*.whl \
    && python3 -c "import torch, habana_frameworks.torch.core; print('torch', torch.__version__)" \
    && rm -rf /wheels \
    && groupadd --system --gid 10001 segnode \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segnode --shell /usr/sbin/nologin segnode \
    && mkdir -p /var/lib/segnode /data /runs \
    && chown 10001:10001 /var/lib/segnode /runs
USER 10001:10001
WORKDIR /runs
HEALTHCHECK NONE
ENTRYPOINT ["segnode"]
CMD ["--help"]
