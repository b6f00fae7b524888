"""The module the Model Registry holds: the VAE behind one call that returns one tensor.

MLflow's pytorch flavour serves `forward(x, **params)` and wants a single tensor
back, so the registered model wraps the VAE and picks what to return with the
inference parameter `output`:

    model = mlflow.pyfunc.load_model("models:/vae-mnist@champion")
    x = images.reshape(-1, 784).astype("float32") / 255          # (N, 784) on [0, 1]
    recon = model.predict(x)                                      # (N, 784) decoded z = mu
    mu = model.predict(x, params={"output": "mu"})                # (N, latent_dim)
    log_std = model.predict(x, params={"output": "log_std"})      # (N, latent_dim)

`mlflow.pytorch.load_model(...)` gives this module; its `.vae` is the VAE itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vae_mlops.model import VAE

OUTPUTS = ("reconstruction", "mu", "log_std")
DEFAULT_OUTPUT = "reconstruction"


class VAEServing(nn.Module):
    """Encode or reconstruct flattened images: `forward(x, output)` with `output` one of `OUTPUTS`."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae.eval()

    @torch.no_grad()
    def forward(self, x: Tensor, output: str = DEFAULT_OUTPUT) -> Tensor:
        mu, log_std = self.vae.encode(x.float())  # (N, L) each
        if output == "mu":
            return mu
        if output == "log_std":
            return log_std
        if output == "reconstruction":
            return self.vae.decode(mu)  # (N, 784) pixel means in [0, 1]
        raise ValueError(f"output={output!r}: must be one of {', '.join(OUTPUTS)}")
