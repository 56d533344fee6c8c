"""The sidecar's ingest over TLS and mutual TLS with bearer tokens: real servers on loopback,
certificates from scripts/make_certs.sh, the service's real MetricsReporter."""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.reporting import MetricsReporter
from specdec.v1 import telemetry_pb2
from specdec_security import ClientSecurity, SecuritySetupError
from telemetry.config import ConfigError, SidecarConfig
from tests.security.conftest import REPO, TOKEN_A, TOKEN_B
from tests.telemetry.support import simulate_metrics, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
REPORT = "/specdec.v1.TelemetryService/Report"


def secure_args(certs, tokens_path: str, mutual: bool = True) -> list[str]:
    args = [
        "--exporters",
        "none",
        "--tls-cert-file",
        certs.server_cert,
        "--tls-key-file",
        certs.server_key,
        "--auth-tokens-file",
        tokens_path,
    ]
    return args + (["--tls-client-ca-file", certs.ca] if mutual else [])


def client_credentials(certs, with_client_cert: bool = True) -> grpc.ChannelCredentials:
    if not with_client_cert:
        return grpc.ssl_channel_credentials(certs.read("ca.pem"))
    return grpc.ssl_channel_credentials(
        certs.read("ca.pem"), certs.read("client.key"), certs.read("client.pem")
    )


def report_once(channel: grpc.Channel, metadata) -> list[telemetry_pb2.ReportResponse]:
    """One batch of one valid record on a Report stream."""
    request = telemetry_pb2.ReportRequest(source_id="probe/1")
    request.records.add(sequence=1).metrics.CopyFrom(simulate_metrics(random.Random(1)))
    call = channel.stream_stream(
        REPORT,
        request_serializer=telemetry_pb2.ReportRequest.SerializeToString,
        response_deserializer=telemetry_pb2.ReportResponse.FromString,
    )
    return list(call(iter([request]), metadata=metadata, timeout=10))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_reporter_over_mutual_tls_with_a_token_is_counted(certs, token_file, sidecar_thread_factory) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A, TOKEN_B)))
    security = ClientSecurity(certs.ca, certs.client_cert, certs.client_key, token_file(TOKEN_B))
    reporter = MetricsReporter(
        sidecar.address,
        instance_id="svc",
        channel_credentials=security.channel_credentials(),
        call_metadata=security.call_metadata,
    ).start()
    rng = random.Random(7)
    try:
        for _ in range(25):
            reporter.report(simulate_metrics(rng))
        assert reporter.flush(20), reporter.stats
    finally:
        reporter.stop(1)
    assert sidecar.sidecar.sources.peek(reporter.source_id).processed == 25


def test_a_reporter_with_a_wrong_token_writes_nothing(certs, token_file, sidecar_thread_factory) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A)))
    security = ClientSecurity(certs.ca, certs.client_cert, certs.client_key, token_file(TOKEN_B))
    reporter = MetricsReporter(
        sidecar.address,
        instance_id="svc",
        backoff_initial_s=0.05,
        channel_credentials=security.channel_credentials(),
        call_metadata=security.call_metadata,
    ).start()
    try:
        reporter.report(simulate_metrics(random.Random(3)))
        wait_for(lambda: reporter.stats.reconnects >= 2, 20, what="refused streams")
        assert not reporter.flush(0.5)
    finally:
        reporter.stop(0.1)
    assert len(sidecar.sidecar.sources) == 0  # nothing was even deduplicated


@pytest.mark.parametrize(
    "metadata, message",
    [
        ((), "missing bearer token"),
        (bearer(TOKEN_B), "the bearer token is not valid"),
        ((("authorization", TOKEN_A),), "is not 'Bearer <token>'"),
    ],
)
def test_report_without_a_valid_token_is_unauthenticated(
    certs, token_file, sidecar_thread_factory, metadata, message
) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A), mutual=False))
    with grpc.secure_channel(sidecar.address, client_credentials(certs, False)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            report_once(channel, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert message in info.value.details()
        assert TOKEN_A not in info.value.details() and TOKEN_B not in info.value.details()
        assert len(sidecar.sidecar.sources) == 0
        assert report_once(channel, bearer(TOKEN_A))  # acknowledged
        assert sidecar.sidecar.sources.peek("probe/1").processed == 1


def test_health_is_open_and_reflection_needs_the_token(certs, token_file, sidecar_thread_factory) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A)))
    with grpc.secure_channel(sidecar.address, client_credentials(certs)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as info:
            list(reflection.ServerReflectionInfo(iter([ask]), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflection.ServerReflectionInfo(iter([ask]), timeout=5, metadata=bearer(TOKEN_A)))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "specdec.v1.TelemetryService" in names


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(
    certs, other_certs, token_file, sidecar_thread_factory
) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A)))
    refused = [
        grpc.insecure_channel(sidecar.address),  # plaintext to a TLS port
        grpc.secure_channel(sidecar.address, client_credentials(certs, with_client_cert=False)),
        grpc.secure_channel(
            sidecar.address,
            grpc.ssl_channel_credentials(
                certs.read("ca.pem"), other_certs.read("client.key"), other_certs.read("client.pem")
            ),
        ),
        # a client that trusts another CA refuses the server's certificate
        grpc.secure_channel(sidecar.address, client_credentials(other_certs)),
    ]
    for channel in refused:
        with channel, pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(sidecar.address, client_credentials(certs)) as channel:
        assert report_once(channel, bearer(TOKEN_A))


def test_tls_without_client_certificates(certs, token_file, sidecar_thread_factory) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A), mutual=False))
    with grpc.secure_channel(sidecar.address, client_credentials(certs, False)) as channel:
        assert report_once(channel, bearer(TOKEN_A))
    with grpc.insecure_channel(sidecar.address) as channel, pytest.raises(grpc.RpcError) as info:
        report_once(channel, bearer(TOKEN_A))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_sighup_reloads_the_tokens_and_refusals_are_logged_without_them(
    certs, token_file, sidecar_process_factory
) -> None:
    path = token_file(TOKEN_A)
    sidecar = sidecar_process_factory(secure_args(certs, path, mutual=False), start=False)
    sidecar.start(wait=False)
    with grpc.secure_channel(sidecar.address, client_credentials(certs, False)) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        assert report_once(channel, bearer(TOKEN_A))
        with open(path, "w") as f:
            f.write(f"{TOKEN_B}\n")
        sidecar.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "auth_tokens_reloaded" in sidecar.log_tail(100_000), 10, what="reload logged")
        with pytest.raises(grpc.RpcError) as info:
            report_once(channel, bearer(TOKEN_A))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert report_once(channel, bearer(TOKEN_B))
        with open(path, "w") as f:  # a broken file on reload: the tokens in force stay
            f.write("not a token\n")
        sidecar.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "auth_tokens_reload_failed" in sidecar.log_tail(100_000), 10, what="failed reload logged"
        )
        assert report_once(channel, bearer(TOKEN_B))
    assert sidecar.terminate() == 0
    log = sidecar.log_tail(1_000_000)
    assert "request_unauthenticated" in log and "TelemetryService/Report" in log
    assert TOKEN_A not in log and TOKEN_B not in log


def test_sighup_without_a_tokens_file_is_logged_and_not_fatal(sidecar_process_factory) -> None:
    sidecar = sidecar_process_factory([], start=False)
    sidecar.start(wait=False)
    with grpc.insecure_channel(sidecar.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        sidecar.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: "auth_tokens_reload_skipped" in sidecar.log_tail(100_000),
            10,
            what="skipped reload logged",
        )
        assert sidecar.proc.poll() is None
        assert report_once(channel, ())
    assert sidecar.terminate() == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tls-cert-file", "x.pem"], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-key-file", "x.key"], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-client-ca-file", "ca.pem"], "--tls-client-ca-file (mutual TLS) needs --tls-cert-file"),
    ],
)
def test_inconsistent_settings_are_config_errors(argv, message) -> None:
    with pytest.raises(ConfigError) as info:
        SidecarConfig.from_args(argv, environ={})
    assert message in str(info.value)


def test_settings_come_from_the_environment(certs) -> None:
    env = {
        "SPECDEC_SIDECAR_TLS_CERT_FILE": certs.server_cert,
        "SPECDEC_SIDECAR_TLS_KEY_FILE": certs.server_key,
        "SPECDEC_SIDECAR_TLS_CLIENT_CA_FILE": certs.ca,
        "SPECDEC_SIDECAR_AUTH_TOKENS_FILE": "/run/secrets/tokens",
    }
    security = SidecarConfig.from_args([], environ=env).security
    assert (
        security.tls_cert_file,
        security.tls_key_file,
        security.tls_client_ca_file,
        security.auth_tokens_file,
    ) == (certs.server_cert, certs.server_key, certs.ca, "/run/secrets/tokens")
    assert SidecarConfig.from_args(["--auth-tokens-file", "t"], environ=env).security.auth_tokens_file == "t"


@pytest.mark.parametrize(
    "swap, message",
    [
        (
            {"--tls-key-file": "client.key"},
            "--tls-cert-file (SPECDEC_SIDECAR_TLS_CERT_FILE) / --tls-key-file (SPECDEC_SIDECAR_TLS_KEY_FILE)",
        ),
        ({"--tls-client-ca-file": "server.key"}, "--tls-client-ca-file (SPECDEC_SIDECAR_TLS_CLIENT_CA_FILE)"),
        ({"--tls-cert-file": "absent.pem"}, "--tls-cert-file (SPECDEC_SIDECAR_TLS_CERT_FILE): cannot read"),
    ],
)
def test_unusable_files_stop_the_start_naming_the_setting(certs, token_file, swap, message, capsys) -> None:
    from telemetry.__main__ import main

    args = secure_args(certs, token_file(TOKEN_A))
    for flag, name in swap.items():
        args[args.index(flag) + 1] = certs.path(name)
    assert main(["--listen", "127.0.0.1:0", *args]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_token_file_stops_the_sidecar_before_its_exporters_start(certs, tmp_path) -> None:
    """The security files are checked before the export set-up: a refused start leaves no
    Prometheus endpoint thread listening on the scrape port."""
    import socket
    import threading

    from telemetry.server import Sidecar
    from tests.telemetry.support import free_port

    bad_tokens = tmp_path / "bad.tokens"
    bad_tokens.write_text("short\n")  # below the 16-character minimum
    port = free_port()
    config = SidecarConfig.from_args(
        [
            "--listen",
            "127.0.0.1:0",
            "--exporters",
            "prometheus",
            "--prometheus-address",
            f"127.0.0.1:{port}",
            "--auth-tokens-file",
            str(bad_tokens),
        ],
        environ={},
    )
    threads_before = set(threading.enumerate())
    with pytest.raises(SecuritySetupError, match="SPECDEC_SIDECAR_AUTH_TOKENS_FILE"):
        Sidecar(config)
    assert set(threading.enumerate()) <= threads_before
    with socket.socket() as probe:  # nobody holds the scrape port
        probe.bind(("127.0.0.1", port))


def test_reflection_serves_the_ingest_api_only(sidecar_thread_factory) -> None:
    """The process's default pool holds other .proto files (here generation.proto, and the
    OTLP exporter's when OTLP is on); reflection serves telemetry.proto, its imports, health
    and reflection only."""
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from specdec.v1 import generation_pb2

    assert descriptor_pool.Default().FindFileByName(generation_pb2.DESCRIPTOR.name)
    sidecar = sidecar_thread_factory(["--exporters", "none"])
    with grpc.insecure_channel(sidecar.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert (
            database.FindFileContainingSymbol("specdec.v1.TelemetryService").name
            == "specdec/v1/telemetry.proto"
        )
        assert database.FindFileByName("specdec/v1/metrics.proto").name == "specdec/v1/metrics.proto"
        assert database.FindFileContainingSymbol("grpc.health.v1.Health").name
        for lookup, name in (
            (database.FindFileByName, "specdec/v1/generation.proto"),
            (database.FindFileContainingSymbol, "specdec.v1.GenerationService"),
        ):
            with pytest.raises(KeyError):
                lookup(name)


def test_the_images_health_probe_speaks_mutual_tls(certs, token_file, sidecar_thread_factory) -> None:
    """deploy/grpc_health_probe.py, as compose.secure.yml runs it: TLS with the CA and a
    client certificate, no token (health stays open)."""
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_A)))
    probe = [
        sys.executable,
        str(REPO / "deploy" / "grpc_health_probe.py"),
        "--addr",
        sidecar.address,
        "--timeout",
        "5",
    ]
    mutual = [
        "--tls-ca-file",
        certs.ca,
        "--tls-cert-file",
        certs.client_cert,
        "--tls-key-file",
        certs.client_key,
    ]
    done = subprocess.run([*probe, *mutual], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "SERVING" in done.stdout, done
    for args in ([], ["--tls-ca-file", certs.ca]):  # plaintext; TLS without a client certificate
        done = subprocess.run([*probe, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done
    done = subprocess.run(
        [*probe, "--tls-cert-file", certs.client_cert], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "go together" in done.stderr, done
