"""Logging for both processes: structlog once, JSON off a terminal, console on one.

stdlib loggers (grpc, transformers, opentelemetry, ...) are routed through the same
processor chain, so every line has one format. Per-request context (request_id) is bound
with structlog.contextvars and merged into every line logged while it is bound.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import structlog

_CONFIGURED_FLAG = "_specdec_logging_configured"


def configure_logging(
    level: str | None = None, *, json: bool | None = None, fields: Mapping[str, str] | None = None
) -> None:
    """Configure structlog and the stdlib root logger. Idempotent.

    level: log level name; default $SPECDEC_LOG_LEVEL or INFO.
    json: force JSON (True) or console (False) output; default: console when stderr is a
    terminal, JSON otherwise; $SPECDEC_LOG_FORMAT=json|console overrides the default.
    fields: added to every line of this process, from every thread (e.g. which of the
    service's two processes wrote it); a field bound or passed with the same name wins.
    """
    level_name = (level or os.environ.get("SPECDEC_LOG_LEVEL") or "INFO").upper()
    numeric_level = logging.getLevelName(level_name)
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level_name!r}")
    if json is None:
        fmt = os.environ.get("SPECDEC_LOG_FORMAT", "").lower()
        if fmt not in ("", "json", "console"):
            raise ValueError(f"SPECDEC_LOG_FORMAT must be json or console, not {fmt!r}")
        json = fmt == "json" if fmt else not sys.stderr.isatty()

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _with_fields(dict(fields or {})),
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.typing.Processor
    if json:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    root = logging.getLogger()
    for handler in configured_handlers():
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _CONFIGURED_FLAG, True)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Chatty third-party loggers stay at WARNING unless DEBUG was asked for.
    if numeric_level > logging.DEBUG:
        for name in ("urllib3", "filelock", "asyncio"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _with_fields(fields: dict[str, str]) -> structlog.typing.Processor:
    def add(logger: object, method: str, event_dict: dict) -> dict:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    return add


def configured_handlers() -> list[logging.Handler]:
    """The root logger's handlers that configure_logging attached (at most one)."""
    return [h for h in logging.getLogger().handlers if getattr(h, _CONFIGURED_FLAG, False)]
