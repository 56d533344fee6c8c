# The inference service on a CUDA-capable PyTorch base (torch comes from the base image).
# Build from the repository root:  docker build -f deploy/service.Dockerfile -t specdec-service .
# The same image runs on CPU (SPECDEC_DEVICE=cpu), which the compose file's `cpu` profile uses.
# A CPU-only image on a plain Python base: put a torch CPU wheel in deploy/wheels/ and pass
# --build-arg BASE_IMAGE=<a Debian/Ubuntu image with python3 and python3-venv>.
# Behind a TLS-intercepting proxy, give pip a CA bundle as a build secret (never stored in
# the image):  --secret id=pip_ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# ---- build: a virtual environment on top of the base image's Python and torch -------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
# --system-site-packages: the venv sees the base image's torch (and its CUDA libraries).
RUN python3 -m venv --system-site-packages /opt/venv
COPY deploy/requirements/service.txt deploy/requirements/torch-cpu.txt /tmp/
COPY deploy/wheels/ /tmp/wheels/
# Every package pinned (deploy/requirements/lock.sh); --no-deps so nothing floats, and
# `pip check` proves the set is consistent with torch. torch is the base image's, unless a
# wheel was put in deploy/wheels/ (then its own requirements come from torch-cpu.txt).
RUN --mount=type=secret,id=pip_ca_bundle \
    if [ -s /run/secrets/pip_ca_bundle ]; then export PIP_CERT=/run/secrets/pip_ca_bundle; fi \
 && if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then \
      /opt/venv/bin/pip install --no-deps /tmp/wheels/torch-*.whl -r /tmp/torch-cpu.txt; fi \
 && /opt/venv/bin/pip install --no-deps -r /tmp/service.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specdec ./specdec
COPY service ./service
COPY telemetry ./telemetry
COPY specdec_security ./specdec_security
COPY specdec_common ./specdec_common
RUN --mount=type=secret,id=pip_ca_bundle \
    if [ -s /run/secrets/pip_ca_bundle ]; then export PIP_CERT=/run/secrets/pip_ca_bundle; fi \
 && /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/pip check \
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
