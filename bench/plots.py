"""PNG plots from bench/gpu_decode.py's JSON.

    python -m bench.plots bench/out/gpu_decode.json [--out-dir DIR]

Writes, next to the JSON unless --out-dir says otherwise (needs matplotlib: pip install
-e '.[bench]'):
  <stem>_concurrency.png  aggregate tokens/s against concurrency, per engine method and prompt
                          kind; transformers' batch-1 rates as reference lines
  <stem>_ksweep.png       speedup against k (fixed draft length, batch 1) for n-gram and the
                          draft model, each over plain decoding in the same engine
  <stem>_acceptance.png   distribution of accepted drafts per drafting pass at batch 1, per
                          method and prompt kind
A plot whose section is missing from the JSON is skipped (and said so). --markdown also prints
the run's tables (batch 1 against every transformers configuration, concurrency, k sweep).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

KIND_LABEL = {"grounded": "input-grounded prompts", "open_chat": "open-chat prompts"}
METHOD_LABEL = {"none": "plain", "ngram": "n-gram", "draft_model": "draft model"}
METHOD_COLOR = {"none": "tab:gray", "ngram": "tab:blue", "draft_model": "tab:orange"}
HF_STYLE = {
    "plain": ("transformers generate() plain", "tab:red", ":"),
    "static_compiled": ("transformers static cache + compile", "tab:purple", "--"),
}


def _rate(rows: list[dict]) -> float:
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def _title(data: dict, what: str) -> str:
    adaptive = "adaptive k" if data.get("adaptive_draft_length") else "fixed k"
    return (
        f"{what}\n{data.get('model')} {data.get('dtype')} on {data.get('machine')}, greedy, "
        f"{data.get('new_tokens')} new tokens, k <= {data.get('k')} ({adaptive})"
    )


# bench/gpu_decode.py's concurrency modes: N clients sending back to back, or N requests at once
MODE_STYLE = {"sustained": "-", "burst": "--"}


def plot_concurrency(data: dict, path: Path) -> bool:
    rows = data.get("concurrency") or []
    if not rows:
        return False
    kinds = [k for k in KIND_LABEL if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False, sharey=True)
    levels = sorted({r["concurrency"] for r in rows})
    modes = [m for m in MODE_STYLE if any(r.get("mode", "burst") == m for r in rows)]
    for ax, kind in zip(axes[0], kinds):
        for method in METHOD_LABEL:
            for mode in modes:
                pts = sorted(
                    (r["concurrency"], r["tokens_per_s"])
                    for r in rows
                    if r["kind"] == kind and r["method"] == method and r.get("mode", "burst") == mode
                )
                if pts:
                    ax.plot(
                        [p[0] for p in pts],
                        [p[1] for p in pts],
                        marker="o",
                        color=METHOD_COLOR[method],
                        linestyle=MODE_STYLE[mode],
                        label=f"engine, {METHOD_LABEL[method]}, {mode}",
                    )
        for config, (label, color, style) in HF_STYLE.items():
            hf_rows = data.get("transformers", {}).get(config, {}).get(kind)
            if hf_rows:
                compiled = data.get("transformers_settings", {}).get(config, {}).get("compiled", True)
                ax.axhline(
                    _rate(hf_rows),
                    color=color,
                    linestyle=style,
                    label=f"{label}, batch 1" + ("" if compiled else " (NOT compiled)"),
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_title(KIND_LABEL[kind])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("aggregate generated tokens/s")
    fig.suptitle(_title(data, "Throughput against concurrency"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_ksweep(data: dict, path: Path) -> bool:
    points = data.get("ksweep_speedup") or []
    if not points:
        return False
    kinds = sorted({p["kind"] for p in points}, key=list(KIND_LABEL).index)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    styles = ["-", "--"]
    for kind, style in zip(kinds, styles):
        for method in ("ngram", "draft_model"):
            pts = sorted(
                (p["k"], p["speedup"], p["accept_rate"])
                for p in points
                if p["kind"] == kind and p["method"] == method
            )
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                linestyle=style,
                color=METHOD_COLOR[method],
                label=f"{METHOD_LABEL[method]}, {KIND_LABEL[kind]}",
            )
            for k, s, a in pts:
                if a is not None:
                    ax.annotate(
                        f"{a:.2f}",
                        (k, s),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=7,
                        color=METHOD_COLOR[method],
                    )
    ax.axhline(1.0, color="tab:gray", linewidth=1, label="plain decoding (same engine)")
    ks = sorted({p["k"] for p in points})
    ax.set_xticks(ks)
    ax.set_xlabel("k, draft tokens per pass (fixed; adaptive draft length off)")
    ax.set_ylabel("speedup over plain decoding (tokens/s ratio)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="labels on points: acceptance rate", title_fontsize=7)
    machine = data.get("machine")
    ax.set_title(
        f"Speedup against k at batch 1\n{data.get('model')} {data.get('dtype')} on {machine}, greedy, "
        f"{data.get('new_tokens')} new tokens",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_acceptance(data: dict, path: Path) -> bool:
    accept = data.get("acceptance_batch1") or {}
    everything = [(m, kind, a) for m in ("ngram", "draft_model") for kind, a in accept.get(m, {}).items()]
    if not everything:
        return False
    series = [(m, kind, a) for m, kind, a in everything if a.get("draft_passes")]
    silent = [
        f"{METHOD_LABEL[m]}, {KIND_LABEL[kind]} ({a['verify_passes']} passes)"
        for m, kind, a in everything
        if not a.get("draft_passes")
    ]
    width = 0.8 / max(len(series), 1)
    k = max(len(a["accept_histogram"]) for _, _, a in everything) - 1
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (method, kind, a) in enumerate(series):
        shares = a["share_of_draft_passes_by_accepted"]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(shares))]
        label = (
            f"{METHOD_LABEL[method]}, {KIND_LABEL[kind]}: {a['draft_passes']} drafting passes of "
            f"{a['verify_passes']}, accept rate {a['accept_rate']:.2f}"
        )
        ax.bar(
            xs,
            shares,
            width=width,
            color=METHOD_COLOR[method],
            alpha=1.0 if kind == "grounded" else 0.5,
            hatch=None if kind == "grounded" else "//",
            edgecolor="black",
            linewidth=0.5,
            label=label,
        )
    if silent:
        ax.text(
            0.99,
            0.6,
            "no pass proposed drafts:\n" + "\n".join(silent),
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "gray"},
        )
    ax.set_xticks(range(k + 1))
    ax.set_xlabel("drafts accepted in a pass (the pass emits this + 1 tokens)")
    ax.set_ylabel("share of passes that proposed drafts")
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    ax.set_title(_title(data, "Acceptance length at batch 1 (passes with drafts)"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(x: float | None, ratio: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:.2f}x" if ratio else f"{x:,.1f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def markdown(data: dict) -> str:
    """Markdown tables of the run (for bench/RESULTS.md): batch 1 against every transformers
    configuration, concurrency, and the k sweep."""
    out = []
    ours, hf = data.get("engine", {}), data.get("transformers", {})
    configs = [c for c in ("plain", "prompt_lookup", "assistant", "static_compiled") if c in hf]
    peers = {"none": "plain", "ngram": "prompt_lookup", "draft_model": "assistant"}
    if ours:
        head = (
            ["scenario (batch 1)", "ours, tok/s", "ours / our plain"]
            + [f"transformers {c}, tok/s" for c in configs]
            + [f"ours / transformers {c}" for c in configs]
        )
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method in ("none", "ngram", "draft_model"):
            for kind in KIND_LABEL:
                if kind not in ours.get(method, {}):
                    continue
                mine = _rate(ours[method][kind])
                plain = _rate(ours["none"][kind]) if kind in ours.get("none", {}) else None
                theirs = [_rate(hf[c][kind]) if kind in hf[c] else None for c in configs]
                peer = peers[method]
                cells = [
                    f"{METHOD_LABEL[method]}, {KIND_LABEL[kind]}",
                    _fmt(mine),
                    _fmt(mine / plain if plain else None, True),
                ]
                cells += [_fmt(t) + (" (peer)" if c == peer else "") for c, t in zip(configs, theirs)]
                cells += [_fmt(mine / t if t else None, True) for t in theirs]
                out.append("| " + " | ".join(cells) + " |")
        settings = data.get("transformers_settings", {})
        if "static_compiled" in settings and not settings["static_compiled"].get("compiled", True):
            out.append(
                "\ntransformers static_compiled was NOT compiled in this run: "
                + settings["static_compiled"]["compile"]
            )
        out.append("")
    rows = data.get("concurrency") or []
    if rows:
        rate = {
            (r["concurrency"], r.get("mode", "burst"), r["method"], r["kind"]): r["tokens_per_s"]
            for r in rows
        }
        methods = [m for m in ("none", "ngram", "draft_model") if any(r["method"] == m for r in rows)]
        head = (
            ["concurrency", "mode", "prompts"]
            + [f"{METHOD_LABEL[m]}, tok/s" for m in methods]
            + [f"{METHOD_LABEL[m]} / plain" for m in methods if m != "none"]
        )
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in sorted({r["concurrency"] for r in rows}):
            for mode in MODE_STYLE:
                for kind in KIND_LABEL:
                    if not any((c, mode, m, kind) in rate for m in methods):
                        continue
                    cells = [str(c), mode, KIND_LABEL[kind]] + [
                        _fmt(rate.get((c, mode, m, kind))) for m in methods
                    ]
                    base = rate.get((c, mode, "none", kind))
                    cells += [
                        _fmt(
                            rate[(c, mode, m, kind)] / base if base and (c, mode, m, kind) in rate else None,
                            True,
                        )
                        for m in methods
                        if m != "none"
                    ]
                    out.append("| " + " | ".join(cells) + " |")
        out.append("")
    points = data.get("ksweep_speedup") or []
    if points:
        out += [
            "| k (fixed) | prompts | method | tok/s | speedup over plain | accept rate | accept length |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in sorted(points, key=lambda p: (p["kind"], p["method"], p["k"])):
            out.append(
                f"| {p['k']} | {KIND_LABEL[p['kind']]} | {METHOD_LABEL[p['method']]} | "
                f"{_fmt(p['tokens_per_s'])} | {_fmt(p['speedup'], True)} | {_num(p['accept_rate'])} | "
                f"{_num(p['accept_length'])} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path)
    parser.add_argument("--out-dir", type=Path, default=None, help="default: the JSON's folder")
    parser.add_argument("--markdown", action="store_true", help="also print the run's tables in Markdown")
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text())
    out_dir = args.out_dir or args.json.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, plot in (
        ("concurrency", plot_concurrency),
        ("ksweep", plot_ksweep),
        ("acceptance", plot_acceptance),
    ):
        path = out_dir / f"{args.json.stem}_{name}.png"
        if plot(data, path):
            print(f"wrote {path}")
        else:
            print(f"no {name} data in {args.json}: {path.name} not written")
    if args.markdown:
        print()
        print(markdown(data))


if __name__ == "__main__":
    main()
