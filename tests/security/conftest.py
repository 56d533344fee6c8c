"""Certificates made by scripts/make_certs.sh (the script operators use), bearer-token files,
and the service/sidecar fixtures of the service and telemetry test packages."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.service.conftest import make_stub, run_service, tiny_model_dir  # noqa: F401 (fixtures)
from tests.telemetry.conftest import sidecar_process_factory, sidecar_thread_factory  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
TOKEN_A = "token-a-" + "0123456789abcdef" * 2
TOKEN_B = "token-b-" + "fedcba9876543210" * 2


@dataclass(frozen=True)
class Certs:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    @property
    def server_cert(self) -> str:
        return self.path("server.pem")

    @property
    def server_key(self) -> str:
        return self.path("server.key")

    @property
    def client_cert(self) -> str:
        return self.path("client.pem")

    @property
    def client_key(self) -> str:
        return self.path("client.key")

    def read(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()


def make_certs(out: Path) -> Certs:
    subprocess.run([str(REPO / "scripts" / "make_certs.sh"), str(out)], check=True, capture_output=True)
    return Certs(out)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory) -> Certs:
    """A second, unrelated CA and its certificates."""
    return make_certs(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture
def token_file(tmp_path) -> Callable[..., str]:
    """token_file(*lines) -> path of a new file with those lines."""
    count = [0]

    def write(*lines: str) -> str:
        count[0] += 1
        path = tmp_path / f"tokens-{count[0]}"
        path.write_text("".join(line + "\n" for line in lines))
        return str(path)

    return write
