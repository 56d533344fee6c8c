"""Modules the benchmarks share: child processes, time budgets, the roofline, the truncated draft."""
