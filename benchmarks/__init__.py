"""Throughput and memory benchmarks of bts_lightning (``python -m benchmarks.benchmark --help``)."""
