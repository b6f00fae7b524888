"""Prefect orchestration of the DVC pipeline: flows, deployments, scheduled retraining.

`flows.py` holds the flows (`vae-pipeline`, `vae-train`), `deploy.py` the work
pools and deployments, `serve.py` the local server and worker behind `make serve`,
`dvcrun.py` the DVC commands the tasks run. See docs/prefect.md.
"""
