"""specdec.v1 messages and services: import the *_pb2 / *_pb2_grpc modules directly."""
