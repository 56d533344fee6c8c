"""The engine core: the child process that owns the models and the device and does nothing
but run the engine (docs/architecture.md, "Two processes of the service").

It has one pipe to each front end (`--front-ends`, usually one). Its main thread loads the
models, starts and warms up the engine, sends `Ready` on every pipe, then waits for the end. A
reader thread per pipe applies what its front end sends (Submit, Cancel, Stop); a request's
events go back on the pipe it came from. The engine thread delivers events into the pipes'
outboxes, which it sends, one `Events` message per pipe that has any, at each of the engine's
delivery points (Engine.add_delivery_observer): the last pass's tokens before a turn that
admits, a prefill pass's first tokens, a decode pass's chunks while the device runs, the rest
at the end of the turn. The first Stop, from any front end, drains the engine; `Stopped` then
goes to every front end. A message that cannot be applied or sent ends the core (every front
end then ends its requests in flight) rather than leaving requests waiting. A front end's end
of a pipe closing (it exited or was killed) ends this process at once: nothing is left holding
the device, and the other front ends see the core go.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import structlog

from service.engine.api import EngineError, Event, FinalResult
from service.engine_process.protocol import (
    Cancel,
    Events,
    Ready,
    Rejected,
    StartFailed,
    Stop,
    Stopped,
    Stopping,
    Submit,
    encode_event,
)
from specdec_common.logging_setup import configure_logging

log = structlog.get_logger(__name__)


class Outbox:
    """Events waiting for the engine's next delivery point, and the one writer of the pipe."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the pending list and the pipe's write end
        self._pending: list[tuple] = []  # encode_event's tuples

    def add(self, key: int, event: Event) -> None:  # the engine thread (a stop's: the caller's)
        item = encode_event(key, event)
        with self._lock:
            self._pending.append(item)

    def flush(self) -> None:
        """Sends every pending event as one message (none when there are none)."""
        if not self._pending:  # nothing to send: no wait for a send in progress (a Ready)
            return
        with self._lock:
            self._flush_locked()

    def send(self, message: Any) -> None:
        """Sends `message` after every event added before it."""
        with self._lock:
            self._flush_locked()
            self._send_locked(message)

    def _flush_locked(self) -> None:
        if self._pending:
            items, self._pending = self._pending, []
            self._send_locked(Events(items))

    def _send_locked(self, message: Any) -> None:
        try:
            self._conn.send(message)
        except OSError:  # the front end is gone; the reader sees the end of the pipe and stops
            pass
        except Exception:  # noqa: BLE001 - a message that cannot be sent (pickling) is lost
            # Its requests would wait forever for events that never come: end the core, so that
            # the front end ends every request in flight (EngineLost) and the service stops.
            log.exception("engine_core_send_failed", message=type(message).__name__)
            _exit_now(1)


class EngineCore:
    """The engine behind the pipes: applies each front end's messages, forwards the events of
    its requests to it. A request is named by (pipe, key): each front end numbers its own."""

    def __init__(self, conns: list[Connection]) -> None:
        self._conns = conns
        self.outboxes = [Outbox(conn) for conn in conns]
        self.engine: Any = None  # set before Ready is sent; nothing is submitted before that
        # (pipe, key) -> RequestHandle of a request not yet finished
        self._handles: dict[tuple[int, int], Any] = {}
        self._handles_lock = threading.Lock()
        self._finished: set[tuple[int, int]] = set()  # FinalResult came before submit returned
        self._stop_started = False  # under _handles_lock
        self._stopped = False
        self.done = threading.Event()  # set once Stopped was sent

    def serve(self, engine: Any) -> None:
        self.engine = engine
        engine.add_delivery_observer(self._flush)

    def send_all(self, message: Any) -> None:
        """`message` to every front end, after the events added before it."""
        for outbox in self.outboxes:
            outbox.send(message)

    def _flush(self) -> None:
        for outbox in self.outboxes:
            outbox.flush()

    def read(self, pipe: int) -> None:
        """A reader thread: applies one front end's messages until the pipe's end. A message
        it cannot apply ends the core (a reader gone would leave the core ignoring the front
        end, and holding the device after it exits)."""
        conn = self._conns[pipe]
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._front_end_gone(pipe)
                return
            try:
                self._apply(pipe, message)
            except Exception:  # noqa: BLE001
                log.exception("engine_core_reader_failed", message=type(message).__name__, pipe=pipe)
                _exit_now(1)

    def _apply(self, pipe: int, message: Any) -> None:
        if isinstance(message, Submit):
            self._submit(pipe, message)
        elif isinstance(message, Cancel):
            with self._handles_lock:
                handle = self._handles.get((pipe, message.key))
            if handle is not None:
                handle.cancel()
        elif isinstance(message, Stop):
            with self._handles_lock:  # the first Stop drains; the others find it under way
                first, self._stop_started = not self._stop_started, True
            if first:
                self.send_all(Stopping())  # every front end drains, whichever asked
                # On its own thread: the readers go on applying cancellations while running
                # requests drain.
                threading.Thread(
                    target=self._stop, args=(message.drain_timeout_s,), name="engine-core-stop", daemon=True
                ).start()

    def _submit(self, pipe: int, message: Submit) -> None:
        name = (pipe, message.key)
        outbox = self.outboxes[pipe]

        def on_event(event: Event) -> None:  # the engine thread
            if isinstance(event, FinalResult):
                with self._handles_lock:
                    if self._handles.pop(name, None) is None:
                        self._finished.add(name)
            outbox.add(message.key, event)

        try:
            handle = self.engine.submit(message.request, on_event)
        except Exception as exc:  # noqa: BLE001 - refused, whatever the reason: the front end ends it
            if not isinstance(exc, EngineError):
                log.exception("engine_core_submit_failed", request_id=message.request.request_id)
            outbox.send(Rejected(message.key, type(exc).__name__, str(exc)))
            return
        with self._handles_lock:
            if name in self._finished:
                self._finished.discard(name)
            else:
                self._handles[name] = handle

    def _stop(self, drain_timeout_s: float | None) -> None:
        try:
            self.engine.stop(drain_timeout_s)
        except Exception:  # noqa: BLE001 - the core ends either way; the front ends end what is left
            log.exception("engine_core_stop_failed")
        finally:
            self._stopped = True  # from here a pipe's end is a front end done with us
            self.send_all(Stopped())  # after the events of the requests the stop cancelled
            self.done.set()

    def _front_end_gone(self, pipe: int) -> None:
        if self._stopped:
            return
        # Its requests have nobody to deliver to, and the device must be free for a restarted
        # server: the other front ends see the core go and stop too.
        log.warning("engine_core_front_end_gone", pipe=pipe)
        _exit_now(1)


def main(conns: list[Connection], config: Any) -> None:
    """The child's entry point (a multiprocessing "spawn" target): one pipe per front end;
    `config` is the server's ServiceConfig."""
    # A signal to the whole process group or cgroup (Ctrl-C in a terminal, systemd's default
    # KillMode) must not end the engine before the front end's drain: the front end decides
    # when the engine stops (Stop), and kills it if it exits without that (client.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the front ends' (tokens file), to a whole group
    configure_logging(config.log_level, fields={"process": "engine_core"})  # every thread's lines
    _thread_lock_for_progress_bars()
    core = EngineCore(conns)
    # Started before the models load, so that a front end going away ends a load too.
    for pipe in range(len(conns)):
        threading.Thread(
            target=core.read, args=(pipe,), name=f"engine-core-reader-{pipe}", daemon=True
        ).start()
    from service.server import load_engine

    try:
        engine, tokenizer = load_engine(config)
    except BaseException as exc:  # noqa: BLE001 - reported to the front end, which fails its start
        log.error("engine_start_failed", error=str(exc), exc_info=True)
        core.send_all(StartFailed(type(exc).__name__, str(exc)))
        _exit_now(1)
    core.serve(engine)
    core.send_all(Ready(engine.info, engine.config, tokenizer, os.getpid()))
    log.info("engine_core_ready", pid=os.getpid(), front_ends=len(conns))
    core.done.wait()
    _exit_now(0)


def _thread_lock_for_progress_bars() -> None:
    """tqdm (transformers' progress bars while loading) guards its output with a
    multiprocessing lock by default: a semaphore registered with the front end's resource
    tracker, which warns of a leak at every shutdown since this process ends with os._exit.
    One process needs only a thread lock."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _exit_now(code: int) -> None:
    """Exits without the interpreter's shutdown (daemon threads mid-torch-call, CUDA teardown):
    everything worth keeping was sent."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
