"""Both processes log through structlog: JSON off a terminal, stdlib loggers routed through it."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import logging, structlog
from specdec_common.logging_setup import configure_logging
configure_logging("INFO")
configure_logging("INFO")  # idempotent: still one handler
structlog.contextvars.bind_contextvars(request_id="abc")
structlog.get_logger("t").info("structured", answer=42)
logging.getLogger("grpc._cython").warning("from %s", "stdlib")
logging.getLogger("x").debug("hidden at INFO")
"""


def run(env_extra: dict[str, str]) -> list[str]:
    import os

    env = {**os.environ, **env_extra}
    env.pop("SPECDEC_LOG_FORMAT", None) if "SPECDEC_LOG_FORMAT" not in env_extra else None
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return [line for line in out.stderr.splitlines() if line.strip()]


def test_json_when_not_on_a_terminal_and_stdlib_is_routed() -> None:
    lines = run({})
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert len(records) == 2, lines
    first, second = records
    assert first["event"] == "structured" and first["answer"] == 42
    assert first["request_id"] == "abc" and first["level"] == "info" and "timestamp" in first
    assert second["event"] == "from stdlib" and second["logger"] == "grpc._cython"
    assert second["level"] == "warning" and second["request_id"] == "abc"


def test_console_format_can_be_forced() -> None:
    lines = run({"SPECDEC_LOG_FORMAT": "console"})
    assert len(lines) == 2
    assert "structured" in lines[0] and "answer" in lines[0]
    for line in lines:
        try:
            json.loads(line)
        except ValueError:
            continue
        raise AssertionError(f"console output should not be JSON: {line}")


def test_fields_reach_the_lines_of_every_thread() -> None:
    """The engine core tags its lines with process=engine_core: its engine and reader threads'
    too (a field bound with contextvars would reach only the binding thread's lines)."""
    script = """
import logging, threading, structlog
from specdec_common.logging_setup import configure_logging
configure_logging("INFO", json=True, fields={"process": "engine_core"})
worker = threading.Thread(target=lambda: structlog.get_logger("t").info("from_thread"))
worker.start(); worker.join()
logging.getLogger("transformers").warning("stdlib line")
structlog.get_logger("t").info("overridden", process="other")
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL
    )
    records = [json.loads(line) for line in out.stderr.splitlines() if line.strip()]
    assert [r["event"] for r in records] == ["from_thread", "stdlib line", "overridden"]
    assert [r["process"] for r in records] == ["engine_core", "engine_core", "other"]
