"""Packing a prefill pass's real tokens and the keys each row reads
(service/engine/execution/dense_prefill.py), and the dense prefill forward on Triton's
interpreter (a CPU machine with TRITON_INTERPRET=1 and Triton installed; CI has neither); on
CUDA it is tested in test_dense_prefill_cuda.py."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.engine.execution.dense_prefill import available, pack, pack_one_row
from tests.support.float_compare import assert_close_up_to_rounding


def test_pack_lists_each_rows_real_tokens_and_keys() -> None:
    # Row 0: 3 new tokens after 2 cached; row 1: 1 token (a padded slot of the span); row 2: 4, none cached.
    packed = pack(starts=[2, 5, 0], lengths=[3, 1, 4], width=4, cache_len=8, device=torch.device("cpu"))
    assert packed.token_index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert packed.key_rows.tolist() == [0] * 5 + [1] * 6 + [2] * 4
    assert packed.key_pos.tolist() == [0, 1, 2, 3, 4] + [0, 1, 2, 3, 4, 5] + [0, 1, 2, 3]
    assert packed.cu_tokens.tolist() == [0, 3, 4, 8] and packed.cu_tokens.dtype == torch.int32
    assert packed.cu_keys.tolist() == [0, 5, 11, 15] and packed.cu_keys.dtype == torch.int32
    assert (packed.max_tokens, packed.max_keys) == (4, 6)
    assert packed.last.tolist() == [2, 3, 7]


def test_pack_one_row_keeps_the_padding_out_of_attention_and_behind_the_row() -> None:
    # Slot 2's first 3 tokens, padded to 5; position 10 is behind every position a row uses.
    slot, length = torch.tensor([2]), torch.tensor([3])
    packed, write_pos = pack_one_row(slot, length, width=5, scratch_pos=10)
    assert packed.key_rows.tolist() == [2] * 5
    assert packed.key_rows.stride() == (1,)  # the cache-write kernel reads the rows as a dense array
    assert packed.key_pos.tolist() == [0, 1, 2, 3, 4]
    assert packed.cu_tokens.tolist() == [0, 3] and packed.cu_tokens.dtype == torch.int32
    assert packed.cu_keys.tolist() == [0, 3]
    assert (packed.max_tokens, packed.max_keys) == (5, 5)
    assert packed.last.tolist() == [2]
    assert write_pos.tolist() == [0, 1, 2, 10, 10]
    # What pack() gives the same row unpadded, for the part the attention reads.
    plain = pack(starts=[0], lengths=[3], width=3, cache_len=16, device=torch.device("cpu"))
    assert plain.cu_tokens.tolist() == packed.cu_tokens.tolist()
    assert plain.key_pos.tolist() == packed.key_pos.tolist()[:3]
    assert plain.last.tolist() == packed.last.tolist()


def test_pack_clamps_keys_to_the_cache() -> None:
    packed = pack(starts=[6], lengths=[3], width=3, cache_len=8, device=torch.device("cpu"))
    assert packed.key_pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 7]


@pytest.mark.parametrize("lengths", [[0, 2], [3, 2]])
def test_pack_refuses_rows_without_tokens_or_past_the_width(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="tokens"):
        pack(starts=[0, 0], lengths=lengths, width=2, cache_len=8, device=torch.device("cpu"))


def test_not_available_off_cuda_or_in_float32() -> None:
    assert not available(torch.device("cpu"), torch.bfloat16, 64)
    assert not available(torch.device("cuda"), torch.float32, 64)


INTERPRETED = (
    os.environ.get("TRITON_INTERPRET") == "1"
    and importlib.util.find_spec("triton") is not None
    and not torch.cuda.is_available()
)


@pytest.mark.skipif(
    not INTERPRETED, reason="needs Triton's interpreter (TRITON_INTERPRET=1, Triton installed, no GPU)"
)
@torch.inference_mode()
def test_dense_prefill_matches_transformers_on_the_interpreter() -> None:
    """ModelForward.prefill in float32 on the CPU (the Triton kernels interpreted, the reference
    attention for FlashAttention's): rows batched and padded, a second chunk after a cached
    prefix next to a padded row and a one-token row past its length, then a decode pass of
    the invariant kernels over the cache it wrote, all equal to transformers' forward up to
    float32 rounding."""
    from service.engine.execution.kv_cache import StaticKVCache, causal_mask
    from service.engine.execution.model_forward import ModelForward

    torch.manual_seed(0)
    shape = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    model = LlamaForCausalLM(LlamaConfig(**shape, initializer_range=0.2)).eval()
    lean = ModelForward(model, variant="invariant", dense_prefill="on")
    assert lean.dense_prefill
    cache = StaticKVCache(max_batch=3, max_len=128, device=torch.device("cpu"), dtype=torch.float32)
    cache.allocate(lean.num_layers, lean.num_kv_heads, lean.head_dim)
    ids = torch.randint(0, shape["vocab_size"], (3, 100), generator=torch.Generator().manual_seed(1))
    want = model(ids).logits  # [3, 100, V]

    got = lean.prefill(ids[:, :90], [0, 0, 0], [90, 41, 66], *cache.rows(0, 3))[:, 0]
    for r, n in enumerate([90, 41, 66]):
        assert_close_up_to_rounding(got[r], want[r, n - 1], what=f"row {r}")
    chunk = torch.stack([ids[0, 90:100], torch.cat([ids[1, 41:46], ids[1, :5]]), ids[2, :10]])
    got = lean.prefill(chunk, [90, 41, 66], [10, 5, 1], *cache.rows(0, 3))[:, 0]
    assert_close_up_to_rounding(got[0], want[0, 99], what="second chunk")
    assert_close_up_to_rounding(got[1], want[1, 45], what="second chunk, padded")
    starts = torch.tensor([100, 46])
    step = ids[:2, [99, 46]].diagonal()[:, None]  # token 99 of row 0, 46 of row 1: [2, 1]
    decoded = lean(
        step, starts[:, None], starts[:, None], causal_mask(starts, 1, 128, torch.float32), *cache.rows(0, 2)
    )[:, 0]
    assert_close_up_to_rounding(decoded[1], model(ids[1:2, :47]).logits[0, -1], what="decode after prefill")


@pytest.mark.parametrize(
    "tokens, ok", [(0, True), (16, True), (512, True), (4096, True), (8, False), (-1, False)]
)
def test_prefill_graph_tokens_is_zero_or_a_bucket_s_worth(tokens: int, ok: bool) -> None:
    from service.engine.config import MIN_PREFILL_GRAPH_TOKENS, EngineConfig
    from service.engine.execution.prefill_graphs import TOKEN_BUCKETS

    assert TOKEN_BUCKETS[0] == MIN_PREFILL_GRAPH_TOKENS and TOKEN_BUCKETS[-1] == 512
    config = EngineConfig(prefill_graph_tokens=tokens)
    if ok:
        config.validate()
    else:
        with pytest.raises(ValueError, match="prefill_graph_tokens must be 0 .* or at least 16"):
            config.validate()
