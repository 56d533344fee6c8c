"""Captured-graph passes on CUDA: same logits as the eager lean forward, and float32
speculative output equal to plain output on the real SmolLM2 (GPU only)."""

from __future__ import annotations

import pytest
import torch

from service.engine import Engine, EngineConfig, GenerationRequest, Method
from service.engine.execution.runner import ModelRunner
from tests.engine.helpers import make_model, run, to_cuda
from tests.support.float_compare import assert_close_up_to_rounding

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@torch.inference_mode()
def test_graph_replay_matches_eager(tokenizer) -> None:
    target = to_cuda(make_model(tokenizer, seed=0, name="g", vocab_size=len(tokenizer)))
    graphed = ModelRunner(target, max_batch=4, max_len=128, max_width=4)
    eager = ModelRunner(target, max_batch=4, max_len=128, max_width=4, use_graphs=False)
    assert graphed.graphs is not None and eager.graphs is None
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, target.vocab_size, (3, 20), generator=gen).cuda()
    lengths = [20, 13, 17]
    for runner in (graphed, eager):  # ragged prefill, eager in both
        for row, n in enumerate(lengths):
            runner.forward(row, row + 1, prompts[row : row + 1, :n], [0], last_only=True)
    for width in (1, 4, 2, 1, 3):
        ids = torch.randint(1, target.vocab_size, (3, width), generator=gen).cuda()
        got = graphed.forward(0, 3, ids, lengths)
        want = eager.forward(0, 3, ids, lengths)
        assert_close_up_to_rounding(got, want)
        lengths = [n + width for n in lengths]
    # Rows [lo, hi) with lo > 0 (a draft model's group) go through the same graphs.
    ids = torch.randint(1, target.vocab_size, (2, 1), generator=gen).cuda()
    assert_close_up_to_rounding(
        graphed.forward(1, 3, ids, lengths[1:]), eager.forward(1, 3, ids, lengths[1:])
    )
    assert len(graphed.graphs.graphs) == 4  # (4, T, 64) for T in 1, 2, 3, 4


@pytest.fixture(scope="module")
def smollm2_fp32_cuda():
    from service.models.loading import load_model
    from service.models.store import cached_path

    if cached_path("smollm2-135m-instruct") is None:
        pytest.skip("SmolLM2 is not in the model cache")
    return load_model("smollm2-135m-instruct", dtype=torch.float32, device="cuda")


def test_float32_speculative_equals_plain_on_cuda(smollm2_fp32_cuda) -> None:
    tok = smollm2_fp32_cuda.tokenizer
    passage = (
        "The quick brown fox jumps over the lazy dog near the river bank, where the old mill "
        "stands. Every morning the miller opens the doors and the fox runs away."
    )
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": f"Repeat this text exactly:\n{passage}"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tuple(tok(prompt, add_special_tokens=False)["input_ids"])
    engine = Engine(smollm2_fp32_cuda, EngineConfig(max_batch_size=4, kv_cache_tokens=512, instance_id="t"))
    engine.start()
    try:
        requests = [
            GenerationRequest(f"{m.name}-{k}", ids, max_tokens=64, method=m, num_draft_tokens=k)
            for m, k in [(Method.NONE, 0), (Method.NGRAM, 3), (Method.NGRAM, 5)]
        ]
        outs = run(engine, requests)
        plain = outs["NONE-0"].tokens
        for name in ("NGRAM-3", "NGRAM-5"):
            assert outs[name].tokens == plain, name
            assert outs[name].metrics.accepted_drafts > 0
        # And all three together in one batch.
        together = run(
            engine,
            [
                GenerationRequest(
                    r.request_id + "-b",
                    r.prompt_token_ids,
                    max_tokens=64,
                    method=r.method,
                    num_draft_tokens=r.num_draft_tokens,
                )
                for r in requests
            ],
        )
        assert all(o.tokens == plain for o in together.values())
    finally:
        engine.stop()


@torch.inference_mode()
def test_capture_all_covers_every_shape_a_pass_can_take(tokenizer) -> None:
    """After capture_all, passes of any batch, width and context length replay without a new
    capture, and every graph still writes the right logits into the shared output buffer."""
    target = to_cuda(make_model(tokenizer, seed=1, name="g", vocab_size=len(tokenizer)))
    graphed = ModelRunner(target, max_batch=4, max_len=128, max_width=3)
    eager = ModelRunner(target, max_batch=4, max_len=128, max_width=3, use_graphs=False)
    captured = graphed.capture_all_graphs()
    assert captured == 3 * 2 * 3  # batch 1, 2, 4 x kv 64, 128 x width 1..3
    assert graphed.captures == captured and graphed.capture_all_graphs() == 0
    gen = torch.Generator().manual_seed(1)
    lengths = [30, 5, 61, 12]
    for runner in (graphed, eager):
        for row, n in enumerate(lengths):
            prompt = torch.randint(
                1, target.vocab_size, (1, n), generator=torch.Generator().manual_seed(row)
            ).cuda()
            runner.forward(row, row + 1, prompt, [0], last_only=True)
    for rows, width in ((1, 1), (4, 3), (2, 2), (3, 1), (4, 1), (1, 3), (2, 3)):
        ids = torch.randint(1, target.vocab_size, (rows, width), generator=gen).cuda()
        got = graphed.forward(0, rows, ids, lengths[:rows]).clone()
        want = eager.forward(0, rows, ids, lengths[:rows])
        assert_close_up_to_rounding(got, want)
        lengths = [n + width if r < rows else n for r, n in enumerate(lengths)]
    assert graphed.captures == captured  # nothing captured mid-decoding
