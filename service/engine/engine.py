"""The engine: a bounded admission queue in front of one engine thread that owns all torch work."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

from service.engine import heap_freeze
from service.engine.api import (
    EngineInfo,
    EngineStoppedError,
    Event,
    EventCallback,
    FinalResult,
    FinishReason,
    GenerationRequest,
    Method,
    QueueFullError,
)
from service.engine.config import EngineConfig
from service.engine.execution.linear_blocks import DEFAULT_TABLE, BlockTable, load_table
from service.engine.execution.runner import ModelRunner
from service.engine.output import OutputProcessor
from service.engine.pass_record import PassObserver
from service.engine.request_metrics import RequestIdentity, RequestTiming, SpecDecodeStats
from service.engine.scheduler import Scheduler
from service.engine.sequence import Handle, Sequence
from service.engine.speculation.draft_length_policy import DraftLengthPolicy
from service.engine.speculation.drafters import Drafter, DraftModelDrafter, NgramDrafter, NoDrafter
from service.engine.validation import resolve
from service.models.loading import LoadedModel

log = structlog.get_logger(__name__)

# (the draft model's runner, the catch-up budget in tokens per pass) -> the DRAFT_MODEL drafter.
DraftModelDrafterFactory = Callable[[ModelRunner, int], Drafter]

_NEW, _RUNNING, _DRAINING, _STOPPED = "new", "running", "draining", "stopped"


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    """End-of-sequence ids from the tokenizer, the generation config and the model config."""
    ids: set[int] = set()
    sources = (
        getattr(loaded.tokenizer, "eos_token_id", None),
        getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None),
        getattr(loaded.model.config, "eos_token_id", None),
    )
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif src is not None:
            ids.update(int(i) for i in src)
    return frozenset(ids)


def _arrival(received_at: float | None) -> float:
    """When the request's clock starts: when the server received it, never in the future."""
    now = time.monotonic()
    return now if received_at is None else min(received_at, now)


class Engine:
    """Speculative-decoding engine. See service/engine/api.py for the threading contract."""

    def __init__(
        self,
        target: LoadedModel,
        config: EngineConfig | None = None,
        draft: LoadedModel | None = None,
        *,
        draft_model_drafter: DraftModelDrafterFactory | None = None,
    ) -> None:
        """`draft_model_drafter` builds the drafter of Method.DRAFT_MODEL from the draft model's
        runner (on the engine thread, at start); None: DraftModelDrafter. It is how a benchmark
        substitutes the draft model's proposals (bench/common/oracle_drafter.py); the service
        never passes it."""
        config = config or EngineConfig()
        config.validate()
        if draft is not None and draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft model {draft.name!r} has vocabulary size {draft.vocab_size}, but target model "
                f"{target.name!r} has {target.vocab_size}; they must share one vocabulary"
            )
        if config.default_method is Method.DRAFT_MODEL and draft is None:
            raise ValueError("default_method is DRAFT_MODEL but no draft model was given")
        self.config = config
        # The one read of the file; which of its shapes the models have is logged when they are built.
        named = BlockTable() if config.linear_blocks is None else load_table(config.linear_blocks)
        self._linear_blocks = DEFAULT_TABLE.overridden_by(named)
        self._linear_blocks_named = frozenset(named)
        self._target, self._draft = target, draft
        self._draft_model_drafter: DraftModelDrafterFactory = draft_model_drafter or DraftModelDrafter
        max_position = min(
            target.max_context_tokens, draft.max_context_tokens if draft else target.max_context_tokens
        )
        self._max_context = min(
            config.max_context_tokens or max_position, max_position, config.kv_cache_tokens
        )
        methods = (Method.NONE, Method.NGRAM) + ((Method.DRAFT_MODEL,) if draft is not None else ())
        self.info = EngineInfo(
            target_model=target.name,
            draft_model=draft.name if draft is not None else "",
            device=str(target.device),
            dtype=str(target.dtype).removeprefix("torch."),
            max_batch_size=config.max_batch_size,
            default_method=config.default_method,
            default_num_draft_tokens=config.default_num_draft_tokens,
            max_num_draft_tokens=config.max_num_draft_tokens,
            max_context_tokens=self._max_context,
            methods=methods,
            vocab_size=target.vocab_size,
            instance_id=config.instance_id,
        )
        self._output = OutputProcessor(eos_token_ids(target), self._max_context)
        # Read-only outside the engine thread: its choices and measured costs.
        self.draft_length_policy = DraftLengthPolicy() if config.adaptive_draft_length else None
        self._observers: list[PassObserver] = []
        self._cond = threading.Condition()
        self._waiting: deque[Sequence] = deque()  # guarded by _cond
        self._in_batch = 0  # running requests, as last published by the engine thread
        self._state = _NEW
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None

    # ---- caller side -----------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._state != _NEW:
                raise RuntimeError(f"engine already {self._state}")
            self._state = _RUNNING
            self._thread = threading.Thread(target=self._run, name="specdec-engine", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest, on_event: EventCallback) -> Handle:
        """Validates (raising InvalidRequestError) and queues a request; thread-safe."""
        r = resolve(request, self.config, self.info)
        seq = Sequence(
            request=request,
            on_event=on_event,
            handle=Handle(request.request_id, self._wake),
            method=r.method,
            k=r.k,
            max_tokens=r.max_tokens,
            sampling=r.sampling,
            seed=r.seed,
            identity=RequestIdentity(
                request.request_id,
                self.info.target_model,
                r.method,
                self.info.draft_model if r.method is Method.DRAFT_MODEL else "",
                self.config.instance_id,
            ),
            timing=RequestTiming(arrival=_arrival(request.received_at)),
            stats=SpecDecodeStats(r.k),
            tokens=list(request.prompt_token_ids),
            prompt_len=len(request.prompt_token_ids),
        )
        with self._cond:
            if self._state in (_DRAINING, _STOPPED):
                raise EngineStoppedError("the engine is shutting down and takes no new requests")
            if len(self._waiting) + self._in_batch >= self.config.max_in_flight:
                raise QueueFullError(f"the admission queue is full ({self.config.max_queue_size} waiting)")
            self._waiting.append(seq)
            self._cond.notify_all()
        return seq.handle

    def add_pass_observer(self, observer: PassObserver) -> None:
        """Calls `observer` with a PassRecord after every scheduler step, on the engine thread
        (it must be quick and must not block; an exception it raises is logged and ignored).
        Register before start()."""
        self._observers.append(observer)

    def add_delivery_observer(self, observer: Callable[[], None]) -> None:
        """Calls `observer()` on the engine thread after each batch of events the engine thread
        delivered: the last pass's tokens before a turn that admits requests, the first tokens
        of a prefill pass (before the decode pass), the previous pass's chunks (while the
        device runs the decode pass), and at the end of every loop
        turn (the step's final results, cancellations) and of a stop or a failed start. No
        event waits for a call longer than the end of the turn that delivered it. For a
        consumer that sends events in batches (service/engine_process). It must be quick; an
        exception it raises is logged and ignored. May be registered while the engine runs
        (from the next call on)."""
        self._output.delivery_observers.append(observer)

    def queue_depth(self) -> int:
        """Requests admitted and waiting for a batch slot."""
        with self._cond:
            return len(self._waiting)

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Refuses new work; cancels the queued requests at once (FinishReason.CANCELLED:
        they hold no batch slot, and their clients do better retrying on another replica
        than waiting out the drain); lets the running requests finish within the timeout
        (None = no limit) and cancels those still running then; joins the thread."""
        with self._cond:
            leftovers = list(self._waiting)
            self._waiting.clear()
            if self._state == _NEW:
                self._state = _STOPPED
            else:
                if self._state == _RUNNING:
                    self._state = _DRAINING
                    self._deadline = None if drain_timeout_s is None else time.monotonic() + drain_timeout_s
                self._cond.notify_all()
        for seq in leftovers:
            self._output.finish(seq, FinishReason.CANCELLED)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def warmup(self, timeout_s: float = 600.0) -> None:
        """Runs one short request through each available method (blocking; after start())."""
        tok = self._target.tokenizer
        prompt = tuple(tok.encode("Warm up. Warm up. Warm up.", add_special_tokens=False)) or (0,)
        for method in self.info.methods:
            done = threading.Event()
            results: list[FinalResult] = []

            def on_event(
                event: Event, results: list[FinalResult] = results, done: threading.Event = done
            ) -> None:
                if isinstance(event, FinalResult):
                    results.append(event)
                    done.set()

            self.submit(
                GenerationRequest(f"warmup-{method.name.lower()}", prompt, max_tokens=8, method=method),
                on_event,
            )
            if not done.wait(timeout_s):
                raise TimeoutError(f"warmup with {method.name} did not finish in {timeout_s} s")
            if results[0].finish_reason is FinishReason.ERROR:
                raise RuntimeError(f"warmup with {method.name} failed: {results[0].error}")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- engine thread ---------------------------------------------------------------

    def _build_scheduler(self) -> Scheduler:
        cache_len = self._max_context + self.config.max_num_draft_tokens + 1  # room for padded draft slots
        max_width = self.config.max_num_draft_tokens + 1  # a verify pass: pending token + k drafts
        fast = dict(
            use_graphs=self.config.cuda_graphs,
            use_compile=self.config.compile,
            lean_variant=self.config.lean_variant,
            linear_blocks=self._linear_blocks,
            gemv_max_rows=self.config.gemv_max_rows,
            prefill_graph_tokens=self.config.prefill_graph_tokens,
        )
        target = ModelRunner(self._target, self.config.max_batch_size, cache_len, max_width, **fast)
        drafters: dict[Method, Drafter] = {
            Method.NONE: NoDrafter(),
            Method.NGRAM: NgramDrafter(self.config.ngram_max_n, self.config.ngram_min_n),
        }
        runners = [target]
        if self._draft is not None:
            runners.append(ModelRunner(self._draft, self.config.max_batch_size, cache_len, max_width, **fast))
            drafters[Method.DRAFT_MODEL] = self._draft_model_drafter(
                runners[-1], self.config.max_prefill_tokens_per_pass
            )
        if self._linear_blocks_named:  # which of the file's weight shapes these models have
            have = {
                shape for runner in runners if runner.lean is not None for shape in runner.lean.linear_blocks
            }
            log.info(
                "linear_blocks",
                file=str(self.config.linear_blocks),
                used=sorted(f"{n}x{k}" for n, k in have & self._linear_blocks_named),
                unused=sorted(f"{n}x{k}" for n, k in self._linear_blocks_named - have),
            )
        kernels = {
            role: runner.lean.gemv_max_rows
            for role, runner in zip(("target", "draft"), runners)
            if runner.lean is not None and runner.lean.variant == "invariant"
        }
        if kernels:  # which passes take which linear kernel (docs/engine.md)
            log.info(
                "gemv_max_rows",
                setting="auto" if self.config.gemv_max_rows is None else self.config.gemv_max_rows,
                **kernels,
            )
        if self.config.capture_all_graphs:
            started = time.perf_counter()
            captured = sum(runner.capture_all_graphs() for runner in runners)
            if captured:
                log.info("graphs_captured", graphs=captured, seconds=round(time.perf_counter() - started, 1))
        return Scheduler(
            target,
            drafters,
            self._output,
            self._target.tokenizer,
            self.config.max_batch_size,
            self.config.max_num_draft_tokens,
            self._max_context,
            policy=self.draft_length_policy,
            prefill_budget=self.config.max_prefill_tokens_per_pass,
            observers=self._observers,
        )

    def _run(self) -> None:
        try:
            scheduler = self._build_scheduler()
        except Exception as exc:  # noqa: BLE001
            log.exception("engine_start_failed")
            with self._cond:
                self._state = _STOPPED
                leftovers = list(self._waiting)
                self._waiting.clear()
            for seq in leftovers:
                self._output.finish(seq, FinishReason.ERROR, f"engine failed to start: {exc!r}")
            self._output.delivered()
            return
        if self.config.freeze_gc_after_start:
            started = time.perf_counter()
            frozen = heap_freeze.freeze()
            log.info("gc_heap_frozen", objects=frozen, seconds=round(time.perf_counter() - started, 2))
        try:
            self._loop(scheduler)
        finally:
            if self.config.freeze_gc_after_start:
                heap_freeze.release()

    def _loop(self, scheduler: Scheduler) -> None:
        while True:
            try:
                if not self._iterate(scheduler):
                    break
            except Exception:  # noqa: BLE001 - the engine thread must not die
                log.exception("engine_iteration_failed")
                scheduler.finish_all(FinishReason.ERROR, "internal engine error")
            self._output.delivered()
        with self._cond:
            self._state = _STOPPED
            self._in_batch = 0
            leftovers = list(self._waiting)
            self._waiting.clear()
        for seq in leftovers:
            self._output.finish(seq, FinishReason.CANCELLED)
        self._output.delivered()

    def _iterate(self, scheduler: Scheduler) -> bool:
        """One loop turn: admissions and one decode pass. False when the engine is done."""
        if self._state == _RUNNING and not self._waiting and scheduler.running:
            # The steady state: nothing queued, nothing to admit, not shutting down. Read
            # without the lock: a request queued or a stop() arriving meanwhile is seen at
            # the next turn, as it would be had it come just after this turn took the lock.
            scheduler.cancel_flagged()
            self._step(scheduler)
            return True
        with self._cond:
            while True:
                draining = self._state == _DRAINING
                expired = draining and self._deadline is not None and time.monotonic() >= self._deadline
                cancelled = [s for s in self._waiting if s.handle.cancelled]
                if (
                    expired
                    or cancelled
                    or scheduler.running
                    or (self._waiting and scheduler.free_slots)
                    or (draining and not self._waiting)
                ):
                    break
                timeout = (
                    None if self._deadline is None or not draining else self._deadline - time.monotonic()
                )
                self._cond.wait(timeout)
            for seq in cancelled:
                self._waiting.remove(seq)
            if expired:
                admit, leftovers = [], list(self._waiting)
                self._waiting.clear()
            else:
                leftovers = []
                admit = [
                    self._waiting.popleft() for _ in range(min(scheduler.free_slots, len(self._waiting)))
                ]
            done = draining and not self._waiting and not admit and not scheduler.running
            self._in_batch = len(scheduler.running) + len(admit)
        for seq in cancelled + leftovers:
            self._output.finish(seq, FinishReason.CANCELLED)
        if expired:
            scheduler.finish_all(FinishReason.CANCELLED)
            return False
        if done:
            return False
        scheduler.cancel_flagged()
        if admit:
            scheduler.flush()
        for seq in admit:
            scheduler.admit(seq)
        self._step(scheduler)
        return True

    def _step(self, scheduler: Scheduler) -> None:
        scheduler.step()
        running = len(scheduler.running)
        if running != self._in_batch:  # only this thread writes it: no lock needed to read
            with self._cond:
                self._in_batch = running
