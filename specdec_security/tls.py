"""PEM files -> grpc credentials, checked with the standard library's ssl module first, so a
wrong file is a start-up error that names its setting rather than a failed handshake later."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from specdec_security.tokens import SecuritySetupError


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SecuritySetupError(f"{setting}: cannot read {path!r}: {exc.strerror or exc}") from None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return exc.reason or exc.strerror or str(exc)


def check_certificate_and_key(
    cert_file: str, key_file: str, cert_setting: str, key_setting: str
) -> tuple[bytes, bytes]:
    """(chain, key) PEM bytes after checking that the key is the certificate's."""
    chain, key = _read(cert_file, cert_setting), _read(key_file, key_setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise SecuritySetupError(
            f"{cert_setting} / {key_setting}: {cert_file!r} and {key_file!r} are not a PEM "
            f"certificate chain and its private key ({_ssl_reason(exc)})"
        ) from None
    return chain, key


def check_ca_bundle(ca_file: str, setting: str) -> bytes:
    """PEM bytes of a bundle of at least one CA certificate."""
    data = _read(ca_file, setting)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca_file)
    except ssl.SSLError as exc:
        raise SecuritySetupError(
            f"{setting}: {ca_file!r} is not a PEM CA certificate bundle ({_ssl_reason(exc)})"
        ) from None
    return data


def server_credentials(chain: bytes, key: bytes, client_ca: bytes | None) -> grpc.ServerCredentials:
    """TLS; with `client_ca`, mutual TLS: a client must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(
    ca: bytes, chain: bytes | None = None, key: bytes | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=chain)
