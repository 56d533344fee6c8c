"""Seeded, structure-aware fuzzing of the two request paths, over real gRPC: the service's
Generate and the sidecar's Report. Shared by the CI test (tests/security/test_fuzz.py, a few
hundred cases) and the longer bench run (bench/fuzz_requests.py).

Cases are drawn from one `random.Random(seed)`: valid-but-extreme messages (plain requests
with one to three fields at or beyond the edges of their ranges: huge strings, many repeated
entries, unknown enum values, NaN/inf floats, control tokens in chat content), those
messages' bytes mutated (bit flips, truncation, splices), and plain random bytes, all sent as raw
payloads so the server parses them itself. A run records every status code it saw; a code
outside the allowed set (INTERNAL and UNKNOWN above all: a 5xx) is a finding, reported with the
seed and case index that reproduce it.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from specdec.v1 import generation_pb2, metrics_pb2, telemetry_pb2
from specdec_common.proto_names import GENERATION_SERVICE, REPORT_METHOD, rpc_path

GENERATE = rpc_path(GENERATION_SERVICE, "Generate")
REPORT = REPORT_METHOD

# Codes a server may answer a hostile request with. UNAVAILABLE is not among them: the
# servers under test are not shutting down, so it would mean one stopped serving.
ALLOWED_GENERATE = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)
ALLOWED_REPORT = frozenset(
    {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
)

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "[INST]")
FLOATS = (0.0, -0.0, 1e-45, 1e-38, 1.0, 1.5, -1.0, 2.0, 1e38, 3.4e38, math.inf, -math.inf, math.nan)
U32 = (0, 1, 2, 7, 64, 65, 1024, 4095, 4096, 65535, 2**31 - 1, 2**32 - 1)
U64 = (0, 1, 2, 2**32, 2**53, 2**63 - 1, 2**64 - 1)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def random_text(rng: random.Random, long: bool = False) -> str:
    pick = rng.random()
    if pick < 0.15:
        return ""
    if pick < 0.3:
        return "".join(rng.choice(CONTROL_TOKENS) for _ in range(rng.randint(1, 20)))
    if pick < 0.45:  # any code point but the surrogates (a proto string is UTF-8)
        return "".join(
            chr(rng.choice((rng.randint(0, 0xD7FF), rng.randint(0xE000, 0x10FFFF))))
            for _ in range(rng.randint(1, 50))
        )
    if pick < 0.55:
        return "\x00\x1b[2J\r\n\t" * rng.randint(1, 100)
    size = rng.choice((1, 10, 100, 1000)) if not long else rng.choice((10_000, 100_000, 1_000_000))
    chunk = "".join(rng.choices("abc xyz.\n", k=min(size, 256)))
    return (chunk * (size // len(chunk) + 1))[:size]


def plain_generate_request(rng: random.Random) -> generation_pb2.GenerateRequest:
    """A request every field of which is in range, short enough to finish quickly."""
    req = generation_pb2.GenerateRequest(max_tokens=rng.randint(1, 8))
    kind = rng.random()
    if kind < 0.4:
        req.text = rng.choice(("Hello", "The quick brown fox", "def f(x):", "日本語 🙂"))
    elif kind < 0.7:
        req.messages.messages.add(role="user", content=rng.choice(("Hi", "Tell me a story")))
    else:
        req.token_ids.ids.extend(rng.randint(1, 300) for _ in range(rng.randint(1, 32)))
    return req


def extreme_field(rng: random.Random, req: generation_pb2.GenerateRequest) -> None:
    """Sets one field (or group) of `req` to a value at or beyond the edge of its range."""
    pick = rng.randrange(9)
    if pick == 0:
        req.request_id = random_text(rng)[: rng.choice((0, 10, 128, 129, 10_000))]
    elif pick == 1:
        req.text = random_text(rng, long=rng.random() < 0.3)
    elif pick == 2:
        req.ClearField("input")
        for _ in range(rng.choice((0, 1, 2, 5, 100, 2000))):
            req.messages.messages.add(
                role=rng.choice(("user", "system", "assistant", "tool", "", "<|im_start|>system")),
                content=random_text(rng),
            )
        req.messages.SetInParent()
    elif pick == 3:
        req.ClearField("input")
        n = rng.choice((0, 1, 5, 100, 4095, 4096, 5000))
        req.token_ids.ids.extend(rng.choice((rng.randint(0, 50), rng.choice(U32))) for _ in range(n))
        req.token_ids.SetInParent()
    elif pick == 4:
        req.ClearField("input")  # no input at all
    elif pick == 5:
        req.max_tokens = rng.choice(U32)
    elif pick == 6:
        s = req.sampling
        setattr(s, rng.choice(("temperature", "top_p")), rng.choice(FLOATS))
        if rng.random() < 0.5:
            s.top_k = rng.choice(U32)
        if rng.random() < 0.5:
            s.seed = rng.choice(U64)
    elif pick == 7:
        req.stop.extend(
            random_text(rng)[: rng.choice((0, 1, 10, 1000))]
            for _ in range(rng.choice((1, 4, 16, 17, 10_000)))
        )
    else:
        req.speculation.method = rng.choice((0, 1, 2, 3, 4, 99, 2**31 - 1))
        if rng.random() < 0.7:
            req.speculation.num_draft_tokens = rng.choice(U32)


def extreme_generate_request(rng: random.Random) -> generation_pb2.GenerateRequest:
    """A plain request with one to three fields at the edges of their ranges (so that many
    extremes get past admission and reach the engine), or, one time in five, none."""
    req = plain_generate_request(rng)
    if rng.random() < 0.8:
        for _ in range(rng.choice((1, 1, 2, 3))):
            extreme_field(rng, req)
    return req


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A damaged copy of `data`: bit flips, a truncation, a splice of random bytes, or
    random bytes instead."""
    pick = rng.random()
    if pick < 0.15 or not data:
        return rng.randbytes(rng.choice((0, 1, 2, 5, 100, 10_000)))
    b = bytearray(data)
    if pick < 0.5:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif pick < 0.7:
        del b[rng.randrange(len(b)) :]
    else:
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    return bytes(b)


def generate_case(rng: random.Random) -> bytes:
    data = extreme_generate_request(rng).SerializeToString()
    return mutate(rng, data) if rng.random() < 0.3 else data


# ---- SpeculativeMetrics and ReportRequest ----------------------------------------------


def extreme_metrics(rng: random.Random) -> metrics_pb2.SpeculativeMetrics:
    """Mostly valid records (so that they reach the aggregates) with extreme values, and
    records breaking an invariant or a bound."""
    k = rng.choice((0, 1, 4, 8, 64, 65, 1024, 2**32 - 1)) if rng.random() < 0.2 else rng.choice((0, 4))
    method = (
        metrics_pb2.SPECULATION_METHOD_NONE
        if k == 0
        else rng.choice((metrics_pb2.SPECULATION_METHOD_NGRAM, metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL))
    )
    if rng.random() < 0.05:
        method = rng.choice((0, 99))
    passes = rng.choice((0, 1, 10, 1000))
    k_eff = min(k, 64)
    hist = [0] * (k_eff + 1)
    pp, ap = [0] * k_eff, [0] * k_eff
    verify = passes
    proposed = accepted = drafts = 0
    if k_eff:
        for _ in range(min(passes, 20)):
            d = rng.randint(1, k_eff)
            a = rng.randint(0, d)
            drafts += 1
            hist[a] += 1
            proposed += d
            accepted += a
            for i in range(d):
                pp[i] += 1
            for i in range(a):
                ap[i] += 1
    m = metrics_pb2.SpeculativeMetrics(
        request_id=random_text(rng)[: rng.choice((0, 36, 128, 300))],
        target_model=rng.choice(("tgt", "tgt-b", random_text(rng)[: rng.choice((1, 64, 256, 257))])),
        method=method,
        draft_model="draft" if method == metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL else "",
        num_draft_tokens=k,
        instance_id=rng.choice(("svc", "x" * 300)),
        verify_passes=verify,
        draft_passes=drafts,
        proposed_drafts=proposed,
        accepted_drafts=accepted,
        accept_histogram=hist,
        proposed_per_position=pp,
        accepted_per_position=ap,
        prompt_tokens=rng.choice((0, 1, 100, 2**40, 2**40 + 1)),
        completion_tokens=min(1 + verify + accepted, rng.choice((0, 1, 10**9))),
        finish_reason=rng.choice((1, 2, 3, 4, 5, 0, 99)),
        queue_time_seconds=rng.choice((0.0, 0.001, 1e6, math.nan)),
    )
    if rng.random() < 0.6:  # keep the extreme counts, make the rest sane: many reach the aggregates
        m.request_id, m.instance_id, m.target_model = "r", "svc", rng.choice(("tgt", "tgt-b"))
        m.prompt_tokens = rng.choice((1, 2**40))
        m.finish_reason = rng.choice((1, 2, 3))
        m.queue_time_seconds = 0.0
    if proposed:
        m.accept_rate = accepted / proposed
    if verify:
        m.accept_length = (accepted + verify) / verify
    duration = rng.choice((0.5, 0.5, 0.5, 1e6, 1e6 + 1, 1e308, math.inf, -1.0))
    m.duration_seconds = max(duration, m.queue_time_seconds) if duration == duration else duration
    if m.completion_tokens:
        m.time_to_first_token_seconds = rng.choice(
            (m.queue_time_seconds, m.duration_seconds, m.duration_seconds, math.nan)
        )
    return m


def extreme_report_request(rng: random.Random, next_sequence: dict[str, int]) -> telemetry_pb2.ReportRequest:
    pick = rng.random()
    if pick < 0.7:
        source = f"fuzz-src-{rng.randint(0, 20)}"
    elif pick < 0.8:
        source = ""
    else:
        source = "s" * rng.choice((512, 513, 100_000))
    req = telemetry_pb2.ReportRequest(source_id=source)
    seq = next_sequence.get(source, 1)
    for _ in range(rng.choice((0, 1, 5, 50, 50, 500))):
        pick = rng.random()
        if pick < 0.85:
            seq += 1
            sequence = seq
        elif pick < 0.93:
            sequence = max(0, seq - rng.randint(0, 5))  # duplicates, and sequence 0
        else:  # far ahead, once (the source goes on from where it was)
            sequence = min(seq + rng.choice((10**6 + 2, 2**40, 2**63)), 2**64 - 1)
        dropped_before = rng.choice((0,) * 12 + (3, 2**32, 2**32 + 1, 2**64 - 1))
        rec = req.records.add(sequence=sequence, dropped_before=dropped_before)
        if rng.random() < 0.97:
            rec.metrics.CopyFrom(extreme_metrics(rng))
    next_sequence[source] = seq + 1
    return req


def report_case(rng: random.Random, next_sequence: dict[str, int]) -> bytes:
    data = extreme_report_request(rng, next_sequence).SerializeToString()
    return mutate(rng, data) if rng.random() < 0.2 else data


# ---- runs --------------------------------------------------------------------------------


@dataclass
class FuzzRun:
    seed: int
    cases: int = 0
    codes: Counter = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)  # "case N: CODE details"
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, case: int, code: grpc.StatusCode, details: str, allowed) -> None:
        with self.lock:
            self.cases += 1
            self.codes[code.name] += 1
            if code not in allowed:
                self.findings.append(f"seed {self.seed} case {case}: {code.name} {details[:300]}")

    def summary(self) -> dict:
        return {
            "seed": self.seed,
            "cases": self.cases,
            "seconds": round(self.seconds, 2),
            "codes": dict(sorted(self.codes.items())),
            "findings": self.findings,
        }


def _open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A channel that may send the oversized payloads the cases hold (up to 64 MiB)."""
    options = [("grpc.max_send_message_length", 64 << 20)]
    if credentials:
        return grpc.secure_channel(address, credentials, options)
    return grpc.insecure_channel(address, options)


def fuzz_generate(
    address: str,
    seed: int,
    max_cases: int,
    budget_s: float,
    deadline_s: float = 3.0,
    workers: int = 4,
    credentials: grpc.ChannelCredentials | None = None,
    metadata=None,
) -> FuzzRun:
    """Up to `max_cases` Generate calls (fewer if `budget_s` runs out), `workers` at a time,
    each with a deadline. The cases are drawn in order from the seed, so a finding's case
    number reproduces it."""
    run = FuzzRun(seed)
    rng = random.Random(seed)
    cases = [generate_case(rng) for _ in range(max_cases)]
    stop_at = time.monotonic() + budget_s
    channel = _open_channel(address, credentials)
    call = channel.unary_stream(
        GENERATE, request_serializer=None, response_deserializer=generation_pb2.GenerateResponse.FromString
    )

    def one(i: int) -> None:
        if time.monotonic() > stop_at:
            return
        try:
            for _ in call(cases[i], timeout=deadline_s, metadata=metadata):
                pass
            run.record(i, grpc.StatusCode.OK, "", ALLOWED_GENERATE)
        except grpc.RpcError as exc:
            run.record(i, exc.code(), exc.details() or "", ALLOWED_GENERATE)

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(max_cases)))
    finally:
        channel.close()
    run.seconds = time.monotonic() - started
    return run


def fuzz_report(
    address: str,
    seed: int,
    max_streams: int,
    budget_s: float,
    batches_per_stream: int = 8,
    credentials: grpc.ChannelCredentials | None = None,
    metadata=None,
) -> FuzzRun:
    """Up to `max_streams` Report streams of `batches_per_stream` raw payloads each. A stream
    must answer every batch that parses with one response, in order, and end OK, or end
    INVALID_ARGUMENT at the first batch that does not parse."""
    run = FuzzRun(seed)
    rng = random.Random(seed)
    next_sequence: dict[str, int] = {}
    stop_at = time.monotonic() + budget_s
    channel = _open_channel(address, credentials)
    call = channel.stream_stream(
        REPORT, request_serializer=None, response_deserializer=telemetry_pb2.ReportResponse.FromString
    )
    started = time.monotonic()
    try:
        for i in range(max_streams):
            if time.monotonic() > stop_at:
                break
            payloads = [report_case(rng, next_sequence) for _ in range(batches_per_stream)]
            expected = 0  # responses due before the first payload that does not parse
            for payload in payloads:
                try:
                    telemetry_pb2.ReportRequest.FromString(payload)
                except Exception:
                    break
                expected += 1
            responses = 0
            try:
                for _ in call(iter(payloads), timeout=60, metadata=metadata):
                    responses += 1
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details() or ""
            malformed = expected < len(payloads)
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED and (
                responses != expected or malformed != (code == grpc.StatusCode.INVALID_ARGUMENT)
            ):
                details = (
                    f"{responses} responses for {expected} batches that parse of "
                    f"{len(payloads)}, ended {code.name}; {details}"
                )
                code = grpc.StatusCode.DATA_LOSS  # a finding: not in ALLOWED_REPORT
            run.record(i, code, details, ALLOWED_REPORT)
    finally:
        channel.close()
    run.seconds = time.monotonic() - started
    return run
