"""The gRPC layer and the command-line tools load without torch or transformers (issue 17):
the client starts in a fraction of a second, and a gRPC front-end does not pay for the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Everything a gRPC client or a gRPC front-end imports.
TORCH_FREE_MODULES = (
    "service.client.cli",
    "service.api.servicer",
    "service.server",
    "service.api.request_mapping",
    "service.api.parse_guard",
    "service.api.streaming",
    "service.api.request_log",
    "specdec_common.metrics_format",
    "service.config",
    "service.reporting",
    "service.engine.api",
    "service.engine.config",
    "service.engine.validation",
    "service.engine_process.client",
    "service.engine_process.protocol",
    "service.engine_process.core",
    "service.client.loadgen.cli",
    "service.client.loadgen.runner",
    "service.client.loadgen.stats",
    "service.client.loadgen.prompts",
    "service.client.loadgen.report",
    "service.client.loadgen.requests",
)


def run_fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_api_layer_and_tools_import_no_torch_or_transformers() -> None:
    imports = "; ".join(f"import {name}" for name in TORCH_FREE_MODULES)
    done = run_fresh(
        f"{imports}; import sys; "
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    assert done.returncode == 0, done.stderr


def test_the_engine_itself_still_imports_from_the_package() -> None:
    done = run_fresh(
        "import sys; import service.engine as engine; assert 'torch' not in sys.modules; "
        "from service.engine import Engine, EngineConfig, GenerationRequest; "
        "from service.engine.engine import Engine as Direct; "
        "assert Engine is Direct and engine.Engine is Direct; assert 'torch' in sys.modules"
    )
    assert done.returncode == 0, done.stderr
