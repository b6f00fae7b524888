"""MLflow's basic auth plus one rule: only the accounts named in `VAE_MLFLOW_CREATORS` create anything.

MLflow's auth app lets every authenticated user create a new experiment or
registered model and makes them its manager, so a read-only account could take
(squat) a model name before the pipeline registers it. The MLflow servers this
project starts (`make ui`, `make services`) name this function as their
`authorization_function`: it authenticates exactly as MLflow does, then refuses
(403, with a message) any `.../create` call from an account that is not a
creator. `default_permission = READ` keeps non-creators from writing to what
exists.
"""

from __future__ import annotations

import os
import re

from flask import Response, make_response, request
from mlflow.server.auth import authenticate_request_basic_auth
from werkzeug.datastructures import Authorization

CREATORS_ENV = "VAE_MLFLOW_CREATORS"
# users/create, experiments/create, registered-models/create, runs/create, logged-models, webhooks, ...
_CREATES = re.compile(r"/(create|create-ui|upload-artifact)/?$")


def creators() -> frozenset[str]:
    return frozenset(name for name in os.environ.get(CREATORS_ENV, "").split(",") if name)


def authenticate() -> Authorization | Response:
    """MLflow's basic-auth check; a create call from an account outside the creators gets 403."""
    result = authenticate_request_basic_auth()
    if isinstance(result, Authorization) and _CREATES.search(request.path) and result.username not in creators():
        return make_response(
            f"403: account {result.username!r} may read but not create; the pipeline's account creates "
            "experiments and models\n",
            403,
        )
    return result
