# The telemetry sidecar: slim Python, no torch.
# Build from the repository root:  docker build -f deploy/sidecar.Dockerfile -t specdec-sidecar .
# Behind a TLS-intercepting proxy, give pip a CA bundle as a build secret (never stored in
# the image):  --secret id=pip_ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=python:3.12.12-slim-bookworm

# ---- build ---------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
COPY deploy/requirements/sidecar.txt /tmp/requirements.txt
# Every package pinned (deploy/requirements/lock.sh); --no-deps so nothing floats.
RUN --mount=type=secret,id=pip_ca_bundle \
    if [ -s /run/secrets/pip_ca_bundle ]; then export PIP_CERT=/run/secrets/pip_ca_bundle; fi \
 && /opt/venv/bin/pip install --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specdec ./specdec
COPY telemetry ./telemetry
COPY specdec_security ./specdec_security
COPY specdec_common ./specdec_common
# The project's own code only: the service/ package is not copied, and its torch stack is the
# `service` extra, so `pip check` holds for the locked set.
RUN --mount=type=secret,id=pip_ca_bundle \
    if [ -s /run/secrets/pip_ca_bundle ]; then export PIP_CERT=/run/secrets/pip_ca_bundle; fi \
 && /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/pip check \
 && /opt/venv/bin/python -c "import telemetry.__main__, telemetry.server; print('sidecar ok')"

# ---- runtime -------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG UID=10001
RUN groupadd --system --gid ${UID} specdec \
 && useradd --system --uid ${UID} --gid specdec --no-create-home --home-dir /nonexistent specdec
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 deploy/grpc_health_probe.py /usr/local/bin/grpc-health-probe
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SPECDEC_SIDECAR_LISTEN=0.0.0.0:50052 \
    SPECDEC_SIDECAR_PROMETHEUS_ADDRESS=0.0.0.0:9464
USER specdec
EXPOSE 50052 9464
HEALTHCHECK --interval=10s --timeout=6s --start-period=30s --retries=3 \
  CMD ["grpc-health-probe", "--addr-env", "SPECDEC_SIDECAR_LISTEN", "--default-addr", "127.0.0.1:50052"]
ENTRYPOINT ["specdec-sidecar"]
