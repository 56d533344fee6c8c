"""The committed generated code must equal what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# scripts/ is not a package: load the generator from its file, without editing sys.path
_spec = importlib.util.spec_from_file_location("gen_proto", REPO / "scripts" / "gen_proto.py")
gen_proto = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_proto)


def committed_generated_files() -> dict[Path, bytes]:
    root = REPO / "specdec"
    return {
        p.relative_to(REPO): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and gen_proto.is_generated(p)
    }


def test_generated_code_matches_proto_sources(tmp_path: Path) -> None:
    # Run the real script, as a developer would, into a temporary root.
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = committed_generated_files()
    assert fresh, "the generator produced nothing"
    missing = sorted(map(str, fresh.keys() - committed.keys()))
    stale = sorted(map(str, committed.keys() - fresh.keys()))
    differing = sorted(str(p) for p in fresh.keys() & committed.keys() if fresh[p] != committed[p])
    assert not (missing or stale or differing), (
        "generated code is out of date; run `make proto` (python scripts/gen_proto.py) and commit.\n"
        f"missing: {missing}\nstale: {stale}\ndiffering: {differing}"
    )


def test_every_proto_has_generated_modules() -> None:
    committed = committed_generated_files()
    for proto in gen_proto.proto_files():
        stem = proto.relative_to(gen_proto.PROTO_ROOT).with_suffix("")  # specdec/v1/metrics
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            assert Path(f"{stem}{suffix}") in committed, f"{stem}{suffix} is not committed"
