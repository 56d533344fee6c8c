"""The run's report: a table for the terminal and an optional PNG plot (matplotlib, the
`bench` extra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class PlotUnavailableError(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Fails before any load is sent, not after, when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError(
            "--plot needs matplotlib: install the bench extra (pip install 'specdec[bench]')"
        ) from None


def _ms(stats: dict[str, Any]) -> str:
    if not stats["count"]:
        return "-"
    return "/".join(f"{stats[f'p{q}'] * 1e3:.1f}" for q in (50, 90, 99))


def _num(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table(runs: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'method':<11} {'mode':<9} {'level':>6} {'ok/sent':>9} {'tok/s':>8} {'req/s':>7} "
        f"{'TTFT ms p50/90/99':>20} {'ITL ms p50/90/99':>18} {'accept':>7} {'acc.len':>7}  errors"
    )
    lines = [header]
    for run in runs:
        req, thr, lat, srv = run["requests"], run["throughput"], run["latency_s"], run["server_metrics"]
        errors = ", ".join(f"{code} {n}" for code, n in req["errors_by_code"].items()) or "-"
        lines.append(
            f"{run['method']:<11} {run['mode']:<9} {run['level']:>6g} "
            f"{req['succeeded']:>4}/{req['sent']:<4} {_num(thr['tokens_per_s'], '.1f'):>8} "
            f"{_num(thr['requests_per_s'], '.2f'):>7} {_ms(lat['ttft']):>20} {_ms(lat['itl']):>18} "
            f"{_num(srv['accept_rate'], '.3f'):>7} {_num(srv['accept_length'], '.2f'):>7}  {errors}"
        )
    return "\n".join(lines)


def plot(runs: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Tokens/s, TTFT and ITL (p50 solid, p99 dashed) against the level, one line per
    method and mode."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        series.setdefault((run["method"], run["mode"]), []).append(run)
    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4.5))
    for (method, mode), points in series.items():
        points = sorted(points, key=lambda r: r["level"])
        levels = [p["level"] for p in points]
        label = f"{method} {mode}"
        (line,) = axes[0].plot(
            levels, [p["throughput"]["tokens_per_s"] or 0 for p in points], "o-", label=label
        )
        for axis, key in ((axes[1], "ttft"), (axes[2], "itl")):
            for q, style in ((50, "o-"), (99, "x--")):
                values = [p["latency_s"][key][f"p{q}"] for p in points]
                axis.plot(
                    levels,
                    [v * 1e3 if v is not None else float("nan") for v in values],
                    style,
                    color=line.get_color(),
                    label=f"{label} p{q}",
                )
    for axis, ylabel in zip(
        axes, ("tokens/s (steady window)", "time to first token (ms)", "inter-chunk latency (ms)")
    ):
        axis.set_xlabel("level (concurrent requests, or requests/s for rate)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    axes[1].legend(fontsize="x-small")
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
