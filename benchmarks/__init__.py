"""Measurements of the project, kept outside the product package: `python -m benchmarks.<name>`."""
