"""Benchmarks, run from the repository root as `python -m bench.<tool>` (each has --help).

Tools: service_decode (realistic sizes, in-process and through gRPC), gpu_decode (our engine
against transformers on one GPU; plots draws its PNGs), gpu_pass_cost and prefill_cost (one
forward pass by path and shape), random_model (the random-weight models they use), cpu_pair,
model_load, sidecar_ingest, service_reporting_overhead, soak and fuzz_requests. What they share
is in bench/common/; one-off diagnostics of past changes in bench/diagnostics/; helpers shared
with the tests in testkit/. Current results: bench/RESULTS.md; earlier ones: bench/history/.
"""
