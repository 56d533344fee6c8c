"""The gRPC layer: the servicer, its handler registration, request mapping (proto -> engine
request) and what a response carries besides tokens (draft provenance, trace context, the
request log line). Imports no torch: the engine's API types are plain dataclasses."""
