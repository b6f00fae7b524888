"""A registration candidate as the register stage builds one: a fresh tiny VAE, its test metrics and provenance."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from vae_mlops import registry
from vae_mlops.model import VAE, VAEConfig

METRIC = "test.nll_iwae"  # the gate metric the tests register with (lower is better)
NAME = "vae-mnist"
DATA_HASH = "d" * 64
GIT_COMMIT = "0123456789abcdef0123"


def candidate(value: float, seed: int, extra: Mapping[str, float] | None = None) -> registry.Candidate:
    """A candidate scoring `value` on `METRIC` (and `extra` metrics), its weights drawn from `seed`."""
    torch.manual_seed(seed)
    return registry.Candidate(
        model=VAE(VAEConfig(784, 16, 2, "bernoulli")).eval(),
        metrics={METRIC: value, "test.elbo": -value - 1.0, **(extra or {})},
        dataset="tiny",
        data_hash=DATA_HASH,
        git_commit=GIT_COMMIT,
        model_sha256=f"sha-{value}-{seed}",
        input_example=np.random.default_rng(0).random((2, 784), dtype=np.float32),
    )
