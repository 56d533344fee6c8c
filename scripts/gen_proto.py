"""Regenerate the Python protobuf/gRPC code and type stubs from proto/.

    python scripts/gen_proto.py            # writes into specdec/ (the committed copy)
    python scripts/gen_proto.py --out DIR  # writes into DIR/specdec/ (the freshness test)

The generator is pinned (grpcio-tools 1.84.0, mypy-protobuf 5.1.0): generated gRPC code
refuses to import under a grpcio older than the grpcio-tools that made it, and 1.84 is the
oldest grpcio the service supports (its runtime floor: the CUDA image runs grpcio 1.84).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "proto"
PINNED = {"grpcio-tools": "1.84.0", "mypy-protobuf": "5.1.0"}
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.name.endswith(GENERATED_SUFFIXES)


def check_generator_versions() -> None:
    for dist, wanted in PINNED.items():
        found = importlib.metadata.version(dist)
        if found != wanted:
            sys.exit(f"gen_proto: {dist} {found} is installed; the stubs must be made with {wanted}")


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto; return the generated files, relative to out_root."""
    from grpc_tools import protoc  # imported late: a dev-only dependency

    check_generator_versions()
    bin_dir = Path(sys.executable).parent
    grpc_include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{grpc_include}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in proto_files()],
        ]
        if protoc.main(args) != 0:
            sys.exit("gen_proto: protoc failed")
        made = sorted(p.relative_to(tmp) for p in Path(tmp).rglob("*") if p.is_file())
        for rel in made:
            dest = out_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(tmp) / rel, dest)
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write specdec/... under")
    args = parser.parse_args()
    made = generate(args.out)
    if args.out == REPO:
        # Drop stale generated files whose .proto was removed.
        for path in (REPO / "specdec").rglob("*"):
            if is_generated(path) and path.relative_to(REPO) not in made:
                path.unlink()
    for rel in made:
        print(rel)


if __name__ == "__main__":
    main()
