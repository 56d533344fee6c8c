"""How a setting is named in messages: its flag and its environment variable."""

from __future__ import annotations


def flag_name(field: str, flag_prefix: str = "--") -> str:
    """flag_name("tls_cert_file", "--telemetry-") -> "--telemetry-tls-cert-file"."""
    return flag_prefix + field.replace("_", "-")


def setting_name(field: str, flag_prefix: str, env_prefix: str) -> str:
    """setting_name("tls_cert_file", "--", "SPECDEC_SIDECAR_")
    -> "--tls-cert-file (SPECDEC_SIDECAR_TLS_CERT_FILE)"."""
    return f"{flag_name(field, flag_prefix)} ({env_prefix}{field.upper()})"
