"""Benchmarks: scripts, not tests (``python -m bench.run_benchmark``)."""
