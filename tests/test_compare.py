"""The comparison report: metric deltas and sides, naming runs, bad names, and the page as Chromium renders it."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.utils import make_grid, save_image

from tests.support import browser
from tests.support.e2e import copy_project, dvc
from tests.support.mlflow_store import fresh_store
from tests.support.project import tiny_raw_params
from vae_mlops import cli, compare, html_page, images, tracking
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import EvaluateParams
from vae_mlops.paths import Paths

# Appended to a copy of the page: records what the browser rendered, for --dump-dom to show.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const drawn = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const rows = [...document.querySelectorAll("#metrics tbody tr")].filter((r) => r.getBoundingClientRect().height > 0);
  document.body.dataset.images = `${drawn.length}/${imgs.length}`;
  document.body.dataset.metricRows = String(rows.length);
  const shown = (sel) => [...document.querySelectorAll(sel)].filter((i) => drawn.includes(i)).length;
  document.body.dataset.mixtureImages = String(shown("#mixture img"));
  document.body.dataset.latentImages = String(shown("#latent-maps img"));
});
</script>"""
CFG = EvaluateParams(iwae_samples=8, batch_size=100, seed=0, n_clusters=10, latent_map="pca")


def render(html: Path, tmp_path: Path) -> dict[str, str]:
    """Open the page in headless Chromium; what it drew: `images` ("drawn/total") and `metric-rows`."""
    return browser.render(html.read_text(), PROBE, tmp_path)


def assert_self_contained(html: str) -> None:
    sources = re.findall(r'<img[^>]* src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "every picture is embedded"
    assert not re.search(r'<(script|link|iframe)[^>]+(src|href)=', html), "nothing is fetched"


# ---------------------------------------------------------------- metric rows


def test_the_better_side_follows_each_metrics_direction():
    rows = {r.key: r for r in compare.metric_rows(
        {"test.nll_iwae": 90.0, "test.elbo": -95.0, "latent.nmi": 0.5, "test.kl": 20.0, "val/loss": 1.0},
        {"test.nll_iwae": 89.0, "test.elbo": -96.0, "latent.nmi": 0.5, "test.kl": 25.0, "val/loss": 2.0},
    )}  # fmt: skip
    assert rows["test.nll_iwae"].delta == -1.0 and rows["test.nll_iwae"].better == "candidate"  # lower is better
    assert rows["test.elbo"].delta == -1.0 and rows["test.elbo"].better == "baseline"  # higher is better
    assert rows["latent.nmi"].better == "equal"
    assert rows["test.kl"].better == "" and rows["val/loss"].better == ""  # no direction: no side


def test_catalogue_metrics_come_first_and_system_metrics_are_left_out():
    rows = compare.metric_rows(None, {"val/loss": 1, "system/cpu": 3, "latent.ari": 0.1, "test.elbo": 2})
    keys = [r.key for r in rows]
    assert keys == ["test.elbo", "latent.ari", "val/loss"]


def test_densities_of_different_likelihoods_get_no_better_side():
    rows = {r.key: r for r in compare.metric_rows(
        {"test.nll_iwae": 90.0, "test.recon_mse": 0.05}, {"test.nll_iwae": -500.0, "test.recon_mse": 0.04},
        same_likelihood=False,
    )}  # fmt: skip
    assert rows["test.nll_iwae"].better == "" and not rows["test.nll_iwae"].comparable
    assert rows["test.recon_mse"].better == "candidate"  # pixel MSE compares across likelihoods


# ---------------------------------------------------------------- the page


def _side(label: str, latent_dim: int, nll: float, seed: int, prior: str = "normal") -> compare.Side:
    torch.manual_seed(seed)
    vae = VAE(VAEConfig(784, 32, latent_dim, "bernoulli", prior=prior, n_components=3 if prior == "gmm" else 0)).eval()
    run_id = f"{seed:032x}"
    summary = tracking.RunSummary(
        run_id, label, "1", {"test.nll_iwae": nll, "test.elbo": -nll - 1, "latent.nmi": 0.4, "system/cpu": 9.0},
        {"model.latent_dim": str(latent_dim), "model.likelihood": "bernoulli"}, {},
    )  # fmt: skip
    history = {"train/loss": [(1, 200.0), (2, 150.0)], "val/loss": [(1, 190.0), (2, 160.0 + seed)]}
    return compare.Side(compare.Ref(run_id, label, None), summary, vae, "", history)


@pytest.fixture
def split():
    g = torch.Generator().manual_seed(0)
    return torch.rand(300, 784, generator=g), torch.arange(300) % 10


def test_the_page_renders_the_metrics_table_and_every_picture_in_chromium(split, tmp_path):
    gate = {"decision": "promoted", "version": "2", "alias": "champion", "champion_version": "1",
            "metric": "test.nll_iwae", "value": 95.0, "champion_value": 96.0, "reason": "better by 1.0000"}  # fmt: skip
    report = compare.build(_side("candidate v2", 4, 95.0, 2), _side("champion v1", 2, 96.0, 1), gate, split, CFG)
    files = compare.write(report, tmp_path / "compare.html", tmp_path / "compare.md")
    html = files["html"].read_text()
    assert_self_contained(html)
    # loss chart, test digits, then per model: reconstructions, samples, latent map
    assert set(report.pictures) == {"loss", "digits"} | {f"{r}.{p}" for r in ("baseline", "candidate")
                                                          for p in ("recon", "samples", "latent")}  # fmt: skip
    assert "better by 1.0000" in html and "promoted" in html
    drawn = render(files["html"], tmp_path)
    assert drawn["images"] == "8/8"
    assert drawn["metric-rows"] == str(len(report.rows)) == "3"  # system/cpu is not a model metric
    md = files["markdown"].read_text()
    assert "| `test.nll_iwae` | 96.0000 | 95.0000 | -1.0000 | candidate v2 |" in md
    assert "| `model.latent_dim` | 2 | 4 |" in md


def test_with_no_champion_the_page_shows_the_candidate_alone(split, tmp_path):
    report = compare.build(_side("candidate v1", 4, 95.0, 2), None, None, split, CFG)
    files = compare.write(report, tmp_path / "compare.html", tmp_path / "compare.md")
    assert "no champion" in report.title and "delta" not in files["markdown"].read_text()
    assert render(files["html"], tmp_path)["images"] == "5/5"


def _mixture_side(label: str, seed: int) -> compare.Side:
    """A gmm model whose components sit far from N(0, I)'s mass: its samples differ from N(0, I)'s."""
    side = _side(label, 4, 95.0, seed, prior="gmm")
    with torch.no_grad():
        side.model.prior.mu.copy_(6.0 * torch.eye(3, 4))
        side.model.prior.log_std.fill_(-2.0)
    return side


def _grid_uri(model: VAE, z: torch.Tensor) -> str:
    """z decoded as the page's sample grid (8 per row), written here with torchvision, not with the report's code."""
    with torch.no_grad():
        grid = make_grid(model.decode(z).clamp(0, 1).view(-1, 1, 28, 28), nrow=8, padding=2)
    buf = BytesIO()
    save_image(grid, buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def test_a_mixture_model_is_sampled_from_its_own_prior_not_from_a_standard_normal(split):
    side = _mixture_side("vade v2", 4)
    report = compare.build(side, None, None, split, CFG)
    n, latent = compare.N_SAMPLES, side.model.config.latent_dim
    own = side.model.prior.sample(n, torch.Generator().manual_seed(CFG.seed))
    standard = torch.randn((n, latent), generator=torch.Generator().manual_seed(CFG.seed))
    assert report.pictures["candidate.samples"] == _grid_uri(side.model, own)
    assert report.pictures["candidate.samples"] != _grid_uri(side.model, standard)
    assert "z ~ mixture of 3 Gaussians" in compare.render_html(report)


def test_a_mixture_model_shows_its_components_and_clusters_beside_a_normal_one_in_chromium(split, tmp_path):
    report = compare.build(_mixture_side("vade v2", 4), _side("champion v1", 2, 96.0, 1), None, split, CFG)
    pictures = {k for k in report.pictures if k.startswith(("baseline.", "candidate."))}
    assert pictures == {"baseline.recon", "baseline.samples", "baseline.latent", "candidate.recon",
                        "candidate.samples", "candidate.latent", "candidate.cluster_samples",
                        "candidate.cluster_confusion"}  # fmt: skip
    x, labels = split  # the evaluate stage's own figures, not others drawn alike
    figures = images.mixture_figures(report.candidate.model, x, labels, CFG.batch_size, CFG.seed)
    for name, fig in figures.items():
        assert report.pictures[f"candidate.{name}"] == html_page.figure_uri(fig)
    files = compare.write(report, tmp_path / "compare.html", tmp_path / "compare.md")
    html = files["html"].read_text()
    assert_self_contained(html)
    assert "no components: its prior is N(0, I)" in html
    drawn = render(files["html"], tmp_path)
    assert (drawn["images"], drawn["mixture-images"], drawn["latent-images"]) == ("10/10", "2", "2")


def test_without_mixture_models_the_page_has_no_mixture_section(split):
    html = compare.render_html(compare.build(_side("candidate v2", 4, 95.0, 2), None, None, split, CFG))
    assert 'id="mixture"' not in html and 'id="latent-maps"' in html


def _log_evaluate_pictures(client, run_id: str, tmp_path: Path, planted: dict[str, bytes]) -> None:
    folder = tmp_path / "evaluate"
    folder.mkdir()
    for name, content in planted.items():
        (folder / name).write_bytes(content)
        client.log_artifact(run_id, str(folder / name), "evaluate")


def test_a_run_whose_model_cannot_be_drawn_shows_the_pictures_its_evaluate_stage_logged(store, split, tmp_path):
    reader = tracking.RunReader(store)
    run_id = _run(reader.client, {"dvc.experiment": "old-vade"})
    model = _mixture_side("vade", 4).model
    logged = {f"{name}.png": html_page.figure_png(fig)
              for name, fig in images.mixture_figures(model, *split, CFG.batch_size, CFG.seed).items()}  # fmt: skip
    logged["latent_map.png"] = b"<script>not a picture</script>"  # planted: never embedded
    _log_evaluate_pictures(reader.client, run_id, tmp_path, logged)
    side = compare.load_side(reader, compare.Ref(run_id, "old-vade", None))
    assert side.model is None and set(side.logged) == {"cluster_samples", "cluster_confusion"}
    report = compare.build(_side("candidate v2", 4, 95.0, 2), side, None, split, CFG)
    assert report.from_run == {"baseline.cluster_samples", "baseline.cluster_confusion"}
    assert report.pictures["baseline.cluster_samples"] == html_page.png_uri(logged["cluster_samples.png"])
    html = compare.render_html(report)
    assert_self_contained(html)
    assert "as its run's evaluate stage logged them" in html and "not a picture" not in html
    assert "the run logged no latent map" in html


def test_a_loaded_model_is_drawn_here_so_its_runs_logged_pictures_are_not_fetched(store, tmp_path):
    reader = tracking.RunReader(store)
    run_id = _run(reader.client, {"dvc.experiment": "new-vade"})
    _log_evaluate_pictures(reader.client, run_id, tmp_path, {"latent_map.png": compare.PNG_SIGNATURE + b"logged"})
    ref = compare.Ref(run_id, "new-vade", None)
    assert compare.load_side(reader, ref, _mixture_side("vade", 4).model).logged == {}
    assert compare.load_side(reader, ref).logged == {"latent": compare.PNG_SIGNATURE + b"logged"}


def test_run_names_are_escaped(split, tmp_path):
    side = _side("<script>alert(1)</script>", 2, 95.0, 3)
    html = compare.render_html(compare.build(side, None, None, None, CFG))
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)" in html


# ---------------------------------------------------------------- naming runs


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return fresh_store(tmp_path)


def _run(client, tags: dict[str, str]) -> str:
    exp = client.get_experiment_by_name("vae-mnist") or client.get_experiment(client.create_experiment("vae-mnist"))
    run_id = client.create_run(exp.experiment_id, tags=tags).info.run_id
    client.set_terminated(run_id)
    return run_id


def test_a_dvc_experiment_names_its_newest_run_and_models_uris_name_versions(store):
    reader = tracking.RunReader(store)
    older = _run(reader.client, {"dvc.experiment": "tidy-mice"})
    newer = _run(reader.client, {"dvc.experiment": "tidy-mice"})
    other = _run(reader.client, {"dvc.experiment": "bold-owls"})
    assert compare.resolve(reader, "tidy-mice").run_id == newer != older
    assert compare.resolve(reader, other).label == f"bold-owls ({other[:8]})"  # a run id, labelled by its experiment
    reader.client.create_registered_model("vae-mnist")
    reader.client.create_model_version("vae-mnist", "file:///nowhere", run_id=older)
    reader.client.set_registered_model_alias("vae-mnist", "champion", "1")
    ref = compare.resolve(reader, "models:/vae-mnist@champion")
    assert (ref.run_id, ref.version, ref.model_uri) == (older, "1", "models:/vae-mnist/1")


@pytest.mark.parametrize("name", ["tidy-mice", "0" * 32, "models:/vae-mnist/7", "x' or '1'='1"])
def test_an_unknown_run_is_a_clear_error(store, name):
    reader = tracking.RunReader(store)
    _run(reader.client, {"dvc.experiment": "bold-owls"})
    with pytest.raises(compare.CompareError, match=re.escape(repr(name.strip()))):
        compare.resolve(reader, name)


def _params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_params()))
    return path


def test_compare_cli_on_an_unknown_run_exits_2_and_writes_nothing(store, tiny_mirror, tmp_path, capsys):
    known = _run(tracking.RunReader(store).client, {})
    out = tmp_path / "out"
    argv = ["compare", known, "no-such-exp", "--root", str(tmp_path), "--params", str(_params_file(tmp_path)),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "'no-such-exp'" in err and "dvc.experiment" in err and "Traceback" not in err
    assert not out.exists()


def test_compare_cli_without_a_store_exits_2_and_creates_none(tiny_mirror, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = ["compare", "a", "b", "--root", str(tmp_path), "--params", str(_params_file(tmp_path))]
    assert cli.main(argv) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "reports").exists()


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two pipeline runs, on a busy 2-core machine
def test_register_writes_the_report_against_the_champion_and_compare_makes_one_for_any_two_runs(
    data_env, tmp_path, monkeypatch
):
    monkeypatch.setenv("VAE_DATA_MIRROR", f"file://{data_env}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = copy_project(tmp_path / "repo", **{"train.epochs": 2})
    reports = repo / "reports"

    dvc("repro", cwd=repo)  # the first version: no champion yet
    first = json.loads((reports / "mlflow_run.json").read_text())["run_id"]
    assert "no champion to compare with yet" in (reports / "compare.md").read_text()
    assert render(reports / "compare.html", tmp_path / "first")["images"] == "5/5"

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["seed"] += 1  # another model, gated against the first
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc("repro", cwd=repo)
    second = json.loads((reports / "mlflow_run.json").read_text())["run_id"]
    md = (reports / "compare.md").read_text()
    assert "# candidate v2 vs champion v1" in md and f"`{first}`" in md and f"`{second}`" in md
    registration = json.loads((reports / "registration.json").read_text())
    assert registration["reason"] in md
    html = (reports / "compare.html").read_text()
    assert_self_contained(html)
    drawn = render(reports / "compare.html", tmp_path / "second")
    assert drawn["images"] == "8/8" and int(drawn["metric-rows"]) >= 10
    client = tracking.RunReader(tracking.tracking_uri(Paths(repo))).client
    logged = {a.path for a in client.list_artifacts(second, compare.ARTIFACT_PATH)}
    assert logged == {"compare/compare.html", "compare/compare.md"}
    assert "up to date" in dvc("status", cwd=repo).stdout  # dvc.lock records the report as register's output

    # any two runs, by run id and by registered version, into another folder
    out = tmp_path / "adhoc"
    cmd = [sys.executable, "-m", "vae_mlops", "compare", "models:/vae-mnist/2", first, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adhoc = (out / "compare.md").read_text()
    assert adhoc.startswith("# ") and "vae-mnist v2" in adhoc
    assert "against champion v1, not a comparison with" not in adhoc  # B (the first run) was gated against none
    assert render(out / "compare.html", tmp_path / "adhoc")["images"] == "8/8"
