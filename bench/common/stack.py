"""The service and the sidecar as child processes on loopback, for the soak and fuzz
benchmarks: a tiny random model (testkit/tiny_model.py: real tokenizer, random weights,
CPU), the sidecar with its Prometheus endpoint, the service reporting to it. Plus what the
benchmarks sample from them: resident memory and open descriptors from /proc, and the
sidecar's counters from a scrape.
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.common.server_process import ServerProcess
from testkit.processes import SidecarProcess, free_port
from testkit.tiny_model import save_tiny_model


def process_sample(pid: int) -> dict:
    """Resident memory (MiB) and open file descriptors of a live process."""
    rss_kib = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
    return {"rss_mib": round(rss_kib / 1024, 1), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def scrape(address: str) -> dict[str, float]:
    """{series name: value summed over its labels} of a Prometheus endpoint; for
    specdec_sidecar_records_rejected_total also one entry per reason (name{reason})."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            if "reason" in s.labels:
                key = f"{s.name}{{{s.labels['reason']}}}"
                out[key] = out.get(key, 0.0) + s.value
    return out


class Stack:
    """Start with `with Stack(workdir) as stack:`; both processes are stopped on exit."""

    def __init__(
        self, workdir: Path | None = None, max_batch_size: int = 8, sidecar_args: tuple[str, ...] = ()
    ) -> None:
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="specdec-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.max_batch_size = max_batch_size
        self.sidecar = SidecarProcess(
            extra_args=["--exporters", "prometheus", "--ack-mode", "aggregate", *sidecar_args],
            prometheus_port=free_port(),
            log_path=self.workdir / "sidecar.log",
        )
        self.service: ServerProcess | None = None

    def __enter__(self) -> Stack:
        model = save_tiny_model(
            self.workdir / "tiny-model", seed=0, layers=2, with_eos=False, max_position=4096
        )
        self.sidecar.start(timeout_s=60)
        self.service = ServerProcess(
            [
                "--model",
                str(model),
                "--dtype",
                "float32",
                "--device",
                "cpu",
                "--telemetry-target",
                self.sidecar.address,
                "--instance-id",
                "soak",
                "--max-batch-size",
                str(self.max_batch_size),
                "--grace-period-s",
                "10",
            ],
            self.workdir / "service.log",
        ).start(timeout_s=300)
        return self

    def __exit__(self, *exc) -> None:
        if self.service is not None:
            self.service.stop()
        self.sidecar.terminate()

    @property
    def pids(self) -> dict[str, int]:
        return {"service": self.service.process.pid, "sidecar": self.sidecar.proc.pid}

    def sample(self) -> dict:
        return {name: process_sample(pid) for name, pid in self.pids.items()}

    def sidecar_metrics(self) -> dict[str, float]:
        return scrape(self.sidecar.prometheus_address)
