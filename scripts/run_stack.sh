#!/usr/bin/env bash
# Start the telemetry sidecar, wait until it is healthy, then run the inference service in
# the foreground. Ctrl-C / SIGTERM stops the service first (it drains and flushes its
# metrics to the sidecar), then the sidecar (which makes a final export).
# OTEL_* variables in the environment reach the sidecar unchanged.
set -euo pipefail
VENV=${VENV:-.venv}
MODEL=${MODEL:-smollm2-135m-instruct}
BIN="$VENV/bin"

export SPECDEC_SIDECAR_LISTEN=${SPECDEC_SIDECAR_LISTEN:-127.0.0.1:50052}
export SPECDEC_SIDECAR_PROMETHEUS_ADDRESS=${SPECDEC_SIDECAR_PROMETHEUS_ADDRESS:-127.0.0.1:9464}
export SPECDEC_LISTEN=${SPECDEC_LISTEN:-127.0.0.1:50051}
export SPECDEC_TELEMETRY_TARGET=${SPECDEC_TELEMETRY_TARGET:-$SPECDEC_SIDECAR_LISTEN}
export SPECDEC_MODEL=${SPECDEC_MODEL:-$MODEL}

"$BIN/specdec-sidecar" &
sidecar=$!
service=
stop_all() {
  [ -n "$service" ] && kill -TERM "$service" 2>/dev/null && wait "$service" || true
  kill -TERM "$sidecar" 2>/dev/null && wait "$sidecar" || true
}
trap 'stop_all; exit 0' INT TERM

# Wait for the sidecar's gRPC health check (it needs a moment to import the OTel SDK). Over
# TLS when the sidecar has a certificate: the service's CA and client certificate settings.
"$BIN/python" - "$SPECDEC_SIDECAR_LISTEN" <<'PY'
import os, sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from specdec_security import ClientSecurity
credentials = None
if os.environ.get("SPECDEC_SIDECAR_TLS_CERT_FILE"):
    credentials = ClientSecurity(*(os.environ.get(f"SPECDEC_TELEMETRY_TLS_{name}_FILE", "")
                                   for name in ("CA", "CERT", "KEY")),
                                 flag_prefix="--telemetry-", env_prefix="SPECDEC_TELEMETRY_"
                                 ).channel_credentials()
channel = (grpc.secure_channel(sys.argv[1], credentials) if credentials
           else grpc.insecure_channel(sys.argv[1]))
grpc.channel_ready_future(channel).result(timeout=60)
status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
echo "sidecar ready on $SPECDEC_SIDECAR_LISTEN (Prometheus scrape endpoint http://$SPECDEC_SIDECAR_PROMETHEUS_ADDRESS/metrics)"

"$BIN/specdec-server" &
service=$!
wait "$service" || true
service=
kill -TERM "$sidecar" 2>/dev/null && wait "$sidecar" || true
