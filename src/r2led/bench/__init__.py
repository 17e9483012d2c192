"""Benchmarks: accuracy (models x seeds, significance) and speed (latency/throughput vs T)."""
