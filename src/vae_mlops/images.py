"""Pictures of a model: sample, reconstruction and interpolation grids; latent map and loss curves;
for a mixture prior, samples of each component and the clusters against the labels.

Grids are made with torchvision's `make_grid`/`save_image`; plots with matplotlib.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global
backend state), and every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from torch import Tensor
from torchvision.utils import make_grid, save_image

from vae_mlops import atomic
from vae_mlops.model import VAE
from vae_mlops.params import EvaluateParams

SIDE = 28


def _as_images(flat: Tensor) -> Tensor:
    """(N, 784) on [0, 1] -> (N, 1, 28, 28) on the CPU."""
    return flat.detach().float().cpu().clamp(0, 1).view(-1, 1, SIDE, SIDE)


@torch.no_grad()
def sample_grid(model: VAE, n: int = 64, seed: int = 0) -> Tensor:
    """Decoded z ~ p(z), the model's prior, as one (3, H, W) grid; the seed keeps the same z across epochs."""
    g = torch.Generator().manual_seed(seed)
    return make_grid(_as_images(model.decode(model.prior.sample(n, g))), nrow=8, padding=2)


@torch.no_grad()
def reconstruction_grid(model: VAE, x: Tensor, n: int = 8) -> Tensor:
    """Inputs in the top row, their reconstructions (decoding z = mu) below."""
    mu, _ = model.encode(x[:n])
    both = torch.cat([_as_images(x[:n]), _as_images(model.decode(mu))])
    return make_grid(both, nrow=n, padding=2)


def save_png(grid: Tensor, path: Path) -> Path:
    """Write a grid as PNG atomically (save_image needs the format, the temp name has none)."""
    atomic.write_with(path, lambda tmp: save_image(grid, tmp, format="png"))
    return path


def to_hwc_uint8(grid: Tensor) -> np.ndarray:
    """(C, H, W) (or (H, W)) float on [0, 1] -> (H, W, C) uint8 numpy, the form `mlflow.log_image` takes."""
    g = grid.detach().float().cpu().mul(255).round().clamp(0, 255).byte()
    return g.permute(1, 2, 0).numpy() if g.ndim == 3 else g.numpy()


# ---------------------------------------------------------------- evaluation pictures

EVAL_PICTURES = ("latent_map", "interpolation", "samples", "reconstructions", "loss_curves")
MIXTURE_PICTURES = ("cluster_samples", "cluster_confusion")  # added for a prior with components
CLUSTER_SAMPLES_PER_ROW = 10
_METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
TSNE_SAMPLE = 2000  # t-SNE is quadratic in the points: map a seeded subsample of this many
INTERPOLATION_ROWS, INTERPOLATION_STEPS = 8, 10


@torch.no_grad()
def interpolation_grid(
    model: VAE, x: Tensor, labels: Tensor, rows: int = INTERPOLATION_ROWS, steps: int = INTERPOLATION_STEPS
) -> Tensor:
    """Each row decodes (1 - t) mu_a + t mu_b for t on [0, 1]: from a digit of one class to the next class's."""
    a, b = _pairs(labels, rows)
    mu, _ = model.encode(x[torch.cat([a, b])])
    mu_a, mu_b = mu[: len(a)], mu[len(a) :]  # (R, L)
    t = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    z = (1 - t) * mu_a[:, None] + t * mu_b[:, None]  # (R, S, L)
    return make_grid(_as_images(model.decode(z.flatten(0, 1))), nrow=steps, padding=2)


def _pairs(labels: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Index pairs (first image of class c, first image of the next class), cycling through the classes."""
    labels = labels.cpu()
    classes = labels.unique()  # sorted
    first = torch.stack([(labels == c).nonzero()[0, 0] for c in classes])
    r = torch.arange(rows) % len(classes)
    return first[r], first[(r + 1) % len(classes)]


def latent_map(mu: Tensor, labels: Tensor, method: str, seed: int) -> Figure:
    """2-D map of the latent means coloured by label: PCA of all, or t-SNE of a seeded subsample."""
    points, labels = mu.detach().cpu().double().numpy(), labels.detach().cpu().numpy()
    if points.shape[1] < 2:  # a 1-D latent: plot it against zero
        points = np.concatenate([points, np.zeros_like(points)], axis=1)
    if method == "tsne":
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.permutation(len(points))[:TSNE_SAMPLE])
        points, labels = points[keep], labels[keep]
        perplexity = min(30.0, (len(points) - 1) / 3)
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
        axes_names = ("t-SNE 1", "t-SNE 2")
    elif method == "pca":
        pca = PCA(2, random_state=seed).fit(points)
        xy = pca.transform(points)
        axes_names = tuple(f"PC{i + 1} ({v:.0%} of variance)" for i, v in enumerate(pca.explained_variance_ratio_))
    else:
        raise ValueError(f"unknown latent map {method!r} (pca | tsne)")
    fig = Figure(figsize=(6, 5.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7, linewidths=0)
    fig.colorbar(scatter, ax=ax, label="label", ticks=np.unique(labels))
    title = f"latent means ({_METHOD_NAMES[method]}, {len(xy)} test images)"
    ax.set(xlabel=axes_names[0], ylabel=axes_names[1], title=title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def mixture_clusters(model: VAE, x: Tensor, batch_size: int) -> np.ndarray:
    """argmax_c q(c|x) of each image (N,)."""
    return torch.cat([model.cluster_probs(xb).argmax(-1).cpu() for xb in x.split(batch_size)]).numpy()


def cluster_table(clusters: np.ndarray, labels: np.ndarray, n_components: int) -> np.ndarray:
    """Images per (cluster, label), (K, classes): every component has a row, an empty one too."""
    classes = np.unique(labels)
    table = np.zeros((n_components, len(classes)), dtype=np.int64)
    np.add.at(table, (clusters, np.searchsorted(classes, labels)), 1)
    return table


def _row_names(table: np.ndarray, classes: np.ndarray) -> list[str]:
    """`c3: 7 (91%)`: each cluster's majority label and its share (`c3: empty` for none)."""
    names = []
    for c, row in enumerate(table):
        total = row.sum()
        names.append(f"c{c}: {classes[row.argmax()]} ({row.max() / total:.0%})" if total else f"c{c}: empty")
    return names


@torch.no_grad()
def cluster_samples(model: VAE, table: np.ndarray, classes: np.ndarray, seed: int) -> Figure:
    """One row per mixture component: z ~ N(mu_c, sigma_c^2) decoded, labelled with the digit it mostly holds."""
    k, per = len(table), CLUSTER_SAMPLES_PER_ROW
    g = torch.Generator().manual_seed(seed)
    z = model.prior.sample_component(torch.arange(k).repeat_interleave(per), g)
    grid = make_grid(_as_images(model.decode(z)), nrow=per, padding=2)  # (3, H, W)
    fig = Figure(figsize=(per * 0.6 + 1.6, k * 0.6 + 0.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(to_hwc_uint8(grid))
    step = grid.shape[1] / k
    ax.set_yticks([step * (r + 0.5) for r in range(k)], _row_names(table, classes))
    ax.set_xticks([])
    ax.set_title("samples of each component (majority test label)")
    fig.tight_layout()
    return fig


def cluster_confusion(table: np.ndarray, classes: np.ndarray) -> Figure:
    """The clusters (rows, argmax q(c|x)) against the labels (columns), test images counted in each cell."""
    fig = Figure(figsize=(0.5 * len(classes) + 2.4, 0.45 * len(table) + 1.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(table, cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(table)), _row_names(table, classes))
    threshold = table.max() / 2
    for (r, c), n in np.ndenumerate(table):
        if n:
            ax.text(c, r, str(n), ha="center", va="center", fontsize=6, color="white" if n > threshold else "black")
    ax.set(xlabel="label", ylabel="cluster (majority label)", title="clusters against labels")
    fig.tight_layout()
    return fig


def loss_curves(history: list[dict]) -> Figure:
    """Loss per epoch (train and validation), and its reconstruction and KL parts where recorded."""
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    loss_ax, parts_ax = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    curves = ((loss_ax, "loss", "C0"), (parts_ax, "recon", "C0"), (parts_ax, "kl", "C1"))
    for ax, part, colour in curves:  # colour: the quantity; line style: the split
        for split, style in (("train", "-"), ("val", "--")):
            key = f"{split}_{part}"
            if history and key in history[0]:
                ax.plot(epochs, [row[key] for row in history], style, color=colour, marker="o", ms=3, label=key)
    for ax in (loss_ax, parts_ax):
        ax.set(xlabel="epoch", ylabel="nats per image")
        if ax.lines:
            ax.legend()
    loss_ax.set_title("loss = recon + beta * KL")
    parts_ax.set_title("reconstruction and KL")
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically."""
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


@torch.no_grad()
def eval_pictures(
    model: VAE, x: Tensor, labels: Tensor, history: list[dict], cfg: EvaluateParams, out_dir: Path
) -> dict[str, Path]:
    """Write the five evaluation pictures of `EVAL_PICTURES` as `<name>.png` under `out_dir`; name -> path.

    A model whose prior has components gets the two of `MIXTURE_PICTURES` too.
    """
    model.eval()
    device = next(model.parameters()).device
    x = x.to(device=device, dtype=torch.float32)
    mu = torch.cat([model.encode(xb)[0].cpu() for xb in x.split(cfg.batch_size)])
    out_dir = Path(out_dir)
    labelled = labels >= 0  # recorded traffic in the test split is labelled -1
    pictures = {
        "latent_map": save_figure(latent_map(mu, labels, cfg.latent_map, cfg.seed), out_dir / "latent_map.png"),
        "interpolation": save_png(  # between labelled digits
            interpolation_grid(model, x[labelled], labels[labelled]), out_dir / "interpolation.png"
        ),
        "samples": save_png(sample_grid(model, seed=cfg.seed), out_dir / "samples.png"),
        "reconstructions": save_png(reconstruction_grid(model, x), out_dir / "reconstructions.png"),
        "loss_curves": save_figure(loss_curves(history), out_dir / "loss_curves.png"),
    }
    for name, fig in mixture_figures(model, x, labels, cfg.batch_size, cfg.seed).items():
        pictures[name] = save_figure(fig, out_dir / f"{name}.png")
    return pictures


@torch.no_grad()
def mixture_figures(model: VAE, x: Tensor, labels: Tensor, batch_size: int, seed: int) -> dict[str, Figure]:
    """The `MIXTURE_PICTURES` of a prior with components, from the labelled images; none for a prior without.

    Shared by the evaluate stage and the comparison report, so both show the same pictures.
    """
    k = model.prior.n_components
    if not k:
        return {}
    labelled = labels >= 0  # recorded traffic in the test split is labelled -1
    truth = labels[labelled].cpu().numpy()
    table = cluster_table(mixture_clusters(model, x[labelled.to(x.device)], batch_size), truth, k)
    classes = np.unique(truth)
    return {"cluster_samples": cluster_samples(model, table, classes, seed),
            "cluster_confusion": cluster_confusion(table, classes)}  # fmt: skip
