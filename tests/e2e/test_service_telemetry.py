"""End to end: the real service (in-process, tiny model, real gRPC clients) reports every
finished request to a real sidecar subprocess (`python -m telemetry`), which exports over
OTLP/gRPC to a receiver built in the test, acknowledging records only after the export that
included them (`--ack-mode export`).

- SIGKILL + restart of the sidecar, twice, while several clients keep sending mixed requests:
  the exported counters, summed over sidecar incarnations, equal the exact sums over every
  request whose final message a client received; nothing is lost, nothing counted twice, and
  no request waited on the sidecar (latency while it was dead vs. while it was up, and the
  duration of every reporter.report() call on the engine thread).
- Sidecar absent at service start: requests are served, then the sidecar starts and the
  counters arrive and equal the sums.
- One request per identity: the SpeculativeMetrics in the client's final message equals,
  field by field, what the sidecar aggregated and exported for it.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import grpc

from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
from tests.e2e.conftest import NGRAM, NONE, Clients, Served, generate
from tests.telemetry.support import attrs_of, expected_totals, wait_for

# Counter series that belong to the requests (the rest are the sidecar's self-metrics).
REQUEST_SERIES = ("specdec.", "gen_ai.")
SELF_PREFIX = "specdec.sidecar."


# ---- helpers ------------------------------------------------------------------------------


def kill_between_exports(sidecar, reporter, delay_s: float = 0.1) -> float:
    """SIGKILL the sidecar ~delay_s after an acknowledgement arrived (so well before its next
    export: EXPORT_INTERVAL_MS is 300), at a moment when the reporter has records in flight
    (sent, aggregated by the sidecar, not yet exported). Returns the kill time (monotonic).

    Why not at a random moment: the one documented window in which records ARE counted twice
    (docs/metrics.md, "Remaining window") is a kill after an export succeeded but before its
    acknowledgements reached the reporter (about a millisecond per export interval); those
    records are resent and counted again by the next incarnation. That is a known limitation
    of ack-after-export without persistent state, not something this test could tolerate with
    an exact comparison, so it avoids that window on purpose (like tests/telemetry/
    test_faults.py) and kills where the guarantee holds: records aggregated but not exported
    must be resent to the next incarnation and counted exactly once."""
    for _ in range(50):
        acked = reporter.stats.acked
        wait_for(lambda: reporter.stats.acked > acked, 10, 0.002, "an acknowledgement")  # noqa: B023
        time.sleep(delay_s)
        if reporter.stats.in_flight > 0:
            sidecar.kill()
            return time.monotonic()
    raise AssertionError("never found records in flight between two exports")


def request_counter_totals(store) -> dict:
    """Exported counters of the request series (self-metrics excluded), summed over sidecar
    incarnations."""
    return {
        k: v
        for k, v in store.counter_totals().items()
        if k[0].startswith(REQUEST_SERIES) and not k[0].startswith(SELF_PREFIX)
    }


def expected_counters(served: list[Served]) -> dict:
    return {k: v for k, v in expected_totals([s.final.metrics for s in served]).items() if "#" not in k[0]}


def diff(got: dict, exp: dict) -> dict:
    """Series whose values differ; a series absent on one side counts as 0 there."""
    keys = set(got) | set(exp)
    return {k: (got.get(k, 0), exp.get(k, 0)) for k in keys if got.get(k, 0) != exp.get(k, 0)}


def wait_for_exact_counters(store, served: list[Served], timeout_s: float = 15.0) -> None:
    exp = expected_counters(served)
    try:
        wait_for(
            lambda: not diff(request_counter_totals(store), exp),
            timeout_s,
            0.1,
            "exported counters to equal the sums over the served requests",
        )
    except AssertionError:
        bad = diff(request_counter_totals(store), exp)
        raise AssertionError(
            f"{len(bad)} series differ (got, expected): {dict(sorted(bad.items(), key=str)[:20])}"
        ) from None


def check_sidecar_self_metrics(store, n: int) -> None:
    got = store.counter_totals()
    assert got[("specdec.sidecar.records.aggregated", frozenset())] == n
    rejected = sum(v for (name, _), v in got.items() if name == "specdec.sidecar.records.rejected")
    assert rejected == 0
    assert got[("specdec.sidecar.service_dropped_records", frozenset())] == 0


def check_duration_histogram(store, served: list[Served]) -> None:
    hist = store.histogram_totals()
    count = sum(c for (name, _), (c, *_r) in hist.items() if name == "gen_ai.server.request.duration")
    total = sum(s for (name, _), (_c, s, *_r) in hist.items() if name == "gen_ai.server.request.duration")
    assert count == len(served)
    assert math.isclose(total, sum(s.final.metrics.duration_seconds for s in served), rel_tol=1e-9)


def sidecar_ids(store) -> set[str]:
    """service.instance.id of every sidecar incarnation that exported (SidecarProcess gives
    each start its own id; a counter's start time is per series, not per incarnation)."""
    return {instance for instance, _start in store.incarnations()}


def keep_serving(clients, min_s: float, min_requests: int, timeout_s: float = 60.0) -> None:
    """Let the clients run for at least min_s and until min_requests more requests finished
    (a time-only wait would make the counts below depend on how busy the shared CPU is)."""
    start = clients.count()
    time.sleep(min_s)
    wait_for(
        lambda: clients.count() - start >= min_requests or clients.errors,
        timeout_s,
        0.02,
        f"{min_requests} more requests served",
    )


def within(served: list[Served], start: float, end: float) -> list[Served]:
    return [s for s in served if s.start >= start and s.end <= end]


def outside(served: list[Served], windows: list[tuple[float, float]], after: float) -> list[Served]:
    return [s for s in served if s.start >= after and all(s.end < a or s.start > b for a, b in windows)]


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- a. SIGKILL + restart while serving -----------------------------------------------------


def test_sigkill_restart_of_the_sidecar_while_serving(start_service, sidecar, otlp_receiver):
    sidecar.start()
    service = start_service()
    reporter = service.service.reporter
    clients = Clients(service.address, n=4, seed=1).start()
    dead: list[tuple[float, float]] = []  # (killed at, restart began at)
    restarting: list[tuple[float, float]] = []  # (restart began at, reconnected + 0.3 s)
    try:
        wait_for(lambda: reporter.stats.acked >= 20, 60, 0.02, "the first acknowledgements")
        warm = time.monotonic()
        keep_serving(clients, 1.0, 30)
        for _ in range(2):
            killed = kill_between_exports(sidecar, reporter)
            st_killed = reporter.stats
            assert st_killed.in_flight > 0  # aggregated by the dead sidecar, never exported
            # dead: the service keeps serving (or wait_for times out), the reporter buffers
            keep_serving(clients, 1.5, 30)
            st_dead = reporter.stats
            assert st_dead.acked == st_killed.acked and not st_dead.connected
            assert st_dead.pending > st_killed.pending  # new records wait in the buffer
            began = time.monotonic()
            dead.append((killed, began))
            sidecar.start()
            wait_for(
                lambda: reporter.stats.acked > st_dead.acked,  # noqa: B023
                20,
                0.01,
                "acknowledgements from the restarted sidecar",
            )
            time.sleep(0.3)
            restarting.append((began, time.monotonic()))
        keep_serving(clients, 1.0, 30)
    finally:
        served = clients.stop()
    assert not clients.errors, clients.errors[:3]
    assert reporter.flush(30), reporter.stats
    st = reporter.stats
    n = len(served)
    # every request the clients got a final message for was reported once, none dropped
    assert len(service.timed.durations) == n
    assert st.dropped == 0 and st.acked == st.last_sequence == n, st
    assert st.reconnects >= 2

    # the exported counters: exact sums over the served requests, over 3 incarnations
    store = otlp_receiver.store
    wait_for_exact_counters(store, served)
    assert sidecar_ids(store) == {f"sidecar-test-{sidecar.port}-{i}" for i in (1, 2, 3)}
    check_sidecar_self_metrics(store, n)
    check_duration_histogram(store, served)
    methods = {s.final.metrics.method for s in served}
    assert methods == {NGRAM, NONE}
    assert sum(s.final.metrics.accepted_drafts for s in served) > 0

    # no request waited on the sidecar
    up = [s.latency for s in outside(served, dead + restarting, after=warm)]
    down = [s.latency for a, b in dead for s in within(served, a, b)]
    assert len(up) >= 20 and len(down) >= 20, (len(up), len(down))
    print(
        f"\n{n} requests; latency up: median {statistics.median(up) * 1e3:.1f} ms, "
        f"p99 {p(up, 0.99) * 1e3:.1f} ms, max {max(up) * 1e3:.1f} ms ({len(up)}); "
        f"sidecar dead: median {statistics.median(down) * 1e3:.1f} ms, "
        f"p99 {p(down, 0.99) * 1e3:.1f} ms, max {max(down) * 1e3:.1f} ms ({len(down)}); "
        f"report() max {max(service.timed.durations) * 1e6:.0f} us"
    )
    # The reporter's reconnect backoff (0.1 s .. 5 s) or a gRPC connect attempt would show up
    # as whole seconds; 2 shared CPU cores make a few tens of ms of noise.
    assert statistics.median(down) <= 2 * statistics.median(up) + 0.05
    assert max(down) <= max(3 * p(up, 0.99), 1.0)
    # report() runs on the engine thread for every finished request: it never did I/O
    assert max(service.timed.durations) < 0.1, max(service.timed.durations)


# ---- b. sidecar absent at service start ----------------------------------------------------


def test_sidecar_absent_at_service_start(start_service, sidecar, otlp_receiver):
    service = start_service()  # the sidecar is not running
    reporter = service.service.reporter
    clients = Clients(service.address, n=3, seed=2).start()
    try:
        keep_serving(clients, 2.0, 30)  # requests must be served without a sidecar
        absent = list(clients.served)
        st = reporter.stats
        assert st.acked == 0 and not st.connected and st.reconnects >= 1
        assert st.pending == st.last_sequence >= len(absent)  # all buffered, none dropped
        assert not otlp_receiver.store.requests
        started = time.monotonic()
        sidecar.start()
        wait_for(lambda: reporter.stats.acked > 0, 20, 0.01, "the first acknowledgement")
        acked_at = time.monotonic()
        first_ack_s = acked_at - started
        keep_serving(clients, 1.0, 30)
    finally:
        served = clients.stop()
    assert not clients.errors, clients.errors[:3]
    latencies = [s.latency for s in absent]
    up = [s.latency for s in served if s.start >= acked_at]
    print(
        f"\n{len(absent)} requests served with no sidecar (median "
        f"{statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms); "
        f"with the sidecar up: median {statistics.median(up) * 1e3:.1f} ms, "
        f"max {max(up) * 1e3:.1f} ms; first acknowledgement {first_ack_s:.2f} s after the "
        f"sidecar was up; {len(served)} requests in all"
    )
    assert len(absent) >= 30 and len(up) >= 20
    assert statistics.median(latencies) <= 2 * statistics.median(up) + 0.05
    assert max(latencies) <= max(3 * p(up, 0.99), 1.0)
    assert reporter.flush(30), reporter.stats
    st = reporter.stats
    assert st.dropped == 0 and st.acked == st.last_sequence == len(served)
    store = otlp_receiver.store
    wait_for_exact_counters(store, served)
    assert sidecar_ids(store) == {f"sidecar-test-{sidecar.port}-1"}
    check_sidecar_self_metrics(store, len(served))
    check_duration_histogram(store, served)


# ---- c. the client's final metrics == what the sidecar aggregated -----------------------------

# SpeculativeMetrics fields and where each one shows up in the export. A field added to the
# proto must be added here (the test fails otherwise), either with its series or as not
# exported, with the reason.
NOT_EXPORTED = {
    "request_id": "per-request identifier (unbounded cardinality); in the service's log line",
    "instance_id": "not a point attribute (docs/metrics.md: cardinality); logged on rejection",
    "finish_reason": "not an attribute; it decides whether TTFT/TPOT are recorded",
    "queue_time_seconds": "no exported series",
    "end_time": "no exported series",
}
IDENTITY = {"target_model", "method", "draft_model", "num_draft_tokens"}  # the attributes


def one_request(stub, text: str, max_tokens: int, method: int, k: int | None = None):
    req = generation_pb2.GenerateRequest(request_id=f"one-{method}-{k}", text=text, max_tokens=max_tokens)
    req.sampling.temperature = 0.0
    req.speculation.method = method
    if k is not None:
        req.speculation.num_draft_tokens = k
    return generate(stub, req)


def test_final_metrics_equal_what_the_sidecar_aggregated(start_service, sidecar, otlp_receiver):
    sidecar.start()
    service = start_service()
    with grpc.insecure_channel(service.address) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        # one request per attribute set, so each exported series is that one request
        spec = one_request(stub, "a a a a a a a a", 24, NGRAM, 3)
        plain = one_request(stub, "The quick brown fox", 9, NONE)
    assert service.service.reporter.flush(30)
    store = otlp_receiver.store
    wait_for_exact_counters(store, [spec, plain])
    counters = store.counter_totals()
    hists = store.histogram_totals()
    gauges = store.gauges()
    assert spec.final.metrics.accepted_drafts > 0  # a request where drafts were accepted
    assert list(spec.final.metrics.accept_histogram)[1:] != [0, 0, 0]

    for served in (spec, plain):
        final, m = served.final, served.final.metrics
        a = attrs_of(m)
        attrs = dict(a)
        seen: set[str] = set()
        # identity -> the point attributes of every series
        assert attrs == {
            "gen_ai.request.model": m.target_model,
            "specdec.method": {NGRAM: "ngram", NONE: "none"}[m.method],
            "specdec.draft_model": m.draft_model,
            "specdec.num_draft_tokens": m.num_draft_tokens,
        }
        assert m.target_model == Path(service.config.model).name  # served by name, never by path
        seen |= IDENTITY
        # scalar counters
        assert counters[("specdec.requests", a)] == 1
        for field, series in (
            ("prompt_tokens", "specdec.prompt_tokens"),
            ("completion_tokens", "specdec.completion_tokens"),
            ("verify_passes", "specdec.verify_passes"),
            ("draft_passes", "specdec.draft_passes"),
            ("proposed_drafts", "specdec.proposed_drafts"),
            ("accepted_drafts", "specdec.accepted_drafts"),
        ):
            assert counters[(series, a)] == getattr(m, field), (field, m)
            seen.add(field)
        assert m.prompt_tokens == final.prompt_tokens
        assert m.completion_tokens == final.completion_tokens
        assert m.finish_reason == final.finish_reason == metrics_pb2.FINISH_REASON_LENGTH
        # per-position counters and passes by accepted count
        k = m.num_draft_tokens
        assert [counters[("specdec.position.proposed", a | {("position", i)})] for i in range(k)] == list(
            m.proposed_per_position
        )
        assert [counters[("specdec.position.accepted", a | {("position", i)})] for i in range(k)] == list(
            m.accepted_per_position
        )
        if k:
            assert [
                counters[("specdec.draft_passes_by_accepted", a | {("accepted", j)})] for j in range(k + 1)
            ] == list(m.accept_histogram)
        else:  # k = 0: no passes-by-accepted series (histogram is [0] by the contract)
            assert list(m.accept_histogram) == [0]
            assert not [
                key
                for key in counters
                if key[0] == "specdec.draft_passes_by_accepted" and ("specdec.num_draft_tokens", 0) in key[1]
            ]
        seen |= {"proposed_per_position", "accepted_per_position", "accept_histogram"}

        # per-request ratio and latency histograms: one value each, exactly the record's
        def one(name: str):
            count, total, *_ = hists[(name, a)]  # noqa: B023
            assert count == 1, name
            return total

        if m.HasField("accept_rate"):
            assert one("specdec.request.accept_rate") == m.accept_rate
            assert gauges[("specdec.window.accept_rate", a)] == m.accept_rate
        else:
            assert ("specdec.request.accept_rate", a) not in hists
            assert ("specdec.window.accept_rate", a) not in gauges
        assert one("specdec.request.accept_length") == m.accept_length
        assert math.isclose(gauges[("specdec.window.accept_length", a)], m.accept_length, rel_tol=1e-12)
        assert one("gen_ai.server.request.duration") == m.duration_seconds
        assert one("gen_ai.server.time_to_first_token") == m.time_to_first_token_seconds
        assert math.isclose(
            one("gen_ai.server.time_per_output_token"),
            (m.duration_seconds - m.time_to_first_token_seconds) / (m.completion_tokens - 1),
            rel_tol=1e-12,
        )
        seen |= {"accept_rate", "accept_length", "duration_seconds", "time_to_first_token_seconds"}
        fields = {f.name for f in metrics_pb2.SpeculativeMetrics.DESCRIPTOR.fields}
        assert fields == seen | set(NOT_EXPORTED), fields ^ (seen | set(NOT_EXPORTED))

    # nothing else was exported for these requests
    assert {key for key in request_counter_totals(store)} <= set(expected_counters([spec, plain]))
