"""Names derived from the proto descriptors, so no module spells them by hand."""

from __future__ import annotations

from specdec.v1 import generation_pb2, metrics_pb2, telemetry_pb2

_METHOD_ENUM = metrics_pb2.SpeculationMethod.DESCRIPTOR
_METHOD_PREFIX = "SPECULATION_METHOD_"

# SpeculationMethod value -> its short lower-case name: NGRAM -> "ngram", UNSPECIFIED -> "unspecified".
METHOD_NAMES: dict[int, str] = {
    value.number: value.name.removeprefix(_METHOD_PREFIX).lower() for value in _METHOD_ENUM.values
}
# The methods a caller may choose by name ("none", "ngram", "draft_model"): every value but UNSPECIFIED.
METHOD_BY_NAME: dict[str, int] = {
    name: number
    for number, name in METHOD_NAMES.items()
    if number != metrics_pb2.SPECULATION_METHOD_UNSPECIFIED
}

_FINISH_ENUM = metrics_pb2.FinishReason.DESCRIPTOR
# FinishReason value -> "eos", "stop_sequence", "length", "cancelled", "error" (UNSPECIFIED left out).
FINISH_REASON_NAMES: dict[int, str] = {
    value.number: value.name.removeprefix("FINISH_REASON_").lower()
    for value in _FINISH_ENUM.values
    if value.number != metrics_pb2.FINISH_REASON_UNSPECIFIED
}

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"]
TELEMETRY_SERVICE = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"]


def rpc_path(service, method: str) -> str:
    """The HTTP/2 path of a method, "/package.Service/Method", as gRPC sends it."""
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


REPORT_METHOD = rpc_path(TELEMETRY_SERVICE, "Report")
