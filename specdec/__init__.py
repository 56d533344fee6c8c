"""Generated protobuf and gRPC code for the specdec.v1 contract (proto/specdec/v1).

Nothing here is written by hand except this file and specdec/v1/__init__.py;
regenerate with `python scripts/gen_proto.py`.
"""
