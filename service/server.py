"""serve(): build the gRPC server, load the models, serve, drain on SIGTERM/SIGINT.

Start-up order: the server listens at once with health NOT_SERVING (so probes see it
loading), the models load and warm up (in the engine's own process, started and awaited from a
worker thread, or on that thread with --engine-process thread), then health turns SERVING.
Shutdown: health NOT_SERVING and new requests get UNAVAILABLE; so do queued requests, at
once (they hold no batch slot; their clients retry on another replica); running requests
finish within the grace period (the rest are cancelled); pending metrics are flushed to the
sidecar; exit 0. An engine process that exits unasked stops the service the same way, with
its requests in flight answered UNAVAILABLE, and the process exits non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from service import __version__
from service.api.parse_guard import add_servicer
from service.api.request_log import log_finished_request
from service.api.request_mapping import RequestLimits
from service.api.request_trace import CapturedTrace
from service.api.servicer import GenerationServicer, ServingState
from service.config import ServiceConfig
from service.engine.api import FinalResult, Method
from service.engine.config import EngineConfig
from service.engine_process.protocol import exited_text
from specdec.v1 import generation_pb2
from specdec_common import proto_names
from specdec_security import SecuredServer
from specdec_security.reflection import reflection_pool

log = structlog.get_logger(__name__)

GENERATION_SERVICE_DESCRIPTOR = proto_names.GENERATION_SERVICE
GENERATION_SERVICE = GENERATION_SERVICE_DESCRIPTOR.full_name
# gRPC's own ceiling on a received message; above it gRPC answers RESOURCE_EXHAUSTED itself.
# Below it, requests over --max-request-bytes get INVALID_ARGUMENT naming the size.
GRPC_MAX_RECEIVE_BYTES = 64 << 20


def build_engine(config: ServiceConfig) -> tuple[Any, Any]:
    """The engine `--engine-process` asks for, started and warmed up, and its tokenizer (runs on
    a worker thread): the core in a child process (service/engine_process), or in this one."""
    if config.engine_process == "process":
        from service.engine_process.client import EngineProcess

        engine = EngineProcess.start(config)
        return engine, engine.tokenizer
    return load_engine(config)


def load_engine(config: ServiceConfig) -> tuple[Any, Any]:
    """Load the models and start a warmed-up engine in this process (the engine core's
    process, or the server's with --engine-process thread)."""
    from service.engine import Engine
    from service.models.loading import check_same_vocabulary, load_model

    def load(spec: str):
        return load_model(
            spec,
            dtype=config.dtype,
            device=None if config.device == "auto" else config.device,
            cache_dir=config.cache_dir or None,
        )

    target = served_as(load(config.model), config.model)
    draft = served_as(load(config.draft_model), config.draft_model) if config.draft_model else None
    if draft is not None:
        check_same_vocabulary(target, draft)
    engine = Engine(target, engine_config(config), draft=draft)
    engine.start()
    engine.warmup()
    return engine, target.tokenizer


def engine_config(config: ServiceConfig) -> EngineConfig:
    """The engine's settings from the service's (in the engine core's process too: it gets the
    ServiceConfig)."""
    return EngineConfig(
        max_batch_size=config.max_batch_size,
        max_queue_size=config.max_queue_size,
        max_prefill_tokens_per_pass=config.max_prefill_tokens_per_pass,
        prefill_graph_tokens=config.prefill_graph_tokens,
        default_method=Method(proto_names.METHOD_BY_NAME[config.method]),
        default_num_draft_tokens=config.num_draft_tokens,
        max_num_draft_tokens=config.max_num_draft_tokens,
        default_max_tokens=config.default_max_tokens,
        adaptive_draft_length=config.adaptive_draft_length,
        instance_id=config.instance_id,
        capture_all_graphs=True,  # CUDA: every graph before the first request (no-op on CPU)
        linear_blocks=Path(config.linear_blocks) if config.linear_blocks else None,
        gemv_max_rows=None if config.gemv_max_rows == "auto" else config.gemv_max_rows,
    )


def served_as(loaded: Any, spec: str) -> Any:
    """The model under the name it is served and reported by: a known name or a hub id as
    given; a local directory or GGUF file by its last path component, so that no file-system
    path reaches clients (GetServerInfo) or the metrics' labels."""
    from service.models.store import REGISTRY

    path = Path(spec).expanduser()
    if spec in REGISTRY or not path.exists():
        return loaded
    return dataclasses.replace(loaded, name=path.name)


def server_info(engine: Any, config: ServiceConfig) -> generation_pb2.GetServerInfoResponse:
    info = engine.info
    return generation_pb2.GetServerInfoResponse(
        target_model=info.target_model,
        draft_model=info.draft_model or "",
        default_method=info.default_method.value,
        default_num_draft_tokens=info.default_num_draft_tokens,
        max_num_draft_tokens=info.max_num_draft_tokens,
        device=str(info.device),
        dtype=str(info.dtype).removeprefix("torch."),
        max_batch_size=info.max_batch_size,
        max_context_tokens=info.max_context_tokens,
        version=__version__,
        instance_id=config.instance_id,
    )


def check_port_free(listen: str) -> None:
    """Raises RuntimeError if `listen`'s fixed port is in use: with SO_REUSEPORT on
    (--front-ends) gRPC would share it with whatever listens there (gRPC servers turn it on by
    default) instead of failing. A socket without it cannot bind a port another listens on.
    (A server binding it between this check and the front ends' own binds is not caught.)"""
    host, port = listen.rsplit(":", 1)
    if int(port) == 0:
        return
    host = host.strip("[]")
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            # As gRPC's own: a port whose old connections wait in TIME_WAIT is free, one that
            # another socket listens on is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise RuntimeError(
                    f"cannot listen on {listen}: the port is in use ({exc.strerror})"
                ) from None


def reporter_credentials(config: ServiceConfig) -> grpc.ChannelCredentials | None:
    """Reads and checks the reporter's TLS and token files, so that a bad one is a start-up
    error naming its setting (the reporter re-reads the token file on every reconnect)."""
    if not config.telemetry_target:
        return None
    config.telemetry_security.call_metadata()
    return config.telemetry_security.channel_credentials()


def make_reporter(config: ServiceConfig, credentials: grpc.ChannelCredentials | None) -> Any:
    if not config.telemetry_target:
        return None
    from service.reporting import MetricsReporter

    reporter = MetricsReporter(
        config.telemetry_target,
        buffer_size=config.telemetry_buffer_size,
        instance_id=config.instance_id,
        channel_credentials=credentials,
        call_metadata=config.telemetry_security.call_metadata,
    )
    reporter.start()
    return reporter


class Service:
    """The running service: gRPC server, health, engine and metrics reporter."""

    def __init__(
        self,
        config: ServiceConfig,
        build_engine: Callable[[ServiceConfig], tuple[Any, Any]] = build_engine,
        on_serving: Callable[[], None] | None = None,
        joins_port: bool = False,
    ) -> None:
        """`build_engine(config) -> (engine, tokenizer)` loads on a worker thread (tests pass
        one that loads slowly or fails); `on_serving()` is called once health is SERVING;
        `joins_port`: a front end other than the first (service/engine_process/front_end.py),
        on the port the first bound."""
        self.config = config
        self._build_engine = build_engine
        self._on_serving = on_serving
        self.failure: str | None = None  # why the service stopped on its own (the engine exited)
        self._health_update: asyncio.Future | None = None  # NOT_SERVING after the engine exited
        # Every certificate and token file is read before anything binds or starts.
        self.security = SecuredServer(config.server_security, env_prefix="SPECDEC_")
        telemetry_credentials = reporter_credentials(config)
        self.servicer = GenerationServicer(
            RequestLimits(
                config.max_request_bytes,
                config.max_tokens_limit,
                config.max_prompt_chars,
                config.max_prompt_bytes,
            ),
            self._on_final,
            tracing=config.tracing,
        )
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=self.security.interceptors,
            options=[
                ("grpc.max_receive_message_length", GRPC_MAX_RECEIVE_BYTES),
                # One front end: a port another server holds is an error, not a share. Several
                # (--front-ends): they share it, and the kernel spreads connections among them.
                ("grpc.so_reuseport", int(config.front_ends > 1)),
            ],
        )
        add_servicer(self.servicer, self.server, GENERATION_SERVICE_DESCRIPTOR)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                GENERATION_SERVICE,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
            pool=reflection_pool(generation_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR),
        )
        if config.front_ends > 1 and not joins_port:
            check_port_free(config.listen)  # SO_REUSEPORT would share it, not refuse it
        self.port = self.security.add_port(self.server, config.listen)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {config.listen}")
        if config.front_ends > 1 and not joins_port:  # the others listen on the port this one bound
            self.config = config = dataclasses.replace(
                config, listen=f"{config.listen.rsplit(':', 1)[0]}:{self.port}"
            )
        self.reporter = make_reporter(
            config, telemetry_credentials
        )  # after the port: nothing to stop if binding failed
        self.engine: Any = None
        self._stopping = asyncio.Event()

    def _on_final(self, result: FinalResult, trace: CapturedTrace | None) -> None:  # the delivering thread
        if self.reporter is not None:
            self.reporter.report(result.metrics, trace.encoded if trace is not None else b"")
        log_finished_request(result, trace)

    async def _set_health(self, status: int) -> None:
        for name in ("", GENERATION_SERVICE):
            await self.health.set(name, status)

    async def start(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        log.info(
            "listening",
            address=self.config.listen,
            port=self.port,
            state="loading",
            **self.security.describe(),
        )
        self.engine, tokenizer = await _result_or_abandon(
            self._build_engine, self.config, abandoned=_stop_abandoned_engine
        )
        self.servicer.attach(self.engine, tokenizer, server_info(self.engine, self.config))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        # After SERVING, so that an exit cannot be followed by SERVING; an engine that exited
        # meanwhile calls the observer at once.
        loop = asyncio.get_running_loop()
        watch_exit = getattr(self.engine, "add_exit_observer", None)  # an engine in its own process
        if watch_exit is not None:
            watch_exit(lambda code: loop.call_soon_threadsafe(self._engine_exited, code))
        watch_stop = getattr(self.engine, "add_stop_observer", None)  # ... shared by front ends
        if watch_stop is not None:
            watch_stop(lambda: loop.call_soon_threadsafe(self._engine_stopped_elsewhere))
        log.info(
            "serving",
            address=self.config.listen,
            **{k: v for k, v in _info_fields(self.servicer.server_info).items() if k != "version"},
        )
        if self._on_serving is not None:
            self._on_serving()

    def request_stop(self) -> None:
        self._stopping.set()

    def reload_tokens(self) -> None:
        """SIGHUP: this front end re-reads the tokens file, and passes the signal on to the
        front ends it started."""
        self.security.reload_tokens()
        forward = getattr(self.engine, "signal_front_ends", None)
        if forward is not None:
            forward(signal.SIGHUP)

    def _engine_exited(self, exit_code: int | None) -> None:  # on the loop
        """The engine's process exited unasked (its requests already got EngineLost): stop
        serving, and stop the service, which then exits non-zero."""
        self.failure = exited_text(exit_code)
        self.servicer.state = ServingState.DRAINING
        self._health_update = asyncio.ensure_future(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        self.request_stop()

    def _engine_stopped_elsewhere(self) -> None:  # on the loop
        """Another front end's stop is draining the engine (the core's Stopping,
        --front-ends): this one stops too, as if it had been signalled (exit 0)."""
        self.servicer.state = ServingState.DRAINING
        self._health_update = asyncio.ensure_future(
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        self.request_stop()

    async def wait_for_stop(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Drain: refuse new work, finish in-flight requests, flush metrics."""
        grace = self.config.grace_period_s
        log.info("draining", grace_period_s=grace)
        self.servicer.state = ServingState.DRAINING
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        if self.engine is not None:
            # Finishes in-flight requests (their streams complete), cancels the rest at `grace`.
            await loop.run_in_executor(None, self.engine.stop, grace)
            failed = getattr(self.engine, "front_end_failures", None)  # --front-ends: the others
            if failed and self.failure is None:
                self.failure = "; ".join(failed)
        await self.server.stop(grace=1.0)
        if self.reporter is not None:
            flushed = await loop.run_in_executor(None, self.reporter.flush, 10.0)
            await loop.run_in_executor(None, self.reporter.stop, 2.0)
            log.info("metrics_flushed", complete=flushed)
        self.servicer.close()
        log.info("stopped")


def _stop_abandoned_engine(built: tuple[Any, Any]) -> None:
    """An engine whose load ended after the service stopped: nothing will serve from it."""
    built[0].stop(0.0)


async def _result_or_abandon(work: Callable[..., Any], *args: Any, abandoned: Callable[[Any], None]) -> Any:
    """`work(*args)` on a daemon thread, awaited. If the awaiting task is cancelled, its
    result, whenever it comes, goes to `abandoned`: _on_daemon_thread hands over a result that
    arrives after the cancellation, and here one that arrived in the same turn of the loop,
    before the task resumed."""
    loading = _on_daemon_thread(work, *args, abandoned=abandoned)
    try:
        return await loading
    except asyncio.CancelledError:
        if loading.done() and not loading.cancelled() and loading.exception() is None:
            threading.Thread(
                target=abandoned, args=(loading.result(),), name="abandoned-load", daemon=True
            ).start()
        raise


def _on_daemon_thread(
    work: Callable[..., Any], *args: Any, abandoned: Callable[[Any], None]
) -> asyncio.Future:
    """Runs `work(*args)` on a daemon thread; the returned future gets its outcome.

    For model loading, which cannot be interrupted: on the loop's default executor,
    asyncio.run would wait for it at exit, so a SIGTERM during loading (minutes with a GGUF
    conversion and graph capture) would keep the process alive past any kill grace period.
    A daemon thread does not hold the exit. Work that completes after the future was
    cancelled (the service stopped while loading) is handed to `abandoned`."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result: Any, error: BaseException | None) -> None:  # on the loop
        if future.cancelled():
            if error is None:
                threading.Thread(target=abandoned, args=(result,), name="abandoned-load", daemon=True).start()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result, error = None, None
        try:
            result = work(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(deliver, result, error)
        except RuntimeError:  # the loop has closed: nobody awaits this any more
            if error is None:
                abandoned(result)

    threading.Thread(target=run, name="model-loading", daemon=True).start()
    return future


def _info_fields(info: generation_pb2.GetServerInfoResponse) -> dict[str, Any]:
    return {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}


async def serve(
    config: ServiceConfig,
    build_engine: Callable[[ServiceConfig], tuple[Any, Any]] = build_engine,
    on_serving: Callable[[], None] | None = None,
    joins_port: bool = False,
) -> None:
    """Serves until SIGTERM/SIGINT (returns after the drain) or until the engine's process
    exits unasked (raises EngineExitedError after the drain, so the process exits non-zero).
    `on_serving` and `joins_port`: as Service's."""
    service = Service(config, build_engine, on_serving, joins_port)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    # SIGHUP re-reads the tokens file; without one it is logged and ignored (never fatal).
    loop.add_signal_handler(signal.SIGHUP, service.reload_tokens)
    starting = asyncio.ensure_future(service.start())
    stopping = asyncio.ensure_future(service.wait_for_stop())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if starting in done:
            starting.result()  # re-raise a failed start (bad model path, ...)
            await stopping
        else:
            starting.cancel()
    finally:
        stopping.cancel()
        await service.stop()
    if service.failure is not None:
        raise EngineExitedError(service.failure)


class EngineExitedError(RuntimeError):
    """The engine's process exited while the service ran."""
