"""One-off diagnostics: each answered a question of a past change; RESULTS.md and bench/history/ keep
what they found. Run as `python -m bench.diagnostics.<name>`."""
