"""The whole-layer lean forward variant on CUDA: compiled, replayed from captured graphs, it
gives the reference variant's logits and cache contents (GPU only)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.helpers import assert_same_cache, graphed_and_reference_runners
from tests.support.float_compare import assert_close_up_to_rounding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.inference_mode()
def test_layer_variant_graphs_match_the_reference_variant(tokenizer) -> None:
    target, layer, reference = graphed_and_reference_runners(tokenizer, "layer", max_len=128)
    assert layer.lean.compiled
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, target.vocab_size, (3, 20), generator=gen).cuda()
    lengths = [20, 13, 17]
    for runner in (layer, reference):  # ragged prefill, one row at a time, rows at offsets 0 and > 0
        for row, n in enumerate(lengths):
            runner.forward(row, row + 1, prompts[row : row + 1, :n], [0], last_only=True)
    for width in (1, 4, 2, 1, 3):
        ids = torch.randint(1, target.vocab_size, (3, width), generator=gen).cuda()
        assert_close_up_to_rounding(layer.forward(0, 3, ids, lengths), reference.forward(0, 3, ids, lengths))
        lengths = [n + width for n in lengths]
    # Rows [lo, hi) with lo > 0 (a draft model's group) and a single row (the B = 1 graphs).
    ids = torch.randint(1, target.vocab_size, (2, 1), generator=gen).cuda()
    assert_close_up_to_rounding(
        layer.forward(1, 3, ids, lengths[1:]), reference.forward(1, 3, ids, lengths[1:])
    )
    lengths[1:] = [n + 1 for n in lengths[1:]]
    for width in (1, 2):
        ids = torch.randint(1, target.vocab_size, (1, width), generator=gen).cuda()
        got = layer.forward(0, 1, ids, lengths[:1])
        assert_close_up_to_rounding(got, reference.forward(0, 1, ids, lengths[:1]))
        lengths[0] += width
    # The graphs wrote every key and value into the cache's own storage.
    assert_same_cache(layer, reference, lengths)
    # (B, T) buckets (4, 1..4) and (1, 1..2): 6 graphs. Compiled specialisations, one per
    # (B == 1, T == 1) and, where torch specialises a storage offset of 0 (2.13 does, 2.11 does
    # not), cache rows at offset 0 or not: the prefills of row 0 and of rows 1, 2, and the
    # graphs' (4, 1), (4, >= 2), (1, 1); the graph (1, 2) shares row 0's prefill specialisation.
    assert len(layer.graphs.graphs) == 6
    assert layer.lean.compiled_graphs() in (4, 5)
