"""Evaluation: sizes, metrics, benchmarks and reports."""
