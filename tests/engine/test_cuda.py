"""The same engine on CUDA (skipped without a GPU): lossless greedy, batch independence,
and exactly one device -> host synchronisation per decode pass."""

from __future__ import annotations

import warnings

import pytest
import torch

from service.engine import Engine, EngineConfig, GenerationRequest, Method, SamplingParams
from tests.engine.helpers import make_model, perturbed, run, submit, to_cuda, wait_checked

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def gpu_models(tokenizer):
    target = make_model(tokenizer, seed=0, name="cuda-target", vocab_size=len(tokenizer))
    draft = perturbed(target, seed=2, scale=0.05, name="cuda-draft")
    return to_cuda(target), to_cuda(draft)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def test_greedy_lossless_and_batch_independent_on_cuda(make_engine, gpu_models) -> None:
    target, draft = gpu_models
    tok = target.tokenizer
    prompts = ["The quick brown fox jumps", "def add(x, y):\n", "café 日本"]
    reqs = [
        GenerationRequest(f"p{i}", _ids(tok, p), max_tokens=40, method=Method.NONE)
        for i, p in enumerate(prompts)
    ]
    for method in (Method.NGRAM, Method.DRAFT_MODEL):
        for k in (1, 3, 5):
            reqs += [
                GenerationRequest(
                    f"{method.name}{k}-{i}", _ids(tok, p), max_tokens=40, method=method, num_draft_tokens=k
                )
                for i, p in enumerate(prompts)
            ]
    hot = SamplingParams(temperature=0.9, top_p=0.9, seed=5)
    reqs.append(
        GenerationRequest(
            "hot", _ids(tok, prompts[0]), max_tokens=30, method=Method.DRAFT_MODEL, sampling=hot
        )
    )
    res = run(make_engine(target, draft=draft, max_num_draft_tokens=5), reqs)
    for r in reqs[len(prompts) : -1]:
        assert res[r.request_id].tokens == res[f"p{r.request_id.split('-')[-1]}"].tokens, r.request_id
    alone = run(make_engine(target, draft=draft, max_batch_size=1, max_num_draft_tokens=5), [reqs[-1]])
    assert alone["hot"].tokens == res["hot"].tokens


def _synchronisations_per_step(scheduler) -> list[int]:
    """Device -> host synchronisations of each scheduler step until no request runs
    (torch.cuda.set_sync_debug_mode warns on each one)."""
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while scheduler.running:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scheduler.step()
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return counts


def test_one_sync_per_decode_pass(gpu_models) -> None:
    """Drives the engine loop on this thread with CUDA's sync debug mode counting syncs."""
    target, draft = gpu_models
    tok = target.tokenizer
    engine = Engine(target, EngineConfig(kv_cache_tokens=256, max_num_draft_tokens=5), draft=draft)
    outs = [
        submit(
            engine,
            GenerationRequest(
                f"r{m.name}",
                _ids(tok, "The quick brown fox"),
                max_tokens=20,
                method=m,
                sampling=SamplingParams(temperature=0.0 if m is Method.NGRAM else 1.0, seed=1),
            ),
        )[0]
        for m in Method
    ]
    scheduler = engine._build_scheduler()
    engine._state = "running"
    for seq in list(engine._waiting):
        scheduler.admit(seq)
    engine._waiting.clear()
    scheduler.step()  # the prompts' prefill pass (below the budget), then a warm-up decode pass
    counts = _synchronisations_per_step(scheduler)
    assert counts and all(c == 1 for c in counts), counts
    for out in outs:
        wait_checked(out, timeout=1)


def test_prefill_chunks_do_not_synchronise(gpu_models) -> None:
    """A prompt prefilled in chunks (docs/prefill.md): the steps that feed a chunk and
    complete no prompt make no device -> host synchronisation (the step that feeds the last
    chunk transfers the first token, then runs the first decode pass, which may capture a
    graph: not counted here)."""
    target, _ = gpu_models
    tok = target.tokenizer
    engine = Engine(target, EngineConfig(kv_cache_tokens=256, max_prefill_tokens_per_pass=8))
    prompt = _ids(tok, "The quick brown fox jumps over the lazy dog. " * 3)
    assert len(prompt) > 3 * 8
    out = submit(engine, GenerationRequest("long", prompt, max_tokens=4, method=Method.NONE))[0]
    scheduler = engine._build_scheduler()
    engine._state = "running"
    scheduler.admit(engine._waiting.popleft())
    counts = _synchronisations_per_step(scheduler)
    chunks = -(-len(prompt) // 8)
    assert counts[: chunks - 1] == [0] * (chunks - 1), counts
    assert counts[chunks - 1] >= 1, counts
    wait_checked(out, timeout=1)
