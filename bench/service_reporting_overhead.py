"""Service throughput with metrics reporting on vs. off, same run (issue 5 target: >= 0.99).

Real services (`python -m service` subprocesses, same model, same flags) in on/off pairs: "on"
reports every finished request to a real sidecar subprocess (`python -m telemetry`), "off"
has reporting disabled (`--telemetry-target ""`). Client threads in this process send a fixed
number of greedy requests (fixed prompts, fixed max_tokens, the same sequence for both) with
N in flight at a time, and measure completed requests/s and completion tokens/s. Only one
service is busy at a time (the idle one sleeps on its engine's condition). Each round starts
a fresh, warmed-up pair (start order alternating) and runs off,on or on,off (alternating), so
that drift (other load on the machine) and a speed difference between two processes (an A/A
run, --aa-control, showed a ~1% bias between two identical services kept for a whole run)
cancel in the median. The ratio is taken per round (on / off of the same round); the median
over rounds is the result. At the end the sidecar's own counter (its Prometheus endpoint) must
hold every request the "on" services finished, so reporting was really on.

    .venv/bin/python -m bench.service_reporting_overhead [--model tiny|smollm2-135m-instruct]
        [--clients 4] [--requests 250] [--max-tokens 32] [--rounds 8] [--method ngram|none]
        [--sidecar-exporter prometheus|otlp] [--reuse-services] [--aa-control]
        [--compare reporting|tracing]

--compare tracing: both services report; "on" also traces (`--tracing true`), "off" does not,
every request carries a W3C traceparent, and the sidecar runs with `--tracing true`, exporting
spans to an OTLP/gRPC receiver in this process (docs/tracing.md). At the end the receiver
must hold one span per request the tracing service finished.

--model tiny (default): the tests' tiny random Llama (2 layers, hidden 64; no EOS, so every
request generates exactly --max-tokens), saved to a temporary directory. That makes the
per-request reporting cost as large a share of the work as it can be (worst case); with a
real model (--model smollm2-135m-instruct, cached after `make model`) the share is smaller.
--sidecar-exporter otlp runs an OTLP/gRPC receiver in this process, ack after export (the
production OTLP setup); prometheus (default) is the embedded default (ack on aggregation).
CPU seconds per request of the busy service, the sidecar and this client process are
reported too (from /proc), which separates a real cost from noise.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from testkit.processes import free_port, health_serving, wait_for

REPO = Path(__file__).resolve().parents[1]

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def add(x, y):\n    return x + y\n\ndef add(x, y):\n",
    "Speculative decoding drafts tokens and verifies them. Speculative decoding",
    "The dog sleeps. The fox runs away. The dog sleeps. The fox",
    "a a a a a a a a",
    "Write one sentence about the sea.",
]
METHODS = {"ngram": metrics_pb2.SPECULATION_METHOD_NGRAM, "none": metrics_pb2.SPECULATION_METHOD_NONE}


def make_requests(n: int, max_tokens: int, method: str, k: int) -> list[generation_pb2.GenerateRequest]:
    out = []
    for i in range(n):
        req = generation_pb2.GenerateRequest(text=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens)
        req.sampling.temperature = 0.0
        req.speculation.method = METHODS[method]
        if method == "ngram":
            req.speculation.num_draft_tokens = k
        out.append(req)
    return out


TRACEPARENT = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)


def run_round(address: str, requests: list, clients: int, metadata=()) -> dict:
    """`clients` threads, each with its own channel, take requests from a shared index until
    all are done. Returns wall time, requests/s, completion tokens/s."""
    lock = threading.Lock()
    next_i = iter(range(len(requests)))
    tokens = [0] * clients
    done = [0] * clients
    errors: list[BaseException] = []
    channels = [grpc.insecure_channel(address) for _ in range(clients)]
    stubs = [generation_pb2_grpc.GenerationServiceStub(ch) for ch in channels]
    for ch in channels:  # connect before the clock starts
        grpc.channel_ready_future(ch).result(timeout=30)
    start = threading.Barrier(clients + 1)

    def client(t: int) -> None:
        start.wait()
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            try:
                final = None
                for resp in stubs[t].Generate(requests[i], timeout=600, metadata=metadata):
                    if resp.HasField("final"):
                        final = resp.final
                assert final is not None
                tokens[t] += final.completion_tokens
                done[t] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    for ch in channels:
        ch.close()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]!r}")
    return {
        "wall_s": wall,
        "requests_per_s": sum(done) / wall,
        "tokens_per_s": sum(tokens) / wall,
        "requests": sum(done),
        "completion_tokens": sum(tokens),
    }


def cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(
    name: str, model: str, telemetry_target: str, args, log_dir: Path, tracing: bool = False
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "service",
        "--listen",
        f"127.0.0.1:{port}",
        "--model",
        model,
        "--telemetry-target",
        telemetry_target,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--instance-id",
        f"bench-{name}",
        "--max-batch-size",
        str(args.max_batch_size),
        "--log-level",
        args.service_log_level,
        "--tracing",
        str(tracing).lower(),
    ]
    log = open(log_dir / f"service-{name}.log", "wb")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT
    )
    return proc, f"127.0.0.1:{port}"


def scrape_requests_total(prom_address: str) -> int:
    with urllib.request.urlopen(f"http://{prom_address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(float(m.group(1)) for m in re.finditer(r"^specdec_requests_total\{[^}]*\} (\S+)$", text, re.M))
    )


def stop(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return None
    return proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        default="tiny",
        help="tiny (the tests' tiny random model) or a model spec for load_model, e.g. smollm2-135m-instruct",
    )
    ap.add_argument("--clients", type=int, default=4, help="requests in flight")
    ap.add_argument("--requests", type=int, default=250, help="requests per round and mode")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--method", choices=sorted(METHODS), default="ngram")
    ap.add_argument("--k", type=int, default=4, help="num_draft_tokens for ngram")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup-requests", type=int, default=40)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument(
        "--service-log-level", default="INFO", help="both services log one canonical line per request at INFO"
    )
    ap.add_argument("--sidecar-exporter", choices=("prometheus", "otlp"), default="prometheus")
    ap.add_argument(
        "--compare",
        choices=("reporting", "tracing"),
        default="reporting",
        help="reporting: on reports, off does not; tracing: both report, on also traces",
    )
    ap.add_argument(
        "--reuse-services",
        action="store_true",
        help="one on/off pair of services for all rounds (default: a fresh pair "
        "per round, so that a speed difference between two processes, seen "
        "in A/A runs, does not bias the ratio)",
    )
    ap.add_argument(
        "--aa-control",
        action="store_true",
        help="A/A control: the 'on' service does not report either, so the ratio "
        "shows the noise floor and any bias between the two processes",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-reporting-"))
    if args.model == "tiny":
        from testkit.tiny_model import save_tiny_model

        model = str(save_tiny_model(tmp / "tiny-model", seed=0, layers=2, with_eos=False))
    else:
        model = args.model

    sidecar_port, prom_port = free_port(), free_port()
    sidecar_cmd = [
        sys.executable,
        "-m",
        "telemetry",
        "--listen",
        f"127.0.0.1:{sidecar_port}",
        "--instance-id",
        "bench-sidecar",
        "--log-level",
        "WARNING",
        "--exporters",
        "prometheus",
        "--prometheus-address",
        f"127.0.0.1:{prom_port}",
    ]
    sidecar_env = {**os.environ, "PYTHONPATH": str(REPO)}
    receiver = None
    if args.sidecar_exporter == "otlp":
        from testkit.otlp_receiver import OtlpGrpcReceiver

        receiver = OtlpGrpcReceiver()
        sidecar_cmd[sidecar_cmd.index("prometheus")] = "otlp,prometheus"
        sidecar_cmd += ["--ack-mode", "export"]
        sidecar_env.update(receiver.env())
    tracing = args.compare == "tracing"
    if tracing:
        from testkit.otlp_receiver import OtlpGrpcReceiver

        receiver = receiver or OtlpGrpcReceiver()
        sidecar_cmd += ["--tracing", "true"]
        sidecar_env.update(receiver.traces_env())
    metadata = TRACEPARENT if tracing else ()
    sidecar = subprocess.Popen(
        sidecar_cmd,
        cwd=REPO,
        env=sidecar_env,
        stdout=open(tmp / "sidecar.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    procs = [sidecar]
    rounds: list[dict] = []
    exit_codes: list[int | None] = []
    load_s: list[float] = []
    served_on = 0
    served_off = 0
    on_target = "" if args.aa_control else f"127.0.0.1:{sidecar_port}"
    off_target = f"127.0.0.1:{sidecar_port}" if tracing else ""
    requests = make_requests(args.requests, args.max_tokens, args.method, args.k)
    warm = make_requests(args.warmup_requests, args.max_tokens, args.method, args.k)

    def start_pair(r: int) -> dict:
        """A fresh on/off pair of services (start order alternating), loaded and warmed."""
        names = ("on", "off") if r % 2 == 0 else ("off", "on")
        pair = {}
        t0 = time.monotonic()
        for name in names:
            proc, addr = start_service(
                f"{name}-{r}",
                model,
                on_target if name == "on" else off_target,
                args,
                tmp,
                tracing=tracing and name == "on",
            )
            procs.append(proc)
            pair[name] = (proc, addr)
        for proc, addr in pair.values():
            wait_for(lambda: proc.poll() is not None or health_serving(addr), 600, 0.2, f"service {addr}")  # noqa: B023
            if proc.poll() is not None:
                raise RuntimeError(f"service exited; see {tmp}")
        load_s.append(round(time.monotonic() - t0, 1))
        for name in names:
            run_round(pair[name][1], warm, args.clients, metadata)
        return pair

    try:
        wait_for(lambda: health_serving(f"127.0.0.1:{sidecar_port}"), 60, 0.1, "sidecar")
        pair = None
        for r in range(args.rounds):
            if pair is None or not args.reuse_services:
                if pair is not None:
                    exit_codes += [stop(proc) for proc, _ in pair.values()]
                pair = start_pair(r)
                served_on += len(warm)
                served_off += len(warm)
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            res = {}
            for mode in order:
                proc, addr = pair[mode]
                pids = {"service": proc.pid, "sidecar": sidecar.pid, "clients": os.getpid()}
                before = {k: cpu_s(pid) for k, pid in pids.items()}
                res[mode] = run_round(addr, requests, args.clients, metadata)
                res[mode]["cpu_ms_per_request"] = {
                    k: round((cpu_s(pid) - before[k]) * 1e3 / res[mode]["requests"], 3)
                    for k, pid in pids.items()
                }
            served_on += res["on"]["requests"]
            served_off += res["off"]["requests"]
            rounds.append(
                {
                    "order": list(order),
                    **{
                        m: {k: round(v, 3) if isinstance(v, float) else v for k, v in res[m].items()}
                        for m in ("off", "on")
                    },
                    "ratio_requests_per_s": round(
                        res["on"]["requests_per_s"] / res["off"]["requests_per_s"], 4
                    ),
                    "ratio_tokens_per_s": round(res["on"]["tokens_per_s"] / res["off"]["tokens_per_s"], 4),
                }
            )
        # reporting was really on: the sidecar counted every request the "on" services
        # served (a service flushes its reporter on SIGTERM before it exits; the Prometheus
        # view needs no export)
        exit_codes += [stop(proc) for proc, _ in pair.values()]
        exported = scrape_requests_total(f"127.0.0.1:{prom_port}")
    finally:
        for proc in reversed(procs):
            stop(proc)
        spans = len(receiver.span_store.spans()) if receiver is not None else 0
        if receiver is not None:
            receiver.close()
    reported = served_on + (served_off if tracing else 0)

    ratios_r = [r["ratio_requests_per_s"] for r in rounds]
    ratios_t = [r["ratio_tokens_per_s"] for r in rounds]
    on_rps = [r["on"]["requests_per_s"] for r in rounds]
    off_rps = [r["off"]["requests_per_s"] for r in rounds]
    out = {
        "bench": "service_reporting_overhead",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "device": "cpu",
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "model": args.model,
        "clients": args.clients,
        "requests_per_round": args.requests,
        "max_tokens": args.max_tokens,
        "method": args.method,
        "k": args.k if args.method == "ngram" else 0,
        "rounds": args.rounds,
        "sidecar_exporter": args.sidecar_exporter,
        "service_pair_load_s": load_s,
        "fresh_services_per_round": not args.reuse_services,
        "per_round": rounds,
        "off_requests_per_s": [round(x, 2) for x in off_rps],
        "on_requests_per_s": [round(x, 2) for x in on_rps],
        "ratio_requests_per_s_per_round": ratios_r,
        "ratio_on_over_off_median": round(statistics.median(ratios_r), 4),
        "ratio_tokens_per_s_median": round(statistics.median(ratios_t), 4),
        "ratio_of_medians_requests_per_s": round(statistics.median(on_rps) / statistics.median(off_rps), 4),
        "cpu_ms_per_request_median": {
            m: {
                k: round(statistics.median(r[m]["cpu_ms_per_request"][k] for r in rounds), 3)
                for k in ("service", "sidecar", "clients")
            }
            for m in ("off", "on")
        },
        "compare": args.compare,
        "sidecar_requests_total": exported,
        "on_service_requests_served": served_on,
        "reporting_complete": exported == reported,
        **({"spans_received": spans, "tracing_complete": spans == served_on} if tracing else {}),
        "aa_control": args.aa_control,
        "service_exit_codes": exit_codes,
        "target_ratio": 0.99,
        "logs": str(tmp),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
