"""First vs second load of known GGUF models (GGUF conversion vs the converted-copy cache).

Each load runs in its own fresh Python process, so nothing is warm in memory but the OS page
cache. The first load uses a fresh cache directory (whose models/ links to the verified GGUF
files in the real cache), so it always converts; the second reads the converted copy.

    .venv/bin/python -m bench.model_load [--models NAME ...] [--dtype float32] [--out FILE]

Prints one JSON document: per model, the in-process load_model() seconds and the process wall
seconds (imports included) of both loads, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.monotonic()
from service.models.loading import load_model
t1 = time.monotonic()
m = load_model(sys.argv[1], dtype=sys.argv[2], device="cpu", cache_dir=sys.argv[3])
t2 = time.monotonic()
print("RESULT " + json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def _one_load(name: str, dtype: str, cache: Path) -> dict:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, name, dtype, str(cache)], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"load of {name} failed:\n{proc.stderr[-3000:]}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return {**json.loads(line[len("RESULT ") :]), "process_wall_s": wall}


def main() -> int:
    from service.models import store as model_store

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[model_store.DEFAULT_MODEL])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    results = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "dtype": args.dtype,
        "models": {},
    }
    import transformers

    results["machine"]["transformers"] = transformers.__version__
    for name in args.models:
        gguf = model_store.fetch(name)
        with tempfile.TemporaryDirectory(prefix="specdec-bench-cache-") as td:
            cache = Path(td)
            (cache / "models").mkdir()
            for p in (gguf, gguf.with_name(gguf.name + ".verified.json")):
                (cache / "models" / p.name).symlink_to(p)
            first = _one_load(name, args.dtype, cache)
            second = _one_load(name, args.dtype, cache)
        results["models"][name] = {
            "gguf_bytes": gguf.stat().st_size,
            "first": first,
            "second": second,
            "load_speedup": first["load_s"] / second["load_s"],
            "process_speedup": first["process_wall_s"] / second["process_wall_s"],
        }
        print(
            f"{name}: first {first['load_s']:.1f} s, second {second['load_s']:.1f} s "
            f"(x{first['load_s'] / second['load_s']:.1f}; process wall {first['process_wall_s']:.1f} "
            f"vs {second['process_wall_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
