"""The benchmark-only oracle drafter (bench/common/oracle_drafter.py) in a real engine, handed
over through `Engine(draft_model_drafter=...)`: tiny random float32 models on the CPU, where
greedy output does not depend on the batch or on speculation (docs/engine.md), so a plain run's
continuation is the speculative run's too.

The draft model is `other_draft`, an unrelated random model whose own proposals are almost
never accepted: a high acceptance can only come from the oracle's tokens."""

from __future__ import annotations

import math

import pytest

from bench.common.oracle_drafter import GreedyOracle, OracleDrafter
from service.engine import Engine, EngineConfig, FinishReason, GenerationRequest, Method, SamplingParams
from service.engine.execution.runner import ModelRunner
from service.engine.pass_record import PassRecord
from tests.engine.helpers import run

K = 4
NEW_TOKENS = 48
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts tokens and verifies them.",
    "def add(x, y):\n    return x + y\n",
    "Unicode: café, naïve, 日本語のテキスト.",
    "The dog sleeps. The fox runs away.",
    "print(add(1, 2))",
    "drafts and verifies; verifies and drafts",
    "emoji 🙂🚀✨, ½ ≠ ∞.",
]


class Verdicts:
    """The draft-model rows' verdicts of every decode pass (a pass observer)."""

    def __init__(self) -> None:
        self.proposed = self.accepted = self.rejecting = 0

    def __call__(self, record: PassRecord) -> None:
        for method, d, a in zip(record.methods, record.proposed, record.accepted):
            if method is Method.DRAFT_MODEL and d:
                self.proposed += d
                self.accepted += a
                self.rejecting += a < d


@pytest.fixture
def oracle_engine():
    """Factory: oracle_engine(target, draft, oracle, alpha) -> (started Engine, the drafters it
    built, the factory's calls, a Verdicts observer); every engine is stopped at teardown."""
    engines: list[Engine] = []

    def factory(target, draft, oracle: GreedyOracle, alpha: float, **config):
        made: list[OracleDrafter] = []
        calls: list[tuple[ModelRunner, int]] = []

        def build(runner: ModelRunner, catch_up_budget: int) -> OracleDrafter:
            calls.append((runner, catch_up_budget))
            made.append(OracleDrafter(runner, catch_up_budget, oracle, alpha=alpha, seed=7))
            return made[-1]

        config.setdefault("kv_cache_tokens", 512)
        config.setdefault("max_batch_size", 8)
        config.setdefault("max_num_draft_tokens", K)
        engine = Engine(target, EngineConfig(**config), draft=draft, draft_model_drafter=build)
        verdicts = Verdicts()
        engine.add_pass_observer(verdicts)
        engine.start()
        engines.append(engine)
        return engine, made, calls, verdicts

    yield factory
    for engine in engines:
        engine.stop(drain_timeout_s=0)


def prompts(tokenizer) -> list[tuple[int, ...]]:
    return [tuple(tokenizer.encode(text)) for text in TEXTS]


def requests(prompt_ids, method: Method, tag: str, **fields) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"{tag}-{i}",
            p,
            max_tokens=NEW_TOKENS,
            method=method,
            num_draft_tokens=K if method is Method.DRAFT_MODEL else None,
            **fields,
        )
        for i, p in enumerate(prompt_ids)
    ]


@pytest.fixture(scope="module")
def plain(target, tokenizer) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's plain greedy output, from an engine without a draft model."""
    engine = Engine(target, EngineConfig(kv_cache_tokens=512, max_batch_size=8))
    engine.start()
    try:
        ids = prompts(tokenizer)
        outs = run(engine, requests(ids, Method.NONE, "plain"))
        return {p: outs[f"plain-{i}"].tokens for i, p in enumerate(ids)}
    finally:
        engine.stop()


def recorded(plain) -> GreedyOracle:
    oracle = GreedyOracle()
    for prompt, tokens in plain.items():
        oracle.record(prompt, tokens)
    return oracle


def speculate(engine, plain, tag="spec", **fields):
    ids = list(plain)
    outs = run(engine, requests(ids, Method.DRAFT_MODEL, tag, **fields))
    return [(p, outs[f"{tag}-{i}"]) for i, p in enumerate(ids)]


def test_alpha_1_every_draft_is_accepted_and_the_output_is_plain_greedy(
    oracle_engine, target, other_draft, plain
):
    engine, made, _, verdicts = oracle_engine(target, other_draft, recorded(plain), alpha=1.0)
    outs = speculate(engine, plain)
    proposed = sum(o.metrics.proposed_drafts for _, o in outs)
    accepted = sum(o.metrics.accepted_drafts for _, o in outs)
    assert proposed > 0
    assert accepted == proposed  # acceptance rate 1.0, from the metrics
    for prompt, out in outs:
        assert out.tokens == plain[prompt]
        if out.metrics.proposed_drafts:
            assert out.metrics.accept_rate == 1.0
    assert (verdicts.proposed, verdicts.accepted, verdicts.rejecting) == (proposed, accepted, 0)
    assert not made[0].diverged


def test_alpha_0_no_draft_is_accepted_and_the_output_is_plain_greedy(
    oracle_engine, target, other_draft, plain
):
    engine, made, _, _ = oracle_engine(target, other_draft, recorded(plain), alpha=0.0)
    outs = speculate(engine, plain)
    assert sum(o.metrics.proposed_drafts for _, o in outs) > 0
    assert sum(o.metrics.accepted_drafts for _, o in outs) == 0
    for prompt, out in outs:
        assert out.tokens == plain[prompt]
    assert not made[0].diverged


def test_alpha_half_accepts_each_draft_with_probability_one_half(oracle_engine, target, other_draft, plain):
    """Each verdict (an accepted draft, or a pass's first rejection) is one position's
    Bernoulli(alpha) draw, each position drawn once (bench/common/oracle_drafter.py), so the
    per-token rate accepted / (accepted + rejections) is a binomial proportion: with n
    verdicts its standard deviation is sqrt(a (1 - a) / n), 0.028 at the n = 319 of this run
    (one prompt ends early, at an end-of-sequence token). Four of them bound it: a correct
    drafter fails with probability 6e-5 over seeds, and this seed is fixed (the run is
    deterministic). An oracle that ignored alpha gives 0 or 1; one that corrupted whole
    passes with probability 1 - a gives a k / (a k + 1 - a) = 0.8 at k = 4."""
    alpha = 0.5
    engine, made, _, verdicts = oracle_engine(target, other_draft, recorded(plain), alpha=alpha)
    outs = speculate(engine, plain)
    for prompt, out in outs:
        assert out.tokens == plain[prompt]
    assert verdicts.accepted == sum(o.metrics.accepted_drafts for _, o in outs)
    assert verdicts.proposed == sum(o.metrics.proposed_drafts for _, o in outs)
    n = verdicts.accepted + verdicts.rejecting
    assert n >= 250, n  # enough verdicts for the bound to mean something
    rate = verdicts.accepted / n
    assert abs(rate - alpha) <= 4 * math.sqrt(alpha * (1 - alpha) / n), (rate, n)
    # The metrics' accept_rate (accepted over proposed) is lower: drafts after a rejection
    # are proposed and never judged. With k = 4 it is (a - a^5) / ((1 - a) 4) = 0.23 at 0.5.
    accept_rate = verdicts.accepted / verdicts.proposed
    assert accept_rate < rate
    assert not made[0].diverged


def test_the_engine_builds_the_draft_model_drafter_through_the_injection_point(
    oracle_engine, target, other_draft, plain
):
    engine, made, calls, _ = oracle_engine(
        target, other_draft, recorded(plain), alpha=1.0, max_prefill_tokens_per_pass=300
    )
    speculate(engine, plain)
    assert len(calls) == 1 and len(made) == 1
    runner, budget = calls[0]
    assert runner.loaded is other_draft and budget == 300 and made[0].runner is runner


def test_without_the_injection_point_the_real_draft_model_proposes(make_engine, target, other_draft, plain):
    """The contrast to the tests above: the same draft model's own proposals, from the default
    DraftModelDrafter, are mostly rejected."""
    engine = make_engine(target, other_draft, max_batch_size=8, max_num_draft_tokens=K)
    outs = speculate(engine, plain)
    proposed = sum(o.metrics.proposed_drafts for _, o in outs)
    assert 0 < sum(o.metrics.accepted_drafts for _, o in outs) < proposed / 2


def test_sampling_requests_are_refused_with_a_clear_error(oracle_engine, target, other_draft, plain):
    engine, _, _, _ = oracle_engine(target, other_draft, recorded(plain), alpha=1.0)
    prompt = next(iter(plain))
    outs = run(
        engine,
        [
            GenerationRequest(
                "sampled",
                prompt,
                max_tokens=8,
                method=Method.DRAFT_MODEL,
                sampling=SamplingParams(temperature=0.8, seed=1),
            ),
            GenerationRequest("greedy", prompt, max_tokens=8, method=Method.DRAFT_MODEL),
        ],
    )
    assert outs["sampled"].final.finish_reason is FinishReason.ERROR
    assert "greedy requests only" in outs["sampled"].final.error
    assert "temperature 0.8" in outs["sampled"].final.error
    assert outs["greedy"].final.finish_reason is FinishReason.LENGTH  # the engine serves on


def test_a_prompt_without_a_recorded_continuation_fails_naming_it(oracle_engine, target, other_draft):
    engine, _, _, _ = oracle_engine(target, other_draft, GreedyOracle(), alpha=1.0)
    outs = run(engine, [GenerationRequest("unknown", (5, 6, 7), max_tokens=8, method=Method.DRAFT_MODEL)])
    assert outs["unknown"].final.finish_reason is FinishReason.ERROR
    assert "no greedy continuation recorded" in outs["unknown"].final.error


def test_a_row_that_leaves_the_oracle_is_detected(oracle_engine, target, other_draft, plain):
    """An oracle that is wrong from position 5 of one prompt on (as a continuation from a run
    that rounded differently would be): the target still decides every token, so the output
    is plain greedy; the drafter flags the row while it runs, and first_divergence finds
    where it left the oracle."""
    oracle = recorded(plain)
    prompt = max(plain, key=lambda p: len(plain[p]))
    assert len(plain[prompt]) > 8
    wrong = list(plain[prompt])
    wrong[5] = (wrong[5] + 1) % target.vocab_size
    oracle.record(prompt, wrong)
    engine, made, _, _ = oracle_engine(target, other_draft, oracle, alpha=1.0)
    outs = speculate(engine, plain)
    by_prompt = dict(outs)
    assert by_prompt[prompt].tokens == plain[prompt]
    assert oracle.first_divergence(prompt, by_prompt[prompt].tokens) == 5
    index = list(plain).index(prompt)
    assert made[0].diverged == {f"spec-{index}"}
    assert all(oracle.first_divergence(p, o.tokens) is None for p, o in outs if p != prompt)


def test_the_corruption_depends_on_seed_prompt_and_position_only(other_draft):
    """The same positions are corrupted whatever the pass structure (k, policy, batch): two
    drafters of one seed draw the same, and the corrupted sets are nested across alphas."""
    runner = ModelRunner(
        other_draft, max_batch=1, max_len=64, max_width=2, use_graphs=False, use_compile=False
    )
    a, b = (OracleDrafter(runner, 64, GreedyOracle(), alpha=0.5, seed=3) for _ in range(2))
    other_seed = OracleDrafter(runner, 64, GreedyOracle(), alpha=0.5, seed=4)
    prompt = (1, 2, 3)
    u_a, offsets = a.draws(prompt, 200)
    assert (u_a, offsets) == b.draws(prompt, 200)
    assert u_a != other_seed.draws(prompt, 200)[0]
    assert a.draws(prompt, 50)[0][:50] == u_a[:50]
    assert all(1 <= o < other_draft.vocab_size for o in offsets)  # a wrong token is never the right one
    corrupted = {alpha: {j for j, u in enumerate(u_a) if u >= alpha} for alpha in (0.5, 0.7, 0.9)}
    assert corrupted[0.9] <= corrupted[0.7] <= corrupted[0.5]


def test_alpha_outside_0_1_is_refused(other_draft):
    runner = ModelRunner(
        other_draft, max_batch=1, max_len=64, max_width=2, use_graphs=False, use_compile=False
    )
    with pytest.raises(ValueError, match="alpha must be in"):
        OracleDrafter(runner, 64, GreedyOracle(), alpha=1.5)


def test_first_divergence():
    oracle = GreedyOracle()
    oracle.record((1, 2), [5, 6, 7])
    assert oracle.first_divergence((1, 2), [5, 6, 7]) is None
    assert oracle.first_divergence((1, 2), [5, 9, 7]) == 1
    assert oracle.first_divergence((1, 2), [5, 6]) == 2
    assert oracle.first_divergence((1, 2), [5, 6, 7, 8]) == 3
