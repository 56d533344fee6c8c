"""Loading target and draft models: known model name, local directory, GGUF file or hub id.

``load_model(spec, dtype=..., device=...)`` returns a ``LoadedModel``; ``check_same_vocabulary``
is the startup check that a draft model can serve a target. GGUF files are dequantized once
and cached as a transformers checkpoint under ``<cache>/converted/<sha256[:16]>-<dtype>/``
(cache root as in ``service.models.store``), so later starts skip the slow GGUF conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch

from service.models import store


@dataclass
class LoadedModel:
    """A causal LM ready for the engine."""

    name: str  # what the operator named: known-model name, hub id, directory or file name
    model: Any  # transformers PreTrainedModel, in eval mode, on `device`, in `dtype`
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def max_context_tokens(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


# --------------------------------------------------------------------------- loader

log = structlog.get_logger(__name__)

CONVERTED_MARKER = "specdec-converted.json"

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says what was tried and why it failed."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on CUDA, float32 elsewhere; names like "bf16" or torch dtypes."""
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPE_ALIASES[key]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto', {', '.join(sorted(_DTYPE_ALIASES))} or a torch.dtype"
        ) from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finish(name: str, model: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, device=device, dtype=dtype)


# from_pretrained arguments that concern where files come from: given to the tokenizer too.
_SHARED_KWARGS = ("local_files_only", "revision", "token", "trust_remote_code", "subfolder")


def _load_pretrained(source: str, device: torch.device, dtype: torch.dtype, **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, **{k: v for k, v in kwargs.items() if k in _SHARED_KWARGS}
    )
    # transformers 5 takes `dtype=` (torch_dtype is deprecated there).
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return model.to(device), tokenizer


# ----------------------------------------------------------------- GGUF conversion cache


def _gguf_sha256(path: Path, root: Path) -> str:
    """sha256 of a GGUF file, remembered by (path, size, mtime) so big files hash once."""
    st = path.stat()
    # A file fetched by model_store carries a verified stamp next to it; other files get a
    # memo under <cache>/converted/.hashes/, keyed by their resolved path.
    stamp = path.with_name(path.name + ".verified.json")
    memo = (
        root
        / "converted"
        / ".hashes"
        / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32] + ".json")
    )
    for candidate in (stamp, memo):
        try:
            d = json.loads(candidate.read_text())
            if d.get("size") == st.st_size and d.get("mtime_ns") == st.st_mtime_ns and d.get("sha256"):
                return str(d["sha256"])
        except (OSError, ValueError, AttributeError):
            pass
    digest = store.sha256_file(path)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps(
                {
                    "path": str(path.resolve()),
                    "sha256": digest,
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                }
            )
        )
        os.replace(tmp, memo)
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.warning("gguf_sha256_not_remembered", path=str(path), error=str(e))
    return digest


def converted_dir(
    gguf_sha256: str, dtype: torch.dtype, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Where the converted copy of a GGUF file (by its sha256) in ``dtype`` lives."""
    return store.cache_root(cache_dir) / "converted" / f"{gguf_sha256[:16]}-{_dtype_name(dtype)}"


def _is_converted(d: Path) -> bool:
    return (d / CONVERTED_MARKER).is_file()


def _detach_gguf_quantizer(model: Any, gguf: Path) -> None:
    """Make a dequantized GGUF model a plain dense model that save_pretrained accepts.

    Newer transformers attach a GGUF "quantizer" even when every weight was dequantized,
    and refuse to serialize such a model; the weights themselves are ordinary tensors.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise ModelLoadError(
            f"{gguf.name}: transformers kept {len(quantizer.packed_modules)} layers in packed GGUF "
            f"blocks; the converted-model cache needs dense weights"
        )
    model.hf_quantizer = None
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")


def _reconcile_special_tokens(tokenizer: Any, config: Any, gguf: Path) -> None:
    """Give the tokenizer the GGUF's own EOS and padding ids, which the model config carries.

    transformers 5.17 builds GGUF tokenizers with wrong special tokens (SmolLM2: EOS
    <|im_start|> instead of <|im_end|>, no pad; Qwen2.5: EOS <|endoftext|> instead of
    <|im_end|>), while its config has the ids from the file's tokenizer.ggml.* metadata.
    Newer versions agree with the config already; then this changes nothing.
    """
    for attr in ("eos", "pad"):
        want = getattr(config, f"{attr}_token_id", None)
        if not isinstance(want, int) or not 0 <= want < len(tokenizer):
            continue
        have = getattr(tokenizer, f"{attr}_token_id", None)
        if have != want:
            token = tokenizer.convert_ids_to_tokens(want)
            log.info(
                "gguf_special_token_set",
                gguf=gguf.name,
                token_kind=attr,
                was=getattr(tokenizer, f"{attr}_token", None),
                was_id=have,
                token=token,
                token_id=want,
            )
            setattr(tokenizer, f"{attr}_token", token)


def gguf_tokenizer(gguf: Path, config: Any = None) -> Any:
    """The tokenizer stored in a GGUF file, with the file's own EOS and padding ids.

    ``config``: the model config read from the same file (read here when not given).
    """
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if config is None:
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelLoadError(
            f"could not read the tokenizer of GGUF file {gguf}: {type(e).__name__}: {e}"
        ) from e
    _reconcile_special_tokens(tokenizer, config, gguf)
    return tokenizer


def _convert_gguf(gguf: Path, gguf_sha256: str, target: Path, dtype: torch.dtype) -> None:
    """Dequantize ``gguf`` into ``dtype`` and save model + tokenizer to ``target`` atomically."""
    import transformers
    from transformers import AutoModelForCausalLM

    t0 = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        kwargs: dict[str, Any] = {}
        try:  # transformers >= 5.2x: GGUF weights may stay packed unless told to dequantize
            from transformers import GgufConfig

            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize GGUF files
            pass
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=dtype, **kwargs
            )
            tokenizer = gguf_tokenizer(gguf, model.config)
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"could not read GGUF file {gguf}: {type(e).__name__}: {e}") from e
        _detach_gguf_quantizer(model, gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        (tmp / CONVERTED_MARKER).write_text(json.dumps({
            "source": str(gguf), "source_sha256": gguf_sha256,
            "dtype": _dtype_name(dtype), "transformers": transformers.__version__,
            "torch": torch.__version__, "created_unix": time.time(),
        }, indent=1) + "\n")  # fmt: skip
        try:
            os.replace(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not _is_converted(target):
                raise
            log.info("gguf_conversion_found", gguf=gguf.name, note="another process converted it first")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "gguf_converted",
        gguf=gguf.name,
        target=str(target),
        dtype=_dtype_name(dtype),
        seconds=round(time.monotonic() - t0, 1),
    )


def _load_gguf(name: str, gguf: Path, device: torch.device, dtype: torch.dtype,
               cache_dir: str | os.PathLike[str] | None, **kwargs: Any) -> LoadedModel:  # fmt: skip
    root = store.cache_root(cache_dir)
    sha = _gguf_sha256(gguf, root)
    target = converted_dir(sha, dtype, cache_dir)
    if not _is_converted(target):
        if target.exists():  # a leftover without its marker (should not happen: rename is atomic)
            shutil.rmtree(target, ignore_errors=True)
        _convert_gguf(gguf, sha, target, dtype)
    # Both the first and later starts load the converted copy: one code path, same weights.
    model, tokenizer = _load_pretrained(str(target), device, dtype, **kwargs)
    return _finish(name, model, tokenizer, device, dtype)


# --------------------------------------------------------------------------- public


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or spec.strip("/").count("/") > 1  # hub ids are "org/name"
    )


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    **from_pretrained_kwargs: Any,
) -> LoadedModel:
    """Load a causal LM and its tokenizer for the engine.

    ``spec`` is, in this order of precedence: a known model name (see
    ``service.models.store.known_models()``; fetched into the cache if needed), a local
    directory (``from_pretrained``), a ``.gguf`` file, or a hub id. A GGUF file is converted
    once into ``<cache>/converted/<sha256[:16]>-<dtype>/`` and later loads read that copy.
    ``device``: default CUDA when available, else CPU. ``dtype``: "auto" is bfloat16 on CUDA,
    float32 on CPU. Extra keyword arguments (e.g. ``attn_implementation``) go to the model's
    ``from_pretrained``. The model is in eval mode with ``requires_grad`` off.
    """
    spec_str = os.fspath(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    t0 = time.monotonic()

    if spec_str in store.REGISTRY:
        gguf = store.fetch(spec_str, cache_dir)
        loaded = _load_gguf(spec_str, gguf, dev, dt, cache_dir, **from_pretrained_kwargs)
    else:
        path = Path(spec_str).expanduser()
        if path.is_dir():
            try:
                model, tok = _load_pretrained(str(path), dev, dt, **from_pretrained_kwargs)
            except Exception as e:
                raise ModelLoadError(f"could not load model directory {path}: {type(e).__name__}: {e}") from e
            loaded = _finish(spec_str, model, tok, dev, dt)
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelLoadError(
                    f"{path} is a file but not a .gguf file; give a GGUF file, a model "
                    f"directory, a hub id or a known model ({', '.join(store.known_models())})"
                )
            loaded = _load_gguf(spec_str, path, dev, dt, cache_dir, **from_pretrained_kwargs)
        elif _looks_like_path(spec_str):
            raise ModelLoadError(
                f"model path {spec_str!r} does not exist (known models: {', '.join(store.known_models())})"
            )
        else:
            try:
                model, tok = _load_pretrained(spec_str, dev, dt, **from_pretrained_kwargs)
            except Exception as e:
                raise ModelLoadError(
                    f"could not load {spec_str!r} as a hub id ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}). It is not a known "
                    f"model ({', '.join(store.known_models())}), a local directory or a "
                    f".gguf file; loading from the Hugging Face Hub needs network access or the "
                    f"model in the local HF cache."
                ) from e
            loaded = _finish(spec_str, model, tok, dev, dt)
    log.info(
        "model_loaded",
        model=spec_str,
        device=str(dev),
        dtype=_dtype_name(dt),
        seconds=round(time.monotonic() - t0, 1),
    )
    return loaded


def output_size(m: LoadedModel) -> int:
    """Rows of the model's output layer (the logits' last dimension)."""
    emb = m.model.get_output_embeddings() if hasattr(m.model, "get_output_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else m.vocab_size


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise ValueError unless the draft's tokenizer and output layer match the target's.

    Tokenizers must have the same length and the same token -> id mapping (the full
    ``get_vocab()``, a dict comparison: milliseconds even for 150k tokens), and the models
    must produce logits of the same size.
    """
    t_tok, d_tok = target.tokenizer, draft.tokenizer
    t_len, d_len = len(t_tok), len(d_tok)
    t_out, d_out = output_size(target), output_size(draft)
    problem = None
    if t_len != d_len:
        problem = "the tokenizers have different sizes"
    else:
        t_vocab, d_vocab = t_tok.get_vocab(), d_tok.get_vocab()
        if t_vocab != d_vocab:
            diff = sorted(set(t_vocab.items()) ^ set(d_vocab.items()), key=lambda kv: kv[1])[:5]
            problem = f"the tokenizers map tokens differently (e.g. {diff})"
        elif t_out != d_out:
            problem = "the models' output layers have different sizes"
    if problem:
        raise ValueError(
            f"draft model {draft.name!r} does not share the vocabulary of target model "
            f"{target.name!r}: {problem}; target: tokenizer {t_len} tokens, output size {t_out}; "
            f"draft: tokenizer {d_len} tokens, output size {d_out}"
        )
