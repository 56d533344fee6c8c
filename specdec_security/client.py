"""ClientSecurity: the settings of a gRPC client of either server (the service's reporter,
specdec-client): the CA that signed the server's certificate, a client certificate for mutual
TLS, and a file holding the bearer token to send."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import structlog

from specdec_common.settings import flag_name, setting_name
from specdec_security.interceptor import AUTHORIZATION
from specdec_security.tls import channel_credentials, check_ca_bundle, check_certificate_and_key
from specdec_security.tokens import read_single_token

Metadata = tuple[tuple[str, str], ...]

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ClientSecurity:
    """Empty strings mean off. `flag_prefix` and `env_prefix` name the settings in errors
    (the reporter's are --telemetry-* / SPECDEC_TELEMETRY_*)."""

    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    auth_token_file: str = ""
    flag_prefix: str = "--"
    env_prefix: str = ""

    def _name(self, field: str) -> str:
        return setting_name(field, self.flag_prefix, self.env_prefix)

    def problem(self) -> str | None:
        """A combination that cannot work, with its flags named; None when consistent."""

        def flag(field: str) -> str:
            return flag_name(field, self.flag_prefix)

        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            return f"{flag('tls_cert_file')} and {flag('tls_key_file')} go together"
        if self.tls_cert_file and not self.tls_ca_file:
            return f"{flag('tls_cert_file')} (mutual TLS) needs {flag('tls_ca_file')}"
        return None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for plaintext (logged as a warning when a token is set: it
        would travel readable and replayable); raises SecuritySetupError for a bad file."""
        if not self.tls_ca_file:
            if self.auth_token_file:
                log.warning(
                    "auth_token_over_plaintext",
                    setting=self._name("auth_token_file"),
                    note=f"the bearer token is sent unencrypted; set {self._name('tls_ca_file')}",
                )
            return None
        ca = check_ca_bundle(self.tls_ca_file, self._name("tls_ca_file"))
        chain = key = None
        if self.tls_cert_file:
            chain, key = check_certificate_and_key(
                self.tls_cert_file, self.tls_key_file, self._name("tls_cert_file"), self._name("tls_key_file")
            )
        return channel_credentials(ca, chain, key)

    def call_metadata(self) -> Metadata:
        """The authorization metadata, read from the token file now (a rotated file is
        picked up by the next call); () when no token file is set."""
        if not self.auth_token_file:
            return ()
        token = read_single_token(self.auth_token_file, self._name("auth_token_file"))
        return ((AUTHORIZATION, f"Bearer {token}"),)
