"""`python -m telemetry` / `specdec-sidecar`: run the telemetry sidecar."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import structlog

from specdec_security import SecuritySetupError
from telemetry.config import ConfigError, SidecarConfig


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = SidecarConfig.from_args(argv)
    except ConfigError as exc:
        print(f"specdec-sidecar: error: {exc}", file=sys.stderr)
        return 2
    from specdec_common.logging_setup import configure_logging

    configure_logging(config.log_level)
    from telemetry.server import serve

    try:
        return serve(config)
    except SecuritySetupError as exc:  # a TLS or token file that cannot be used
        structlog.get_logger(__name__).error("sidecar_failed", error=str(exc))
        return 2
    except Exception:
        structlog.get_logger(__name__).exception("sidecar_failed")
        return 1


if __name__ == "__main__":
    sys.exit(main())
