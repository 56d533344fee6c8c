"""Random-weight Llama-shaped models at real sizes, with SmolLM2's tokenizer, as model directories.

    python -m bench.random_model --shape llama-3.1-8b --out bench/out/models/llama-3.1-8b
    python -m bench.random_model --shape llama-3.2-1b --out bench/out/models/llama-3.2-1b

Each directory holds bf16 safetensors (sharded like transformers' save_pretrained, with
model.safetensors.index.json), config.json, generation_config.json and the tokenizer of
SmolLM2-135M-Instruct (49,152 tokens, with its chat template), read from the cached GGUF
file of the known model (fetched once by `specdec-fetch-model`; no other download). Both
shapes share that tokenizer, so the pair serves as target + draft model:
`specdec-server --model DIR_8B --draft-model DIR_1B`, or transformers'
AutoModelForCausalLM.from_pretrained(DIR).

Weights are what LlamaForCausalLM's own initialisation draws: normal(0, initializer_range
= 0.02) for every matrix, ones for every norm, so activations stay finite in bfloat16.
They are drawn tensor by tensor, one shard (--max-shard-size) in memory at a time, on
--device (CUDA draws 15 GB in seconds; the CPU takes a few minutes). The output of such a
model is meaningless text; its cost per token is a real model's of that shape.

Shapes (--shape): llama-3.1-8b (32 layers, hidden 4096, 32 heads, 8 KV heads, intermediate
14336, rope theta 500000 with Llama 3.1's rope scaling, 131072 positions; 7.4 B parameters,
14.8 GB), llama-3.2-1b (16 layers, hidden 2048, 32 heads, 8 KV heads, intermediate 8192, tied
embeddings; 1.1 B parameters, 2.1 GB), smollm2-135m (SmolLM2-135M's shape: 30 layers, hidden
576, 9 heads, 3 KV heads, intermediate 1536, tied embeddings; 0.27 GB), and tiny / tiny-draft
for tests and CPU smoke runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common.model_shapes import LLAMA_3_1_8B, LLAMA_3_2_1B, SMOLLM2_135M
from service.models import store as model_store
from service.models.loading import gguf_tokenizer

# Llama 3.1 / 3.2's rope scaling ("llama3"), as their published configs have it.
# Given in the long-standing form (rope_theta, rope_scaling), which every transformers 5
# release converts to its own.
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        **LLAMA_3_1_8B,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
    ),
    "llama-3.2-1b": dict(
        **LLAMA_3_2_1B,
        max_position_embeddings=131072,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
    ),
    # SmolLM2-135M's shape, for speed runs where its GGUF file is not at hand: the cost of a
    # token does not depend on the weights' values.
    "smollm2-135m": dict(**SMOLLM2_135M, max_position_embeddings=8192),
    # Head dim 32 (a power of two, as the engine's invariant CUDA kernels need).
    "tiny": dict(
        num_hidden_layers=2,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        tie_word_embeddings=False,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
    ),
    "tiny-draft": dict(
        num_hidden_layers=1,
        hidden_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=128,
        tie_word_embeddings=True,
        max_position_embeddings=16384,
        rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
    ),
}
MARKER = "specdec-random-model.json"  # what wrote the directory, and how
TOKENIZER_MODEL = "smollm2-135m-instruct"


def llama_config(shape: str, tokenizer: Any, dtype: torch.dtype = torch.bfloat16):
    """The transformers LlamaConfig of a shape, with the tokenizer's vocabulary and special ids."""
    from transformers import LlamaConfig

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        **SHAPES[shape],
    )
    config.dtype = dtype
    config.architectures = ["LlamaForCausalLM"]
    return config


def parameter_shapes(config) -> dict[str, torch.Size]:
    """Name -> shape of every parameter a checkpoint of `config` stores (a tied LM head is
    stored once, as the embedding), from the model built on the meta device."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: p.shape for name, p in model.named_parameters()}  # shared parameters listed once


def random_tensor(
    shape: torch.Size, std: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """A norm weight (1-D): ones; a matrix: normal(0, std), drawn in float32, then cast."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    values = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=generator)
    return values.to(dtype).cpu()


def write_random_model(
    out: Path,
    shape: str,
    tokenizer: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_shard_size: str | int = "4GB",
    log=lambda message: None,
) -> Path:
    """Writes the model directory `out` (replaced atomically if it exists); returns it."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    device = torch.device(device)
    config = llama_config(shape, tokenizer, dtype)
    shapes = parameter_shapes(config)
    # The split reads only each tensor's size: meta tensors of the right dtype stand in.
    plan = split_torch_state_dict_into_shards(
        {name: torch.empty(s, dtype=dtype, device="meta") for name, s in shapes.items()},
        max_shard_size=max_shard_size,
    )
    generator = torch.Generator(device=device).manual_seed(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    started = time.monotonic()
    try:
        total = 0
        for filename, names in plan.filename_to_tensors.items():
            shard = {
                name: random_tensor(shapes[name], config.initializer_range, dtype, device, generator)
                for name in names
            }
            save_file(shard, tmp / filename, metadata={"format": "pt"})
            size = sum(t.numel() * t.element_size() for t in shard.values())
            total += size
            del shard
            log(f"{filename}: {len(names)} tensors, {size / 1e9:.2f} GB ({time.monotonic() - started:.0f} s)")
        if plan.is_sharded:
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(plan.tensor_to_filename.items())),
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
        config.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        ).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "shape": shape,
                    "seed": seed,
                    "device": str(device),
                    "dtype": str(dtype).removeprefix("torch."),
                    "parameters": sum(s.numel() for s in shapes.values()),
                    "weight_bytes": total,
                    "init": f"matrices normal(0, {config.initializer_range}), norms 1",
                    "tokenizer": f"{TOKENIZER_MODEL} (its GGUF file)",
                },
                indent=1,
            )
            + "\n"
        )
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"wrote {out} ({shape}, {total / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")
    return out


def smollm2_tokenizer(cache_dir: str | None = None):
    """SmolLM2's tokenizer, from the known model's GGUF file in the model cache."""
    return gguf_tokenizer(model_store.fetch(TOKENIZER_MODEL, cache_dir))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.random_model",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--shape",
        required=True,
        action="append",
        choices=list(SHAPES),
        help="model shape (repeat the flag for several; --out is then a parent directory)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="model directory to write (with several shapes: OUT/<shape>)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the random values are drawn [default: cuda when present, else cpu]",
    )
    parser.add_argument("--max-shard-size", default="4GB", help="largest safetensors file [default 4GB]")
    parser.add_argument(
        "--cache-dir",
        default=os.environ.get("SPECDEC_CACHE_DIR") or None,
        help="model cache holding the tokenizer's GGUF file [env SPECDEC_CACHE_DIR]",
    )
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(f"[random_model] {message}", file=sys.stderr, flush=True)

    tokenizer = smollm2_tokenizer(args.cache_dir)
    for shape in args.shape:
        out = args.out if len(args.shape) == 1 else args.out / shape
        write_random_model(
            out,
            shape,
            tokenizer,
            seed=args.seed,
            device=args.device,
            max_shard_size=args.max_shard_size,
            log=log,
        )
        print(out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
