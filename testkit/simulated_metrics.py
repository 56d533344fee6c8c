"""Random *valid* SpeculativeMetrics records from a per-pass simulation: every contract
invariant (docs/metrics-contract.md) holds by construction."""

from __future__ import annotations

import random

from specdec.v1 import metrics_pb2

# (target_model, method, draft_model, k)
IDENTITIES = (
    ("tgt-a", metrics_pb2.SPECULATION_METHOD_NGRAM, "", 4),
    ("tgt-a", metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL, "draft-x", 3),
    ("tgt-b", metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL, "draft-y", 5),
    ("tgt-b", metrics_pb2.SPECULATION_METHOD_NONE, "", 0),
)


def simulate_metrics(
    rng: random.Random,
    identity=None,
    *,
    instance_id: str = "svc",
    request_id: str | None = None,
    passes: int | None = None,
) -> metrics_pb2.SpeculativeMetrics:
    """A record built pass by pass, so every contract invariant holds by construction."""
    target, method, draft, k = identity or rng.choice(IDENTITIES)
    n_passes = rng.randint(0, 24) if passes is None else passes
    hist, pp, ap = [0] * (k + 1), [0] * k, [0] * k
    verify = draft_passes = proposed = accepted = 0
    p_accept = rng.uniform(0.2, 0.95)
    for _ in range(n_passes):
        verify += 1
        d = 0 if not k or rng.random() < 0.1 else (k if rng.random() < 0.6 else rng.randint(1, k))
        a = 0
        while a < d and rng.random() < p_accept:
            a += 1
        if d:
            draft_passes += 1
            hist[a] += 1
            for i in range(d):
                pp[i] += 1
            for i in range(a):
                ap[i] += 1
        proposed += d
        accepted += a
    bound = 1 + verify + accepted
    completion = bound if rng.random() < 0.8 else rng.randint(0, bound)
    queue = rng.uniform(0.0, 0.05)
    m = metrics_pb2.SpeculativeMetrics(
        request_id=request_id or f"req-{rng.getrandbits(48):012x}",
        target_model=target,
        method=method,
        draft_model=draft,
        num_draft_tokens=k,
        instance_id=instance_id,
        verify_passes=verify,
        draft_passes=draft_passes,
        proposed_drafts=proposed,
        accepted_drafts=accepted,
        accept_histogram=hist,
        proposed_per_position=pp,
        accepted_per_position=ap,
        prompt_tokens=rng.randint(1, 2000),
        completion_tokens=completion,
        finish_reason=rng.choice([1, 1, 1, 2, 3, 4, 5]),
        queue_time_seconds=queue,
    )
    if proposed:
        m.accept_rate = accepted / proposed
    if verify:
        m.accept_length = (accepted + verify) / verify
    ttft = queue + rng.uniform(0.001, 0.5)
    duration = ttft + completion * rng.uniform(0.005, 0.05)
    if completion:
        m.time_to_first_token_seconds = ttft
    m.duration_seconds = duration
    m.end_time.GetCurrentTime()
    return m
