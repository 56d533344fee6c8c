"""The contract in proto/specdec/v1: required names, buf style, and a client built from the
.proto files alone (compiled here, independently of the committed stubs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"

METRICS_FIELDS = {  # docs/metrics-contract.md, "The per-request record"
    "verify_passes",
    "draft_passes",
    "proposed_drafts",
    "accepted_drafts",
    "accept_rate",
    "accept_length",
    "accept_histogram",
    "proposed_per_position",
    "accepted_per_position",
    "prompt_tokens",
    "completion_tokens",
    "queue_time_seconds",
    "time_to_first_token_seconds",
    "duration_seconds",
    "request_id",
    "target_model",
    "method",
    "draft_model",
    "num_draft_tokens",
    "instance_id",
}


@pytest.fixture(scope="module")
def descriptor_set(tmp_path_factory) -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("desc") / "set.pb"
    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in sorted(PROTO_ROOT.rglob("*.proto"))]
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *files,
            ]
        )
        == 0
    )
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


def by_name(fds, kind: str) -> dict:
    found = {}
    for f in fds.file:
        for item in getattr(f, kind):
            found[item.name] = item
    return found


def test_package_is_versioned(descriptor_set) -> None:
    for f in descriptor_set.file:
        assert f.package == "specdec.v1", f.name
        assert f.name.startswith("specdec/v1/"), f.name


def test_required_services_and_rpcs(descriptor_set) -> None:
    services = by_name(descriptor_set, "service")
    gen = {m.name: m for m in services["GenerationService"].method}
    assert gen["Generate"].input_type == ".specdec.v1.GenerateRequest"
    assert gen["Generate"].output_type == ".specdec.v1.GenerateResponse"
    assert gen["Generate"].server_streaming and not gen["Generate"].client_streaming
    assert gen["GetServerInfo"].input_type == ".specdec.v1.GetServerInfoRequest"
    assert gen["GetServerInfo"].output_type == ".specdec.v1.GetServerInfoResponse"
    report = {m.name: m for m in services["TelemetryService"].method}["Report"]
    assert report.client_streaming and report.server_streaming


def test_every_rpc_has_its_own_request_and_response(descriptor_set) -> None:
    for service in by_name(descriptor_set, "service").values():
        for method in service.method:
            assert method.input_type == f".specdec.v1.{method.name}Request", method.name
            assert method.output_type == f".specdec.v1.{method.name}Response", method.name


def test_required_message_fields(descriptor_set) -> None:
    messages = by_name(descriptor_set, "message_type")
    fields = lambda name: {f.name: f for f in messages[name].field}  # noqa: E731
    request = fields("GenerateRequest")
    assert {
        "request_id",
        "text",
        "messages",
        "token_ids",
        "max_tokens",
        "sampling",
        "stop",
        "speculation",
    } <= request.keys()
    oneof = messages["GenerateRequest"].oneof_decl[request["text"].oneof_index].name
    assert oneof == "input"
    assert {request[n].oneof_index for n in ("text", "messages", "token_ids")} == {
        request["text"].oneof_index
    }
    assert {"temperature", "top_p", "top_k", "seed"} <= fields("SamplingParams").keys()
    assert {"method", "num_draft_tokens"} <= fields("SpeculationParams").keys()
    response = fields("GenerateResponse")
    assert response["chunk"].oneof_index == response["final"].oneof_index
    assert {"finish_reason", "prompt_tokens", "completion_tokens", "metrics"} <= fields(
        "GenerateFinal"
    ).keys()
    metrics = fields("SpeculativeMetrics")
    assert METRICS_FIELDS <= metrics.keys(), METRICS_FIELDS - metrics.keys()
    # Ratios that may be undefined have explicit presence.
    for name in ("accept_rate", "accept_length", "time_to_first_token_seconds"):
        assert metrics[name].proto3_optional, name


def test_speculation_method_enum(descriptor_set) -> None:
    enums = by_name(descriptor_set, "enum_type")
    names = [v.name for v in enums["SpeculationMethod"].value]
    assert names[0] == "SPECULATION_METHOD_UNSPECIFIED"
    assert {"SPECULATION_METHOD_NONE", "SPECULATION_METHOD_NGRAM", "SPECULATION_METHOD_DRAFT_MODEL"} <= set(
        names
    )


def test_buf_style(descriptor_set) -> None:
    """Enum zero values are *_UNSPECIFIED; every message, field, enum value, service and rpc
    has a leading doc comment."""
    problems = []
    for f in descriptor_set.file:
        comments = {tuple(loc.path): loc.leading_comments.strip() for loc in f.source_code_info.location}

        def need(path: tuple, what: str) -> None:
            if not comments.get(path):  # noqa: B023
                problems.append(f"{f.name}: {what} has no doc comment")  # noqa: B023

        for mi, message in enumerate(f.message_type):
            need((4, mi), f"message {message.name}")
            for fi, field in enumerate(message.field):
                need((4, mi, 2, fi), f"field {message.name}.{field.name}")
        for ei, enum in enumerate(f.enum_type):
            need((5, ei), f"enum {enum.name}")
            if enum.value[0].number != 0 or not enum.value[0].name.endswith("_UNSPECIFIED"):
                problems.append(f"{f.name}: enum {enum.name} zero value is not *_UNSPECIFIED")
            for vi, value in enumerate(enum.value):
                need((5, ei, 2, vi), f"enum value {value.name}")
        for si, service in enumerate(f.service):
            need((6, si), f"service {service.name}")
            for ri, method in enumerate(service.method):
                need((6, si, 2, ri), f"rpc {service.name}.{method.name}")
    assert not problems, "\n".join(problems)


CLIENT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from specdec.v1 import generation_pb2, generation_pb2_grpc, metrics_pb2
    req = generation_pb2.GenerateRequest(
        request_id="r-1", max_tokens=32, stop=["\\n\\n", "END"],
        sampling=generation_pb2.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=7),
        speculation=generation_pb2.SpeculationParams(
            method=metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL, num_draft_tokens=5),
    )
    req.text = "hello"
    assert req.WhichOneof("input") == "text"
    req.messages.messages.add(role="user", content="hi")
    assert req.WhichOneof("input") == "messages"
    req.token_ids.ids.extend([1, 2, 3])
    assert req.WhichOneof("input") == "token_ids"
    assert hasattr(generation_pb2_grpc, "GenerationServiceStub")
    sys.stdout.buffer.write(req.SerializeToString())
""")


def test_client_from_proto_files_alone(tmp_path: Path) -> None:
    """Compile the .proto files into a fresh directory, build a request with every field
    there (in a separate interpreter, so the committed stubs play no part), and check the
    committed stubs read the same bytes."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in sorted(PROTO_ROOT.rglob("*.proto"))]
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={tmp_path}",
                f"--grpc_python_out={tmp_path}",
                *files,
            ]
        )
        == 0
    )
    for package in (tmp_path / "specdec", tmp_path / "specdec" / "v1"):
        (package / "__init__.py").touch()
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    wire = subprocess.run(
        [sys.executable, "-S", str(script), str(tmp_path)],
        check=False,
        capture_output=True,
        cwd=tmp_path,
        env={"PYTHONPATH": ":".join(p for p in sys.path if "site-packages" in p)},
    )
    assert wire.returncode == 0, wire.stderr.decode()

    from specdec.v1 import generation_pb2, metrics_pb2

    request = generation_pb2.GenerateRequest.FromString(wire.stdout)
    assert request.request_id == "r-1" and request.max_tokens == 32
    assert list(request.stop) == ["\n\n", "END"]
    assert list(request.token_ids.ids) == [1, 2, 3]
    assert request.sampling.seed == 7 and request.sampling.top_k == 40
    assert request.speculation.method == metrics_pb2.SPECULATION_METHOD_DRAFT_MODEL
    assert request.speculation.num_draft_tokens == 5
