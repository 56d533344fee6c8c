"""The front end's reader of the engine process (service/engine_process/client.py) never leaves a
request waiting: whatever ends it (the pipe's end, or a message it cannot handle), every
request in flight gets EngineLost and the exit observers learn of it. A real pipe; a stand-in
for the child process, since no engine is needed to send the core's messages."""

from __future__ import annotations

import multiprocessing
import threading

from service.engine.api import EngineInfo, EngineLost, Event, GenerationRequest, Method
from service.engine.config import EngineConfig
from service.engine_process.client import EngineProcess
from service.engine_process.protocol import Events, Ready, Stop, Stopped, Stopping
from testkit.processes import wait_for


class StandInProcess:
    """What EngineProcess uses of a multiprocessing.Process."""

    def __init__(self) -> None:
        self.killed = False
        self.exitcode: int | None = None

    def kill(self) -> None:
        self.killed = True
        self.exitcode = -9

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return self.exitcode is None


def engine_process() -> tuple[EngineProcess, object, StandInProcess]:
    front, core = multiprocessing.Pipe(duplex=True)
    config = EngineConfig()
    info = EngineInfo(
        target_model="m",
        draft_model="",
        device="cpu",
        dtype="float32",
        max_batch_size=config.max_batch_size,
        default_method=Method.NONE,
        default_num_draft_tokens=config.default_num_draft_tokens,
        max_num_draft_tokens=config.max_num_draft_tokens,
        max_context_tokens=512,
        methods=(Method.NONE, Method.NGRAM),
        vocab_size=100,
        instance_id="t",
    )
    process = StandInProcess()
    return EngineProcess(process, front, Ready(info, config, None, 1)), core, process


def submit(engine: EngineProcess) -> tuple[list[Event], threading.Event]:
    events: list[Event] = []
    ended = threading.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, EngineLost):
            ended.set()

    engine.submit(GenerationRequest("r1", (1, 2, 3), max_tokens=4), on_event)
    return events, ended


def test_a_message_the_reader_cannot_handle_ends_every_request_in_flight() -> None:
    engine, core, process = engine_process()
    exits: list[int | None] = []
    engine.add_exit_observer(exits.append)
    events, ended = submit(engine)
    core.recv()  # the Submit
    core.send(Events([("not", "an", "event")]))  # decode_event cannot unpack it
    assert ended.wait(10), "the request was left waiting after the reader failed"
    assert isinstance(events[-1], EngineLost) and events[-1].request_id == "r1"
    assert process.killed  # a core the front end can no longer follow is not left running
    assert exits == [-9]


def test_the_pipes_end_ends_every_request_in_flight() -> None:
    engine, core, process = engine_process()
    events, ended = submit(engine)
    core.recv()
    process.exitcode = -9
    core.close()
    assert ended.wait(10)
    assert "exited with code -9" in events[-1].reason


def test_a_stop_another_front_end_asked_for_is_observed_once_whenever_the_observer_came() -> None:
    """The core's Stopping (another front end's Stop, --front-ends) reaches a stop observer
    added before it arrived and one added after, each once; none for a stop this one asked."""
    engine, core, _ = engine_process()
    early: list[str] = []
    engine.add_stop_observer(lambda: early.append("early"))
    core.send(Stopping())
    core.send(Stopping())  # a second one changes nothing
    exited = threading.Event()
    engine.add_exit_observer(lambda code: exited.set())
    wait_for(lambda: early, 10, what="the stop observer")
    assert early == ["early"]
    late: list[str] = []
    engine.add_stop_observer(lambda: late.append("late"))
    assert late == ["late"]
    core.send(Stopped())
    core.close()
    engine.stop(1.0)  # returns once the reader has seen the pipe's end
    assert early == ["early"] and late == ["late"] and not exited.is_set()  # clean: no exit observer

    asked, core2, _ = engine_process()
    observed: list[str] = []
    asked.add_stop_observer(lambda: observed.append("x"))
    stopping = threading.Thread(target=asked.stop, args=(5.0,))
    stopping.start()
    assert isinstance(core2.recv(), Stop)
    core2.send(Stopping())
    core2.send(Stopped())
    core2.close()
    stopping.join(10)
    assert observed == []
