"""The comparison report: one page that says how a candidate compares with a baseline run.

`register` writes it for the candidate against the champion it was gated against
(the candidate alone when there was none yet); `python -m vae_mlops compare A B`
writes it for any two runs. A is the baseline and B the candidate: every delta is
B - A, as in `dvc metrics diff A B`. A run is named by its MLflow run id, by the
DVC experiment it ran as (the run tagged `dvc.experiment=<name>`), or by a
registered version (`models:/vae-mnist/3`, `models:/vae-mnist@champion`).

Two files: `compare.html` holds every picture as a base64 PNG, so it reads on its
own (mailed, or opened from the MLflow run's artifacts); `compare.md` is its text
(metrics, the gate's decision, differing params), the form the Prefect flow run's
artifact takes. Models are read only through `model_store.load_vae`, which never
unpickles. Each model's pictures are drawn here, on the same test digits, with the
evaluate stage's own functions (`images`): samples from the model's own prior, the
latent map and, for a mixture prior, its samples per component and its clusters
against the labels. A side whose model cannot be drawn here shows the pictures its
run's evaluate stage logged (`evaluate/<name>.png`), PNG files and nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.exceptions import MlflowException
from torch import Tensor
from torchvision.utils import make_grid, save_image

from vae_mlops import atomic, compare_template, data, html_page, images, model_store, registry, tracking
from vae_mlops.datasets import get_dataset
from vae_mlops.errors import VaeMlopsError
from vae_mlops.metric_catalogue import CATALOGUE, METRIC_KEYS
from vae_mlops.model import VAE
from vae_mlops.params import EvaluateParams
from vae_mlops.paths import Paths
from vae_mlops.train import to_unit_float

log = logging.getLogger(__name__)

TAG_DVC_EXPERIMENT = "dvc.experiment"  # set on the pipeline's run by the train stage (docs/mlflow.md)
ARTIFACT_PATH = "compare"  # where the report sits among the MLflow run's artifacts
N_DIGITS = 16  # test digits reconstructed by both models
N_SAMPLES = 64  # decoded z ~ p(z), each model's own prior, drawn with the evaluation seed
LOSS_KEYS = ("train/loss", "val/loss")
COLOURS = {"baseline": "C1", "candidate": "C0"}  # the same in the loss chart and the page's legend
HIDDEN_PREFIXES = ("system/",)  # machine load, not the model: left out of the metrics table
# A side's picture in the report -> the evaluate stage's picture logged to its run (`evaluate/<name>.png`)
LOGGED_PICTURES = {"latent": "latent_map", **{name: name for name in images.MIXTURE_PICTURES}}
EVALUATE_ARTIFACTS = "evaluate"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_MODELS_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")
_EXPERIMENT_NAME = re.compile(r"[\w.-]+")


class CompareError(VaeMlopsError):
    """A run to compare cannot be found (unknown id, experiment or version, no store): says how to name one."""


# ---------------------------------------------------------------- what a report holds


@dataclass(frozen=True)
class Ref:
    """A run named on the command line, resolved: its id and the model to picture."""

    run_id: str
    label: str  # how the report names it: "champion v2", "tidy-mice", a run name
    model_uri: str | None  # `models:/...` of its model, None when it logged none
    version: str | None = None  # the registered version, when named as one


@dataclass
class Side:
    """One run of the comparison, with what the report needs of it."""

    ref: Ref
    run: tracking.RunSummary
    model: VAE | None
    note: str = ""  # why there are no pictures of this model ("" when there are)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    logged: dict[str, bytes] = field(default_factory=dict)  # report picture -> PNG its run's evaluate stage logged

    @property
    def prior(self) -> str:
        """The model's prior p(z) in words, for the page: `N(0, I)`, `mixture of 10 Gaussians`."""
        if self.model is None:
            return ""
        k = self.model.prior.n_components
        return f"mixture of {k} Gaussians" if k else "N(0, I)"

    @property
    def label(self) -> str:
        return self.ref.label


@dataclass(frozen=True)
class MetricRow:
    """One metric of both runs; `lower_is_better` None: the metric has no better direction."""

    key: str
    baseline: float | None
    candidate: float | None
    lower_is_better: bool | None
    comparable: bool = True  # False: a per-likelihood metric of models with different likelihoods

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.candidate is None:
            return None
        return self.candidate - self.baseline

    @property
    def better(self) -> str:
        """"candidate", "baseline", "equal", or "" when it cannot be said."""
        if self.delta is None or self.lower_is_better is None or not self.comparable:
            return ""
        if self.delta == 0:
            return "equal"
        return "candidate" if (self.delta < 0) == self.lower_is_better else "baseline"


@dataclass
class Report:
    title: str
    candidate: Side
    baseline: Side | None
    rows: list[MetricRow]
    params_diff: list[tuple[str, str, str]]  # key, baseline value, candidate value
    gate: dict | None  # a promotion decision (`registry.Decision.to_dict()`)
    notes: list[str]
    # name -> data URI: "loss", "digits", and per side "<role>.<picture>", a picture of `model_pictures`
    pictures: dict[str, str]
    from_run: set[str] = field(default_factory=set)  # pictures taken from a run's logged artifacts, not drawn here
    latent_map: str = "pca"  # how the latent maps drawn here were made (`evaluate.latent_map`)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def sides(self) -> list[tuple[str, Side]]:
        """(role, side) in the order the page shows them: baseline first, as in `A B`."""
        return ([("baseline", self.baseline)] if self.baseline else []) + [("candidate", self.candidate)]

    @property
    def has_mixture(self) -> bool:
        """Whether a side has pictures of mixture components: the page then shows that section."""
        return any(f"{role}.cluster_samples" in self.pictures for role, _ in self.sides)


# ---------------------------------------------------------------- metric directions and rows


def lower_is_better(key: str) -> bool | None:
    """The metric's better direction from the catalogue; None when it has none or is not catalogued."""
    return CATALOGUE[key].lower_is_better if key in CATALOGUE else None


def metric_rows(
    baseline: dict[str, float] | None, candidate: dict[str, float], same_likelihood: bool = True
) -> list[MetricRow]:
    """Every metric of either run: the catalogue's in its order, then the rest by name.

    With `same_likelihood` False, a per-likelihood metric (a density under each model's
    own p(x|z)) gets no better side: the two numbers are not of one kind.
    """
    base = baseline or {}
    keys = {k for k in (*base, *candidate) if not k.startswith(HIDDEN_PREFIXES)}
    order = [k for k in METRIC_KEYS if k in keys] + sorted(keys - set(METRIC_KEYS))
    return [
        MetricRow(k, base.get(k), candidate.get(k), lower_is_better(k),
                  same_likelihood or not (k in CATALOGUE and CATALOGUE[k].per_likelihood))  # fmt: skip
        for k in order
    ]


def params_diff(baseline: dict[str, str], candidate: dict[str, str]) -> list[tuple[str, str, str]]:
    return [
        (k, baseline.get(k, "—"), candidate.get(k, "—"))
        for k in sorted({*baseline, *candidate})
        if baseline.get(k) != candidate.get(k)
    ]


# ---------------------------------------------------------------- naming runs


def resolve(reader: tracking.RunReader, ref: str) -> Ref:
    """A run id, a DVC experiment name or a `models:/` URI -> the run; `CompareError` naming what was tried."""
    ref = ref.strip()
    where = f"in the MLflow store {reader.uri}"
    if m := _MODELS_URI.fullmatch(ref):
        name, wanted = m["name"], m["version"] or m["alias"]
        mv = reader.model_version(name, wanted)
        if mv is None:
            raise CompareError(f"{ref!r}: registered model {name!r} has no version or alias {wanted!r} {where}; "
                               "`make history` lists the versions")  # fmt: skip
        alias = f" (@{m['alias']})" if m["alias"] else ""
        return Ref(mv.run_id, f"{name} v{mv.version}{alias}", f"models:/{name}/{mv.version}", mv.version)
    if _RUN_ID.fullmatch(ref):
        run = reader.run(ref)
        if run is None:
            raise CompareError(f"{ref!r}: no MLflow run has this id {where}; set MLFLOW_TRACKING_URI to the store "
                               "that holds it")  # fmt: skip
        return Ref(run.run_id, f"{run.tags.get(TAG_DVC_EXPERIMENT) or run.name or 'run'} ({run.run_id[:8]})",
                   model_store.run_model_uri(run.run_id, reader.uri))  # fmt: skip
    if not _EXPERIMENT_NAME.fullmatch(ref):
        raise CompareError(f"{ref!r} is not a run: name an MLflow run id (32 hex digits), a DVC experiment "
                           "(`dvc exp show`) or a registered version (models:/vae-mnist/3, "
                           "models:/vae-mnist@champion)")  # fmt: skip
    found = reader.runs_tagged(TAG_DVC_EXPERIMENT, ref)
    if not found:
        raise CompareError(f"{ref!r}: no MLflow run {where} is tagged {TAG_DVC_EXPERIMENT}={ref}, and it is not a "
                           "run id (32 hex digits) or a models:/ URI. `dvc exp show` lists the experiments, "
                           "`make ui` the runs")  # fmt: skip
    if len(found) > 1:
        log.info("%d runs are tagged %s=%s: comparing the newest, %s", len(found), TAG_DVC_EXPERIMENT, ref, found[0])
    return Ref(found[0], ref, model_store.run_model_uri(found[0], reader.uri))


def load_side(reader: tracking.RunReader, ref: Ref, model: VAE | None = None) -> Side:
    """The run's metrics, params, loss history and model (`model` when the caller holds it already).

    The pictures its evaluate stage logged are fetched only when its model is not loaded: a loaded one's are drawn.
    """
    run = reader.run(ref.run_id)
    if run is None:
        raise CompareError(f"MLflow run {ref.run_id} ({ref.label}) is not in {reader.uri}")
    note = ""
    if model is None and ref.model_uri is None:
        note = "this run logged no model"
    elif model is None:
        try:
            model = model_store.load_vae(ref.model_uri, reader.uri)
        except Exception as exc:  # refused by the safe loader, or its artifacts are gone: the page says so, and goes on
            note = f"its model {ref.model_uri} was not loaded ({type(exc).__name__}: {str(exc)[:300]})"
    if model is not None:
        model = model.to("cpu").eval()
    history = {k: reader.history(ref.run_id, k) for k in LOSS_KEYS}
    logged = logged_pictures(reader, ref.run_id) if model is None else {}  # a loaded model's are drawn here
    return Side(ref, run, model, note, {k: v for k, v in history.items() if v}, logged)


def gate_of(reader: tracking.RunReader, run_id: str) -> dict | None:
    """The promotion decision recorded on the newest version registered from this run, if any."""
    found = [v for _, v in reader.versions_of_run(run_id) if registry.TAG_PROMOTION in v.tags]
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    return json.loads(newest.tags[registry.TAG_PROMOTION])


# ---------------------------------------------------------------- pictures


def grid_png(grid: Tensor) -> bytes:
    buf = BytesIO()
    save_image(grid, buf, format="png")
    return buf.getvalue()


def digit_row(flat: Tensor) -> Tensor:
    """(N, 784) on [0, 1] -> one row of N digits as a (3, H, W) grid."""
    return make_grid(flat.detach().float().cpu().clamp(0, 1).view(-1, 1, images.SIDE, images.SIDE), nrow=len(flat))


@torch.no_grad()
def reconstruct(model: VAE, x: Tensor) -> Tensor:
    """Decode z = mu, as the evaluation pictures do."""
    return model.decode(model.encode(x)[0])


@torch.no_grad()
def latent_means(model: VAE, x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([model.encode(xb)[0] for xb in x.split(batch_size)])


def loss_chart(sides: list[tuple[str, Side]]) -> Figure | None:
    """Train and validation loss per epoch of every side on one axis: colour the run, line style the split."""
    if not any(side.history for _, side in sides):
        return None
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for role, side in sides:
        colour = COLOURS[role]
        for key, style in zip(LOSS_KEYS, ("-", "--")):
            points = side.history.get(key, [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, color=colour, marker="o", ms=3, label=f"{side.label}: {key}")
    likelihoods = {side.run.params.get("model.likelihood") for _, side in sides}
    title = "loss per epoch (nats per image)"
    if len(likelihoods) > 1:
        title += ": different likelihoods, so the scales differ"
    ax.set(xlabel="epoch", ylabel="loss = recon + beta * KL", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    fig.tight_layout()
    return fig


def pictures(
    sides: list[tuple[str, Side]], split: tuple[Tensor, Tensor] | None, cfg: EvaluateParams
) -> tuple[dict[str, str], set[str]]:
    """Every picture of the report as a data URI, and which of them are a run's logged ones.

    The loss chart and the test digits, then per side: reconstructions, samples from its own prior,
    the latent map and, for a mixture prior, samples per component and clusters against labels.
    A picture that cannot be drawn here (no model, no test split) is the run's logged one, if any.
    """
    out: dict[str, str] = {}
    chart = loss_chart(sides)
    if chart is not None:
        out["loss"] = html_page.figure_uri(chart)
    if split is not None:
        out["digits"] = html_page.png_uri(grid_png(digit_row(split[0][:N_DIGITS])))
    for role, side in sides:
        if side.model is not None:
            out.update({f"{role}.{name}": uri for name, uri in model_pictures(side.model, split, cfg).items()})
    from_run = set()
    for role, side in sides:
        for name, png in side.logged.items():
            key = f"{role}.{name}"
            if key not in out:
                out[key] = html_page.png_uri(png)
                from_run.add(key)
    return out, from_run


@torch.no_grad()
def model_pictures(model: VAE, split: tuple[Tensor, Tensor] | None, cfg: EvaluateParams) -> dict[str, str]:
    """One model's pictures as data URIs: samples of z ~ p(z) under its own prior; with the test split,
    reconstructions, the latent map and, for a mixture prior, the evaluate stage's two mixture pictures."""
    out = {"samples": html_page.png_uri(grid_png(images.sample_grid(model, n=N_SAMPLES, seed=cfg.seed)))}
    if split is None:
        return out
    x, labels = split
    out["recon"] = html_page.png_uri(grid_png(digit_row(reconstruct(model, x[:N_DIGITS]))))
    mu = latent_means(model, x, cfg.batch_size)
    out["latent"] = html_page.figure_uri(images.latent_map(mu, labels, cfg.latent_map, cfg.seed))
    for name, fig in images.mixture_figures(model, x, labels, cfg.batch_size, cfg.seed).items():
        out[name] = html_page.figure_uri(fig)
    return out


def logged_pictures(reader: tracking.RunReader, run_id: str) -> dict[str, bytes]:
    """The evaluate stage's pictures of `LOGGED_PICTURES` logged to the run, as PNG bytes; a file that is
    not a PNG is left out (the page embeds images only)."""
    wanted = {f"{EVALUATE_ARTIFACTS}/{name}.png": key for key, name in LOGGED_PICTURES.items()}
    try:
        present = [a.path for a in reader.client.list_artifacts(run_id, EVALUATE_ARTIFACTS) if a.path in wanted]
        found: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for path in present:
                png = Path(reader.client.download_artifacts(run_id, path, tmp)).read_bytes()
                if png.startswith(PNG_SIGNATURE):
                    found[wanted[path]] = png
    except (MlflowException, OSError) as exc:  # artifacts gone or unreadable: the page goes on without them
        log.warning("the evaluate pictures of run %s were not read (%s: %s)", run_id, type(exc).__name__, exc)
        return {}
    return found


def load_test_split(dataset: str, paths: Paths) -> tuple[tuple[Tensor, Tensor] | None, str]:
    """The test images (N, 784) on [0, 1] and labels of `dataset`, or None and why not."""
    raw_dir = paths.raw_dir(dataset)
    try:
        images_u8, labels = data.load_split(raw_dir, get_dataset(dataset), "test")
    except (VaeMlopsError, OSError, ValueError) as exc:
        return None, f"no reconstructions or latent maps: the {dataset!r} test split is not in {raw_dir} ({exc})"
    return (to_unit_float(images_u8, torch.device("cpu")), labels), ""


# ---------------------------------------------------------------- building and writing


def build(
    candidate: Side,
    baseline: Side | None,
    gate: dict | None,
    split: tuple[Tensor, Tensor] | None,
    cfg: EvaluateParams,
    notes: list[str] | None = None,
) -> Report:
    """Everything the page shows, computed before anything is written."""
    notes = list(notes or [])
    if baseline is None:
        title = f"{candidate.label}: no champion to compare with yet"
    else:
        title = f"{candidate.label} vs {baseline.label}"
    likelihood = "model.likelihood"
    same_likelihood = baseline is None or baseline.run.params.get(likelihood) == candidate.run.params.get(likelihood)
    if not same_likelihood:
        notes.append("the two models have different likelihoods: per-likelihood metrics (ELBO, IWAE NLL, BCE, KL) "
                     "are densities of different kinds and get no better side")  # fmt: skip
    for role, side in (("baseline", baseline), ("candidate", candidate)):
        if side is not None and side.note:
            notes.append(f"{role} {side.label}: {side.note}")
    report = Report(
        title=title,
        candidate=candidate,
        baseline=baseline,
        rows=metric_rows(baseline.run.metrics if baseline else None, candidate.run.metrics, same_likelihood),
        params_diff=params_diff(baseline.run.params, candidate.run.params) if baseline else [],
        gate=gate,
        notes=notes,
        pictures={},
        latent_map=cfg.latent_map,
    )
    report.pictures, report.from_run = pictures(report.sides, split, cfg)
    return report


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}" if abs(v) >= 1e4 or (v != 0 and abs(v) < 1e-3) else f"{v:.4f}"


def _fmt_delta(v: float | None) -> str:
    return "—" if v is None else ("+" if v > 0 else "") + _fmt(v)


def render_html(report: Report) -> str:
    page = html_page.environment(num=_fmt, delta=_fmt_delta).from_string(compare_template.HTML_TEMPLATE)
    return page.render(r=report, n_digits=N_DIGITS, n_samples=N_SAMPLES)


def render_markdown(report: Report) -> str:
    """The report's text: header, the gate's decision, the metrics table, differing params, notes."""

    def cell(s: object) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = [f"# {cell(report.title)}", ""]
    for role, side in report.sides:
        lines.append(f"- **{role}**: {cell(side.label)}, MLflow run `{side.run.run_id}`")
    lines += ["", "## Promotion gate", "", gate_sentence(report.gate), ""]
    lines += ["## Metrics", ""]
    if report.baseline:
        lines += [f"| metric | {cell(report.baseline.label)} | {cell(report.candidate.label)} | delta | better |",
                  "| --- | ---: | ---: | ---: | --- |"]  # fmt: skip
        for row in report.rows:
            sides = {"candidate": report.candidate.label, "baseline": report.baseline.label}
            better = sides.get(row.better, row.better) or ("" if row.comparable else "not comparable")
            lines.append(f"| `{row.key}` | {_fmt(row.baseline)} | {_fmt(row.candidate)} | {_fmt_delta(row.delta)} | "
                         f"{cell(better) or '—'} |")  # fmt: skip
    else:
        lines += [f"| metric | {cell(report.candidate.label)} |", "| --- | ---: |"]
        lines += [f"| `{row.key}` | {_fmt(row.candidate)} |" for row in report.rows]
    if report.params_diff:
        lines += ["", "## Params that differ", "", "| param | baseline | candidate |", "| --- | --- | --- |"]
        lines += [f"| `{k}` | {cell(a)} | {cell(b)} |" for k, a, b in report.params_diff]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {cell(n)}" for n in report.notes]]
    pictures = ("Pictures (loss curves, reconstructions, samples from each model's prior, latent maps, and for a "
                "mixture prior its components and clusters): `compare.html`.")  # fmt: skip
    lines += ["", f"{pictures} Made {report.created}.", ""]
    return "\n".join(lines)


def gate_sentence(gate: dict | None) -> str:
    if not gate:
        return "No promotion decision is recorded for the candidate (its run registered no version)."
    champ = f" against champion v{gate['champion_version']}" if gate.get("champion_version") else ""
    return f"**{gate['decision']}** (v{gate['version']} -> `{gate['alias']}`{champ}): {gate['reason']}"


def write(report: Report, html_path: Path, md_path: Path) -> dict[str, Path]:
    """Render both files first, then write each atomically: a failure leaves the previous report whole."""
    html, md = render_html(report), render_markdown(report)
    atomic.write_text(html_path, html)
    atomic.write_text(md_path, md)
    return {"html": html_path, "markdown": md_path}


# ---------------------------------------------------------------- the two entry points


def compare_runs(ref_a: str, ref_b: str, uri: str, paths: Paths, cfg: EvaluateParams, dataset: str,
                 out_dir: Path) -> dict[str, Path]:  # fmt: skip
    """`python -m vae_mlops compare A B`: A the baseline, B the candidate; both resolved before any work."""
    store = tracking.local_store_path(uri)
    if store is not None and not store.exists():
        raise CompareError(f"there is no MLflow store at {uri}: run the pipeline first (`make pipeline`), "
                           "or point MLFLOW_TRACKING_URI at the store that holds the runs")  # fmt: skip
    reader = tracking.RunReader(uri)
    a, b = resolve(reader, ref_a), resolve(reader, ref_b)
    baseline, candidate = load_side(reader, a), load_side(reader, b)
    gate = gate_of(reader, b.run_id)
    notes = []
    if gate and gate.get("champion_version"):
        champion = reader.model_version(gate["model_name"], gate["champion_version"])
        if champion is None or champion.run_id != a.run_id:
            notes.append(f"the promotion decision shown is the one {b.label} got against champion "
                         f"v{gate['champion_version']}, not a comparison with {a.label}")  # fmt: skip
    split, why = load_test_split(candidate.run.tags.get(tracking.TAG_DATASET, dataset), paths)
    if split is None:  # without the test split only samples are drawn here: the runs' logged pictures stand in
        for side in (baseline, candidate):
            if side.model is not None:
                side.logged = logged_pictures(reader, side.ref.run_id)
    report = build(candidate, baseline, gate, split, cfg, notes + ([why] if why else []))
    out_dir = Path(out_dir)
    return write(report, out_dir / paths.compare_html.name, out_dir / paths.compare_md.name)


def registration_report(
    run: tracking.PipelineRun,
    decision: registry.Decision,
    model: VAE,
    split: tuple[Tensor, Tensor],
    cfg: EvaluateParams,
    paths: Paths,
) -> dict[str, Path]:
    """The register stage's report: the candidate against the champion it was gated against; logged to the run."""
    reader = tracking.RunReader(run.uri)
    name = decision.model_name
    candidate = load_side(reader, Ref(run.run_id, f"candidate v{decision.version}", None, decision.version), model)
    baseline = None
    if decision.champion_version is not None:
        info = reader.model_version(name, decision.champion_version)
        if info is not None:
            ref = Ref(info.run_id, f"champion v{info.version}", f"models:/{name}/{info.version}", info.version)
            baseline = load_side(reader, ref)
    report = build(candidate, baseline, decision.to_dict(), split, cfg)
    files = write(report, paths.compare_html, paths.compare_md)
    run.log_files(files, ARTIFACT_PATH)
    return files
