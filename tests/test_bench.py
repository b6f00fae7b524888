"""`make bench` (`benchmarks.train_speed`) on tiny data: every key, sane numbers, the table. No wall-time assertion."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.support.project import ROOT
from benchmarks import train_speed as bench
from vae_mlops import cli
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.paths import Paths

KEYS = (
    "project_s_per_epoch",
    "baseline_s_per_epoch",
    "speedup",
    "bound_s_per_epoch",
    "bound_bf16_s_per_epoch",
    "project_test_loss",
    "baseline_test_loss",
    "iwae1000_s",
    "iwae1000_bf16_s",
)
ROW_NAMES = ["example", "baseline", "project-autograd", "project-bf16-autocast", "project-float32", "project"]


@pytest.fixture(scope="module")
def run(tiny_mirror, tmp_path_factory):
    """One bench run on the tiny dataset (500 training images), shared by the tests below."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VAE_DATA_MIRROR", str(tiny_mirror))
    root = tmp_path_factory.mktemp("bench")
    common = ["--params", str(ROOT / "params.yaml"), "--root", str(root), "-S", "data.dataset=tiny"]
    argv = [
        *common, "--device", "cpu",
        "--epochs", "2", "--iwae-k", "4", "--limit", "150", "--matmul-size", "128", "--min-seconds", "0.01",
        "-S", "train.val_size=100", "-S", "model.hidden_dim=32", "-S", "model.latent_dim=4",
    ]  # fmt: skip
    try:
        assert cli.main(["download", *common]) == 0  # the bench reads what the download stage verified
        code = bench.main(argv)
    finally:
        mp.undo()
    return code, json.loads(Paths(root).bench_file.read_text())


def test_bench_writes_every_key_as_a_finite_positive_number(run):
    code, result = run
    assert code == 0
    for key in KEYS:
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["train_images"] == 150 and result["iwae_k"] == 4 and result["iwae_images"] == 150
    assert {"cpu_count", "torch", "threads", "device"} <= result["machine"].keys()


def test_speedup_is_per_image_over_the_faster_of_the_example_alone_and_the_baseline(run):
    _, result = run
    rows = {r["name"]: r for r in result["rows"]}
    reference = max(rows["example"]["images_per_s"], rows["baseline"]["images_per_s"])
    assert result["speedup"] == pytest.approx(rows["project"]["images_per_s"] / reference)
    assert rows["example"]["train_images"] == rows["baseline"]["train_images"] == 150  # --limit: the first 150


def test_every_row_is_reported_with_its_bound(run):
    _, result = run
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ROW_NAMES
    for r in rows.values():
        assert len(r["epoch_seconds"]) == 2 and r["s_per_epoch"] == r["epoch_seconds"][1]  # epoch 1 is warm-up
        assert r["images_per_s"] == pytest.approx(r["train_images"] / r["s_per_epoch"])
        assert math.isfinite(r["test_loss"]) == (r["name"] != "example") and r["images_per_s"] > 0
    assert rows["project-bf16-autocast"]["bound_s_per_epoch"] == pytest.approx(result["bound_bf16_s_per_epoch"])
    assert rows["project-float32"]["bound_s_per_epoch"] == pytest.approx(result["bound_s_per_epoch"])
    bound = {"float32": result["bound_s_per_epoch"], "bf16": result["bound_bf16_s_per_epoch"]}
    assert rows["project"]["precision"] == result["project_precision"] in bound  # `auto`, resolved on this machine
    assert rows["project"]["bound_s_per_epoch"] == result["project_bound_s_per_epoch"]
    assert result["project_bound_s_per_epoch"] == pytest.approx(bound[result["project_precision"]])
    gap = rows["project"]["test_loss"] - rows["project-float32"]["test_loss"]
    assert result["precision_test_loss_gap"] == pytest.approx(gap)
    assert isinstance(result["machine"]["cpu_flags"], list) and isinstance(result["machine"]["native_bf16"], bool)


def test_baseline_and_project_reach_similar_test_loss(run):
    """Same init, same images, same epochs: the two loops train the same model, up to noise and order."""
    _, result = run
    assert result["project_test_loss"] == pytest.approx(result["baseline_test_loss"], rel=0.1)


def test_table_is_printed(run, capsys, tmp_path):
    _, result = run
    bench.print_table(result)
    out = capsys.readouterr().out
    assert "s/epoch" in out and "x bound" in out and "target speedup" in out
    assert all(name in out for name in ROW_NAMES)


def test_example_weights_give_the_same_function():
    """logvar = 2 log_std: the copied example model is our VAE, term for term."""
    torch.manual_seed(0)
    ours = VAE(VAEConfig(784, 16, 3, "bernoulli"))
    theirs = bench.ExampleVAE(784, 16, 3)
    bench.copy_weights(ours, theirs, to_example=True)
    x = torch.rand(5, 784)
    torch.manual_seed(1)
    recon, mu, logvar = theirs(x)
    torch.manual_seed(1)
    logits, mu2, log_std = ours(x, torch.randn(5, 3))
    torch.testing.assert_close((mu, logvar, recon), (mu2, 2 * log_std, torch.sigmoid(logits)))
    back = VAE(VAEConfig(784, 16, 3, "bernoulli"))
    bench.copy_weights(theirs, back, to_example=False)
    assert all(torch.allclose(a, b) for a, b in zip(back.parameters(), ours.parameters()))


def test_train_flops_match_the_issue_formula():
    model = VAE(VAEConfig(784, 400, 20, "bernoulli"))
    assert bench.train_flops_per_image(model) == 3 * 2 * (784 * 400 + 400 * 40 + 20 * 400 + 400 * 784)


def test_profile_step_lists_the_ops_per_step(capsys):
    from benchmarks import profile_step

    assert profile_step.main(["--images", "300", "--threads", "1", "--top", "3", "--precision", "float32"]) == 0
    out = capsys.readouterr().out
    assert "(3 steps)" in out and "aten::" in out and "all ops" in out


@pytest.mark.parametrize("precision", ["bf16", "float32"])
def test_step_floor_sums_the_kernels_a_step_cannot_do_without(capsys, precision):
    from benchmarks import step_floor

    assert step_floor.main(["--reps", "2", "--threads", "1", "--precision", precision]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {ln[:82].strip(): float(ln[82:]) for ln in lines if ln[82:].strip().replace(".", "").isdigit()}
    kernels = {k: v for k, v in rows.items() if not k.startswith(("floor", "the real step"))}
    assert any(k.startswith("Adam") for k in kernels) and any(k.startswith("wide matmuls") for k in kernels)
    assert any(k.startswith("casts") for k in kernels) == (precision == "bf16")  # float32 casts nothing
    assert rows["floor: their sum"] == pytest.approx(sum(kernels.values()), abs=len(kernels))  # rounding
    assert rows["the real step, timed in turn with them"] > 0
    assert "s/epoch over 430 steps" in lines[-1] and "ms/step" in lines[-1]
