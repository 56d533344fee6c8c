"""How often an early exit of the target agrees with the full model: the acceptance a draft
cut from the target's first N layers (bench/common/truncated_draft.py) would see.

    python -m bench.diagnostics.draft_truncated --model smollm2-135m-instruct --device cpu --dtype float32

measures, for every N, how often the N-layer exit's greedy token equals the full model's
along the full model's own greedy outputs of the benchmark prompts (teacher forced: one
forward per prompt). That is the per-draft acceptance an N-layer draft would see at the
first draft position, and what `--draft-layers` in bench/gpu_decode.py is chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.common.truncated_draft import decoder_of
from service.models.loading import LoadedModel


@torch.inference_mode()
def early_exit_agreement(target: LoadedModel, prompts: list[list[int]], new_tokens: int) -> dict:
    """Per layer count N: the share of the full model's greedy tokens that an exit after
    layer N (final norm + LM head applied there) predicts too, teacher forced."""
    model = target.model
    decoder = decoder_of(model)
    total = len(decoder.layers)
    same = [0] * (total + 1)
    count = 0
    for ids in prompts:
        input_ids = torch.tensor([ids], device=target.device)
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False
        )
        seq = out[:, :]
        hidden = model(seq, output_hidden_states=True).hidden_states  # total + 1 entries, [1, S, E]
        lo, hi = len(ids) - 1, seq.shape[1] - 1  # positions whose next token was generated
        full = model.lm_head(hidden[-1][:, lo:hi]).argmax(-1)  # hidden[-1] is already normed
        for n in range(1, total):
            exit_tokens = model.lm_head(decoder.norm(hidden[n][:, lo:hi])).argmax(-1)
            same[n] += int((exit_tokens == full).sum())
        same[total] += hi - lo
        count += hi - lo
    return {"tokens": count, "agreement_by_layers": {n: same[n] / max(count, 1) for n in range(1, total + 1)}}


def main() -> None:
    from bench.gpu_decode import chat_ids
    from service.client.loadgen.builtin_prompts import KINDS
    from service.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args()
    started = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "command": " ".join(sys.argv),
    }
    for kind, texts in KINDS.items():
        prompts = [chat_ids(loaded.tokenizer, p) for p in texts]
        result[kind] = early_exit_agreement(loaded, prompts, args.new_tokens)
        print(f"{kind}: {result[kind]['tokens']} tokens")
        for n, share in result[kind]["agreement_by_layers"].items():
            print(f"  exit after layer {n:2d}: {share:.3f}")
    result["seconds"] = time.perf_counter() - started
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
