"""The dense prefill (cuBLAS linears, FlashAttention over packed tokens:
service/engine/execution/dense_prefill.py) of a bfloat16 model on CUDA: as close to a float32
reference as the invariant kernels' prefill, whole or in chunks, alone or in a padded batch;
the cache it writes decodes as the invariant prefill's does; no device synchronisation.

Tolerance: bfloat16 passes are compared with the float32 forward of the same (bf16-rounded)
weights, and the dense path's largest logit error may be at most ERROR_FACTOR times the
invariant path's on the same tokens. Both round at the same points (norms, linears,
rotary, probabilities) and differ in summation order only, so their errors are of one
size; a wrong position, mask or cache slot moves logits by a good fraction of their
magnitude, far past that. (The float32 version of these checks, with the exact float32
bound, runs on Triton's interpreter: test_dense_prefill.py.)
"""

from __future__ import annotations

import pytest
import torch

from service.engine.execution.kv_cache import StaticKVCache, causal_mask
from service.engine.execution.model_forward import ModelForward
from tests.engine.helpers import DENSE_ERROR_FACTOR as ERROR_FACTOR
from tests.engine.helpers import DENSE_MAX_LEN as MAX_LEN
from tests.engine.helpers import DENSE_SHAPE as SHAPE
from tests.engine.helpers import bf16_and_float32
from tests.engine.helpers import max_abs_error as _error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def models():
    return bf16_and_float32()  # the bf16 model and its float32 reference


class _Rows:
    """A lean forward over a cache of 4 rows."""

    def __init__(self, lean: ModelForward) -> None:
        self.lean = lean
        self.cache = StaticKVCache(
            max_batch=4, max_len=MAX_LEN, device=torch.device("cuda"), dtype=torch.bfloat16
        )
        self.cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)

    def dense(self, lo: int, ids: torch.Tensor, starts: list[int], lengths: list[int]) -> torch.Tensor:
        keys, values = self.cache.rows(lo, lo + ids.shape[0])
        return self.lean.prefill(ids, starts, lengths, keys, values)[:, 0]  # [B, V]

    def invariant(
        self, lo: int, ids: torch.Tensor, starts: list[int], kv_len: int | None = None
    ) -> torch.Tensor:
        b, t = ids.shape
        keys, values = self.cache.rows(lo, lo + b)
        starts_t = torch.tensor(starts, device="cuda")
        positions = starts_t[:, None] + torch.arange(t, device="cuda")
        mask = causal_mask(starts_t, t, kv_len or max(starts) + t, torch.bfloat16)
        return self.lean(ids, positions, positions, mask, keys, values)  # [B, T, V]


@torch.inference_mode()
def test_dense_prefill_is_as_close_to_float32_as_the_invariant_kernels(models) -> None:
    bf16, reference = models
    lean = ModelForward(bf16, variant="invariant")
    assert lean.dense_prefill
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 140), generator=gen).cuda()
    want = reference(ids).logits  # [3, 140, V], the full causal forward
    lengths = [130, 41, 97]

    invariant = _Rows(ModelForward(bf16, variant="invariant", dense_prefill="off"))
    assert not invariant.lean.dense_prefill
    inv_last = torch.stack(
        [invariant.invariant(r, ids[r : r + 1, :n], [0])[0, -1] for r, n in enumerate(lengths)]
    )
    inv_error = max(_error(inv_last[r], want[r, n - 1]) for r, n in enumerate(lengths))
    assert inv_error > 0  # bfloat16 rounds: the bound below is not zero

    # Batched and padded (rows 1 and 2 padded to 130 with other tokens), then chunked:
    # row 0 as 60 + 70 tokens, its second chunk with row 1 in a batch of two.
    rows = _Rows(lean)
    batched = rows.dense(0, ids[:, :130], [0, 0, 0], lengths)
    for r, n in enumerate(lengths):
        assert _error(batched[r], want[r, n - 1]) <= ERROR_FACTOR * inv_error, r
    chunks = _Rows(lean)
    chunks.dense(0, ids[:1, :60], [0], [60])
    pair = torch.stack([ids[0, 60:130], torch.cat([ids[1, :41], ids[2, :29]])])  # row 1: 41 tokens, padded
    chunked = chunks.dense(0, pair, [60, 0], [70, 41])
    assert _error(chunked[0], want[0, 129]) <= ERROR_FACTOR * inv_error
    assert _error(chunked[1], want[1, 40]) <= ERROR_FACTOR * inv_error

    # Decode passes (the invariant kernels) over what each prefill wrote: 2 then 1 tokens a row.
    starts = lengths[:]
    for width in (2, 1):
        step = torch.stack([ids[r, n : n + width] for r, n in enumerate(starts)])
        got = rows.invariant(0, step, starts, kv_len=MAX_LEN)
        ref = invariant.invariant(0, step, starts, kv_len=MAX_LEN)
        for r, n in enumerate(starts):
            bound = ERROR_FACTOR * max(_error(ref[r], want[r, n : n + width]), inv_error)
            assert _error(got[r], want[r, n : n + width]) <= bound, (width, r)
        starts = [n + width for n in starts]


@torch.inference_mode()
def test_dense_prefill_does_not_synchronise(models) -> None:
    bf16, _ = models
    rows = _Rows(ModelForward(bf16, variant="invariant"))
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 50), device="cuda")
    rows.dense(0, ids, [0, 0, 0], [50, 20, 33])  # warm-up: kernels loaded, allocator primed
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows.dense(0, ids, [50, 20, 33], [50, 7, 1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
