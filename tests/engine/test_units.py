"""Unit tests: logits processing, n-gram lookup, counters and their proto, the KV cache."""

from __future__ import annotations

import gc
import random

import numpy as np
import pytest
import torch

from service.engine.api import FinishReason, Method
from service.engine.execution.runner import ModelRunner
from service.engine.request_metrics import RequestIdentity, RequestTiming, SpecDecodeStats, to_proto
from service.engine.speculation.drafters import NgramIndex
from service.engine.speculation.sampling import BatchSampling, RowSampling, probs_from_logits, sample_from
from tests.engine.helpers import assert_metrics_invariants
from tests.support.float_compare import SHALLOW_BUDGET, assert_close_up_to_rounding

# ---- sampling ---------------------------------------------------------------------------


def _probs(logits: list[float], row: RowSampling) -> torch.Tensor:
    out = probs_from_logits(torch.tensor([[logits]]), BatchSampling.build([row], torch.device("cpu")))
    return out[0, 0]


def _assert_probs(got: torch.Tensor, want: torch.Tensor | list[float]) -> None:
    """Probabilities of the sampler against a softmax computed here: another code path."""
    assert_close_up_to_rounding(
        got, torch.as_tensor(want, dtype=torch.float32), SHALLOW_BUDGET, what="probabilities"
    )


def test_temperature_top_k_top_p() -> None:
    logits = [2.0, 1.0, 0.0, -1.0]
    full = torch.softmax(torch.tensor(logits), -1)
    _assert_probs(_probs(logits, RowSampling(temperature=1.0)), full)
    hot = torch.softmax(torch.tensor(logits) / 2.0, -1)
    _assert_probs(_probs(logits, RowSampling(temperature=2.0)), hot)
    top2 = full[:2] / full[:2].sum()
    _assert_probs(_probs(logits, RowSampling(temperature=1.0, top_k=2)), top2.tolist() + [0, 0])
    # full = [0.644, 0.237, 0.087, 0.032]: top_p 0.7 keeps two tokens, 0.9 keeps three.
    _assert_probs(_probs(logits, RowSampling(temperature=1.0, top_p=0.7)), top2.tolist() + [0, 0])
    top3 = full[:3] / full[:3].sum()
    _assert_probs(_probs(logits, RowSampling(temperature=1.0, top_p=0.9)), top3.tolist() + [0])
    # top_p small keeps only the argmax; greedy is one-hot on the argmax.
    assert _probs(logits, RowSampling(temperature=1.0, top_p=0.01)).tolist() == [1.0, 0, 0, 0]
    assert _probs([0.0, 3.0, 1.0], RowSampling()).tolist() == [0.0, 1.0, 0.0]


def test_mixed_rows_keep_their_own_parameters() -> None:
    rows = [RowSampling(), RowSampling(temperature=1.0, top_k=1), RowSampling(temperature=1.0)]
    logits = torch.tensor([[[0.0, 1.0, 0.5]]] * 3)
    probs = probs_from_logits(logits, BatchSampling.build(rows, torch.device("cpu")))
    assert probs[0, 0].tolist() == [0, 1, 0]
    assert probs[1, 0].tolist() == [0, 1, 0]
    _assert_probs(probs[2, 0], torch.softmax(logits[2, 0], -1))


def test_sample_from_inverse_cdf() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]] * 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.999999])
    assert sample_from(probs, u).tolist() == [1, 1, 3, 3]
    one_hot = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    assert sample_from(one_hot, torch.tensor([0.0, 0.9999999])).tolist() == [2, 2]


# ---- n-gram lookup ----------------------------------------------------------------------


# The scanning reference for NgramIndex (what prompt lookup proposes), kept as the oracle.
def ngram_lookup(tokens: list[int], limit: int, max_n: int, min_n: int) -> list[int]:
    """Prompt lookup: match the last n tokens (n from max_n down to min_n) earlier in `tokens`
    and propose up to `limit` tokens that followed the match. Prefers the latest match with
    a full-length continuation, else the earliest (longest continuation). [] on a miss.
    """
    length = len(tokens)
    if limit <= 0 or length < 2:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # windows[i] = arr[i : i + n] for every i with a continuation token (i + n <= length - 1);
        # this excludes the suffix itself.
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == arr[length - n :]).all(axis=1))
        if hits.size:
            full = hits[hits + n + limit <= length]
            start = int(full[-1] if full.size else hits[0]) + n
            return arr[start : start + limit].tolist()
    return []


@pytest.mark.parametrize("max_n,min_n", [(3, 1), (4, 2), (1, 1)])
@pytest.mark.parametrize("seed", range(20))
def test_ngram_index_answers_as_the_reference_while_the_sequence_grows(
    seed: int, max_n: int, min_n: int
) -> None:
    rng = random.Random(seed)
    # Small alphabets (many repeats and many hits) of ids anywhere below 2**32: the index packs
    # n ids into one key, and ids that share low or high bits must not collide.
    alphabet = [rng.randrange(2**32) for _ in range(rng.randint(2, 6))]
    if seed % 2:
        alphabet = [a & ~0xFFFF for a in alphabet] + [a & 0xFFFF for a in alphabet]
    tokens = [rng.choice(alphabet) for _ in range(5)]
    index = NgramIndex(max_n=max_n, min_n=min_n)
    for _ in range(60):
        limit = rng.randint(0, 9)
        expected = ngram_lookup(tokens, limit, max_n=max_n, min_n=min_n)
        assert index.lookup(tokens, limit) == expected, tokens
        # The match length behind the proposal: the longest n whose lookup alone hits.
        lengths = [n for n in range(max_n, min_n - 1, -1) if ngram_lookup(tokens, limit, max_n=n, min_n=n)]
        assert index.matched == (lengths[0] if expected else 0), tokens
        tokens.extend(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
        if rng.random() < 0.3:
            index.extend(tokens)  # as the drafter does while the device runs a pass
        elif rng.random() < 0.3:
            index.extend(tokens, len(tokens) - rng.randint(1, 3))  # part of it (while prefilling)


def test_ngram_index_growth_allocates_nothing_the_cycle_collector_tracks() -> None:
    # Objects the collector tracks and that outlive a pass make Python run full collections
    # of the whole heap mid-decoding; an index of a long generation must add none per token.
    rng = random.Random(0)
    tokens = [rng.randrange(50_000) for _ in range(64)]
    index = NgramIndex(max_n=3, min_n=1)
    index.lookup(tokens, 4)
    gc.disable()
    try:
        before = len(gc.get_objects())
        for _ in range(2000):
            tokens.append(rng.randrange(50_000))
            index.lookup(tokens, 4)
        assert len(gc.get_objects()) - before < 20
    finally:
        gc.enable()


def test_ngram_lookup() -> None:
    # last 3 tokens (1, 2, 3) occurred at the start; propose what followed.
    assert ngram_lookup([1, 2, 3, 4, 5, 6, 1, 2, 3], limit=2, max_n=3, min_n=1) == [4, 5]
    # the proposal never exceeds the limit, may be shorter when the history ends
    assert ngram_lookup([7, 8, 7], limit=5, max_n=3, min_n=1) == [8, 7]
    # a miss proposes nothing
    assert ngram_lookup([1, 2, 3, 4], limit=4, max_n=3, min_n=1) == []
    assert ngram_lookup([1, 2, 3, 1], limit=0, max_n=3, min_n=1) == []
    # min_n = 2: a single-token match is not enough
    assert ngram_lookup([5, 9, 1, 5], limit=2, max_n=3, min_n=2) == []
    # the latest match with a full continuation wins
    assert ngram_lookup([1, 2, 1, 3, 3, 1], limit=1, max_n=1, min_n=1) == [3]


# ---- counters ---------------------------------------------------------------------------


def _proto(stats: SpecDecodeStats, completion: int) -> object:
    identity = RequestIdentity("r", "target", Method.NGRAM, "", "inst")
    timing = RequestTiming(arrival=1.0, admitted=1.5, first_token=2.0, finished=3.0)
    return to_proto(identity, stats, timing, 5, completion, FinishReason.LENGTH, 1_700_000_000.0)


def test_sglang_biased_formula_is_pinned_out() -> None:
    stats = SpecDecodeStats(k=4)
    for _ in range(10):
        stats.record_pass(proposed=4, accepted=2)
    m = _proto(stats, completion=1 + 10 * 3)
    assert_metrics_invariants(m)
    # Old SGLang: (accepted + bs) / (bs * num_draft_tokens), where its num_draft_tokens counts
    # the bonus slot (k + 1 = 5): the bonus token inflates the numerator -> 0.6.
    sglang = (m.accepted_drafts + 10) / (10 * (4 + 1))
    assert sglang == pytest.approx(0.6)
    assert m.accept_rate == 0.5 != sglang
    assert m.accept_length == 3.0
    assert list(m.accept_histogram) == [0, 0, 10, 0, 0]
    assert list(m.proposed_per_position) == [10, 10, 10, 10]
    assert list(m.accepted_per_position) == [10, 10, 0, 0]


def test_proposed_counts_real_proposals_not_configuration() -> None:
    stats = SpecDecodeStats(k=4)
    for proposed, accepted in [(0, 0), (2, 1), (0, 0), (4, 4), (1, 0)]:  # n-gram misses give d_s = 0
        stats.record_pass(proposed, accepted)
    m = _proto(stats, completion=1 + 5 + 5)
    assert_metrics_invariants(m)
    assert m.verify_passes == 5 and m.draft_passes == 3
    assert m.proposed_drafts == 7 != m.verify_passes * 4
    assert m.accepted_drafts == 5
    assert m.accept_rate == pytest.approx(5 / 7)
    assert list(m.accept_histogram) == [1, 1, 0, 0, 1]
    assert list(m.proposed_per_position) == [3, 2, 1, 1]
    assert list(m.accepted_per_position) == [2, 1, 1, 1]


def test_undefined_ratios_are_absent() -> None:
    m = _proto(SpecDecodeStats(k=3), completion=1)
    assert_metrics_invariants(m)
    assert not m.HasField("accept_rate") and not m.HasField("accept_length")
    stats = SpecDecodeStats(k=3)
    stats.record_pass(0, 0)
    m = _proto(stats, completion=2)
    assert not m.HasField("accept_rate") and m.accept_length == 1.0
    assert m.queue_time_seconds == 0.5 and m.time_to_first_token_seconds == 1.0 and m.duration_seconds == 2.0
    assert m.end_time.seconds == 1_700_000_000


def test_bad_pass_is_refused() -> None:
    with pytest.raises(ValueError):
        SpecDecodeStats(k=2).record_pass(proposed=3, accepted=0)
    with pytest.raises(ValueError):
        SpecDecodeStats(k=2).record_pass(proposed=1, accepted=2)


# ---- KV cache ---------------------------------------------------------------------------


@torch.inference_mode()
def test_batched_rows_of_different_lengths_match_full_forward(target) -> None:
    """Rows at different lengths in one forward, padding, and rollback by length reset."""
    runner = ModelRunner(target, max_batch=4, max_len=64)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, target.vocab_size, (n,), generator=gen).tolist() for n in (6, 11, 4)]
    full = [target.model(input_ids=torch.tensor([s])).logits[0] for s in seqs]  # [n, V] each
    # prefill all but the last 3 tokens, each row alone, in slots 1..3 (slot 0 stays empty)
    for i, s in enumerate(seqs):
        runner.forward(i + 1, i + 2, torch.tensor([s[:-3]]), [0])
    # a speculative-style pass: 3 real tokens + 2 garbage tokens per row, rolled back after
    garbage = torch.tensor([[7, 7, 7, 7, 7]] + [s[-3:-2] + [9, 9, 9, 9] for s in seqs])
    runner.forward(0, 4, garbage, [0] + [len(s) - 3 for s in seqs])
    # roll back to len - 2 (keep one real token), then the true continuation overwrites
    ids = torch.tensor([[1, 1]] + [s[-2:] for s in seqs])
    logits = runner.forward(0, 4, ids, [0] + [len(s) - 2 for s in seqs])  # [4, 2, V]
    for i in range(len(seqs)):
        assert_close_up_to_rounding(logits[i + 1], full[i][-2:], what=f"row {i + 1}")


def test_draft_catch_up_batches_similar_backlogs_and_leaves_outliers_to_prepare() -> None:
    """DraftModelDrafter.prepare_rows: one padded forward for rows behind by similar amounts;
    a long backlog among short ones, or rows far apart, are left to prepare() (row by row)."""
    from types import SimpleNamespace

    import torch

    from service.engine.speculation.drafters import DraftModelDrafter, DraftRow

    calls = []
    runner = SimpleNamespace(
        device=torch.device("cpu"),
        forward=lambda lo, hi, ids, starts, last_only=False: calls.append(
            (lo, hi, tuple(ids.shape), list(starts), ids.tolist())
        ),
    )
    drafter = DraftModelDrafter(runner)

    def row(slot: int, behind: int, cached: int = 10) -> SimpleNamespace:
        # tokens: `cached` seen, `behind` unseen, then the pending token (fed by the pass itself)
        drafter.rows[slot] = DraftRow(cached=cached)
        return SimpleNamespace(slot=slot, tokens=list(range(cached + behind + 1)))

    rows = [row(0, 3), row(1, 4), row(2, 200), row(3, 5), row(4, 1, cached=7)]
    drafter.prepare_rows(rows)
    # Slots 0, 1 and 3 in one forward of width 5; slot 2 (200 behind) left to prepare(), and it
    # and slot 4 (not behind) get padding written from their own cached length.
    assert [(lo, hi, shape, starts) for lo, hi, shape, starts, _ in calls] == [
        (0, 4, (4, 5), [10, 10, 10, 10])
    ]
    ids = calls[0][4]
    assert ids[0] == [10, 11, 12, 0, 0] and ids[3] == [10, 11, 12, 13, 14] and ids[2] == [0] * 5
    assert [drafter.rows[seq.slot].cached for seq in rows] == [13, 14, 10, 15, 7]
    assert drafter.catch_ups == 1

    calls.clear()
    far = [row(0, 100), row(31, 100)] + [row(slot, 1) for slot in range(1, 31)]
    drafter.prepare_rows(far)  # 32 rows of padding for 200 tokens: each is fed alone
    assert calls == [] and drafter.rows[0].cached == 10


@pytest.mark.parametrize(
    "temperature, greedy", [(0.0, True), (1e-38, True), (9.99e-6, True), (1e-5, False), (0.7, False)]
)
def test_temperatures_below_the_floor_resolve_to_greedy(temperature: float, greedy: bool) -> None:
    """Below 1e-5, logits / temperature can overflow float32 (NaN probabilities): such a
    request decodes greedily, its limit; from 1e-5 up it samples at its own temperature."""
    from service.engine.api import EngineInfo, GenerationRequest, SamplingParams
    from service.engine.config import EngineConfig
    from service.engine.validation import resolve

    info = EngineInfo(
        "t", "", "cpu", "float32", 4, Method.NGRAM, 4, 8, 64, (Method.NONE, Method.NGRAM), 100, "i"
    )
    request = GenerationRequest("r", (1, 2, 3), sampling=SamplingParams(temperature=temperature, seed=1))
    sampling = resolve(request, EngineConfig(), info).sampling
    assert sampling.greedy is greedy
    assert sampling.temperature == (0.0 if greedy else temperature)


def test_cpu_float32_verify_and_plain_passes_agree_up_to_rounding(target) -> None:
    """Why the README claims CPU float32 exactness only up to ties within rounding: a token's
    logits in a 5-token verify pass are those of five 1-token plain passes up to rounding
    (about 1e-5 on this model), not necessarily bit for bit: the two are different code paths,
    held to the suite's one rounding bound."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, target.vocab_size, (1, 20), generator=gen)
    following = torch.randint(1, target.vocab_size, (1, 5), generator=gen)

    def runner() -> ModelRunner:
        r = ModelRunner(target, 1, 128, 8, use_graphs=False, use_compile=False)
        r.forward(0, 1, prompt, [0], last_only=True)
        return r

    verify = runner().forward(0, 1, following, [20]).clone()  # [1, 5, V]
    plain_runner = runner()
    plain = torch.cat(
        [plain_runner.forward(0, 1, following[:, i : i + 1], [20 + i]).clone() for i in range(5)], dim=1
    )
    assert_close_up_to_rounding(verify, plain, what="verify pass against plain passes")
