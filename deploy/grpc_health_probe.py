#!/usr/bin/env python3
"""A grpc_health_probe work-alike for the images' HEALTHCHECK (no binary to download).

Calls grpc.health.v1.Health/Check and exits 0 when the answer is SERVING, 1 otherwise
(NOT_SERVING, UNKNOWN, connection refused, deadline exceeded), printing one line either way.

    grpc-health-probe [--addr HOST:PORT | --addr-env VAR] [--service NAME] [--timeout S]
                      [--tls-ca-file CA [--tls-cert-file CERT --tls-key-file KEY]]

--addr-env reads the address from an environment variable (SPECDEC_LISTEN for the service,
SPECDEC_SIDECAR_LISTEN for the sidecar), so the probe follows the listen address the
container was started with. A wildcard host (0.0.0.0, [::], empty) is probed on loopback.
With --tls-ca-file the probe speaks TLS and checks the server's certificate against that CA
(the certificate must be valid for the probed host: make_certs.sh always includes 127.0.0.1);
a server that requires client certificates also needs --tls-cert-file and --tls-key-file.
Health needs no bearer token.
"""

from __future__ import annotations

import argparse
import os
import sys

WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]", "*"}


def probe_address(address: str) -> str:
    """HOST:PORT to connect to: the listen address, with wildcard hosts replaced by loopback."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, not {address!r}")
    if host in WILDCARD_HOSTS:
        host = "127.0.0.1"
    return f"{host}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpc-health-probe", description=__doc__.split("\n")[0])
    parser.add_argument("--addr", help="HOST:PORT to probe")
    parser.add_argument("--addr-env", help="environment variable holding the listen address")
    parser.add_argument(
        "--default-addr",
        default="127.0.0.1:50051",
        help="address when --addr is absent and the variable is unset",
    )
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds")
    parser.add_argument("--tls-ca-file", default="", help="PEM CA of the server's certificate: TLS")
    parser.add_argument("--tls-cert-file", default="", help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key-file", default="", help="private key of --tls-cert-file")
    args = parser.parse_args(argv)
    if bool(args.tls_cert_file) != bool(args.tls_key_file) or (args.tls_cert_file and not args.tls_ca_file):
        print(
            "grpc-health-probe: --tls-cert-file and --tls-key-file go together, with --tls-ca-file",
            file=sys.stderr,
        )
        return 2
    raw = args.addr or (os.environ.get(args.addr_env, "") if args.addr_env else "") or args.default_addr
    try:
        address = probe_address(raw)
    except ValueError as exc:
        print(f"grpc-health-probe: {exc}", file=sys.stderr)
        return 2

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        credentials = None
        if args.tls_ca_file:

            def read(path: str) -> bytes | None:
                if not path:
                    return None
                with open(path, "rb") as f:
                    return f.read()

            credentials = grpc.ssl_channel_credentials(
                read(args.tls_ca_file), read(args.tls_key_file), read(args.tls_cert_file)
            )
    except OSError as exc:
        print(f"grpc-health-probe: {exc}", file=sys.stderr)
        return 2
    try:
        with (
            grpc.secure_channel(address, credentials)
            if credentials is not None
            else grpc.insecure_channel(address)
        ) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as exc:
        print(f"grpc-health-probe: {address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
