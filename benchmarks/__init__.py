"""Benchmarks: what they measure and the numbers they gave are in RESULTS.md."""
