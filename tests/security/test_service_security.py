"""The inference service over TLS and mutual TLS with bearer tokens, specdec-client's
security flags, and the service's reporter to a secured sidecar: real servers on loopback
with the tiny model, certificates from scripts/make_certs.sh."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from structlog.testing import capture_logs

from service.config import ServiceConfig
from specdec.v1 import generation_pb2, generation_pb2_grpc
from specdec_security import SecuritySetupError
from tests.security.conftest import REPO, TOKEN_A, TOKEN_B
from tests.security.test_sidecar_security import bearer, client_credentials, secure_args
from tests.service.conftest import service_config
from tests.telemetry.support import free_port, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING


def secured(certs, tokens_path: str, mutual: bool = True) -> dict:
    return dict(
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca if mutual else "",
        auth_tokens_file=tokens_path,
    )


def generate(channel: grpc.Channel, metadata=(), text: str = "hello") -> list:
    stub = generation_pb2_grpc.GenerationServiceStub(channel)
    return list(
        stub.Generate(generation_pb2.GenerateRequest(text=text, max_tokens=3), timeout=30, metadata=metadata)
    )


def last_json(out: str) -> dict:
    """The client's JSON line (the in-process service logs to the same stdout)."""
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_generate_needs_a_token_over_mutual_tls_and_health_does_not(certs, token_file, run_service) -> None:
    service = run_service(**secured(certs, token_file(TOKEN_A, TOKEN_B)))
    with grpc.secure_channel(service.address, client_credentials(certs)) as channel:
        assert (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == SERVING
        )
        for metadata, message in (
            ((), "missing bearer token"),
            (bearer("x" * 32), "the bearer token is not valid"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                generate(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                generation_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(
                    generation_pb2.GetServerInfoRequest(), timeout=5, metadata=metadata
                )
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for token in (TOKEN_A, TOKEN_B):  # both tokens of a rotation are accepted
            responses = generate(channel, bearer(token))
            assert responses[-1].final.completion_tokens == 3
        info = generation_pb2_grpc.GenerationServiceStub(channel).GetServerInfo(
            generation_pb2.GetServerInfoRequest(), timeout=5, metadata=bearer(TOKEN_A)
        )
        assert info.instance_id == "test-instance"
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as refused:
            list(reflection.ServerReflectionInfo(iter([ask]), timeout=5))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answers = list(reflection.ServerReflectionInfo(iter([ask]), timeout=5, metadata=bearer(TOKEN_A)))
        assert "specdec.v1.GenerationService" in {s.name for s in answers[0].list_services_response.service}
    with grpc.secure_channel(service.address, client_credentials(certs, with_client_cert=False)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            generate(channel, bearer(TOKEN_A))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate: no handshake
    with grpc.insecure_channel(service.address) as channel, pytest.raises(grpc.RpcError) as info:
        generate(channel, bearer(TOKEN_A))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_specdec_client_uses_tls_a_client_certificate_and_a_token(
    certs, token_file, run_service, capsys
) -> None:
    from service.client.cli import main

    service = run_service(**secured(certs, token_file(TOKEN_A)))
    common = [
        "hello",
        "--target",
        service.address,
        "--max-tokens",
        "2",
        "--json",
        "--tls-ca-file",
        certs.ca,
        "--tls-cert-file",
        certs.client_cert,
        "--tls-key-file",
        certs.client_key,
    ]
    assert main([*common, "--auth-token-file", token_file(TOKEN_A)]) == 0
    assert last_json(capsys.readouterr().out)["completion_tokens"] == 2
    assert main([*common, "--auth-token-file", token_file(TOKEN_B)]) == 2
    assert "UNAUTHENTICATED: the bearer token is not valid" in capsys.readouterr().err
    assert main(common) == 2
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err


def test_specdec_client_reads_its_settings_from_the_environment(
    certs, token_file, run_service, monkeypatch, capsys
) -> None:
    from service.client.cli import main

    service = run_service(**secured(certs, token_file(TOKEN_A), mutual=False))
    monkeypatch.setenv("SPECDEC_CLIENT_TLS_CA_FILE", certs.ca)
    monkeypatch.setenv("SPECDEC_CLIENT_AUTH_TOKEN_FILE", token_file(TOKEN_A))
    assert main(["hi", "--target", service.address, "--max-tokens", "1", "--json"]) == 0
    assert last_json(capsys.readouterr().out)["completion_tokens"] == 1
    monkeypatch.setenv("SPECDEC_CLIENT_AUTH_TOKEN_FILE", "/nonexistent/token")
    assert main(["hi", "--target", service.address]) == 2
    assert "--auth-token-file (SPECDEC_CLIENT_AUTH_TOKEN_FILE): cannot read" in capsys.readouterr().err


def test_the_service_reports_to_a_secured_sidecar(
    certs, token_file, run_service, sidecar_thread_factory
) -> None:
    sidecar = sidecar_thread_factory(secure_args(certs, token_file(TOKEN_B)))
    service = run_service(
        telemetry_target=sidecar.address,
        telemetry_tls_ca_file=certs.ca,
        telemetry_tls_cert_file=certs.client_cert,
        telemetry_tls_key_file=certs.client_key,
        telemetry_auth_token_file=token_file(TOKEN_B),
    )
    with grpc.insecure_channel(service.address) as channel:  # the service itself: plaintext
        assert generate(channel)[-1].final.completion_tokens == 3
    reporter = service.service.reporter
    assert reporter.flush(20), reporter.stats
    assert sidecar.sidecar.sources.peek(reporter.source_id).processed == 1


def test_service_settings_are_flags_over_environment_variables(certs) -> None:
    env = {
        "SPECDEC_TLS_CERT_FILE": certs.server_cert,
        "SPECDEC_TLS_KEY_FILE": certs.server_key,
        "SPECDEC_TLS_CLIENT_CA_FILE": certs.ca,
        "SPECDEC_AUTH_TOKENS_FILE": "/t",
        "SPECDEC_TELEMETRY_TLS_CA_FILE": certs.ca,
        "SPECDEC_TELEMETRY_AUTH_TOKEN_FILE": "/r",
    }
    config = ServiceConfig.from_args(["--auth-tokens-file", "/u"], environ=env)
    assert (
        config.tls_cert_file,
        config.tls_key_file,
        config.tls_client_ca_file,
        config.auth_tokens_file,
    ) == (certs.server_cert, certs.server_key, certs.ca, "/u")
    assert (config.telemetry_tls_ca_file, config.telemetry_auth_token_file) == (certs.ca, "/r")
    defaults = ServiceConfig.from_args([], environ={})
    assert not defaults.server_security.tls and not defaults.auth_tokens_file  # make run: plaintext


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tls-cert-file", "a.pem"], "--tls-cert-file and --tls-key-file go together"),
        (["--tls-client-ca-file", "ca.pem"], "--tls-client-ca-file (mutual TLS) needs --tls-cert-file"),
        (
            ["--telemetry-tls-cert-file", "c.pem", "--telemetry-tls-key-file", "c.key"],
            "--telemetry-tls-cert-file (mutual TLS) needs --telemetry-tls-ca-file",
        ),
    ],
)
def test_inconsistent_service_settings_are_named(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        ServiceConfig.from_args(argv, environ={})
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(tls_cert_file="client.pem"), "--tls-cert-file (SPECDEC_TLS_CERT_FILE) / --tls-key-file"),
        (
            dict(telemetry_target="127.0.0.1:1", telemetry_tls_ca_file="server.key"),
            "--telemetry-tls-ca-file (SPECDEC_TELEMETRY_TLS_CA_FILE)",
        ),
    ],
)
def test_unusable_files_stop_the_service_start(certs, tiny_model_dir, overrides, message) -> None:
    from service.server import Service

    files = {
        key: certs.path(value) if key != "telemetry_target" else value for key, value in overrides.items()
    }
    config = service_config(tiny_model_dir, **{**secured(certs, ""), **files})
    with pytest.raises(SecuritySetupError) as info:
        Service(config)
    assert message in str(info.value)


def test_sighup_reloads_the_service_tokens(certs, token_file, tiny_model_dir, tmp_path) -> None:
    path = token_file(TOKEN_A)
    port = free_port()
    log = open(tmp_path / "service.log", "wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service",
            "--listen",
            f"127.0.0.1:{port}",
            "--model",
            str(tiny_model_dir),
            "--telemetry-target",
            "",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--tls-cert-file",
            certs.server_cert,
            "--tls-key-file",
            certs.server_key,
            "--auth-tokens-file",
            path,
        ],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        with grpc.secure_channel(f"127.0.0.1:{port}", client_credentials(certs, False)) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                assert server.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
                try:
                    return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
                except grpc.RpcError:
                    return False

            wait_for(serving, 120, 0.2, "service SERVING over TLS")
            assert generate(channel, bearer(TOKEN_A))
            with open(path, "w") as f:
                f.write(f"{TOKEN_B}\n")
            server.send_signal(signal.SIGHUP)
            wait_for(lambda: b"auth_tokens_reloaded" in (tmp_path / "service.log").read_bytes(), 10)
            with pytest.raises(grpc.RpcError) as info:
                generate(channel, bearer(TOKEN_A))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert generate(channel, bearer(TOKEN_B))
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    text = (tmp_path / "service.log").read_text()
    assert "request_unauthenticated" in text and TOKEN_A not in text and TOKEN_B not in text


def test_specdec_bench_uses_tls_and_a_token(certs, token_file, run_service, tmp_path, capsys) -> None:
    from service.client.loadgen.cli import main

    service = run_service(**secured(certs, token_file(TOKEN_A), mutual=False))
    common = [
        "--target",
        service.address,
        "--prompts",
        "builtin:grounded",
        "--modes",
        "burst",
        "--concurrency",
        "2",
        "--max-tokens",
        "2",
        "--connect-timeout-s",
        "5",
        "--tls-ca-file",
        certs.ca,
    ]
    out = tmp_path / "bench.json"
    assert main([*common, "--auth-token-file", token_file(TOKEN_A), "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["requests"]["succeeded"] == 2
    assert main(common) == 2
    assert "UNAUTHENTICATED: missing bearer token" in capsys.readouterr().err


def test_a_token_over_plaintext_is_sent_with_a_warning(token_file, run_service, capsys) -> None:
    from service.client.cli import main

    service = run_service(auth_tokens_file=token_file(TOKEN_A))
    with capture_logs() as logs:
        assert (
            main(
                [
                    "hi",
                    "--target",
                    service.address,
                    "--max-tokens",
                    "1",
                    "--json",
                    "--auth-token-file",
                    token_file(TOKEN_A),
                ]
            )
            == 0
        )
    assert last_json(capsys.readouterr().out)["completion_tokens"] == 1
    warned = [e for e in logs if e["event"] == "auth_token_over_plaintext"]
    assert warned and "--tls-ca-file" in warned[0]["note"]
