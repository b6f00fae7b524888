"""Helpers shared by the tests: a project copy run with the real tools, synthetic IDX data, MLflow stores."""
