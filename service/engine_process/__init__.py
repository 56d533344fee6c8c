"""The engine in a process of its own (docs/architecture.md, "Two processes of the service").

`client.EngineProcess` (the gRPC front end's side) starts `core.main` in a child process
that owns the models and the device and does nothing but run the engine; the two exchange
the messages of `protocol` over one pipe. The front end imports no torch.
"""
