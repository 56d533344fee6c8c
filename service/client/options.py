"""What the two command-line clients (specdec-client, specdec-bench) share: the drafter names
they accept and the connection settings (TLS, mutual TLS, bearer token) with their flags and
SPECDEC_CLIENT_* variables. Imports only grpc and the generated stubs (no torch)."""

from __future__ import annotations

import argparse
import contextlib
import os

import grpc

from specdec.v1 import generation_pb2_grpc
from specdec_common.proto_names import METHOD_BY_NAME
from specdec_security import ClientSecurity

CLIENT_ENV_PREFIX = "SPECDEC_CLIENT_"

# Drafter names on the command line -> the proto enum.
METHODS = METHOD_BY_NAME

_SECURITY_FLAGS = (
    ("tls_ca_file", "PEM CA bundle that signed the server's certificate; set: TLS"),
    ("tls_cert_file", "PEM client certificate for mutual TLS"),
    ("tls_key_file", "private key of --tls-cert-file"),
    ("auth_token_file", "file holding the bearer token to send"),
)


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls-ca-file, --tls-cert-file, --tls-key-file, --auth-token-file; each flag overrides
    its SPECDEC_CLIENT_* variable."""
    for field, what in _SECURITY_FLAGS:
        env = CLIENT_ENV_PREFIX + field.upper()
        parser.add_argument(
            "--" + field.replace("_", "-"), default=os.environ.get(env, ""), help=f"{what} [env {env}]"
        )


def security_of(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(
        args.tls_ca_file,
        args.tls_cert_file,
        args.tls_key_file,
        args.auth_token_file,
        env_prefix=CLIENT_ENV_PREFIX,
    )


def open_channel(target: str, security: ClientSecurity, own_connection: bool = False) -> grpc.aio.Channel:
    """A TLS channel when a CA is set, else plaintext; raises SecuritySetupError for a bad file.
    `own_connection`: a connection of its own, not shared with the process's other channels
    to the same target (gRPC shares one by default)."""
    credentials = security.channel_credentials()
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else None
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


async def open_stubs(
    channels: contextlib.AsyncExitStack, target: str, security: ClientSecurity, connections: int
) -> list[generation_pb2_grpc.GenerationServiceStub]:
    """`connections` GenerationService stubs, each on a channel entered into `channels`; more
    than one: each channel on a connection of its own (open_channel's own_connection)."""
    return [
        generation_pb2_grpc.GenerationServiceStub(
            await channels.enter_async_context(open_channel(target, security, own_connection=connections > 1))
        )
        for _ in range(connections)
    ]
