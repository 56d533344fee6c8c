"""A gRPC front end other than the first (`--front-ends N`, N > 1): a multiprocessing "spawn"
target started by the first front end (client.py, `EngineProcess.start`).

It is the same service as the first (service/server.py: gRPC, health, tokenization,
reporting with a reporter of its own), listening on the same port with SO_REUSEPORT, so the
kernel spreads the connections between the front ends. Its engine is the core the first
started, reached through a pipe of its own. It drains on SIGTERM like the first (which sends it
one when it stops) and exits non-zero when the core goes away unasked.
"""

from __future__ import annotations

import asyncio
from multiprocessing.connection import Connection
from typing import Any

import structlog

from specdec_common.logging_setup import configure_logging


def main(config: Any, conn: Connection, in_flight_count: Any, index: int, serving: Any) -> None:
    """`config`: the first front end's ServiceConfig, listening on the port it bound;
    `in_flight_count`: the InFlightCount every front end shares; `serving`: a multiprocessing
    Event set once this front end is SERVING (the first waits for it before it is)."""
    configure_logging(config.log_level, fields={"process": f"front_end_{index}"})
    from service.engine_process.client import EngineProcess
    from service.server import serve

    def attach(_config: Any) -> tuple[Any, Any]:
        engine = EngineProcess.attach(conn, in_flight_count)
        return engine, engine.tokenizer

    try:
        asyncio.run(serve(config, build_engine=attach, on_serving=serving.set, joins_port=True))
    except Exception as exc:  # as specdec-server: one line, non-zero exit
        structlog.get_logger("service").error("service_failed", error=str(exc), exc_info=True)
        raise SystemExit(1) from None  # the process's exit code (multiprocessing's bootstrap)
