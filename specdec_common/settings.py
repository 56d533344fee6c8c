"""Settings: every setting is a command-line flag whose default comes from an environment
variable (the flag wins), declared once as an Option row. The service's and the sidecar's
configuration modules are tables of these rows; the parsers below turn bad values into errors
that name the flag or the variable."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    name: str  # attribute of the config; the flag is --name-with-dashes
    env: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return flag_name(self.name)


def add_options(
    parser: argparse.ArgumentParser, options: Iterable[Option], environ: Mapping[str, str]
) -> None:
    """One argument per option; its default is the option's variable parsed by the option's type
    (a bad value is a parser error naming the variable), else the option's default."""
    for option in options:
        raw = environ.get(option.env)
        try:
            default = option.type(raw) if raw is not None else option.default
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{option.env}={raw!r}: {exc}")
        parser.add_argument(
            option.flag,
            dest=option.name,
            type=option.type,
            default=default,
            help=f"{option.help} [env {option.env}, default {option.default!r}]",
        )


def flag_name(field: str, flag_prefix: str = "--") -> str:
    """flag_name("tls_cert_file", "--telemetry-") -> "--telemetry-tls-cert-file"."""
    return flag_prefix + field.replace("_", "-")


def setting_name(field: str, flag_prefix: str, env_prefix: str) -> str:
    """setting_name("tls_cert_file", "--", "SPECDEC_SIDECAR_")
    -> "--tls-cert-file (SPECDEC_SIDECAR_TLS_CERT_FILE)"."""
    return f"{flag_name(field, flag_prefix)} ({env_prefix}{field.upper()})"


# ---- value parsers (argparse types: they raise ArgumentTypeError with the reason) ----------


def parse_bool(value: str) -> bool:
    """true/false, 1/0, yes/no, on/off; empty is false (an empty variable is an unset one)."""
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, not {value!r}")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {number}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {number}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return number


def choice(*names: str) -> Callable[[str], str]:
    """A parser accepting one of names (case-insensitive, '-' read as '_')."""

    def parse(value: str) -> str:
        normal = value.strip().lower().replace("-", "_")
        if normal not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, not {value!r}")
        return normal

    return parse
