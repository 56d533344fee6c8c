"""Packing a prefill pass's real tokens and the keys each row reads (service/engine/dense_prefill.py);
the CUDA forward itself is tested in test_dense_prefill_cuda.py."""

from __future__ import annotations

import pytest
import torch

from service.engine.dense_prefill import available, pack


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
