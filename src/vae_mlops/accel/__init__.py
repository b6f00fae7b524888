"""The fast path's one door: hand-written maths that does what a plain path elsewhere does, in less time.

Its face is four names; the rest of the code imports them from here, never from a module inside:

- `fused_elbo` / `fused_grads`: the `mlp`'s ELBO step with a hand-written backward pass (`elbo.py`),
  as an autograd function and without autograd; the reference is autograd through `model.VAE`.
- `CudaGraphStep`: a training step recorded once as a CUDA graph and replayed (`graphs.py`).
- `iwae_log_px`: log p(x|z) of k samples per image, decoding a chunk at a time into reused buffers
  (`iwae.py`); the reference decodes every sample (`model.iwae_log_likelihood`).

Torch internals (`torch._*`, `torch.ops.*`) may appear only in this package, and only while
BENCHMARKS.md shows they pay against the public way; `tests/test_architecture.py` holds both rules.
"""

from __future__ import annotations

from vae_mlops.accel.elbo import fused_elbo, fused_grads
from vae_mlops.accel.graphs import CudaGraphStep
from vae_mlops.accel.iwae import iwae_log_px

__all__ = ["CudaGraphStep", "fused_elbo", "fused_grads", "iwae_log_px"]
