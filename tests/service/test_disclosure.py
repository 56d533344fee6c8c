"""What the service tells a caller about itself: no file-system path of a model (in
GetServerInfo, in the metrics records and so in every exported series), and reflection
serves the public API's .proto files only, not the internal telemetry.proto."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from specdec.v1 import generation_pb2, telemetry_pb2
from tests.service.test_generate import collect, request


def test_a_model_loaded_from_a_path_is_served_under_its_last_component(
    run_service, make_stub, tiny_model_dir
) -> None:
    service = run_service()
    stub = make_stub(service.address)
    info = stub.GetServerInfo(generation_pb2.GetServerInfoRequest(), timeout=10)
    assert info.target_model == tiny_model_dir.name
    assert "/" not in info.target_model and str(tiny_model_dir) not in str(info)
    _, final, _ = collect(stub, request(max_tokens=2))
    assert final.metrics.target_model == tiny_model_dir.name  # the records' model label


def test_reflection_serves_the_public_api_only(run_service) -> None:
    # The default descriptor pool of this process holds telemetry.proto (imported above), as
    # the service's own does once its reporter is loaded.
    assert descriptor_pool.Default().FindFileByName(telemetry_pb2.DESCRIPTOR.name)
    service = run_service()
    with grpc.insecure_channel(service.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        generation = database.FindFileContainingSymbol("specdec.v1.GenerationService")
        assert generation.name == "specdec/v1/generation.proto"
        assert database.FindFileByName("specdec/v1/metrics.proto").name == "specdec/v1/metrics.proto"
        pool = descriptor_pool.DescriptorPool(database)
        assert (
            pool.FindMethodByName("specdec.v1.GenerationService.Generate").output_type.name
            == "GenerateResponse"
        )
        for lookup, name in (
            (database.FindFileByName, "specdec/v1/telemetry.proto"),
            (database.FindFileContainingSymbol, "specdec.v1.TelemetryService"),
            (database.FindFileContainingSymbol, "specdec.v1.ReportRequest"),
        ):
            with pytest.raises(KeyError):
                lookup(name)
