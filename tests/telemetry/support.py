"""Reusable test machinery for the telemetry pipeline (importable by other test packages):

- `simulate_metrics`: random *valid* SpeculativeMetrics from a per-pass simulation;
- `expected_totals`: the exact sums the sidecar must export for a list of records;
- `OtlpGrpcReceiver` / `OtlpHttpReceiver`: OTLP metrics receivers built from
  opentelemetry-proto's collector definitions; `ExportedMetrics`: what they received, with
  counters summed over sidecar incarnations (start_time_unix_nano); the gRPC one also
  receives spans (`ExportedSpans`);
- `SidecarThread`: an in-process sidecar on its own event loop; `SidecarProcess`: a real
  `python -m telemetry` subprocess on free ports (kill/terminate/restart);
- `TcpProxy`: a loopback TCP proxy whose connections can be cut;
- `PrometheusServer`: a real Prometheus (Debian package) scraping targets from a file_sd file;
- `free_port`, `wait_for`.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from specdec.v1 import metrics_pb2

REPO = Path(__file__).resolve().parents[2]

# ---- valid records ------------------------------------------------------------------------

# (target_model, method, draft_model, k)
IDENTITIES = (
    ("tgt-a", metrics_pb2.SPECULATION_METHOD_NGRAM, "", 4),
    ("tgt-a", metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL, "draft-x", 3),
    ("tgt-b", metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL, "draft-y", 5),
    ("tgt-b", metrics_pb2.SPECULATION_METHOD_NONE, "", 0),
)
METHOD_NAMES = {1: "none", 2: "ngram", 3: "draft_model"}


def simulate_metrics(
    rng: random.Random,
    identity=None,
    *,
    instance_id: str = "svc",
    request_id: str | None = None,
    passes: int | None = None,
) -> metrics_pb2.SpeculativeMetrics:
    """A record built pass by pass, so every contract invariant holds by construction."""
    target, method, draft, k = identity or rng.choice(IDENTITIES)
    n_passes = rng.randint(0, 24) if passes is None else passes
    hist, pp, ap = [0] * (k + 1), [0] * k, [0] * k
    verify = draft_passes = proposed = accepted = 0
    p_accept = rng.uniform(0.2, 0.95)
    for _ in range(n_passes):
        verify += 1
        d = 0 if not k or rng.random() < 0.1 else (k if rng.random() < 0.6 else rng.randint(1, k))
        a = 0
        while a < d and rng.random() < p_accept:
            a += 1
        if d:
            draft_passes += 1
            hist[a] += 1
            for i in range(d):
                pp[i] += 1
            for i in range(a):
                ap[i] += 1
        proposed += d
        accepted += a
    bound = 1 + verify + accepted
    completion = bound if rng.random() < 0.8 else rng.randint(0, bound)
    queue = rng.uniform(0.0, 0.05)
    m = metrics_pb2.SpeculativeMetrics(
        request_id=request_id or f"req-{rng.getrandbits(48):012x}",
        target_model=target,
        method=method,
        draft_model=draft,
        num_draft_tokens=k,
        instance_id=instance_id,
        verify_passes=verify,
        draft_passes=draft_passes,
        proposed_drafts=proposed,
        accepted_drafts=accepted,
        accept_histogram=hist,
        proposed_per_position=pp,
        accepted_per_position=ap,
        prompt_tokens=rng.randint(1, 2000),
        completion_tokens=completion,
        finish_reason=rng.choice([1, 1, 1, 2, 3, 4, 5]),
        queue_time_seconds=queue,
    )
    if proposed:
        m.accept_rate = accepted / proposed
    if verify:
        m.accept_length = (accepted + verify) / verify
    ttft = queue + rng.uniform(0.001, 0.5)
    duration = ttft + completion * rng.uniform(0.005, 0.05)
    if completion:
        m.time_to_first_token_seconds = ttft
    m.duration_seconds = duration
    m.end_time.GetCurrentTime()
    return m


def identity_attrs(target: str, method: int, draft: str, k: int) -> frozenset:
    return frozenset(
        {
            "gen_ai.request.model": target,
            "specdec.method": METHOD_NAMES[method],
            "specdec.draft_model": draft,
            "specdec.num_draft_tokens": k,
        }.items()
    )


def attrs_of(m: metrics_pb2.SpeculativeMetrics) -> frozenset:
    return identity_attrs(m.target_model, m.method, m.draft_model, m.num_draft_tokens)


def expected_totals(records: Iterable[metrics_pb2.SpeculativeMetrics]) -> dict:
    """{(metric name, frozenset attrs): exact value} for every counter the sidecar exports,
    plus ("specdec.request.accept_rate"...) histogram counts under the key suffix '#count'."""
    out: dict = defaultdict(int)
    for m in records:
        a = attrs_of(m)
        out[("specdec.requests", a)] += 1
        out[("specdec.prompt_tokens", a)] += m.prompt_tokens
        out[("specdec.completion_tokens", a)] += m.completion_tokens
        out[("specdec.verify_passes", a)] += m.verify_passes
        out[("specdec.draft_passes", a)] += m.draft_passes
        out[("specdec.proposed_drafts", a)] += m.proposed_drafts
        out[("specdec.accepted_drafts", a)] += m.accepted_drafts
        for i, (p, acc) in enumerate(zip(m.proposed_per_position, m.accepted_per_position)):
            out[("specdec.position.proposed", a | {("position", i)})] += p
            out[("specdec.position.accepted", a | {("position", i)})] += acc
        for j, c in enumerate(m.accept_histogram):
            if m.num_draft_tokens:
                out[("specdec.draft_passes_by_accepted", a | {("accepted", j)})] += c
        out[("gen_ai.server.request.duration#count", a)] += 1
        if m.HasField("accept_rate"):
            out[("specdec.request.accept_rate#count", a)] += 1
        if m.HasField("accept_length"):
            out[("specdec.request.accept_length#count", a)] += 1
    return dict(out)


# ---- OTLP receivers ---------------------------------------------------------------------


def _any_value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def _attrs(kvs) -> frozenset:
    return frozenset((kv.key, _any_value(kv.value)) for kv in kvs)


class ExportedMetrics:
    """Everything a receiver got. Counters/histograms are cumulative per sidecar incarnation
    (service.instance.id, start_time_unix_nano); `total` sums each incarnation's last value,
    which is how a backend reading cumulative series across counter resets sees them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def add(self, req) -> None:
        with self.lock:
            self.requests.append(req)

    def points(self):
        """Yield (resource attrs, metric, point kind, point)."""
        with self.lock:
            reqs = list(self.requests)
        for req in reqs:
            for rm in req.resource_metrics:
                res = _attrs(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        for p in getattr(metric, kind).data_points:
                            yield res, metric, kind, p

    def _latest(self, want_kind: str, name: str | None = None) -> dict:
        latest: dict = {}
        for res, metric, kind, p in self.points():
            if kind != want_kind or (name is not None and metric.name != name):
                continue
            inst = (dict(res).get("service.instance.id"), p.start_time_unix_nano)
            key = (metric.name, _attrs(p.attributes), inst)
            prev = latest.get(key)
            if prev is None or p.time_unix_nano >= prev.time_unix_nano:
                latest[key] = p
        return latest

    def counter_totals(self) -> dict:
        """{(name, attrs): sum over incarnations of the last cumulative value}."""
        out: dict = defaultdict(int)
        for (name, attrs, _), p in self._latest("sum").items():
            out[(name, attrs)] += p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
        return dict(out)

    def histogram_totals(self) -> dict:
        """{(name, attrs): (count, sum, bucket_counts, bounds)} summed over incarnations."""
        out: dict = {}
        for (name, attrs, _), p in self._latest("histogram").items():
            c, s, b, bounds = out.get((name, attrs), (0, 0.0, None, tuple(p.explicit_bounds)))
            buckets = list(p.bucket_counts) if b is None else [x + y for x, y in zip(b, p.bucket_counts)]
            out[(name, attrs)] = (c + p.count, s + p.sum, buckets, bounds)
        return out

    def gauges(self) -> dict:
        """{(name, attrs): last value} (over all incarnations, by point time)."""
        last: dict = {}
        for _, metric, kind, p in self.points():
            if kind != "gauge":
                continue
            key = (metric.name, _attrs(p.attributes))
            if key not in last or p.time_unix_nano >= last[key].time_unix_nano:
                last[key] = p
        return {
            k: (p.as_double if p.WhichOneof("value") == "as_double" else p.as_int) for k, p in last.items()
        }

    def incarnations(self) -> set:
        """One entry per sidecar process that exported. Start times are per series, not per
        process, so count the series every sidecar creates once, at start-up."""
        return {inst for (_, _, inst) in self._latest("sum", "specdec.sidecar.records.received")}

    def resources(self) -> list[dict]:
        with self.lock:
            return [
                dict(_attrs(rm.resource.attributes)) for req in self.requests for rm in req.resource_metrics
            ]


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, store: ExportedMetrics, fail: Callable[[], bool]) -> None:
        self.store, self.fail = store, fail

    def Export(self, request, context):
        if self.fail():
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver told to fail")
        self.store.add(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class ExportedSpans:
    """Every span a receiver got: `spans()` -> [(resource attrs dict, span)]."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def add(self, req) -> None:
        with self.lock:
            self.requests.append(req)

    def spans(self) -> list:
        with self.lock:
            reqs = list(self.requests)
        return [
            (dict(_attrs(rs.resource.attributes)), span)
            for req in reqs
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]


def span_attrs(span) -> dict:
    """A span's (or exemplar's) attributes as a dict; arrays as tuples."""
    out = {}
    for kv in span.attributes if hasattr(span, "attributes") else span.filtered_attributes:
        v = _any_value(kv.value)
        if kv.value.WhichOneof("value") == "array_value":
            v = tuple(_any_value(x) for x in v.values)
        out[kv.key] = v
    return out


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, store: ExportedSpans) -> None:
        self.store = store

    def Export(self, request, context):
        self.store.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpGrpcReceiver:
    """OTLP/gRPC metrics and traces receiver on a free loopback port."""

    protocol = "grpc"

    def __init__(self) -> None:
        self.store = ExportedMetrics()
        self.span_store = ExportedSpans()
        self.failing = False
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
            _MetricsService(self.store, lambda: self.failing), self.server
        )
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self.span_store), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}

    def traces_env(self) -> dict[str, str]:
        """Spans to this receiver too, exported at once (no batching delay)."""
        return {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}

    def close(self) -> None:
        self.server.stop(0)


class OtlpHttpReceiver:
    """OTLP/HTTP (protobuf) receiver: POST /v1/metrics."""

    protocol = "http/protobuf"

    def __init__(self) -> None:
        self.store = ExportedMetrics()
        self.failing = False
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/metrics" or outer.failing:
                    self.send_response(404 if self.path != "/v1/metrics" else 503)
                    self.end_headers()
                    return
                req = metrics_service_pb2.ExportMetricsServiceRequest.FromString(body)
                outer.store.add(req)
                payload = metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/metrics"

    def env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- sidecars -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred: Callable[[], object], timeout_s: float, interval_s: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class SidecarThread:
    """The real Sidecar object, in-process, on its own event loop thread. Environment
    variables (OTEL_*) must be set before construction (the exporters read them then)."""

    def __init__(self, argv: list[str]) -> None:
        from telemetry.config import SidecarConfig
        from telemetry.server import Sidecar

        self.config = SidecarConfig.from_args(argv)
        self.loop = asyncio.new_event_loop()
        self.sidecar = Sidecar(self.config)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.sidecar.start(), self.loop).result(30)

    @property
    def address(self) -> str:
        return self.sidecar.address

    def stop(self, grace_s: float = 2.0) -> None:
        if self.loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(grace_s), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def health_serving(address: str, timeout_s: float = 1.0) -> bool:
    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass
class SidecarProcess:
    """`python -m telemetry` as a subprocess on fixed free ports (so a restart comes back at
    the same address). `extra_args`/`env` add flags and variables."""

    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    prometheus_port: int | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    incarnation: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def prometheus_address(self) -> str | None:
        return f"127.0.0.1:{self.prometheus_port}" if self.prometheus_port else None

    def start(self, wait: bool = True, timeout_s: float = 30.0) -> SidecarProcess:
        self.incarnation += 1
        args = [
            sys.executable,
            "-m",
            "telemetry",
            "--listen",
            self.address,
            "--instance-id",
            f"sidecar-test-{self.port}-{self.incarnation}",
            *self.extra_args,
        ]
        if self.prometheus_port:
            args += ["--prometheus-address", self.prometheus_address]
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONPATH", str(REPO))
        env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=out)
        if wait:
            wait_for(
                lambda: self.proc.poll() is not None or health_serving(self.address),
                timeout_s,
                0.1,
                "sidecar health SERVING",
            )
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}; log: {self.log_tail()}")
        return self

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def kill(self) -> None:
        """SIGKILL: no final export, no goodbye."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 20.0) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            return self.proc.wait(timeout_s)
        return self.proc.returncode if self.proc else 0

    def restart(self) -> SidecarProcess:
        self.kill()
        return self.start()


# ---- a cuttable TCP proxy -------------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `upstream`; `cut()` closes every open connection
    (both sides see a broken stream) while the proxy keeps accepting new ones."""

    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> int:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()


# ---- a real Prometheus server -----------------------------------------------------------


def ensure_prometheus_binary() -> str | None:
    """Path of the prometheus binary; installs the Debian package if missing and possible."""
    path = shutil.which("prometheus")
    if path:
        return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "update", "-qq"],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=600,
        )
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "prometheus"],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=900,
        )
    return shutil.which("prometheus")


class PrometheusServer:
    """Prometheus scraping every 1 s the targets listed in a file_sd file (`set_targets`)."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.workdir = workdir
        self.targets_file = workdir / "targets.json"
        self.set_targets([])
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: specdec-sidecar\n"
            "    scrape_interval: 1s\n    scrape_timeout: 900ms\n"
            "    file_sd_configs:\n"
            f"      - files: ['{self.targets_file}']\n        refresh_interval: 1s\n"
        )
        self.port = free_port()
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=self.log,
            cwd=workdir,
        )
        wait_for(self._ready, 60, 0.2, "prometheus /-/ready")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("prometheus exited: " + (self.workdir / "prometheus.log").read_text()[-2000:])
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def set_targets(self, targets: list[str]) -> None:
        tmp = self.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {}}]))
        tmp.replace(self.targets_file)

    def query(self, promql: str) -> list[dict]:
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def scalar(self, promql: str) -> float | None:
        result = self.query(promql)
        if not result:
            return None
        return float(result[0]["value"][1])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def isclose(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
