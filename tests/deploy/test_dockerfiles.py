"""The Dockerfiles, statically (no Docker engine here): multi-stage, pinned bases and
packages, non-root, a HEALTHCHECK through the gRPC health service, the model-cache volume,
and every file they COPY exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy.conftest import REPO

DOCKERFILES = {
    "service": REPO / "deploy" / "service.Dockerfile",
    "sidecar": REPO / "deploy" / "sidecar.Dockerfile",
}


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def arg_defaults(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(rest.split("=", 1) for op, rest in ins if op == "ARG" and "=" in rest)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_with_pinned_base(name) -> None:
    ins = instructions(DOCKERFILES[name])
    froms = [rest for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build"
    base = arg_defaults(ins)["BASE_IMAGE"]
    image, _, tag = base.rpartition(":")
    assert tag and tag != "latest" and re.match(r"\d", tag), base
    if name == "service":
        assert image == "pytorch/pytorch" and tag.startswith("2.11.0-cuda") and "cudnn" in tag
    else:
        assert image == "python" and tag.startswith("3.12.") and "slim" in tag
    assert any("--from=build" in rest for op, rest in ins if op == "COPY")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root_with_a_grpc_health_check(name) -> None:
    ins = instructions(DOCKERFILES[name])
    last_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM") :]
    users = [rest for op, rest in last_stage if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    checks = [rest for op, rest in last_stage if op == "HEALTHCHECK"]
    assert len(checks) == 1 and "grpc-health-probe" in checks[0]
    listen_var = "SPECDEC_LISTEN" if name == "service" else "SPECDEC_SIDECAR_LISTEN"
    assert listen_var in checks[0]
    assert any(
        "deploy/grpc_health_probe.py /usr/local/bin/grpc-health-probe" in rest
        for op, rest in last_stage
        if op == "COPY"
    )
    for op, rest in ins:  # nothing downloaded but through pip
        if op == "RUN":
            assert not re.search(r"\b(curl|wget|ADD)\b", rest), rest
    assert not [r for op, r in ins if op == "ADD"]


def test_service_image_has_the_model_cache_volume() -> None:
    ins = instructions(DOCKERFILES["service"])
    env = " ".join(rest for op, rest in ins if op == "ENV")
    assert "SPECDEC_CACHE_DIR=/models" in env
    assert any("/models" in rest for op, rest in ins if op == "VOLUME")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_requirements_are_pinned(name) -> None:
    for op, rest in instructions(DOCKERFILES[name]):
        if op != "COPY" or "--from=" in rest:
            continue
        sources = [a for a in rest.split() if not a.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: missing"
    ignore = DOCKERFILES[name].with_name(DOCKERFILES[name].name + ".dockerignore")
    allowed = [entry[1:].rstrip("/") for entry in ignore.read_text().splitlines() if entry.startswith("!")]
    assert "*" in ignore.read_text().splitlines(), "allowlist build context (no .venv)"
    for op, rest in instructions(DOCKERFILES[name]):
        if op == "COPY" and "--from=" not in rest:
            for source in [a for a in rest.split() if not a.startswith("--")][:-1]:
                assert any(source == a or source.startswith(a + "/") for a in allowed), (
                    f"COPY {source} is excluded by {ignore.name}"
                )
    lock = REPO / "deploy" / "requirements" / f"{name}.txt"
    lines = [pin for pin in lock.read_text().splitlines() if pin and not pin.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+\-]+", pin) for pin in lines)
    names = {pin.split("==")[0].lower().replace("_", "-") for pin in lines}
    assert {"grpcio", "grpcio-health-checking", "protobuf", "opentelemetry-sdk", "structlog"} <= names
    if name == "service":
        assert "torch" not in names and not any(n.startswith("nvidia-") for n in names), (
            "torch comes from the CUDA base image"
        )
        assert {"transformers", "accelerate", "gguf"} <= names
    else:
        assert not names & {"torch", "transformers", "numpy"}, "the sidecar image stays slim"
    text = DOCKERFILES[name].read_text()
    assert f"deploy/requirements/{name}.txt" in text and "--no-deps -r" in text


def test_grpc_health_probe_maps_wildcards_to_loopback() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe", REPO / "deploy" / "grpc_health_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.probe_address("0.0.0.0:50051") == "127.0.0.1:50051"
    assert probe.probe_address("[::]:50052") == "127.0.0.1:50052"
    assert probe.probe_address("sidecar:50052") == "sidecar:50052"
    with pytest.raises(ValueError):
        probe.probe_address("nonsense")
