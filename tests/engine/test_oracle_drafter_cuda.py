"""The oracle drafter on CUDA (skipped without a GPU): its replacement of the draft model's
proposals adds no device -> host synchronisation to a decode pass, and at alpha = 1 every
draft is accepted with the output still plain greedy."""

from __future__ import annotations

import pytest
import torch

from bench.common.oracle_drafter import GreedyOracle, OracleDrafter
from service.engine import Engine, EngineConfig, GenerationRequest, Method
from tests.engine.helpers import make_model, perturbed, run, submit, to_cuda, wait_checked
from tests.engine.test_cuda import _synchronisations_per_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = ("The quick brown fox jumps", "def add(x, y):\n", "café 日本")


@pytest.fixture(scope="module")
def gpu_models(tokenizer):
    target = make_model(tokenizer, seed=0, name="cuda-target", vocab_size=len(tokenizer))
    draft = perturbed(target, seed=2, scale=0.05, name="cuda-draft")
    return to_cuda(target), to_cuda(draft)


@pytest.fixture(scope="module")
def oracle(gpu_models) -> GreedyOracle:
    target, _ = gpu_models
    engine = Engine(target, EngineConfig(kv_cache_tokens=256))
    engine.start()
    try:
        ids = [tuple(target.tokenizer.encode(p, add_special_tokens=False)) for p in PROMPTS]
        outs = run(
            engine,
            [GenerationRequest(f"p{i}", p, max_tokens=24, method=Method.NONE) for i, p in enumerate(ids)],
        )
    finally:
        engine.stop()
    recorded = GreedyOracle()
    for i, p in enumerate(ids):
        recorded.record(p, outs[f"p{i}"].tokens)
    return recorded


def _engine(gpu_models, oracle, alpha):
    target, draft = gpu_models
    return Engine(
        target,
        EngineConfig(kv_cache_tokens=256, max_num_draft_tokens=4),
        draft=draft,
        draft_model_drafter=lambda runner, budget: OracleDrafter(runner, budget, oracle, alpha=alpha),
    )


def _requests(target):
    return [
        GenerationRequest(
            f"s{i}",
            tuple(target.tokenizer.encode(p, add_special_tokens=False)),
            max_tokens=24,
            method=Method.DRAFT_MODEL,
            num_draft_tokens=4,
        )
        for i, p in enumerate(PROMPTS)
    ]


def test_alpha_1_accepts_every_draft_on_cuda(gpu_models, oracle) -> None:
    engine = _engine(gpu_models, oracle, 1.0)
    engine.start()
    try:
        requests = _requests(gpu_models[0])
        outs = run(engine, requests)
    finally:
        engine.stop()
    for request in requests:
        out = outs[request.request_id]
        assert out.tokens == oracle.continuation(request.prompt_token_ids)
        assert out.metrics.accepted_drafts == out.metrics.proposed_drafts > 0


def test_one_sync_per_decode_pass_with_the_oracle_drafter(gpu_models, oracle) -> None:
    """Drives the engine loop on this thread with CUDA's sync debug mode counting syncs, as
    tests/engine/test_cuda.py does for the real drafters."""
    engine = _engine(gpu_models, oracle, 0.5)
    outs = [submit(engine, request)[0] for request in _requests(gpu_models[0])]
    scheduler = engine._build_scheduler()
    engine._state = "running"
    for seq in list(engine._waiting):
        scheduler.admit(seq)
    engine._waiting.clear()
    scheduler.step()  # the prompts' prefill pass, then a warm-up decode pass
    counts = _synchronisations_per_step(scheduler)
    assert counts and all(c == 1 for c in counts), counts
    for out in outs:
        wait_checked(out, timeout=1)
        assert out.metrics.proposed_drafts > 0
