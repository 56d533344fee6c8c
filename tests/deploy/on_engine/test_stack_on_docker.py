"""The compose stack built and run on a real Docker engine (`make test-deploy`).

docker-compose.yml's CPU profile, with tests/deploy/on_engine/compose.test.yml only for what
this machine cannot have (a registry: no Collector or Grafana image). Everything is checked
from the host through the published ports. The tests run in file order on one stack: each
step starts from the state the previous one left.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from specdec_common.metrics_format import metrics_to_dict
from tests.deploy.on_engine.stack import CLIENT, DRAIN_GRACE_S, PIP_CA, REPO, SECURE, Stack, Totals, run

if not os.environ.get("SPECDEC_DEPLOY_PYTHON_BASE"):
    pytest.skip(
        "run by `make test-deploy` (needs its own Docker daemon and local base images)",
        allow_module_level=True,
    )

PROJECT = "specdec-deploy-test"
MODEL = "smollm2-135m-instruct"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVICE = "service-cpu"
CPU_PROFILE = ("--scale", "service=0")  # the GPU service stays down (README's CPU command)
DOWNLOAD_LINE = "[specdec-fetch-model] downloading"
CONVERTED_LINE = "gguf_converted"  # the service's log event of a GGUF conversion


def docker_time(text: str) -> float:
    """Docker's RFC 3339 nanosecond timestamps -> epoch seconds."""
    head, _, frac = text.rstrip("Z").partition(".")
    if "+" in frac:
        frac = frac.split("+")[0]
    return datetime.fromisoformat(head + "+00:00").timestamp() + float("0." + (frac or "0"))


def probe(address: str) -> str:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        return exc.code().name


@pytest.fixture(scope="module")
def stack():
    s = Stack(PROJECT)
    s.compose("down", "-v", "--remove-orphans", timeout=120)  # an interrupted run's leftovers
    try:
        yield s
    finally:
        s.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=180, check=False)


@pytest.fixture(scope="module")
def totals() -> Totals:
    return Totals()


@pytest.fixture(scope="module")
def speed() -> dict[str, float]:
    """Tokens per second per request, as measured through the stack (machines differ ten-fold:
    the drain test sizes its requests to be in flight for seconds, yet end within the grace)."""
    return {"tokens_per_s": 1.0}


def test_compose_v2_accepts_the_gpu_and_cpu_profiles_as_shipped(stack) -> None:
    """The GPU service cannot run here; Compose v2 itself still validates its definition."""
    env = {k: v for k, v in stack.env.items() if not k.startswith(("SPECDEC_", "OTEL_"))}
    env["COMPOSE_PROJECT_NAME"] = PROJECT
    for profile_args in ([], ["--profile", "cpu"]):
        proc = run(
            [
                "docker",
                "compose",
                "-f",
                str(REPO / "docker-compose.yml"),
                *profile_args,
                "config",
                "--format",
                "json",
            ],
            env,
            timeout=60,
        )
        services = json.loads(proc.stdout)["services"]
        gpu = services["service"]["deploy"]["resources"]["reservations"]["devices"]
        assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], gpu
        assert ("service-cpu" in services) == bool(profile_args)
        assert services["service"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    ca = run(
        [
            "docker",
            "compose",
            "-f",
            str(REPO / "docker-compose.yml"),
            "-f",
            str(PIP_CA),
            "config",
            "--format",
            "json",
        ],
        dict(env, SPECDEC_PIP_CA_BUNDLE="/dev/null"),
        60,
    )
    assert json.loads(ca.stdout)["services"]["sidecar"]["build"]["secrets"][0]["source"] == "pip_ca_bundle"


def test_images_build_from_local_bases(stack) -> None:
    started = time.monotonic()
    stack.compose("build", "sidecar", SERVICE, "prometheus", timeout=1500)
    print(f"images built in {time.monotonic() - started:.0f} s")
    for image in ("specdec-service:0.1.0", "specdec-sidecar:0.1.0"):
        config = stack.inspect(image)["Config"]
        assert config["User"] == "specdec", image
        history = stack.docker("history", "--no-trunc", image).stdout
        assert "BEGIN CERTIFICATE" not in history
        # The CA bundle was a build secret: nowhere in the image.
        found = stack.docker(
            "run",
            "--rm",
            "--entrypoint",
            "sh",
            image,
            "-c",
            "ls /run/secrets 2>/dev/null; grep -rl 'BEGIN CERTIFICATE' /tmp "
            "/src /opt/venv/pip.conf 2>/dev/null; true",
        ).stdout.strip()
        assert not found, f"{image}: build-time CA bundle left in the image: {found}"
    versions = stack.docker(
        "run",
        "--rm",
        "--entrypoint",
        "python",
        "specdec-service:0.1.0",
        "-c",
        "import torch; print(torch.__version__)",
    ).stdout
    assert "+cpu" in versions, versions


def test_model_fetched_into_the_cache_volume_by_the_image(stack) -> None:
    """The image's own `specdec-fetch-model` fills the model-cache volume (pip through this
    machine's proxy, its CA bundle mounted at run time; the stack's network has no way out
    here, so this one container uses the host's network)."""
    stack.compose("create", *CPU_PROFILE)  # the project's volumes, as compose names them
    volume = f"{PROJECT}_model-cache"
    ca = os.environ.get("SPECDEC_DEPLOY_CA_BUNDLE")
    ca_args = ["-v", f"{ca}:/etc/specdec-ca.pem:ro", "-e", "PIP_CERT=/etc/specdec-ca.pem"] if ca else []
    started = time.monotonic()
    proc = stack.docker(
        "run",
        "--rm",
        "--network",
        "host",
        "-v",
        f"{volume}:/models",
        *ca_args,
        "--entrypoint",
        "specdec-fetch-model",
        "specdec-service:0.1.0",
        MODEL,
        timeout=600,
    )
    print(f"model fetched in {time.monotonic() - started:.0f} s: {proc.stdout.strip()}")
    assert proc.stdout.strip() == f"/models/models/{MODEL_FILE}"
    assert DOWNLOAD_LINE in proc.stderr


def test_start_is_health_ordered(stack) -> None:
    stack.compose("up", "-d", *CPU_PROFILE, timeout=300)
    # `up -d` returns once the service is started, which it only is after the sidecar is healthy.
    sidecar = stack.inspect(stack.container("sidecar"))
    service_id = stack.container(SERVICE)
    service = stack.inspect(service_id)
    healthy_probes = [docker_time(p["End"]) for p in sidecar["State"]["Health"]["Log"] if p["ExitCode"] == 0]
    assert healthy_probes, sidecar["State"]["Health"]
    assert min(healthy_probes) < docker_time(service["State"]["StartedAt"]), (
        "the service started before the sidecar was healthy"
    )
    prometheus = stack.inspect(stack.container("prometheus"))
    assert prometheus["State"]["Health"]["Status"] == "healthy"

    address = stack.service_address(SERVICE, 50051)
    seen = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        status = probe(address)
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "SERVING":
            break
        time.sleep(0.5)
    assert seen[-1] == "SERVING", seen
    assert len(seen) > 1, f"serving at once, before loading a model? {seen}"
    healthy_at = stack.wait_healthy(service_id, timeout=120)
    logs = stack.logs(service_id)
    assert DOWNLOAD_LINE not in logs, "the service downloaded the model the volume held"
    assert CONVERTED_LINE in logs and "/models/converted/" in logs, logs[-3000:]
    print(
        f"service health seen from the host: {seen}; healthy {healthy_at - deadline + 300:.0f} s "
        f"after up returned"
    )


def test_requests_counted_exactly(stack, totals, speed) -> None:
    results = stack.client(stack.service_address(SERVICE, 50051), requests=4, concurrency=3, max_tokens=12)
    assert all(r["completion_tokens"] > 0 for r in results)
    speed["tokens_per_s"] = min(r["completion_tokens"] / r["client_seconds"] for r in results)
    assert sum(r["metrics"].get("proposed_drafts", 0) for r in results) > 0, (
        "ngram drafting proposed nothing: the acceptance counters would be vacuous"
    )
    totals.add(results)
    stack.wait_counters(totals.values)
    assert stack.counter_sum("specdec_sidecar_records_rejected_total") == 0


class _Streamed(threading.Thread):
    """One Generate stream on its own thread: when its first token came, how it ended."""

    def __init__(self, address: str, max_tokens: int, index: int) -> None:
        super().__init__(daemon=True)
        self.request = generation_pb2.GenerateRequest(
            request_id=f"drain-{index}",
            max_tokens=max_tokens,
            messages=generation_pb2.ChatMessages(
                messages=[
                    generation_pb2.ChatMessage(
                        role="user", content="List the first twenty prime numbers, then explain how."
                    )
                ]
            ),
        )
        self.address = address
        self.first_token = threading.Event()
        self.result: dict | None = None
        self.error: str | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            with grpc.insecure_channel(self.address) as channel:
                stub = generation_pb2_grpc.GenerationServiceStub(channel)
                for response in stub.Generate(self.request, timeout=600):
                    if response.HasField("chunk"):
                        self.first_token.set()
                    else:
                        final = response.final
                        self.result = {
                            "finish_reason": metrics_pb2.FinishReason.Name(final.finish_reason),
                            "prompt_tokens": final.prompt_tokens,
                            "completion_tokens": final.completion_tokens,
                            "metrics": metrics_to_dict(final.metrics),
                        }
        except grpc.RpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()


def test_stop_drains_in_flight_requests_and_flushes_their_metrics(stack, totals, speed) -> None:
    service_id = stack.container_running(SERVICE)
    address = stack.service_address(SERVICE, 50051)
    # About 12 s of decoding each, well inside the stack's grace period (DRAIN_GRACE_S).
    max_tokens = max(6, min(300, int(speed["tokens_per_s"] * 12)))
    streams = [_Streamed(address, max_tokens, i) for i in range(3)]
    for stream in streams:
        stream.start()
    # Running, not queued: a draining server answers queued requests UNAVAILABLE at once.
    for stream in streams:
        assert stream.first_token.wait(300), "no first token in 300 s"
    assert all(s.ended_at is None for s in streams), [
        s.error or s.result for s in streams
    ]  # each still in flight: max_tokens too small
    stop_began = time.monotonic()
    stack.compose("stop", "--timeout", str(DRAIN_GRACE_S + 30), SERVICE, timeout=DRAIN_GRACE_S + 90)
    stop_took = time.monotonic() - stop_began
    for stream in streams:
        stream.join(120)
    assert [s.error for s in streams] == [None] * 3, [s.error for s in streams]
    results = [s.result for s in streams]
    assert all(r["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP") for r in results), results
    assert all(s.ended_at > stop_began for s in streams), (
        "a request finished before the stop began: it was not in flight"
    )
    state = stack.inspect(service_id)["State"]
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stop_took < DRAIN_GRACE_S, f"stop took {stop_took:.0f} s: cancelled at the grace period"
    totals.add(results)
    stack.wait_counters(totals.values)  # the stopped service flushed them before exiting
    print(f"stopped in {stop_took:.1f} s with 3 requests of {max_tokens} tokens in flight")
    since = time.time()
    stack.compose("start", SERVICE, timeout=120)
    stack.wait_healthy(service_id, timeout=300)
    restart_logs = stack.docker("logs", "--since", str(int(since) - 1), service_id)
    text = restart_logs.stdout + restart_logs.stderr
    assert "loaded" in text and CONVERTED_LINE not in text and DOWNLOAD_LINE not in text, text


def test_sidecar_killed_under_load_loses_and_doubles_nothing(stack, totals) -> None:
    address = stack.service_address(SERVICE, 50051)
    sidecar_id = stack.container("sidecar")
    batches: list[tuple[float, float, list[dict]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def load() -> None:
        try:
            while not stop.is_set():
                began = time.monotonic()
                results = stack.client(address, requests=2, concurrency=2, max_tokens=8)
                batches.append((began, time.monotonic(), results))
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while not batches and time.monotonic() < deadline:
        time.sleep(0.2)
    killed_at = time.monotonic()
    stack.docker("kill", sidecar_id)
    # Down until a whole batch ran while no sidecar listened: the service must buffer those.
    deadline = time.monotonic() + 240
    while not any(began > killed_at for began, _, _ in batches) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert stack.inspect(sidecar_id)["State"]["Status"] == "exited"
    restarted_at = time.monotonic()
    stack.compose("start", "sidecar", timeout=60)
    stack.wait_healthy(sidecar_id, timeout=120)
    time.sleep(4)
    stop.set()
    worker.join(timeout=300)
    assert not errors, errors
    assert any(killed_at < began and ended < restarted_at for began, ended, _ in batches), (
        "no requests completed while the sidecar was down"
    )
    for _, _, results in batches:
        totals.add(results)
    instances = stack.query("count by (instance) (specdec_requests_total)")
    stack.wait_counters(totals.values, timeout=120)
    assert len(stack.query("count by (instance) (last_over_time(specdec_requests_total[1h]))")) >= 2, (
        f"one sidecar instance only: {instances}"
    )
    assert stack.counter_sum("specdec_sidecar_service_dropped_records_total") == 0


def test_two_replicas_report_to_one_sidecar(stack, totals) -> None:
    stack.compose(
        "up",
        "-d",
        "--scale",
        "service=0",
        "--scale",
        f"{SERVICE}=2",
        "--wait",
        "--wait-timeout",
        "400",
        timeout=450,
    )
    replicas = stack.containers(SERVICE, all_states=False)
    assert len(replicas) == 2, replicas
    addresses = {stack.published(replica, 50051) for replica in replicas}
    assert len(addresses) == 2, addresses
    instances = set()
    for address in sorted(addresses):
        results = stack.client(address, requests=2, concurrency=2, max_tokens=8)
        ids = {r["metrics"]["instance_id"] for r in results}
        assert len(ids) == 1, ids
        instances |= ids
        totals.add(results)
    assert len(instances) == 2, f"both ports answered from one replica: {instances}"
    for replica in replicas:  # the new replica loaded the first one's converted copy
        logs = stack.logs(replica)
        assert DOWNLOAD_LINE not in logs
    assert sum(CONVERTED_LINE in stack.logs(r) for r in replicas) == 1
    stack.wait_counters(totals.values)  # the next step's `down` ends the second replica


def test_restart_reuses_the_model_cache(stack, totals) -> None:
    marker = "stat -c %Y:%i /models/converted/*/specdec-converted.json /models/models/" + MODEL_FILE
    before = stack.compose("exec", "-T", SERVICE, "sh", "-c", marker).stdout
    stack.compose("down", timeout=180)
    assert not stack.containers(), "down left containers"
    stack.compose("up", "-d", *CPU_PROFILE, "--wait", "--wait-timeout", "400", timeout=450)
    service_id = stack.container(SERVICE)
    logs = stack.logs(service_id)
    assert "loaded" in logs and CONVERTED_LINE not in logs and DOWNLOAD_LINE not in logs, logs
    assert stack.compose("exec", "-T", SERVICE, "sh", "-c", marker).stdout == before
    results = stack.client(stack.service_address(SERVICE, 50051), requests=2, concurrency=2, max_tokens=8)
    totals.add(results)
    stack.wait_counters(totals.values)  # Prometheus' data volume survived `down` too


def test_secure_stack_serves_mutual_tls_and_tokens(stack, totals, tmp_path) -> None:
    """deploy/compose.secure.yml as docs/operations.md runs it: certificates from
    scripts/make_certs.sh, tokens, the containers' user owning the keys; the images' health
    probe speaks mutual TLS (`--wait` needs both healthy); the reporter's stream to the
    sidecar is mutual TLS with a token (the sidecar counts the requests)."""
    certs = tmp_path / "certs"
    run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs), "service", "sidecar"], stack.env, 60)
    (certs / "client.token").write_text(os.urandom(32).hex() + "\n")
    (certs / "reporter.token").write_text(os.urandom(32).hex() + "\n")
    for name in ("server.key", "client.key", "client.token", "reporter.token"):
        os.chown(certs / name, 10001, -1)  # the images' user `specdec`; mode stays 0600
    stack.files.append(SECURE)
    stack.env["SPECDEC_CERTS_DIR"] = str(certs)
    stack.compose("up", "-d", *CPU_PROFILE, "--wait", "--wait-timeout", "400", timeout=450)
    for name in ("sidecar", SERVICE):
        logs = stack.logs(stack.container_running(name))
        assert '"tls": true' in logs or "tls=True" in logs, logs[-2000:]
    address = stack.service_address(SERVICE, 50051)
    tls = {
        "SPECDEC_CLIENT_TLS_CA_FILE": str(certs / "ca.pem"),
        "SPECDEC_CLIENT_TLS_CERT_FILE": str(certs / "client.pem"),
        "SPECDEC_CLIENT_TLS_KEY_FILE": str(certs / "client.key"),
    }
    refused = run(
        [str(CLIENT), "--target", address, "--max-tokens", "2", "hello"],
        {**stack.env, **tls},
        120,
        check=False,
    )
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr, refused.stderr
    plaintext = run(
        [str(CLIENT), "--target", address, "--max-tokens", "2", "--timeout", "10", "hello"],
        stack.env,
        120,
        check=False,
    )
    assert plaintext.returncode == 2 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
    stack.env.update(tls, SPECDEC_CLIENT_AUTH_TOKEN_FILE=str(certs / "client.token"))
    results = stack.client(address, requests=2, concurrency=2, max_tokens=8)
    totals.add(results)
    stack.wait_counters(totals.values)  # reported over mutual TLS with the reporter's token


def test_down_leaves_nothing_running(stack) -> None:
    stack.compose("down", "-v", timeout=180)
    label = f"label=com.docker.compose.project={PROJECT}"
    assert not stack.containers()
    assert not stack.docker("network", "ls", "-q", "--filter", label).stdout.split()
    assert not stack.docker("volume", "ls", "-q", "--filter", label).stdout.split()
    assert not stack.docker("ps", "-q").stdout.split(), "something still runs on the engine"
