"""Runs one model's forward over batch slots, against that model's static KV cache.

Three paths, one contract (float32 logits for the given rows and positions):
- the lean forward (service/engine/execution/model_forward.py) for the Llama/Qwen2 family, eager (or
  compiled, on CUDA);
- the same lean forward replayed from captured CUDA graphs for decode and verify passes
  on CUDA (service/engine/execution/cuda_graphs.py), and for one-row prefill passes of
  short prompts (service/engine/execution/prefill_graphs.py);
- transformers' own forward with a cache window, for every other model family.
"""

from __future__ import annotations

import torch

from service.engine.execution.cuda_graphs import GraphedDecoder
from service.engine.execution.device import to_device
from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.linear_blocks import DEFAULT_TABLE, BlockTable, gemv_row_limit
from service.engine.execution.model_forward import ModelForward, supports
from service.engine.execution.prefill_graphs import GraphedPrefill
from service.models.loading import LoadedModel


def pick_variant(requested: str, model: torch.nn.Module, device: torch.device, use_compile: bool) -> str:
    """The lean forward variant a runner uses for `requested` (ModelForward's variants).

    Off CUDA: "around_attention", eager (the invariant kernels are Triton, and the "layer"
    variant run eagerly was measured the slower of the two). On CUDA: "layer" needs
    compile (else "around_attention"); "invariant" needs a model its kernels cover (else
    what "layer" would give).
    """
    if device.type != "cuda":
        return "around_attention"
    if requested == "invariant" and supports(model, "invariant"):
        return "invariant"
    if requested in ("invariant", "layer"):
        return "layer" if use_compile else "around_attention"
    return requested


class ModelRunner:
    """A model plus its KV cache. Slots are rows of the cache; the caller tracks lengths.

    The cache has `max_len` usable positions plus `max_width` scratch positions behind
    them: rows that only pad a captured graph's batch write there, never where a real
    row's keys live.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int,
        max_len: int,
        max_width: int = 1,
        use_lean: bool = True,
        use_graphs: bool = True,
        use_compile: bool = True,
        lean_variant: str = "around_attention",
        linear_blocks: BlockTable = DEFAULT_TABLE,
        gemv_max_rows: int | None = None,
        prefill_graph_tokens: int = 0,
    ) -> None:
        """prefill_graph_tokens: with graphs and the dense prefill, prefill passes of one row
        from position 0 of up to this many tokens replay captured graphs (0: every prefill
        pass eager)."""
        self.loaded = loaded
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        self.max_len = max_len
        self.scratch_start = max_len
        self.max_position = loaded.max_context_tokens
        self.cache = StaticKVCache(max_batch, max_len + max_width, self.device, loaded.dtype)
        self.vocab_size = loaded.vocab_size
        self.lean: ModelForward | None = None
        self.graphs: GraphedDecoder | None = None
        self.prefill_graphs: GraphedPrefill | None = None
        if use_lean and supports(self.model):
            variant = pick_variant(lean_variant, self.model, self.device, use_compile)
            compiled = use_compile and self.device.type == "cuda" and variant != "invariant"
            self.lean = ModelForward(
                self.model,
                compile=compiled,
                variant=variant,
                linear_blocks=linear_blocks,
                gemv_max_rows=gemv_row_limit(gemv_max_rows, self.model.config.hidden_size, max_width),
            )
            self.cache.allocate(self.lean.num_layers, self.lean.num_kv_heads, self.lean.head_dim)
            if self.device.type == "cuda":
                # Split-K GEMMs may otherwise reduce partial sums in bfloat16, one source of a
                # row's result depending on how many rows share the GEMM (a verify pass of
                # width k + 1 against a plain pass of width 1); alone it does not close the
                # bf16 divergence at near-ties (the invariant kernels do). Process-wide.
                torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
                torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            if use_graphs and self.device.type == "cuda":
                self.graphs = GraphedDecoder(
                    self.lean, self.cache, max_batch, max_width, max_len, self.scratch_start
                )
                if prefill_graph_tokens and self.lean.dense_prefill:
                    self.prefill_graphs = GraphedPrefill(
                        self.lean, self.cache, prefill_graph_tokens, self.scratch_start
                    )

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far, decode and prefill (0 without graphs)."""
        return sum(g.captures for g in (self.graphs, self.prefill_graphs) if g is not None)

    @torch.inference_mode()
    def capture_all_graphs(self) -> int:
        """Captures every decode/verify and prefill graph bucket now (CUDA graphs only; before
        any request: the prefill captures write slot 0); returns how many."""
        return sum(g.capture_all() for g in (self.graphs, self.prefill_graphs) if g is not None)

    @torch.inference_mode()
    def forward(
        self,
        lo: int,
        hi: int,
        input_ids: torch.Tensor,
        starts: list[int],
        last_only: bool = False,
        lengths: list[int] | None = None,
    ) -> torch.Tensor:
        """Runs slots [lo, hi) on input_ids [hi - lo, T]; row r's tokens go to positions
        starts[r] .. starts[r] + T - 1 and see the row's cache below starts[r].

        Returns float32 logits [hi - lo, T, V] ([hi - lo, 1, V] with last_only: of each row's
        last token, token lengths[r] - 1 of row r when given, for rows of different lengths
        padded to T: a batched prefill). From a
        captured graph they are a view of the graphs' shared output buffer: valid until this
        runner's next forward (read them, or queue the kernels that do, before calling again).
        Positions past a row's real tokens (padding) write cache entries that the row's
        length excludes; later writes overwrite them (a dense prefill, ModelForward.prefill,
        writes none; its captured one-row graph writes its padding at the scratch position).
        """
        width = input_ids.shape[1]
        if (
            last_only and self.lean is not None and self.lean.dense_prefill
        ):  # a prefill: cuBLAS + FlashAttention
            lengths = lengths or [width] * (hi - lo)
            if self.prefill_graphs is not None and self.prefill_graphs.fits(hi - lo, starts, lengths):
                return self.prefill_graphs(lo, input_ids, lengths[0])
            keys, values = self.cache.rows(lo, hi)
            return self.lean.prefill(input_ids, starts, lengths, keys, values)
        last_at = None  # [B] per row, the token whose logits last_only returns; None: the last
        if last_only and lengths is not None and min(lengths) < width:
            last_at = to_device([n - 1 for n in lengths], torch.long, self.device)
        if self.graphs is not None and not last_only and self.graphs.fits(hi, width):
            return self.graphs(lo, hi, input_ids, starts)
        starts_t = to_device(starts, torch.long, self.device)  # [B], no sync
        positions = starts_t[:, None] + torch.arange(width, device=self.device)  # [B, T]
        kv_len = min(max(starts) + width, self.max_len)
        write_pos = positions.clamp(max=self.cache.max_len - 1)
        mask = causal_mask(starts_t, width, kv_len, self.loaded.dtype)  # [B, 1, T, kv_len]
        if self.lean is not None:
            keys, values = self.cache.rows(lo, hi)
            return self.lean(
                input_ids, positions, write_pos, mask, keys, values, last_only=last_only, last_at=last_at
            )
        window = self.cache.window(lo, hi, write_pos, kv_len)
        out = self.model(
            input_ids=input_ids,
            position_ids=positions.clamp(max=self.max_position - 1),
            attention_mask=mask,
            past_key_values=window,
            use_cache=True,
            logits_to_keep=1 if last_only and last_at is None else 0,
        )
        logits = out.logits.float()
        if last_at is not None:
            logits = logits[torch.arange(hi - lo, device=self.device), last_at][:, None]  # [B, 1, V]
        return logits
