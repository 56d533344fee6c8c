"""Transport security shared by the inference service and the telemetry sidecar: TLS and
mutual-TLS credentials, bearer tokens read from a file, the server interceptor that
checks them on every RPC except grpc.health.v1, the one that logs refused calls
(refusal_log.py, rate-limited by log_limit.py), and the descriptor pool reflection serves
(reflection.py).

Imports only grpc, structlog and the standard library, so the sidecar (which must not load
torch) and the service use one implementation.

    from specdec_security import ServerSecurity, ClientSecurity
"""

from specdec_security.client import ClientSecurity
from specdec_security.server import SecuredServer, ServerSecurity
from specdec_security.tokens import SecuritySetupError, TokenSet

__all__ = ["ClientSecurity", "SecuredServer", "SecuritySetupError", "ServerSecurity", "TokenSet"]
