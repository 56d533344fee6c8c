"""Command-line clients of the gRPC API, using only the .proto contract (no torch):
`cli` (specdec-client), `loadgen` (specdec-bench) and the connection options they share."""
