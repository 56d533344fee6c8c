"""The engine's pass observers (Engine.add_pass_observer): what benchmarks read instead of the
scheduler's internals. Each step's PassRecord agrees with the requests' own metrics."""

from __future__ import annotations

from service.engine import GenerationRequest, Method, PassRecord
from tests.engine.helpers import run

TEXT = "the fox jumps over the fox and the fox jumps over the dog. the fox"


def _requests(tokenizer) -> list[GenerationRequest]:
    ids = tuple(tokenizer.encode(TEXT, add_special_tokens=False))
    methods = [Method.NONE, Method.NGRAM, Method.DRAFT_MODEL, Method.NGRAM, Method.DRAFT_MODEL]
    return [
        GenerationRequest(f"r{i}", ids[: 8 + 3 * i], max_tokens=12 + i, method=method, num_draft_tokens=3)
        for i, method in enumerate(methods)
    ]


def test_pass_records_add_up_to_the_requests_metrics(make_engine, target, close_draft, tokenizer) -> None:
    engine = make_engine(target, close_draft, start=False, max_batch_size=3, adaptive_draft_length=False)
    records: list[PassRecord] = []
    engine.add_pass_observer(records.append)
    engine.start()
    requests = _requests(tokenizer)
    outs = run(engine, requests)
    metrics = [out.metrics for out in outs.values()]

    decode = [r for r in records if r.rows]
    assert sum(r.admitted for r in records) == len(requests)
    assert sum(r.rows for r in decode) == sum(m.verify_passes for m in metrics)
    assert sum(sum(r.proposed) for r in decode) == sum(m.proposed_drafts for m in metrics) > 0
    assert sum(sum(r.accepted) for r in decode) == sum(m.accepted_drafts for m in metrics) > 0
    assert any(r.prefill_rows for r in records) and any(r.draft_model for r in decode)
    for r in decode:
        assert len(r.methods) == len(r.proposed) == len(r.accepted) == r.rows <= r.span <= 3
        assert r.drafts == max(r.proposed) and all(a <= p for a, p in zip(r.accepted, r.proposed))
        assert r.draft_model == any(m is Method.DRAFT_MODEL and p for m, p in zip(r.methods, r.proposed))
        parts = r.prefill_s + r.plan_s + r.forward_s + r.verify_s + r.absorb_s
        assert min(r.plan_s, r.forward_s, r.verify_s, r.absorb_s) >= 0 and parts <= r.total_s
    for r in records:
        if not r.rows:
            assert r.prefill_rows and r.total_s >= r.prefill_s >= 0


def test_an_observer_that_raises_changes_nothing(make_engine, target, close_draft, tokenizer) -> None:
    quiet = make_engine(target, close_draft, max_batch_size=3, adaptive_draft_length=False)
    want = {rid: out.tokens for rid, out in run(quiet, _requests(tokenizer)).items()}
    engine = make_engine(target, close_draft, start=False, max_batch_size=3, adaptive_draft_length=False)
    calls = []

    def broken(record: PassRecord) -> None:
        calls.append(record)
        raise RuntimeError("observer bug")

    engine.add_pass_observer(broken)
    engine.start()
    got = {rid: out.tokens for rid, out in run(engine, _requests(tokenizer)).items()}
    assert got == want and calls
