"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.engine.api import Method

LEAN_VARIANTS = ("invariant", "layer", "around_attention")
MIN_PREFILL_GRAPH_TOKENS = 16  # prefill_graphs.TOKEN_BUCKETS[0] (that module imports torch)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 8
    max_queue_size: int = 64  # requests waiting for a batch slot; more are refused (QueueFullError)
    default_method: Method = Method.NGRAM
    default_num_draft_tokens: int = 4  # k when a request does not say
    max_num_draft_tokens: int = 8  # the largest k a request may ask for
    default_max_tokens: int = 256
    # None = the target's max_position_embeddings; always capped by kv_cache_tokens.
    max_context_tokens: int | None = None
    # Per-slot KV cache length allocated for the target (and the draft model): memory is
    # max_batch_size * kv_cache_tokens * layers * 2 * kv_heads * head_dim * dtype size.
    kv_cache_tokens: int = 4096
    # Prompt tokens one prefill pass feeds at most (docs/prefill.md): new requests are
    # prefilled together, long prompts in chunks, one prefill pass between two decode passes,
    # so an admission stalls the running requests by at most this much prefill per pass. A
    # cancelled request stops prefilling at the next chunk. The draft model's own prefill
    # (its catch-up on the prompt) is chunked by the same budget.
    max_prefill_tokens_per_pass: int = 2048
    ngram_max_n: int = 3
    ngram_min_n: int = 1
    instance_id: str = ""
    # Shorten draft lengths pass by pass from measured acceptance and pass costs
    # (service/engine/speculation/draft_length_policy.py). Greedy and unseeded rows only:
    # a seeded sampled request keeps its k, so the same seed still gives the same output.
    adaptive_draft_length: bool = False
    # CUDA only: replay decode/verify passes from captured graphs, and fuse the per-layer
    # work with torch.compile (the first pass of each new shape compiles and captures).
    cuda_graphs: bool = True
    compile: bool = True
    # The lean forward's variant on CUDA (service/engine/execution/model_forward.py; CPU runs are always
    # eager "around_attention"):
    # - "invariant": row-invariant Triton kernels, no torch.compile: a token's logits are the
    #   same bits in a verify pass of k + 1 rows as in a plain pass of one, so bfloat16
    #   speculative greedy output equals plain greedy output;
    # - "layer": the whole decoder layer as one torch.compile region (fastest batch-1 plain
    #   pass measured before "invariant"; shape-dependent rounding, see bench/RESULTS.md);
    # - "around_attention": compiled regions before and after an eager attention.
    # Models the invariant kernels do not cover (head dim not a power of two >= 16) use "layer".
    lean_variant: str = "invariant"
    # The "invariant" variant's block shapes per weight shape: a JSON file
    # (service/engine/execution/linear_blocks.py) over the committed table; None: the committed
    # table. Read and checked when the Engine is made (a bad file raises ValueError there).
    linear_blocks: Path | None = None
    # The "invariant" variant's linears in passes of up to this many token rows run on the
    # CUDA-core gemv kernel, larger ones on the tensor-core tile kernel; the two round
    # differently (docs/engine.md). 0: every pass on the tile kernel, one rounding for every
    # pass whatever it holds; at the 8B shape on an H100 a batch-1 decode pass costs 1.12x
    # the gemv kernel's, but a verify pass of 9 tokens 0.26x and a batch-16 decode pass 0.16x
    # (bench/RESULTS.md). Otherwise at least max_num_draft_tokens + 1, so a batch-1 verify pass
    # runs on the same kernel as a batch-1 decode pass (speculative == plain at batch 1, not
    # between larger passes that cross the limit). None ("auto", the default): per model,
    # linear_blocks.gemv_row_limit (0 from hidden size 4096 up, below it
    # max(16, max_num_draft_tokens + 1)).
    gemv_max_rows: int | None = None
    # CUDA graphs and the dense prefill only: a prefill pass of one row from position 0 (a
    # prompt, or its first chunk) of up to this many tokens replays a captured graph
    # (service/engine/execution/prefill_graphs.py; padded to a token bucket) instead of
    # launching its kernels one by one; longer ones, later chunks and passes of several rows
    # run eagerly. Rounded down to a bucket (16, 32, 48, 64, 96, ..., 512; at most 512).
    # 0: every prefill eager.
    prefill_graph_tokens: int = 512
    # CUDA graphs only: capture every (batch, width, kv) bucket when the engine starts, so that
    # no request stalls on a capture when the draft length or the batch first takes a new shape.
    capture_all_graphs: bool = False
    # Once the models are loaded (and, with capture_all_graphs, the graphs captured), collect
    # and then freeze the heap (gc.freeze), so full collections stop walking the objects
    # alive at startup and stalling every running request (docs/engine.md). Process-wide:
    # the engines of a process share it, and the last to stop unfreezes (heap_freeze.py).
    freeze_gc_after_start: bool = True

    @property
    def max_in_flight(self) -> int:
        """Requests admitted at once, running or queued: beyond it, submit raises QueueFullError."""
        return self.max_queue_size + self.max_batch_size

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_queue_size < 0:
            raise ValueError("max_queue_size must be >= 0")
        if not 0 <= self.default_num_draft_tokens <= self.max_num_draft_tokens:
            raise ValueError("need 0 <= default_num_draft_tokens <= max_num_draft_tokens")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_context_tokens is not None and self.max_context_tokens < 2:
            raise ValueError("max_context_tokens must be >= 2")
        if self.max_prefill_tokens_per_pass < 1:
            raise ValueError("max_prefill_tokens_per_pass must be >= 1")
        if self.prefill_graph_tokens < 0 or 0 < self.prefill_graph_tokens < MIN_PREFILL_GRAPH_TOKENS:
            raise ValueError(
                f"prefill_graph_tokens must be 0 (no prefill graphs) or at least "
                f"{MIN_PREFILL_GRAPH_TOKENS} (the smallest bucket), not {self.prefill_graph_tokens}"
            )
        if self.kv_cache_tokens < 2:
            raise ValueError("kv_cache_tokens must be >= 2")
        if not 1 <= self.ngram_min_n <= self.ngram_max_n:
            raise ValueError("need 1 <= ngram_min_n <= ngram_max_n")
        if self.gemv_max_rows is not None and self.gemv_max_rows < 0:
            raise ValueError(f"gemv_max_rows must be >= 0 or None (auto), not {self.gemv_max_rows}")
        if self.gemv_max_rows and self.gemv_max_rows < self.max_num_draft_tokens + 1:
            raise ValueError(
                f"gemv_max_rows must be 0 (the tile kernel for every pass) or at least "
                f"max_num_draft_tokens + 1 = {self.max_num_draft_tokens + 1} (a batch-1 verify pass on "
                f"the decode pass's kernel), not {self.gemv_max_rows}"
            )
        if self.lean_variant not in LEAN_VARIANTS:
            raise ValueError(
                f"lean_variant must be one of {', '.join(LEAN_VARIANTS)}, not {self.lean_variant!r}"
            )
