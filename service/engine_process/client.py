"""The front end's side of the engine process: `EngineProcess`, with the interface the gRPC
layer uses of an Engine (submit, info, stop, queue_depth), backed by `core.main` in a
child process (docs/architecture.md, "Two processes of the service").

`submit` validates the request as the engine would (service/engine/validation.py, the same
function, torch-free) and counts the requests in flight, so that InvalidRequestError and
QueueFullError stay synchronous and exact: every request in flight was submitted here and
leaves with its last event, which passes here too. A reader thread receives the `Events`
messages (one per delivery point of the engine) and calls each request's callback, as the
engine thread does in process. When the core exits without being asked to, every request in flight gets
`EngineLost`, new ones get EngineStoppedError, and the exit observers are called.

With `--front-ends N` the first front end (the server's own process) starts the core with one
pipe per front end and the N - 1 other front ends (`front_end.main`), each on the same port; they
attach to the core through their pipes (`EngineProcess.attach`), and every front end counts its
requests in one shared `InFlightCount`, so that the limit holds for all together. The first
Stop the core gets, from any front end, makes it send `Stopping` to every front end, which then
drains too; the first front end waits for the others to exit.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import structlog

from service.engine.api import (
    EngineLost,
    EngineStoppedError,
    Event,
    EventCallback,
    FinalResult,
    GenerationRequest,
    QueueFullError,
)
from service.engine.validation import resolve
from service.engine_process import core, front_end
from service.engine_process.in_flight import InFlightCount, InFlightCountUnavailable
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
    decode_event,
    exited_text,
)

log = structlog.get_logger(__name__)

# How long past the drain timeout a stopping core may take (its last pass, sending the
# events, exiting) before it is killed.
STOP_MARGIN_S = 30.0
# How long after the core is ready the other front ends (--front-ends) may take to serve.
FRONT_END_START_S = 120.0

_RUNNING, _STOPPING, _EXITED = "running", "stopping", "exited"


class EngineStartError(RuntimeError):
    """The core failed to load or start; the message is the core's error."""


class EngineProcess:
    """An engine in a child process. Start with `EngineProcess.start(config)`."""

    def __init__(
        self,
        process: Any,
        conn: Connection,
        ready: Ready,
        in_flight_count: InFlightCount | None = None,
        front_ends: list[Any] | None = None,
    ) -> None:
        """`process`: the core's multiprocessing.Process, or what stands in for it in a front
        end that did not start it; `in_flight_count`: shared with the other front ends (a
        count of its own when there are none); `front_ends`: the other front ends' processes,
        in the one that started them."""
        self.info = ready.info
        self.config = ready.config
        self.tokenizer = ready.tokenizer
        self.pid: int = ready.pid
        self._process = process
        self._conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # _state, _in_flight, _exit_code
        self._state = _RUNNING
        self._in_flight: dict[int, tuple[str, EventCallback]] = {}  # key -> (request id, callback)
        self._in_flight_count = in_flight_count or InFlightCount()  # every front end's requests
        self._front_ends = front_ends or []
        self._keys = itertools.count()
        self._stopped_cleanly = False
        self._exit_code: int | None = None  # the core's, once it exited
        self._exit_observers: list[Callable[[int | None], None]] = []
        self._stop_observers: list[Callable[[], None]] = []
        self._stopped_elsewhere = False  # the core is stopping at another front end's Stop
        self.front_end_failures: list[str] = []  # the other front ends that ended badly (stop)
        self._exited = threading.Event()
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, config: Any) -> EngineProcess:
        """Starts the core for `config` (a ServiceConfig) and waits until its engine is warmed
        up; raises EngineStartError with the core's error if it fails to load or exits."""
        # spawn, never fork: CUDA must not be initialised in a forked child, and this process
        # has gRPC threads.
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe(duplex=True) for _ in range(config.front_ends)]  # (front's, core's)
        in_flight_count = InFlightCount(context if config.front_ends > 1 else None)
        process = context.Process(
            target=core.main, args=([end for _, end in pipes], config), name="specdec-engine-core"
        )  # not a daemon: torch may start processes of its own in it (compile workers)
        process.start()
        for _, end in pipes:
            end.close()  # only the child holds its ends: its exit is the end of the pipes here
        # The core ignores SIGTERM (a signal to the whole group must not cut the drain short),
        # so this process kills it if it exits with the core still running: a stop while the
        # models load, a failure that skipped stop(). A kill of this process closes the pipe,
        # which ends the core too.
        atexit.register(_kill_if_running, process)
        log.info("engine_process_started", pid=process.pid)
        others, serving = [], []
        for index, (front_end_conn, _) in enumerate(pipes[1:], start=1):
            serving.append(context.Event())
            other = context.Process(
                target=front_end.main,
                args=(config, front_end_conn, in_flight_count, index, serving[-1]),
                name=f"specdec-front-end-{index}",
            )  # as the core, not a daemon: stop() lets it finish its drain, atexit kills it
            other.start()
            front_end_conn.close()  # that front end's: its exit is the end of its pipe for the core
            atexit.register(_kill_if_running, other)
            log.info("front_end_started", index=index, pid=other.pid)
            others.append(other)
        conn = pipes[0][0]
        try:
            first = conn.recv()
        except (EOFError, OSError):
            process.join(10)
            conn.close()
            # The core also exits when another front end goes away before it is ready.
            gone = [(i, o.exitcode) for i, o in enumerate(others, start=1) if o.exitcode is not None]
            if gone:
                index, code = gone[0]
                raise EngineStartError(
                    f"front end {index} exited with code {code} while starting (the engine process followed)"
                ) from None
            raise EngineStartError(
                f"the engine process exited with code {process.exitcode} while loading the models"
            ) from None
        if isinstance(first, StartFailed):
            process.join(30)
            conn.close()
            raise EngineStartError(first.message)
        if not isinstance(first, Ready):
            process.kill()
            raise EngineStartError(f"the engine process sent {type(first).__name__} before Ready")
        try:
            _wait_until_serving(process, others, serving)
        except EngineStartError:
            process.kill()  # the front ends still running see the core go, and exit
            raise
        return cls(process, conn, first, in_flight_count, others)

    @classmethod
    def attach(cls, conn: Connection, in_flight_count: InFlightCount) -> EngineProcess:
        """In a front end other than the first: waits for the core, which the first started,
        to be ready; raises EngineStartError with the core's error if it fails to start."""
        try:
            first = conn.recv()
        except (EOFError, OSError):
            conn.close()
            raise EngineStartError("the engine process exited while loading the models") from None
        if isinstance(first, StartFailed):
            conn.close()
            raise EngineStartError(first.message)
        if not isinstance(first, Ready):
            raise EngineStartError(f"the engine process sent {type(first).__name__} before Ready")
        return cls(_CoreOfAnotherFrontEnd(first.pid), conn, first, in_flight_count)

    # ---- the engine interface (service/engine/api.py) ---------------------------------

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> _Handle:
        """Validates (InvalidRequestError), applies back-pressure (QueueFullError) and sends
        the request to the core; `on_event` is called on this object's reader thread."""
        resolve(request, self.config, self.info)  # the engine's own checks; it repeats them
        with self._lock:
            if self._state != _RUNNING:
                raise EngineStoppedError(self._stopped_message())
            try:
                taken = self._in_flight_count.try_take(self.config.max_in_flight)
            except InFlightCountUnavailable as exc:
                log.error("in_flight_count_unavailable", error=str(exc))
                raise EngineStoppedError(f"{exc}; the server is shutting down") from None
            if not taken:
                raise QueueFullError(f"the admission queue is full ({self.config.max_queue_size} waiting)")
            key = next(self._keys)
            self._in_flight[key] = (request.request_id, on_event)
        try:
            self._send(Submit(key, request))
        except Exception:  # not sent (it does not pickle): no place or entry may stay behind
            with self._lock:
                entry = self._in_flight.pop(key, None)
            if entry is not None:
                self._give_back()
            raise
        return _Handle(request.request_id, key, self)

    def queue_depth(self) -> int:
        """Requests in flight beyond one batch: those waiting for a slot, as far as this side
        knows, for every front end (a request's slot is free once its last event has arrived)."""
        return max(0, self._in_flight_count.count - self.config.max_batch_size)

    def add_exit_observer(self, observer: Callable[[int | None], None]) -> None:
        """Calls `observer(exit_code)` once if the core exits without having stopped cleanly (a
        crash, a kill, a drain that ran past its time), on the reader thread, after every
        request in flight got EngineLost; at once if that already happened."""
        with self._lock:
            self._exit_observers.append(observer)
            # _exited is set once every request in flight got EngineLost (_ended)
            exited, code = self._exited.is_set() and not self._stopped_cleanly, self._exit_code
        if exited:
            observer(code)

    def add_stop_observer(self, observer: Callable[[], None]) -> None:
        """Calls `observer()` once if the core starts to stop without this front end having
        asked (another front end's Stop: `--front-ends`), on the reader thread; at once if
        that already happened."""
        with self._lock:
            self._stop_observers.append(observer)
            stopped = self._stopped_elsewhere
        if stopped:
            observer()

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Engine.stop in the core (queued requests cancelled at once, running ones given
        `drain_timeout_s`), then waits for the core to send the last events and exit; a core
        that takes STOP_MARGIN_S longer than that is killed (None: no limit on the drain, and
        so none on the wait; the server always passes its grace period)."""
        with self._lock:
            stopping = self._state == _RUNNING
            if stopping:
                self._state = _STOPPING
        if stopping:  # the core tells the other front ends (Stopping): they drain theirs
            self._send(Stop(drain_timeout_s))
        timeout = None if drain_timeout_s is None else drain_timeout_s + STOP_MARGIN_S
        if not self._exited.wait(timeout):
            log.error("engine_process_stop_timed_out", pid=self.pid, timeout_s=timeout)
            self._process.kill()
            self._exited.wait(30)
        self._process.join(10)
        deadline = time.monotonic() + STOP_MARGIN_S  # the core has stopped: their drains end too
        for index, other in enumerate(self._front_ends, start=1):
            other.join(max(0.0, deadline - time.monotonic()))
            if other.exitcode is None:
                log.error("front_end_stop_timed_out", pid=other.pid, timeout_s=STOP_MARGIN_S)
                other.kill()
                other.join(10)
                self.front_end_failures.append(f"front end {index} did not stop and was killed")
            elif other.exitcode != 0:
                log.error("front_end_exited", pid=other.pid, exit_code=other.exitcode)
                self.front_end_failures.append(f"front end {index} exited with code {other.exitcode}")

    def signal_front_ends(self, signum: int) -> None:
        """Sends `signum` to the other front ends this one started (SIGHUP: re-read the tokens
        file), so that a signal to this process alone (a container's PID 1) reaches them all."""
        for other in self._front_ends:
            if other.exitcode is None:
                try:
                    os.kill(other.pid, signum)
                except ProcessLookupError:
                    pass

    # ---- internals -------------------------------------------------------------------

    def cancel_key(self, key: int) -> None:
        """Cancels the request submitted under `key` (its handle's cancel())."""
        with self._lock:
            live = key in self._in_flight and self._state != _EXITED
        if live:
            self._send(Cancel(key))

    def _send(self, message: Any) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except OSError:  # the core is gone; the reader ends every request in flight
                pass

    def _stopped_message(self) -> str:
        if self._state == _EXITED and not self._stopped_cleanly:
            return f"{exited_text(self._exit_code)}; the server is shutting down"
        return "the engine is shutting down and takes no new requests"

    def _read(self) -> None:
        """The reader thread: delivers the core's messages until the pipe ends; then, or if a
        message cannot be handled, ends every request in flight (_ended): nothing waits for
        a reader that is gone."""
        try:
            self._read_messages()
        except Exception:  # noqa: BLE001
            log.exception("engine_process_reader_failed", pid=self.pid)
            self._process.kill()
        finally:
            self._ended()

    def _read_messages(self) -> None:
        in_flight = self._in_flight
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                return
            if isinstance(message, Events):
                for item in message.items:
                    key, event = decode_event(item)
                    if isinstance(event, FinalResult):
                        with self._lock:
                            entry = in_flight.pop(key, None)
                        if entry is not None:
                            self._give_back()
                    else:
                        entry = in_flight.get(key)
                    if entry is not None:
                        _deliver(entry[1], event)
            elif isinstance(message, Rejected):
                with self._lock:
                    entry = in_flight.pop(message.key, None)
                if entry is not None:
                    self._give_back()
                    _deliver(entry[1], EngineLost(entry[0], f"the engine refused it: {message.message}"))
            elif isinstance(message, Stopping):
                with self._lock:
                    elsewhere = self._state == _RUNNING and not self._stopped_elsewhere
                    self._stopped_elsewhere = self._stopped_elsewhere or elsewhere
                    stop_observers = list(self._stop_observers)
                if elsewhere:
                    self._notify_stopped_elsewhere(stop_observers)
            elif isinstance(message, Stopped):
                self._stopped_cleanly = True

    def _give_back(self) -> None:
        if not self._in_flight_count.give_back():
            log.error("in_flight_count_unavailable", error="a place could not be given back")

    def _notify_stopped_elsewhere(self, stop_observers: list[Callable[[], None]]) -> None:
        log.info("engine_stopped_by_another_front_end", pid=self.pid)
        for stop_observer in stop_observers:
            try:
                stop_observer()
            except Exception:  # noqa: BLE001
                log.exception("engine_stop_observer_failed")

    def _ended(self) -> None:
        """The pipe's end: the core exited (or is about to)."""
        self._process.join(10)
        code = self._process.exitcode
        with self._lock:
            asked = self._state == _STOPPING
            self._state = _EXITED
            self._exit_code = code
            lost, self._in_flight = self._in_flight, {}
            observers = list(self._exit_observers)
            stop_observers = list(self._stop_observers)
            # A clean stop nobody here asked for, not announced by Stopping (a core older than
            # this front end would never say it): the same as Stopping.
            elsewhere = self._stopped_cleanly and not asked and not self._stopped_elsewhere
            self._stopped_elsewhere = self._stopped_elsewhere or elsewhere
        # The lost requests' places are not given back: the core is gone and the service stops.
        with self._send_lock:  # no submit or cancel is writing to it
            self._conn.close()
        crashed = not self._stopped_cleanly
        if crashed:
            log.error("engine_process_exited", exit_code=code, pid=self.pid, in_flight=len(lost))
        reason = exited_text(code) + ("" if crashed else " after its stop, before this request ended")
        for request_id, callback in lost.values():
            _deliver(callback, EngineLost(request_id, reason))
        self._exited.set()
        if crashed:
            for observer in observers:
                try:
                    observer(code)
                except Exception:  # noqa: BLE001
                    log.exception("engine_exit_observer_failed")
        elif elsewhere:
            self._notify_stopped_elsewhere(stop_observers)


class _Handle:
    """RequestHandle of a request in the core: cancel() sends one Cancel, from any thread."""

    def __init__(self, request_id: str, key: int, owner: EngineProcess) -> None:
        self.request_id = request_id
        self._key = key
        self._owner = owner
        self._cancelled = False

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._owner.cancel_key(self._key)


class _CoreOfAnotherFrontEnd:
    """What EngineProcess uses of the core's Process, in a front end that did not start it:
    its exit code is the first front end's to read (None here)."""

    exitcode = None

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def join(self, timeout: float | None = None) -> None:
        pass


def _wait_until_serving(core_process: Any, front_ends: list[Any], serving: list[Any]) -> None:
    """Waits until every other front end is SERVING, so that this one (and with it, for a
    probe, the port) turns SERVING after them: a call must not reach a front end still
    loading once the service says it serves. Raises EngineStartError if the core or one of
    them exits first, or one takes FRONT_END_START_S."""
    deadline = time.monotonic() + FRONT_END_START_S
    for index, (other, event) in enumerate(zip(front_ends, serving, strict=True), start=1):
        while not event.wait(0.05):
            if core_process.exitcode is not None:
                raise EngineStartError(
                    f"the engine process exited with code {core_process.exitcode} while front ends started"
                )
            if other.exitcode is not None:
                raise EngineStartError(f"front end {index} exited with code {other.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineStartError(f"front end {index} was not serving after {FRONT_END_START_S:.0f} s")


def _kill_if_running(process: Any) -> None:
    if process.is_alive():
        process.kill()
        process.join(10)


def _deliver(callback: EventCallback, event: Event) -> None:
    try:
        callback(event)
    except Exception:  # noqa: BLE001 - one request's callback must not end the others'
        log.exception("event_callback_failed", request_id=event.request_id)
