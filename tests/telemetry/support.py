"""Test machinery for the telemetry pipeline (importable by other test packages):

- `expected_totals`: the exact sums the sidecar must export for a list of records;
- `SidecarThread`: an in-process sidecar on its own event loop;
- `TcpProxy`: a loopback TCP proxy whose connections can be cut;
- `PrometheusServer`: a real Prometheus (Debian package) scraping targets from a file_sd file;
- from the package shared with the benchmarks (testkit/), under the names the tests use:
  `simulate_metrics`, the OTLP receivers (`OtlpGrpcReceiver`, `OtlpHttpReceiver`,
  `ExportedMetrics`, `ExportedSpans`, `span_attrs`), `SidecarProcess`, `free_port`,
  `wait_for`, `health_serving`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from specdec.v1 import metrics_pb2
from testkit.otlp_receiver import (
    ExportedMetrics as ExportedMetrics,
)
from testkit.otlp_receiver import (
    ExportedSpans as ExportedSpans,
)
from testkit.otlp_receiver import (
    OtlpGrpcReceiver as OtlpGrpcReceiver,
)
from testkit.otlp_receiver import (
    OtlpHttpReceiver as OtlpHttpReceiver,
)
from testkit.otlp_receiver import (
    span_attrs as span_attrs,
)
from testkit.processes import (
    SidecarProcess as SidecarProcess,
)
from testkit.processes import free_port as free_port
from testkit.processes import health_serving as health_serving
from testkit.processes import wait_for as wait_for
from testkit.simulated_metrics import IDENTITIES as IDENTITIES
from testkit.simulated_metrics import simulate_metrics as simulate_metrics

REPO = Path(__file__).resolve().parents[2]

# ---- valid records ------------------------------------------------------------------------

METHOD_NAMES = {1: "none", 2: "ngram", 3: "draft_model"}


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


# ---- sidecars -----------------------------------------------------------------------------


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
