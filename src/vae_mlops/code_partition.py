"""Group an autoencoder's codes into clusters before a mixture prior is fitted to them (VaDE's initialisation).

VaDE (Jiang et al. 2017) starts its mixture from a GMM fitted on a pretrained autoencoder's codes,
and its ELBO keeps the clusters close to where they start, so the start decides the result.

- `kmeans`: k-means on the codes themselves (the best of `KMEANS_RESTARTS` k-means++ runs).
- `umap`: N2D's grouping (McConville et al. 2020, "N2D: (Not Too) Deep Clustering via Clustering the
  Local Manifold of an Autoencoded Embedding", arXiv:1908.05968): UMAP embeds the codes in as many
  dimensions as there are clusters, keeping each code's `UMAP_NEIGHBOURS` nearest neighbours close
  (min_dist 0: tight clumps), and a full-covariance GMM on that embedding groups them. The clusters
  follow the codes' manifold rather than straight boundaries: on VaDE's 25-epoch autoencoder, 0.96
  accuracy on the training codes against k-means' 0.79 (docs/models.md).

Seeded UMAP runs on one thread (n_jobs=1) and gives the same groups for the same codes and seed.
UMAP's numba sets the process's OpenMP thread count to the machine's cores, which torch's kernels
read too: `partition_codes` puts torch's count back, or a `train.threads: 1` run trains on every core after.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.mixture import GaussianMixture

from vae_mlops.params import PARTITIONS

KMEANS_RESTARTS = 10  # k-means++ runs; the lowest inertia's partition is kept
UMAP_NEIGHBOURS = 20  # N2D's setting for MNIST


def partition_codes(codes: np.ndarray, n_groups: int, method: str, seed: int) -> np.ndarray:
    """One group in [0, n_groups) per code (N, L) -> (N,), by `method` (one of `PARTITIONS`)."""
    if method == "kmeans":
        return KMeans(n_groups, n_init=KMEANS_RESTARTS, random_state=seed).fit_predict(codes)
    if method == "umap":
        import umap  # with numba, 0.75 s: only a run that groups by UMAP pays it (tests/test_architecture.py)

        threads = torch.get_num_threads()
        try:
            embedded = umap.UMAP(
                n_components=n_groups, n_neighbors=UMAP_NEIGHBOURS, min_dist=0.0, random_state=seed, n_jobs=1
            ).fit_transform(codes)
        finally:
            torch.set_num_threads(threads)
        return GaussianMixture(n_groups, covariance_type="full", random_state=seed).fit_predict(embedded)
    raise ValueError(f"train.pretrain_partition: {method!r} is not one of {', '.join(PARTITIONS)}")
