"""End to end, speculative sampling draws from the target's distribution; seeds reproduce.

A tiny model over an 8-token vocabulary makes the exact distribution of the first three
generated tokens computable (8 * 8 full forwards); thousands of seeded requests through the
engine are compared with it by a chi-square test. The same test against the draft model's
own distribution must fail, so a sampler that merely passed drafts through would be caught.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from service.engine import GenerationRequest, Method, SamplingParams
from service.engine.speculation.sampling import BatchSampling, RowSampling, probs_from_logits
from tests.engine.helpers import make_model, perturbed, run

ALPHA = 1e-3
SAMPLES = 2000
WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


@pytest.fixture(scope="module")
def small():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)  # no EOS: every request runs to max_tokens
    target = make_model(tokenizer, seed=5, name="small-target", vocab_size=len(WORDS), init=0.2)
    target.model.config.eos_token_id = None
    target.model.generation_config.eos_token_id = None
    draft = perturbed(target, seed=6, scale=0.2, name="small-draft")
    return target, draft


PROMPT = (0, 1, 2, 3, 0, 1, 2, 3, 0, 1)  # repetitive: n-gram lookups always propose
SAMPLING = RowSampling(temperature=0.9, top_p=0.95, top_k=6)


@torch.inference_mode()
def _exact_joint(model) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) under `model` with SAMPLING's processing: [V, V, V]."""
    params = BatchSampling.build([SAMPLING], torch.device("cpu"))
    v = len(WORDS)

    def dist(prefixes: list[tuple[int, ...]]) -> torch.Tensor:  # [N, V]
        logits = model.model(input_ids=torch.tensor([PROMPT + p for p in prefixes])).logits[:, -1:]
        return torch.cat([probs_from_logits(logits[i : i + 1], params)[:, 0] for i in range(len(prefixes))])

    p1 = dist([()])[0]  # [V]
    p2 = dist([(a,) for a in range(v)])  # [V, V]
    p3 = dist(list(itertools.product(range(v), repeat=2))).view(v, v, v)
    return p1[:, None, None] * p2[:, :, None] * p3


def _pvalue(observed: torch.Tensor, expected_probs: torch.Tensor, strict: bool = True) -> float:
    observed, expected_probs = observed.flatten().double(), expected_probs.flatten().double()
    expected = expected_probs / expected_probs.sum() * observed.sum()
    if (observed[expected == 0] > 0).any():
        assert not strict, "emitted a sequence the target cannot produce"
        return 0.0  # impossible under this hypothesis: rejected outright
    # pool the sparse cells so the chi-square approximation holds
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return float(stats.chisquare(obs[keep].numpy(), exp[keep].numpy()).pvalue)


def _sample(make_engine, target, draft, method: Method, seeds: range) -> torch.Tensor:
    engine = make_engine(
        target, draft=draft, max_batch_size=8, max_queue_size=SAMPLES, max_num_draft_tokens=4
    )
    s = SAMPLING
    reqs = [
        GenerationRequest(
            f"s{seed}",
            PROMPT,
            max_tokens=4,  # the first pass proposes 2 drafts: both draft positions are tested
            method=method,
            num_draft_tokens=2,
            sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed),
        )
        for seed in seeds
    ]
    results = run(engine, reqs, timeout=600)
    counts = torch.zeros(len(WORDS), len(WORDS), len(WORDS))
    accepted = 0
    for out in results.values():
        assert len(out.tokens) == 4
        counts[tuple(out.tokens[:3])] += 1
        accepted += out.metrics.accepted_drafts
    assert accepted > SAMPLES // 4  # the acceptance path was exercised, not just rejections
    return counts


@pytest.mark.parametrize("method", [Method.DRAFT_MODEL, Method.NGRAM])
def test_speculative_sampling_follows_the_target(make_engine, small, method) -> None:
    target, draft = small
    counts = _sample(make_engine, target, draft, method, range(SAMPLES))
    want = _exact_joint(target)
    assert _pvalue(counts, want) > ALPHA
    assert _pvalue(counts.sum((1, 2)), want.sum((1, 2))) > ALPHA  # t1 (from the prefill)
    assert _pvalue(counts.sum((0, 2)), want.sum((0, 2))) > ALPHA  # t2
    assert _pvalue(counts.sum((0, 1)), want.sum((0, 1))) > ALPHA  # t3
    if method is Method.DRAFT_MODEL:
        # Non-vacuity: the draft's own distribution is told apart by the same test.
        assert _pvalue(counts, _exact_joint(draft), strict=False) < ALPHA


def test_same_seed_same_output(make_engine, target, close_draft) -> None:
    prompt = tuple(target.tokenizer.encode("The quick brown fox", add_special_tokens=False))
    engine = make_engine(target, draft=close_draft, max_batch_size=4)

    def req(rid: str, seed: int, method: Method) -> GenerationRequest:
        sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return GenerationRequest(
            rid, prompt, max_tokens=30, method=method, num_draft_tokens=3, sampling=sampling
        )

    for method in (Method.DRAFT_MODEL, Method.NGRAM, Method.NONE):
        first = run(engine, [req("a", 42, method)])["a"].tokens
        # again, now sharing the batch with other sampled requests
        again = run(engine, [req("b", 42, method), req("c", 43, method), req("d", 44, method)])
        assert again["b"].tokens == first
        assert again["c"].tokens != first or again["d"].tokens != first
