"""Pipelines: small end-to-end models and drivers used by the demo, the benchmarks and the tests."""
