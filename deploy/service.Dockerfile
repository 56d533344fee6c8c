# syntax=docker/dockerfile:1
# The inference service on a CUDA-capable PyTorch base (torch comes from the base image).
# Build from the repository root:  docker build -f deploy/service.Dockerfile -t specdec-service .
# The same image runs on CPU (SPECDEC_DEVICE=cpu), which the compose file's `cpu` profile uses.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# ---- build: a virtual environment on top of the base image's Python and torch -------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# --system-site-packages: the venv sees the base image's torch (and its CUDA libraries).
RUN python -m venv --system-site-packages /opt/venv
COPY deploy/requirements/service.txt /tmp/requirements.txt
# Every package pinned (deploy/requirements/lock.sh); --no-deps so nothing floats, and
# `pip check` proves the set is consistent with the base image's torch.
RUN /opt/venv/bin/pip install --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specdec ./specdec
COPY service ./service
COPY telemetry ./telemetry
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import torch, transformers, grpc, service.server; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# ---- runtime -------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} specdec \
 && useradd --system --uid ${UID} --gid specdec --create-home --home-dir /home/specdec specdec \
 && mkdir -p /models && chown specdec:specdec /models
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/grpc_health_probe.py /usr/local/bin/grpc-health-probe
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SPECDEC_LISTEN=0.0.0.0:50051 \
    SPECDEC_CACHE_DIR=/models \
    HF_HOME=/models/huggingface
# Model files (fetched, verified and converted) persist here across restarts and upgrades.
VOLUME ["/models"]
USER specdec
WORKDIR /home/specdec
EXPOSE 50051
# The standard gRPC health service: SERVING once the model is loaded and warmed up. The
# first start fetches the model into /models, hence the long start period.
HEALTHCHECK --interval=10s --timeout=6s --start-period=600s --retries=3 \
  CMD ["grpc-health-probe", "--addr-env", "SPECDEC_LISTEN", "--default-addr", "127.0.0.1:50051"]
ENTRYPOINT ["specdec-server"]
