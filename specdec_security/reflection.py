"""The descriptor pool a server's reflection serves: its public .proto files and their
imports only. grpc_reflection otherwise serves the process's default pool, which holds every
.proto the process has loaded (internal ones, the OTLP exporter's)."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor


def reflection_pool(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """A new descriptor pool holding `files` and, before each, its imports."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for file in files:
        add(file)
    return pool
