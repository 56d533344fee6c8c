"""The sidecar is independent of the service: no module of `telemetry/`, `specdec_common/` or
`specdec_security/` imports `service`, and the sidecar loads without torch or transformers
(its image installs neither: they are the `service` extra)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_AND_SIDECAR = ("telemetry", "specdec_common", "specdec_security")


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_sidecar_and_shared_packages_never_import_the_service() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for package in SHARED_AND_SIDECAR
        for path in sorted((REPO / package).rglob("*.py"))
        if "service" in imported_roots(path)
    ]
    assert not offenders, f"import the service package: {offenders}"


def test_the_boundary_check_sees_an_import_of_the_service(tmp_path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from service.api import servicer\n")
    assert "service" in imported_roots(module)


def test_sidecar_loads_without_torch_or_transformers() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import telemetry.__main__, telemetry.server, specdec_common.settings, sys; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'service') if m in sys.modules); "
            "assert not heavy, heavy",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
