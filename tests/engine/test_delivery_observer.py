"""Engine.add_delivery_observer (docs/engine.md): the points at which the engine process sends
a batch of events. A chunk waits for no pass after the step that delivered it (the first token
of a request goes out before the decode pass that follows its prefill); a final result (and
the last chunk its end flushes) waits at most for the end of its turn; requests decoded
together share their batches."""

from __future__ import annotations

import threading

from service.engine import FinalResult, GenerationRequest, Method, PassRecord, TokenChunk
from tests.engine.helpers import Outcome, wait_checked

TEXT = "Once upon a time there was"


class LoggedOutcome(Outcome):
    def __init__(self, request_id: str, log: list[tuple], lock: threading.Lock) -> None:
        super().__init__(request_id)
        self.log, self.lock = log, lock

    def on_event(self, event: object) -> None:
        with self.lock:
            kind = "chunk" if isinstance(event, TokenChunk) else "final"
            self.log.append((kind, self.request_id))
        super().on_event(event)


def test_events_are_batched_at_the_delivery_points(make_engine, target, tokenizer) -> None:
    engine = make_engine(target, start=False, max_batch_size=2, adaptive_draft_length=False)
    log: list[tuple] = []
    lock = threading.Lock()

    def on_pass(record: PassRecord) -> None:
        with lock:
            log.append(("pass",))

    def on_delivered() -> None:
        with lock:
            log.append(("delivered",))

    engine.add_pass_observer(on_pass)
    engine.add_delivery_observer(on_delivered)
    engine.start()
    ids = tuple(tokenizer.encode(TEXT, add_special_tokens=False))
    first = LoggedOutcome("first", log, lock)
    engine.submit(GenerationRequest("first", ids, max_tokens=30, method=Method.NONE), first.on_event)
    second = LoggedOutcome("second", log, lock)
    started = threading.Event()

    def submit_second_once_streaming() -> None:  # an admission while the first request decodes
        while len(first.chunks) < 3 and not first.done.is_set():
            first.done.wait(0.001)
        engine.submit(GenerationRequest("second", ids, max_tokens=20, method=Method.NONE), second.on_event)
        started.set()

    thread = threading.Thread(target=submit_second_once_streaming)
    thread.start()
    wait_checked(first)
    assert started.wait(30)
    wait_checked(second)
    thread.join()
    engine.stop(drain_timeout_s=0)
    assert isinstance(second.final, FinalResult) and second.final.completion_tokens == 20

    with lock:
        entries = list(log)
    for index, entry in enumerate(entries):
        if entry[0] not in ("chunk", "final"):
            continue
        later = [e[0] for e in entries[index + 1 :]]
        assert "delivered" in later, (index, entry)
        if entry[0] == "chunk" and "pass" in later and later.index("pass") < later.index("delivered"):
            # Only a request's last chunk, flushed by its end after the synchronisation, goes
            # out with its final result at the end of the turn; any other chunk before the
            # step that delivered it ends.
            until_pass = entries[index + 1 : index + 1 + later.index("pass")]
            assert ("final", entry[1]) in until_pass, (index, entry, entries[index : index + 6])
    assert entries[-1] == ("delivered",)
    # Both requests decoding: their chunks of one pass go out in one batch.
    batches, current = [], set()
    for entry in entries:
        if entry[0] == "delivered":
            batches.append(current)
            current = set()
        elif entry[0] == "chunk":
            current.add(entry[1])
    assert {"first", "second"} in batches
