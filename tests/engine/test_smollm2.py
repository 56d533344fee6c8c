"""Real-model checks on SmolLM2-135M-Instruct (float32, CPU): greedy speculative decoding is
token-for-token identical to plain decoding, for n-gram and for a draft model (SmolLM2 as its
own draft), alone and in a mixed batch. Skipped when the model cannot be loaded."""

from __future__ import annotations

import pytest
import torch

from service.engine import GenerationRequest, Method, SamplingParams
from tests.engine.helpers import run

pytestmark = pytest.mark.slow

PASSAGES = [
    "The library opens at nine in the morning and closes at six in the evening. Members may "
    "borrow up to five books at a time, and each loan lasts three weeks.",
    "def area(width, height):\n    return width * height\n\nprint(area(3, 4))",
]
INSTRUCTIONS = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text, keeping every sentence:\n\n{}",
]
KS = (1, 3, 5)
MAX_TOKENS = 64


def _prompt(model, instruction: str, passage: str) -> tuple[int, ...]:
    text = model.tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction.format(passage)}], add_generation_prompt=True, tokenize=False
    )
    return tuple(model.tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def prompts(smollm2) -> list[tuple[int, ...]]:
    return [_prompt(smollm2, INSTRUCTIONS[0], PASSAGES[0]), _prompt(smollm2, INSTRUCTIONS[1], PASSAGES[1])]


@pytest.fixture(scope="module")
def plain(smollm2, prompts) -> list[list[int]]:
    """Plain greedy output per prompt, checked once against transformers' generate."""
    from service.engine import Engine, EngineConfig

    engine = Engine(smollm2, EngineConfig(kv_cache_tokens=512, instance_id="t"))
    engine.start()
    try:
        reqs = [
            GenerationRequest(f"p{i}", p, max_tokens=MAX_TOKENS, method=Method.NONE)
            for i, p in enumerate(prompts)
        ]
        results = run(engine, reqs)
    finally:
        engine.stop()
    outputs = [results[f"p{i}"].tokens for i in range(len(prompts))]
    with torch.inference_mode():
        ref = smollm2.model.generate(torch.tensor([prompts[1]]), max_new_tokens=MAX_TOKENS, do_sample=False)
    assert outputs[1] == ref[0, len(prompts[1]) :].tolist()
    return outputs


@pytest.mark.parametrize("method", [Method.NGRAM, Method.DRAFT_MODEL])
def test_greedy_speculative_equals_plain(make_engine, smollm2, prompts, plain, method) -> None:
    engine = make_engine(smollm2, draft=smollm2 if method is Method.DRAFT_MODEL else None, max_batch_size=6)
    reqs = [
        GenerationRequest(f"s{i}-k{k}", p, max_tokens=MAX_TOKENS, method=method, num_draft_tokens=k)
        for i, p in enumerate(prompts)
        for k in KS
    ]
    results = run(engine, reqs)
    for i in range(len(prompts)):
        for k in KS:
            out = results[f"s{i}-k{k}"]
            assert out.tokens == plain[i], (i, k)
            # the prompts make speculation pay off, so the comparison covers accepted drafts
            assert out.metrics.accepted_drafts > 0, (i, k)
            if method is Method.DRAFT_MODEL:
                assert out.metrics.accept_rate > 0.9  # SmolLM2 drafting for itself


def test_mixed_batch_equals_alone(make_engine, smollm2, prompts, plain) -> None:
    hot = SamplingParams(temperature=0.7, top_p=0.9, seed=11)
    reqs = [
        GenerationRequest("a", prompts[0], max_tokens=MAX_TOKENS, method=Method.NGRAM, num_draft_tokens=5),
        GenerationRequest("b", prompts[1], max_tokens=20, method=Method.DRAFT_MODEL, num_draft_tokens=2),
        GenerationRequest("c", prompts[1], max_tokens=MAX_TOKENS, method=Method.NONE),
        GenerationRequest(
            "d", prompts[0], max_tokens=24, method=Method.DRAFT_MODEL, num_draft_tokens=4, sampling=hot
        ),
        GenerationRequest(
            "e", prompts[0][:20], max_tokens=16, method=Method.NGRAM, num_draft_tokens=3, stop=("\n",)
        ),
    ]
    batched = run(make_engine(smollm2, draft=smollm2, max_batch_size=3), reqs)
    assert batched["a"].tokens == plain[0]
    assert batched["c"].tokens == plain[1]
    assert batched["b"].tokens == plain[1][:20]
    alone_engine = make_engine(smollm2, draft=smollm2, max_batch_size=1)
    for req in reqs[3:]:
        alone = run(alone_engine, [req])[req.request_id]
        assert batched[req.request_id].tokens == alone.tokens, req.request_id
        assert batched[req.request_id].text == alone.text
