"""SpeculativeMetrics -> a plain dict with native numbers (for log lines and CLI JSON).

json_format.MessageToDict renders uint64 as strings (the proto3 JSON mapping); a log line
or a shell pipeline wants numbers. Absent optional fields stay absent; enums become names.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from specdec.v1 import metrics_pb2


def metrics_to_dict(metrics: metrics_pb2.SpeculativeMetrics) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in metrics.DESCRIPTOR.fields:
        if field.has_presence and not metrics.HasField(field.name):
            continue
        value = getattr(metrics, field.name)
        if field.type == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values_by_number[value].name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:  # end_time (Timestamp)
            value = value.ToJsonString()
        elif field.is_repeated:
            value = list(value)
        out[field.name] = value
    return out
