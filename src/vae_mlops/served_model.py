"""The file MLflow executes to load a registered VAE (models-from-code): it sets the pyfunc, nothing else.

`model_store.log_vae` logs this file as the model's `python_model`; the weights
and config are the model's artifacts, read by `pyfunc.VAEModel.load_context`.
"""

import mlflow

from vae_mlops.pyfunc import VAEModel

mlflow.models.set_model(VAEModel())
