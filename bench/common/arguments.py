"""Command-line pieces shared by the benchmark tools: comma-separated lists, checked as parsed,
and result files written whole."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from service.config import gemv_rows_setting


def subset_of(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a non-empty comma-separated subset of `choices`, in the order given."""
    allowed = tuple(choices)

    def parse(text: str) -> list[str]:
        items = [x for x in text.split(",") if x]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {', '.join(allowed)}, got {text!r}"
            )
        return items

    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def floats(text: str) -> list[float]:
    """An argparse type: comma-separated numbers."""
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def gemv_rows(text: str) -> int | None:
    """A --gemv-max-rows value, checked as the service checks it: "auto" (None: EngineConfig's
    per-model rule) or a row count >= 0."""
    value = gemv_rows_setting(text)
    return None if value == "auto" else value


def gemv_rows_text(rows: int | None) -> int | str:
    """A gemv limit as a result file records it and the service's flag takes it."""
    return "auto" if rows is None else rows


def add_gemv_max_rows(parser: argparse.ArgumentParser, what: str = "the engine's") -> None:
    """--gemv-max-rows (gemv_rows): None for auto."""
    parser.add_argument(
        "--gemv-max-rows",
        type=gemv_rows,
        default=None,
        help=f"{what} gemv limit (EngineConfig.gemv_max_rows): auto (default), 0 (the tile "
        "kernel for every pass) or a row count",
    )


def write_result(path: Path, result: Any) -> None:
    """Writes `result` as JSON to `path` through a temporary file, so that a run stopped while
    writing leaves the last complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
