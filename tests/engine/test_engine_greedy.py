"""Greedy speculative decoding is lossless: token for token equal to plain decoding."""

from __future__ import annotations

import pytest
import torch

from service.engine import GenerationRequest, Method, SamplingParams
from tests.engine.helpers import run

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The dog",
    "def add(x, y):\n",
    "Unicode: café, naïve, 日本語のテキスト",
]
KS = (1, 3, 5)


def _ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def _plain_and_spec(tokenizer, method: Method, max_tokens: int = 48) -> list[GenerationRequest]:
    reqs = []
    for i, text in enumerate(PROMPTS):
        reqs.append(
            GenerationRequest(f"plain-{i}", _ids(tokenizer, text), max_tokens=max_tokens, method=Method.NONE)
        )
        for k in KS:
            reqs.append(
                GenerationRequest(
                    f"spec-{i}-k{k}",
                    _ids(tokenizer, text),
                    max_tokens=max_tokens,
                    method=method,
                    num_draft_tokens=k,
                )
            )
    return reqs


def _assert_lossless(results) -> tuple[int, int]:
    accepted = proposed = 0
    for i in range(len(PROMPTS)):
        plain = results[f"plain-{i}"]
        for k in KS:
            spec = results[f"spec-{i}-k{k}"]
            assert spec.tokens == plain.tokens, (i, k)
            assert spec.text == plain.text
            assert spec.final.finish_reason == plain.final.finish_reason
            assert spec.metrics.num_draft_tokens == k
            accepted += spec.metrics.accepted_drafts
            proposed += spec.metrics.proposed_drafts
    return accepted, proposed


def test_plain_decoding_matches_transformers_generate(make_engine, target, loopy) -> None:
    for model in (target, loopy):
        engine = make_engine(model, max_batch_size=3)
        results = run(
            engine,
            [
                GenerationRequest(f"p{i}", _ids(model.tokenizer, t), max_tokens=40, method=Method.NONE)
                for i, t in enumerate(PROMPTS)
            ],
        )
        for i, text in enumerate(PROMPTS):
            prompt = torch.tensor([_ids(model.tokenizer, text)])
            with torch.inference_mode():
                ref = model.model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=0)[
                    0, prompt.shape[1] :
                ]
            assert results[f"p{i}"].tokens == ref.tolist()


@pytest.mark.parametrize(
    "target_name,draft_name,min_rate",
    [
        ("target", "other_draft", 0.0),  # unrelated draft: nearly everything rejected
        ("target", "close_draft", 0.1),  # partial acceptance
        ("target", "same_draft", 0.99),  # the target as its own draft: the long-acceptance path
        ("loopy", "loopy_draft", 0.3),
    ],
)
def test_draft_model_greedy_is_lossless(request, make_engine, target_name, draft_name, min_rate) -> None:
    target, draft = request.getfixturevalue(target_name), request.getfixturevalue(draft_name)
    engine = make_engine(target, draft=draft, max_batch_size=8, max_num_draft_tokens=5)
    accepted, proposed = _assert_lossless(run(engine, _plain_and_spec(target.tokenizer, Method.DRAFT_MODEL)))
    assert proposed > 0 and accepted / proposed >= min_rate, (accepted, proposed)


@pytest.mark.parametrize("target_name,min_rate", [("target", 0.0), ("loopy", 0.3)])
def test_ngram_greedy_is_lossless(request, make_engine, target_name, min_rate) -> None:
    target = request.getfixturevalue(target_name)
    engine = make_engine(target, max_batch_size=8, max_num_draft_tokens=5)
    accepted, proposed = _assert_lossless(
        run(engine, _plain_and_spec(target.tokenizer, Method.NGRAM, max_tokens=64))
    )
    assert proposed > 0 and accepted / proposed >= min_rate, (accepted, proposed)


def _mixed_requests(tokenizer) -> list[GenerationRequest]:
    ids = lambda t: _ids(tokenizer, t)  # noqa: E731
    greedy, hot = SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7)
    return [
        GenerationRequest("a", ids(PROMPTS[0]), max_tokens=60, method=Method.DRAFT_MODEL, num_draft_tokens=5),
        GenerationRequest("b", ids(PROMPTS[1]), max_tokens=7, method=Method.NGRAM, num_draft_tokens=2),
        GenerationRequest("c", ids("Hi"), max_tokens=33, method=Method.NONE),
        GenerationRequest("d", ids(PROMPTS[2]), max_tokens=45, method=Method.DRAFT_MODEL, num_draft_tokens=1),
        GenerationRequest("e", ids(PROMPTS[0] * 3), max_tokens=50, method=Method.NGRAM, num_draft_tokens=4),
        GenerationRequest(
            "f", ids(PROMPTS[1]), max_tokens=40, method=Method.DRAFT_MODEL, num_draft_tokens=3, sampling=hot
        ),
        GenerationRequest(
            "g",
            ids(PROMPTS[0]),
            max_tokens=40,
            method=Method.NGRAM,
            num_draft_tokens=3,
            sampling=SamplingParams(temperature=1.0, seed=3),
        ),
        GenerationRequest(
            "h", ids(PROMPTS[2]), max_tokens=25, method=Method.NONE, sampling=greedy, stop=("e",)
        ),
        GenerationRequest("i", ids("x"), max_tokens=1, method=Method.DRAFT_MODEL, num_draft_tokens=4),
    ]


def test_mixed_batch_equals_each_request_alone(make_engine, target, close_draft) -> None:
    requests = _mixed_requests(target.tokenizer)
    batched = run(make_engine(target, draft=close_draft, max_batch_size=4, max_num_draft_tokens=5), requests)
    alone_engine = make_engine(target, draft=close_draft, max_batch_size=1, max_num_draft_tokens=5)
    for req in requests:
        alone = run(alone_engine, [req])[req.request_id]
        assert batched[req.request_id].tokens == alone.tokens, req.request_id
        assert batched[req.request_id].text == alone.text
        got, want = batched[req.request_id].metrics, alone.metrics
        assert (got.verify_passes, got.proposed_drafts, got.accepted_drafts) == (
            want.verify_passes,
            want.proposed_drafts,
            want.accepted_drafts,
        )
    assert batched["i"].final.completion_tokens == 1 and batched["i"].metrics.verify_passes == 0
