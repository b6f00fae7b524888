"""Evaluation pictures: valid PNG files, written atomically, showing what they claim to show."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests.support.synthetic import digits
from threadpoolctl import threadpool_limits

from vae_mlops import images
from vae_mlops.images import EVAL_PICTURES, eval_pictures, interpolation_grid, latent_map, loss_curves, save_figure
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import EvaluateParams

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TILE = 28 + 2  # make_grid's padding of 2 around each 28x28 image
HISTORY = [
    {"epoch": e, "train_loss": 300 / e, "val_loss": 310 / e, "train_recon": 250 / e, "val_recon": 255 / e,
     "train_kl": 20.0, "val_kl": 21.0, "seconds": 1.0}
    for e in (1, 2, 3)
]  # fmt: skip


@pytest.fixture(scope="module")
def model() -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(784, 32, 3, "bernoulli")).eval()


@pytest.fixture(scope="module")
def test_split() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits(120, seed=1)
    return torch.from_numpy(images).reshape(120, -1).float() / 255, torch.from_numpy(labels).long()


def test_eval_pictures_writes_the_five_pictures_as_valid_pngs(model, test_split, tmp_path):
    x, labels = test_split
    cfg = EvaluateParams(iwae_samples=4, batch_size=50, seed=0, n_clusters=10, latent_map="pca")
    written = eval_pictures(model, x, labels, HISTORY, cfg, tmp_path / "evaluate")
    assert tuple(written) == EVAL_PICTURES
    for name, path in written.items():
        assert path == tmp_path / "evaluate" / f"{name}.png"
        assert path.read_bytes()[:8] == PNG_MAGIC, name
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == sorted(f"{n}.png" for n in EVAL_PICTURES)


def test_interpolation_rows_run_from_one_class_to_the_next(model, test_split):
    x, labels = test_split
    rows, steps = 3, 4
    grid = interpolation_grid(model, x, labels, rows=rows, steps=steps)
    assert grid.shape == (3, 2 + rows * TILE, 2 + steps * TILE)
    with torch.no_grad():
        for r in range(rows):
            first_a = (labels == r).nonzero()[0, 0]
            first_b = (labels == r + 1).nonzero()[0, 0]
            for col, idx in ((0, first_a), (steps - 1, first_b)):
                tile = grid[0, 2 + r * TILE : r * TILE + TILE, 2 + col * TILE : col * TILE + TILE]
                expected = model.decode(model.encode(x[idx : idx + 1])[0]).view(28, 28)
                assert torch.allclose(tile, expected, atol=1e-6), (r, col)


def test_latent_map_draws_every_point_even_for_a_one_dimensional_latent():
    mu, labels = torch.randn(50, 1), torch.arange(50) % 10
    fig = latent_map(mu, labels, "pca", seed=0)
    (scatter,) = fig.axes[0].collections
    assert scatter.get_offsets().shape == (50, 2)


def test_tsne_latent_map_draws_a_seeded_subsample(monkeypatch):
    monkeypatch.setattr(images, "TSNE_SAMPLE", 40)
    mu, labels = torch.randn(60, 3), torch.arange(60) % 10
    with threadpool_limits(1):  # t-SNE's OpenMP threads crawl when the two cores are busy with other tests
        offsets = [latent_map(mu, labels, "tsne", seed=0).axes[0].collections[0].get_offsets() for _ in range(2)]
    assert offsets[0].shape == (40, 2)
    assert (offsets[0] == offsets[1]).all()


def test_latent_map_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="umap"):
        latent_map(torch.randn(10, 3), torch.arange(10), "umap", seed=0)


def test_loss_curves_plot_train_and_validation_per_epoch(tmp_path):
    fig = loss_curves(HISTORY)
    loss_ax, parts_ax = fig.axes[:2]
    assert [line.get_label() for line in loss_ax.lines] == ["train_loss", "val_loss"]
    assert [list(line.get_xdata()) for line in loss_ax.lines] == [[1, 2, 3]] * 2
    assert len(parts_ax.lines) == 4
    assert save_figure(fig, tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_grids_become_hwc_uint8_as_mlflow_log_image_takes_them():
    grid = torch.tensor([[[0.0, 1.0]], [[0.5, 0.2]], [[1.2, -0.1]]], requires_grad=True)  # (3, 1, 2)
    out = images.to_hwc_uint8(grid)
    assert out.shape == (1, 2, 3) and out.dtype.name == "uint8"
    assert out[0, 0].tolist() == [0, 128, 255] and out[0, 1].tolist() == [255, 51, 0]  # rounded, clamped
    assert images.to_hwc_uint8(torch.ones(2, 4)).shape == (2, 4)  # one channel, no channel axis


# ---------------------------------------------------------------- every architecture and prior; a mixture's pictures


@pytest.mark.parametrize(("arch", "prior"), [("mlp-deep", "gmm"), ("conv", "normal"), ("conv", "gmm")])
def test_eval_pictures_work_for_every_architecture_and_prior_with_a_tsne_map(arch, prior, test_split, tmp_path):
    torch.manual_seed(1)
    model = VAE(VAEConfig(784, 32, 3, "bernoulli", arch=arch, hidden_dims=(40,), prior=prior, n_components=4)).eval()
    x, labels = test_split
    cfg = EvaluateParams(iwae_samples=4, batch_size=50, seed=0, n_clusters=10, latent_map="tsne")
    with threadpool_limits(1):
        written = eval_pictures(model, x, labels, HISTORY, cfg, tmp_path / "evaluate")
    want = EVAL_PICTURES + (images.MIXTURE_PICTURES if prior == "gmm" else ())
    assert tuple(written) == want
    assert all(path.read_bytes()[:8] == PNG_MAGIC for path in written.values())


def test_cluster_table_counts_each_cluster_against_each_label_and_names_the_majority():
    clusters = np.array([0, 0, 0, 2, 2, 1])
    labels = np.array([7, 7, 3, 3, 3, 7])
    table = images.cluster_table(clusters, labels, n_components=4)
    assert table.tolist() == [[1, 2], [0, 1], [2, 0], [0, 0]]  # columns: labels 3, 7; component 3 holds none
    assert images._row_names(table, np.array([3, 7])) == ["c0: 7 (67%)", "c1: 7 (100%)", "c2: 3 (100%)", "c3: empty"]


def test_cluster_samples_have_one_row_per_component_drawn_from_it():
    torch.manual_seed(2)
    model = VAE(VAEConfig(784, 32, 3, "bernoulli", prior="gmm", n_components=5)).eval()
    with torch.no_grad():
        model.prior.mu.copy_(torch.arange(5.0)[:, None].expand(5, 3) * 10)
        model.prior.log_std.fill_(-20.0)  # each component a point: its row decodes that point only
    seen = []
    decode = model.decode
    model.decode = lambda z: seen.append(z) or decode(z)  # the latents the picture decodes
    images.cluster_samples(model, np.ones((5, 2), dtype=np.int64), np.array([0, 1]), seed=0)
    z = seen[0].view(5, images.CLUSTER_SAMPLES_PER_ROW, 3)
    torch.testing.assert_close(z, (torch.arange(5.0) * 10)[:, None, None].expand_as(z))
