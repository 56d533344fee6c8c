"""GenerationService over real gRPC on loopback: streaming, concurrency, cancellation,
deadlines, errors, queue overflow, server info."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from specdec.v1 import generation_pb2, metrics_pb2
from tests.support.metrics_invariants import assert_metrics_invariants, assert_stream_provenance

NGRAM = metrics_pb2.SPECULATION_METHOD_NGRAM
NONE = metrics_pb2.SPECULATION_METHOD_NONE
PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


def request(
    text: str = PROMPT, max_tokens: int = 24, method: int = 0, k: int | None = None, **kwargs
) -> generation_pb2.GenerateRequest:
    req = generation_pb2.GenerateRequest(text=text, max_tokens=max_tokens, **kwargs)
    if method:
        req.speculation.method = method
    if k is not None:
        req.speculation.num_draft_tokens = k
    return req


def collect(stub, req, timeout: float = 120):
    chunks, final, request_ids = [], None, set()
    for response in stub.Generate(req, timeout=timeout):
        request_ids.add(response.request_id)
        assert final is None, "nothing may follow the final message"
        if response.HasField("chunk"):
            chunks.append(response.chunk)
        else:
            final = response.final
    assert final is not None, "the stream must end with a final message"
    assert len(request_ids) == 1
    assert_stream_provenance(chunks, final.metrics)
    return chunks, final, request_ids.pop()


def test_streams_chunks_then_one_final_with_metrics(run_service, make_stub) -> None:
    service = run_service()
    stub = make_stub(service.address)
    chunks, final, request_id = collect(stub, request(request_id="req-1", method=NGRAM, k=3))
    assert request_id == "req-1"
    token_ids = [t for c in chunks for t in c.token_ids]
    assert len(token_ids) == final.completion_tokens > 0
    assert all(c.token_ids for c in chunks)
    tokenizer = service.service.servicer.tokenizer
    # The chunks' text, joined, is exactly the detokenized completion (no split characters).
    assert "".join(c.text for c in chunks) == tokenizer.decode(token_ids, skip_special_tokens=True)
    assert final.finish_reason in (metrics_pb2.FINISH_REASON_LENGTH, metrics_pb2.FINISH_REASON_EOS)
    m = final.metrics
    assert m.request_id == "req-1" and m.instance_id == "test-instance"
    assert m.method == NGRAM and m.num_draft_tokens == 3
    assert m.prompt_tokens == final.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])
    assert m.completion_tokens == final.completion_tokens
    assert_metrics_invariants(m)


def test_generates_a_request_id_when_empty(run_service, make_stub) -> None:
    stub = make_stub(run_service().address)
    _, final, request_id = collect(stub, request(max_tokens=4))
    assert len(request_id) >= 16 and final.metrics.request_id == request_id


def test_chat_messages_and_token_ids_inputs(run_service, make_stub) -> None:
    service = run_service()
    stub = make_stub(service.address)
    tokenizer = service.service.servicer.tokenizer
    chat = generation_pb2.GenerateRequest(max_tokens=4)
    chat.messages.messages.add(role="user", content="hello there")
    _, final, _ = collect(stub, chat)
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello there"}], tokenize=False, add_generation_prompt=True
    )
    assert final.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    ids = generation_pb2.GenerateRequest(max_tokens=4)
    ids.token_ids.ids.extend([5, 6, 7, 8, 9])
    _, final, _ = collect(stub, ids)
    assert final.prompt_tokens == 5


def test_sixteen_concurrent_clients_get_their_solo_output(run_service, make_stub) -> None:
    service = run_service(max_batch_size=4, max_queue_size=32)
    stub = make_stub(service.address)
    prompts = [f"{PROMPT} number {i}" + " over the lazy dog" * (i % 3) for i in range(16)]
    methods = [NGRAM, NONE]
    requests = [
        request(text=p, max_tokens=12 + i % 5, method=methods[i % 2], k=1 + i % 4)
        for i, p in enumerate(prompts)
    ]
    solo = [[t for c in collect(stub, r)[0] for t in c.token_ids] for r in requests]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: collect(stub, r), requests))
    for i, (chunks, final, _) in enumerate(together):
        assert [t for c in chunks for t in c.token_ids] == solo[i], f"request {i} differs"
        assert_metrics_invariants(final.metrics)


def test_cancel_mid_stream_frees_the_slot(run_service, make_stub) -> None:
    service = run_service(max_batch_size=1)
    stub = make_stub(service.address)
    finals = []
    service.service.servicer._on_final = _spy(service.service.servicer._on_final, finals)
    call = stub.Generate(request(max_tokens=4000, method=NONE, stop=[]), timeout=120)
    next(call)  # the first chunk arrived: the request holds the only slot
    call.cancel()
    started = time.monotonic()
    _, final, _ = collect(stub, request(max_tokens=4))  # runs only once the slot is free
    assert final.completion_tokens > 0
    assert time.monotonic() - started < 60
    cancelled = [f for f in finals if f.finish_reason.name == "CANCELLED"]
    assert len(cancelled) == 1, finals
    assert cancelled[0].completion_tokens < 4000
    assert_metrics_invariants(cancelled[0].metrics)


def test_deadline_frees_the_slot(run_service, make_stub) -> None:
    service = run_service(max_batch_size=1)
    stub = make_stub(service.address)
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, request(max_tokens=4000, method=NONE), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, final, _ = collect(stub, request(max_tokens=4), timeout=60)
    assert final.completion_tokens > 0


def _spy(original, sink):
    def spy(result, trace):
        sink.append(result)
        original(result, trace)

    return spy


def _bad(**kwargs) -> generation_pb2.GenerateRequest:
    req = request()
    for path, value in kwargs.items():
        target = req
        *parents, leaf = path.split("__")
        for parent in parents:
            target = getattr(target, parent)
        if leaf == "clear_input":
            req.ClearField("text")
        else:
            setattr(target, leaf, value)
    return req


def _empty_messages():
    req = generation_pb2.GenerateRequest(max_tokens=4)
    req.messages.SetInParent()
    return req


def _empty_ids():
    req = generation_pb2.GenerateRequest(max_tokens=4)
    req.token_ids.SetInParent()
    return req


def _ids(values):
    req = generation_pb2.GenerateRequest(max_tokens=4)
    req.token_ids.ids.extend(values)
    return req


@pytest.mark.parametrize(
    "req, field",
    [
        (_bad(clear_input=True), "input"),
        (_bad(text=""), "text"),
        (_empty_messages(), "messages"),
        (_empty_ids(), "token_ids"),
        (_ids([1, 10**6]), "input"),
        (_bad(max_tokens=0), "max_tokens"),
        (_bad(max_tokens=100000), "max_tokens"),
        (_bad(sampling__temperature=-1.0), "sampling.temperature"),
        (_bad(sampling__temperature=float("nan")), "sampling.temperature"),
        (_bad(sampling__top_p=0.0), "sampling.top_p"),
        (_bad(sampling__top_p=1.5), "sampling.top_p"),
        (_bad(speculation__num_draft_tokens=99), "speculation.num_draft_tokens"),
        (_bad(speculation__method=metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL), "speculation.method"),
        (_bad(speculation__method=42), "speculation.method"),
        (_bad(text="lazy dog " * 3000), "input"),  # longer than the 4,096-token context
        (_bad(text="x" * (2 << 20)), "request"),  # over --max-request-bytes
        (generation_pb2.GenerateRequest(text="hi", stop=[""]), "stop[0]"),
        (_bad(request_id="r" * 129), "request_id"),  # echoed in every log line and metrics record
        (_bad(request_id="two\nlines"), "request_id"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_invalid_fields_get_invalid_argument_naming_the_field(run_service, make_stub, req, field) -> None:
    service = run_service()
    stub = make_stub(service.address)
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field), info.value.details()
    # The server keeps serving.
    assert collect(stub, request(max_tokens=2))[1].completion_tokens > 0


@contextlib.contextmanager
def full_queue(service, stub) -> Iterator[None]:
    """A service of max_batch_size=1, max_queue_size=1 with its slot held and its queue full;
    on exit the holder is cancelled and the queued request must still be served."""
    running = stub.Generate(request(max_tokens=4000, method=NONE), timeout=120)
    next(running)  # holds the slot
    queued = stub.Generate(request(max_tokens=2, method=NONE), timeout=120)
    deadline = time.monotonic() + 30
    while service.service.engine.queue_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    yield
    running.cancel()
    assert [r for r in queued][-1].HasField("final")


def test_full_queue_gives_resource_exhausted(run_service, make_stub) -> None:
    service = run_service(max_batch_size=1, max_queue_size=1)
    stub = make_stub(service.address)
    with full_queue(service, stub):
        with pytest.raises(grpc.RpcError) as info:
            collect(stub, request(max_tokens=2))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details().count("queue is full") == 1, info.value.details()


def test_server_info(run_service, make_stub, tiny_model_dir) -> None:
    service = run_service(max_batch_size=3)
    info = make_stub(service.address).GetServerInfo(generation_pb2.GetServerInfoRequest(), timeout=10)
    assert info.target_model and info.device == "cpu" and info.dtype == "float32"
    assert info.max_batch_size == 3 and info.default_method == NGRAM
    assert info.default_num_draft_tokens == 4 and info.max_num_draft_tokens == 8
    assert info.max_context_tokens > 0 and info.version and info.instance_id == "test-instance"
    assert info.draft_model == ""


def test_one_failing_request_fails_alone(run_service, make_stub, monkeypatch) -> None:
    """An unexpected failure inside one request's processing (here: its event delivery
    raises) gives INTERNAL with its request id; a concurrent request completes."""
    from service.api import servicer

    original = servicer._EventBridge.__call__

    def failing(self, event):
        if getattr(event, "request_id", "") == "boom" and not isinstance(event, servicer.FinalResult):
            raise RuntimeError("injected failure")
        original(self, event)

    monkeypatch.setattr(servicer._EventBridge, "__call__", failing)
    service = run_service(max_batch_size=2)
    stub = make_stub(service.address)
    other = {}
    thread = threading.Thread(target=lambda: other.update(r=collect(stub, request(max_tokens=30))))
    thread.start()
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, request(request_id="boom", max_tokens=30))
    thread.join(60)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" in info.value.details() and "injected failure" in info.value.details()
    assert other["r"][1].completion_tokens > 0
    # The server keeps serving.
    assert collect(stub, request(max_tokens=3))[1].completion_tokens > 0


def test_one_canonical_log_line_per_finished_request(run_service, make_stub) -> None:
    from structlog.testing import capture_logs

    service = run_service()
    stub = make_stub(service.address)
    with capture_logs() as logs:
        _, final, _ = collect(stub, request(request_id="logged", method=NGRAM, k=2, max_tokens=6))
        deadline = time.monotonic() + 10
        while (
            not any(e.get("request_id") == "logged" and e["event"] == "request_finished" for e in logs)
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
    lines = [e for e in logs if e["event"] == "request_finished" and e.get("request_id") == "logged"]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line["log_level"] == "info" and line["finish_reason"] == "length"
    assert line["completion_tokens"] == final.completion_tokens == 6
    metrics = line["metrics"]
    assert metrics["verify_passes"] == final.metrics.verify_passes  # numbers, not strings
    assert metrics["proposed_drafts"] == final.metrics.proposed_drafts
    assert metrics["accept_histogram"] == list(final.metrics.accept_histogram)
    assert metrics["method"] == "SPECULATION_METHOD_NGRAM" and metrics["num_draft_tokens"] == 2


class _SlowTokenizer:
    """The service's tokenizer, `delay_s` slower per call: a busy tokenization pool."""

    def __init__(self, tokenizer, delay_s: float) -> None:
        self._tokenizer, self._delay_s = tokenizer, delay_s

    def __call__(self, *args, **kwargs):
        time.sleep(self._delay_s)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


class _ThreadRecordingTokenizer:
    """The service's tokenizer, noting the thread of every call."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.threads = tokenizer, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


def test_small_requests_are_tokenized_on_the_loop_and_the_others_in_the_pool(run_service, make_stub) -> None:
    from service import server
    from service.api.request_mapping import INLINE_MAX_CHARS, INLINE_MAX_MESSAGES

    recording = []

    def build(config):
        engine, tokenizer = server.build_engine(config)
        recording.append(_ThreadRecordingTokenizer(tokenizer))
        return engine, recording[0]

    service = run_service(build_engine=build)
    stub = make_stub(service.address)

    def chat(messages: int) -> generation_pb2.GenerateRequest:
        req = generation_pb2.GenerateRequest(max_tokens=1)
        for _ in range(messages):
            req.messages.messages.add(role="user", content="hi")
        return req

    requests = [
        request(text=PROMPT, max_tokens=1),  # inline
        request(text="x" * INLINE_MAX_CHARS, max_tokens=1),  # inline: at the bound
        request(text="x" * (INLINE_MAX_CHARS + 1), max_tokens=1),  # the pool
        chat(INLINE_MAX_MESSAGES),  # inline
        chat(INLINE_MAX_MESSAGES + 1),  # the pool: each message adds its template's text
    ]
    for req in requests:
        _, final, _ = collect(stub, req)
        assert final.completion_tokens == 1
    threads = recording[0].threads
    loop_thread = service._thread.name
    assert [name == loop_thread for name in threads] == [True, True, False, True, False], threads
    assert all(name.startswith("tokenize") for name in (threads[2], threads[4]))


class _FinalHoldingEngine:
    """The service's engine, holding back the final event of request "held" until release()."""

    def __init__(self, engine) -> None:
        self._engine, self._held = engine, []
        self.first_chunk = threading.Event()

    def submit(self, req, on_event):
        if req.request_id != "held":
            return self._engine.submit(req, on_event)
        from service.engine.api import FinalResult

        def hold(event):
            if isinstance(event, FinalResult):
                self._held.append((on_event, event))
            else:
                on_event(event)
                self.first_chunk.set()

        return self._engine.submit(req, hold)

    def release(self) -> None:
        for on_event, event in self._held:
            on_event(event)

    def __getattr__(self, name: str):
        return getattr(self._engine, name)


def test_a_small_request_is_tokenized_in_the_pool_while_another_streams(run_service, make_stub) -> None:
    """While a call is streaming, a small request is mapped in the pool, not on the loop that
    streams the other's tokens; once none streams, on the loop again."""
    from service import server

    built = []

    def build(config):
        engine, tokenizer = server.build_engine(config)
        built.append((_FinalHoldingEngine(engine), _ThreadRecordingTokenizer(tokenizer)))
        return built[0]

    service = run_service(build_engine=build)
    stub = make_stub(service.address)
    engine, recording = built[0]
    held = stub.Generate(request(max_tokens=2, request_id="held"), timeout=120)
    assert next(held).HasField("chunk")
    assert engine.first_chunk.wait(60)
    _, final, _ = collect(stub, request(max_tokens=1))  # while "held" streams: the pool
    assert final.completion_tokens == 1
    engine.release()
    rest = list(held)
    assert rest[-1].HasField("final") and rest[-1].final.completion_tokens == 2
    collect(stub, request(max_tokens=1))  # none streams: the loop
    loop_thread = service._thread.name
    threads = recording.threads
    assert [name == loop_thread for name in threads] == [True, False, True], threads
    assert threads[1].startswith("tokenize")


@pytest.mark.parametrize("pool", [False, True], ids=["on the loop", "in the pool"])
def test_timings_start_when_the_server_receives_the_request(run_service, make_stub, pool) -> None:
    """Tokenization (on the event loop for a small request while none streams, else in a pool) is
    part of the wait the client sees, so the queue time, the time to first token and the
    duration all start before it (docs/metrics-contract.md, "Timings")."""
    from service import server
    from service.api.request_mapping import INLINE_MAX_CHARS

    delay_s = 0.5

    def build(config):
        engine, tokenizer = server.build_engine(config)
        return engine, _SlowTokenizer(tokenizer, delay_s)

    service = run_service(build_engine=build)
    started = time.monotonic()
    text = "x" * (INLINE_MAX_CHARS + 1) if pool else PROMPT
    _, final, _ = collect(make_stub(service.address), request(text=text, max_tokens=4, method=NONE))
    elapsed = time.monotonic() - started
    m = final.metrics
    assert m.queue_time_seconds >= delay_s, m
    assert m.time_to_first_token_seconds >= delay_s, m
    assert delay_s <= m.duration_seconds <= elapsed, (m, elapsed)
    assert_metrics_invariants(m)


def test_a_long_prompt_whose_deadline_passes_stops_prefilling(run_service, make_stub) -> None:
    """A prompt of 4,090 token ids with a short deadline, prefilled in chunks of 8 tokens: the
    deadline cancels it between chunks, so it ends CANCELLED with no token (its prefill never
    finished, and no decode ran for a client that was gone), and a short request sent after
    it is served meanwhile, its prefill and decode passes interleaved with the long one's chunks."""
    service = run_service(max_batch_size=2, max_prefill_tokens_per_pass=8)
    stub = make_stub(service.address)
    finals = []
    service.service.servicer._on_final = _spy(service.service.servicer._on_final, finals)
    long = generation_pb2.GenerateRequest(request_id="long", max_tokens=4)
    long.token_ids.ids.extend(1 + i % 300 for i in range(4090))
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, long, timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _, final, _ = collect(stub, request(request_id="short", max_tokens=4), timeout=60)
    assert final.finish_reason == metrics_pb2.FINISH_REASON_LENGTH and final.completion_tokens == 4
    deadline = time.monotonic() + 30
    while not any(f.request_id == "long" for f in finals) and time.monotonic() < deadline:
        time.sleep(0.01)
    (cancelled,) = [f for f in finals if f.request_id == "long"]
    assert cancelled.finish_reason.name == "CANCELLED"
    assert cancelled.completion_tokens == 0 and cancelled.metrics.verify_passes == 0
    assert cancelled.prompt_tokens == 4090
    assert_metrics_invariants(cancelled.metrics)
