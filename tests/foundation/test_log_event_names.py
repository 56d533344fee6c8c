"""Every structlog event name in the product is snake_case (one style, greppable, stable),
and the values go into key-value fields, not into the event name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "telemetry", "specdec_security", "specdec_common")
LEVELS = {"debug", "info", "warning", "error", "exception", "critical", "msg"}
SNAKE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")


def _is_structlog(receiver: ast.expr) -> bool:
    """`log` (the module's structlog logger) or `structlog.get_logger(...)` itself."""
    if isinstance(receiver, ast.Name):
        return receiver.id == "log"
    return (
        isinstance(receiver, ast.Call)
        and isinstance(receiver.func, ast.Attribute)
        and receiver.func.attr == "get_logger"
    )


def structlog_events() -> list[tuple[str, int, str]]:
    """(file, line, event) of every `log.<level>("...")` call; `log` is the structlog logger
    each module binds (stdlib loggers are named otherwise)."""
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LEVELS
                    and _is_structlog(node.func.value)
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    found.append((str(path.relative_to(REPO)), node.lineno, node.args[0].value))
    return found


def test_event_names_are_snake_case() -> None:
    events = structlog_events()
    assert len(events) > 40  # the scan sees the product's log calls
    bad = [f"{file}:{line}: {event!r}" for file, line, event in events if not SNAKE.fullmatch(event)]
    assert not bad, "event names not in snake_case:\n" + "\n".join(bad)


def test_the_product_logs_through_structlog_only() -> None:
    """No stdlib logger of its own (whose messages would be sentences with %s): the one place
    that touches stdlib logging is the set-up that routes other libraries' records."""
    own = [
        f"{path.relative_to(REPO)}:{number}"
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "logging_setup.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "logging.getLogger(" in line
    ]
    assert not own, own
