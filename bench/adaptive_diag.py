"""What the adaptive draft-length policy does at a given concurrency, n-gram against plain.

    python bench/adaptive_diag.py --concurrency 32

Rounds of N simultaneous requests (prompts from bench/prompts.py, 128 tokens), plain then
n-gram; prints tokens/s, row-passes, proposed/accepted drafts per round, then the policy's
choices per (batch bucket, cap) and its measured pass costs. Round 0 includes graph capture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.gpu_decode import chat_ids, run_engine  # noqa: E402
from bench.prompts import GROUNDED, OPEN_CHAT  # noqa: E402
from service.engine import Engine, EngineConfig, GenerationRequest, Method  # noqa: E402
from service.model_loading import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-k", type=int, default=4)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype)
    prompts = [chat_ids(loaded.tokenizer, p) for p in GROUNDED + OPEN_CHAT]
    engine = Engine(loaded, EngineConfig(max_batch_size=args.concurrency, max_queue_size=4 * args.concurrency,
                                         max_num_draft_tokens=args.k, kv_cache_tokens=1024,
                                         adaptive_draft_length=True, capture_all_graphs=True))
    engine.start()
    for rnd in range(args.rounds):
        for method in (Method.NONE, Method.NGRAM):
            requests = [GenerationRequest(f"{rnd}-{method.name}-{i}", tuple(prompts[i % len(prompts)]),
                                          max_tokens=128, method=method, num_draft_tokens=args.k)
                        for i in range(args.concurrency)]
            wall, outs = run_engine(engine, requests)
            metrics = [final.metrics for final, _ in outs]
            tokens = sum(len(t) for _, t in outs)
            print(f"round {rnd} {method.name:5s} {tokens / wall:8.0f} tok/s  tokens {tokens}  row-passes "
                  f"{sum(m.verify_passes for m in metrics)}  proposed {sum(m.proposed_drafts for m in metrics)}  "
                  f"accepted {sum(m.accepted_drafts for m in metrics)}", flush=True)
    engine.stop()
    policy = engine.draft_length_policy
    print("choices (batch bucket, cap) -> passes:", sorted(policy.choices.items()))
    print("pass cost ms (bucket, drafts, draft model):",
          {key: round(seconds * 1e3, 3) for key, seconds in sorted(policy.costs().items())})


if __name__ == "__main__":
    main()
