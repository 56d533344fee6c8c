"""Helpers shared by the tests and the benchmarks (bench/): tiny random models, fuzz cases,
simulated metrics records, OTLP receivers and the sidecar as a child process. Not installed
with the service; imported from the repository root, as `tests` and `bench` are."""
