"""`specdec-bench`: a load generator for the gRPC API (see cli.py).

It speaks only the specdec.v1 contract (generated stubs and grpc), so it runs anywhere a
client does and never imports the engine or torch.
"""
