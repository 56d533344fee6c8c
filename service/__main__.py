"""`python -m service` / `specdec-server`: run the inference service."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import structlog

from service.config import ServiceConfig
from specdec_common.logging_setup import configure_logging


def main(argv: Sequence[str] | None = None) -> int:
    config = ServiceConfig.from_args(argv)
    # With several front ends every line says which wrote it (front_end.main: front_end_N).
    configure_logging(config.log_level, fields={"process": "front_end_0"} if config.front_ends > 1 else None)
    try:
        asyncio.run(_serve(config))
    except Exception as exc:  # start-up failures: one clear line, non-zero exit
        structlog.get_logger("service").error("service_failed", error=str(exc), exc_info=True)
        return 1
    return 0


async def _serve(config: ServiceConfig) -> None:
    from service.server import serve

    await serve(config)


if __name__ == "__main__":
    sys.exit(main())
