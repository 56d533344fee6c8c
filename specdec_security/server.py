"""ServerSecurity (the four settings of a gRPC server) and SecuredServer (what a grpc.aio
server is built with from them: interceptors, the listening port's credentials, the token
reload that SIGHUP triggers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from specdec_common.settings import flag_name, setting_name
from specdec_security.interceptor import BearerTokenInterceptor
from specdec_security.refusal_log import RefusalLogInterceptor
from specdec_security.tls import check_ca_bundle, check_certificate_and_key, server_credentials
from specdec_security.tokens import TokenSet

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ServerSecurity:
    """Empty strings mean off: plaintext and no token check (the loopback default)."""

    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    auth_tokens_file: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def problem(self, flag_prefix: str = "--") -> str | None:
        """A combination that cannot work, with its flags named; None when consistent."""

        def flag(field: str) -> str:
            return flag_name(field, flag_prefix)

        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            return f"{flag('tls_cert_file')} and {flag('tls_key_file')} go together (TLS needs both)"
        if self.tls_client_ca_file and not self.tls_cert_file:
            return (
                f"{flag('tls_client_ca_file')} (mutual TLS) needs {flag('tls_cert_file')} "
                f"and {flag('tls_key_file')}"
            )
        return None


class SecuredServer:
    """Reads and checks every file at construction: a file that cannot serve is a start-up
    error naming its setting (SecuritySetupError), not a failure at the first handshake."""

    def __init__(self, security: ServerSecurity, env_prefix: str, flag_prefix: str = "--") -> None:
        def name(field: str) -> str:
            return setting_name(field, flag_prefix, env_prefix)

        self.security = security
        self.tokens = (
            TokenSet(security.auth_tokens_file, name("auth_tokens_file"))
            if security.auth_tokens_file
            else None
        )
        self.credentials: grpc.ServerCredentials | None = None
        if security.tls:
            chain, key = check_certificate_and_key(
                security.tls_cert_file, security.tls_key_file, name("tls_cert_file"), name("tls_key_file")
            )
            client_ca = (
                check_ca_bundle(security.tls_client_ca_file, name("tls_client_ca_file"))
                if security.tls_client_ca_file
                else None
            )
            self.credentials = server_credentials(chain, key, client_ca)
        if self.tokens is not None and self.credentials is None:
            log.warning(
                "auth_tokens_over_plaintext",
                note="bearer tokens are sent unencrypted: anyone on the network path can "
                "read and replay them; set --tls-cert-file and --tls-key-file",
            )

    @property
    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """The token check (when tokens are on), then the refusal log: it sees only the
        calls the token check let through (that one logs its own refusals)."""
        refusals = RefusalLogInterceptor()
        if self.tokens is None:
            return [refusals]
        return [BearerTokenInterceptor(self.tokens), refusals]

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """The bound port (0 when the address cannot be bound)."""
        if self.credentials is not None:
            return server.add_secure_port(address, self.credentials)
        return server.add_insecure_port(address)

    def reload_tokens(self) -> None:
        """SIGHUP: re-read the tokens file (a bad file keeps the previous tokens)."""
        if self.tokens is None:
            log.info("auth_tokens_reload_skipped", reason="no tokens file is configured")
            return
        self.tokens.reload()

    def describe(self) -> dict[str, Any]:
        """Fields for the start-up log line (no secrets)."""
        return {
            "tls": self.credentials is not None,
            "mutual_tls": bool(self.security.tls_client_ca_file),
            "auth_tokens": len(self.tokens) if self.tokens is not None else 0,
        }
