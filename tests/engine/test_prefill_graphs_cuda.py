"""One-row prefill passes replayed from captured CUDA graphs
(service/engine/execution/prefill_graphs.py), bfloat16 on CUDA: as close to a float32
reference as the eager dense prefill, padding written behind the row only, the other rows'
cache untouched, the decode passes after them as close as after an eager prefill, passes the
graphs do not cover run eagerly, and a replay does not synchronise.

Tolerance as in test_dense_prefill_cuda.py: the graph runs the eager pass's kernels at the
bucket's token count, so the two differ in summation order only (cuBLAS picks its algorithm
from the shape); the graphed path's largest logit error against the float32 forward of the
same weights may be at most ERROR_FACTOR times the eager path's. A wrong slot, position or
mask moves logits by a good fraction of their size, far past that.
"""

from __future__ import annotations

import pytest
import torch

from service.engine.execution.runner import ModelRunner
from service.models.loading import LoadedModel
from tests.engine.helpers import DENSE_ERROR_FACTOR as ERROR_FACTOR
from tests.engine.helpers import DENSE_MAX_LEN as MAX_LEN
from tests.engine.helpers import DENSE_SHAPE as SHAPE
from tests.engine.helpers import bf16_and_float32
from tests.engine.helpers import max_abs_error as _error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def models():
    bf16, reference = bf16_and_float32()  # reference: the same (bf16) weights in float32
    loaded = LoadedModel("g", bf16, None, torch.device("cuda"), torch.bfloat16)
    return loaded, reference


def _runner(loaded: LoadedModel, prefill_graph_tokens: int) -> ModelRunner:
    return ModelRunner(
        loaded,
        max_batch=4,
        max_len=MAX_LEN,
        max_width=4,
        lean_variant="invariant",
        prefill_graph_tokens=prefill_graph_tokens,
    )


def _prefill(runner: ModelRunner, slot: int, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
    n = ids.shape[1]
    return runner.forward(slot, slot + 1, ids, [start], last_only=True, lengths=[n])[0, 0]  # [V]


@torch.inference_mode()
def test_graphed_prefill_is_as_close_to_float32_as_the_eager_one(models) -> None:
    loaded, reference = models
    graphed, eager = _runner(loaded, 64), _runner(loaded, 0)
    assert graphed.prefill_graphs is not None and eager.prefill_graphs is None
    assert graphed.prefill_graphs.buckets == (16, 32, 48, 64)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 140), generator=gen).cuda()
    want = reference(ids).logits  # [4, 140, V]
    lengths = {2: 40, 0: 17, 1: 1, 3: 64}  # slot: prompt length (buckets 48, 32, 16, 64)
    # Every graph captured first (with slot 0 and the bucket's length, as at start-up), so each
    # prefill below replays a graph on other inputs than it was captured with.
    captured = graphed.capture_all_graphs()
    assert sorted(graphed.prefill_graphs.graphs) == [16, 32, 48, 64]

    # Slot 1's cache past its prompt holds a sentinel: the graph's padding must not land there.
    for layer in graphed.cache.keys.values():
        layer[1].fill_(7.0)
    errors = {}
    for slot, n in lengths.items():
        got = _prefill(graphed, slot, ids[slot : slot + 1, :n])
        ref = _prefill(eager, slot, ids[slot : slot + 1, :n])
        errors[slot] = (_error(got, want[slot, n - 1]), _error(ref, want[slot, n - 1]))
    assert graphed.captures == captured  # no capture on the way: every prefill was a replay
    eager_error = max(e for _, e in errors.values())
    assert eager_error > 0  # bfloat16 rounds: the bound below is not zero
    for slot, (graph_error, _) in errors.items():
        assert graph_error <= ERROR_FACTOR * eager_error, (slot, errors)
    scratch = graphed.scratch_start
    for layer in graphed.cache.keys.values():
        assert bool((layer[1, :, 1:scratch] == 7.0).all())  # only position 0 (its one token) written

    # What the prefills wrote decodes as the eager prefills' cache does: two decode passes
    # over all four rows (captured graphs in both runners).
    starts = [lengths[slot] for slot in range(4)]
    decode_errors = []
    for width in (2, 1):
        step = torch.stack([ids[r, n : n + width] for r, n in enumerate(starts)])  # [4, width]
        got, ref = graphed.forward(0, 4, step, starts), eager.forward(0, 4, step, starts)
        for r, n in enumerate(starts):
            decode_errors.append(
                (_error(got[r], want[r, n : n + width]), _error(ref[r], want[r, n : n + width]))
            )
        starts = [n + width for n in starts]
    bound = ERROR_FACTOR * max(max(e for _, e in decode_errors), eager_error)
    assert all(g <= bound for g, _ in decode_errors), decode_errors


@torch.inference_mode()
def test_passes_the_graphs_do_not_cover_run_eagerly(models) -> None:
    loaded, _ = models
    runner = _runner(loaded, 32)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 50), device="cuda")
    _prefill(runner, 0, ids[:1, :20])  # a graph (bucket 32)
    assert runner.prefill_graphs.captures == 1
    _prefill(runner, 0, ids[:1, 20:28], start=20)  # a later chunk: eager
    _prefill(runner, 1, ids[1:, :33])  # longer than the largest bucket: eager
    runner.forward(2, 4, ids[:, :10], [0, 0], last_only=True, lengths=[10, 6])  # two rows: eager
    assert runner.prefill_graphs.captures == 1 and sorted(runner.prefill_graphs.graphs) == [32]


@torch.inference_mode()
def test_capture_all_and_a_replay_without_synchronising(models) -> None:
    loaded, reference = models
    runner = _runner(loaded, 48)
    captured = runner.capture_all_graphs()
    assert sorted(runner.prefill_graphs.graphs) == [16, 32, 48]
    assert captured == len(runner.graphs.graphs) + 3 and runner.captures == captured
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 30), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        first = _prefill(runner, 3, ids)  # slot 3, 30 tokens: captured as slot 0, 32 tokens
        second = _prefill(runner, 3, ids)  # its own tensor: the replay did not overwrite `first`
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.captures == captured
    assert torch.equal(first, second)  # the same graph on the same inputs
    # And what the replay computed is this prompt's prefill, as close to float32 as eager's.
    want = reference(ids).logits[0, -1]
    eager_error = _error(_prefill(_runner(loaded, 0), 3, ids), want)
    assert eager_error > 0
    assert _error(first, want) <= ERROR_FACTOR * eager_error
