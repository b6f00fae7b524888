"""The train stage on tiny data: determinism, resume, divergence, devices, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.support.project import tiny_raw_params
from vae_mlops import checkpoint
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import DeviceError, TrainingDiverged, resolve_device


def params(**extra):
    return parse_params(tiny_raw_params(**extra))


@pytest.fixture
def project(data_env, tmp_path) -> Paths:
    paths = Paths(tmp_path / "proj")
    run_download(params().data, paths)
    return paths


def weights(paths: Paths) -> dict[str, torch.Tensor]:
    model, _ = checkpoint.load_model(paths.model_file)
    return model.state_dict()


def test_same_seed_gives_same_history_twice(project, tmp_path):
    run_train(params(), project)
    first = checkpoint.load(project.model_file)["history"]
    other = Paths(tmp_path / "other")
    other.raw_dir("tiny").parent.mkdir(parents=True)
    project.raw_dir("tiny").rename(other.raw_dir("tiny"))
    run_train(params(), other)
    second = checkpoint.load(other.model_file)["history"]
    strip = lambda h: [{k: v for k, v in row.items() if k != "seconds"} for row in h]  # noqa: E731
    assert strip(first) == strip(second)


def test_resume_gives_same_weights(project, tmp_path):
    run_train(params(**{"train.epochs": 3}), project)
    straight = weights(project)
    project.model_file.unlink()
    for f in project.checkpoints_dir.rglob("epoch-0003.pt*"):
        f.unlink()  # as if killed during epoch 3: the epoch-2 checkpoint is the last one
    run_train(params(**{"train.epochs": 3}), project)
    resumed = weights(project)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_more_epochs_continue_from_the_checkpoint(project):
    run_train(params(**{"train.epochs": 1}), project)
    run_train(params(**{"train.epochs": 2}), project)
    assert [r["epoch"] for r in checkpoint.load(project.model_file)["history"]] == [1, 2]


def test_model_file_rebuilds_on_its_own(project):
    run_train(params(), project)
    model, payload = checkpoint.load_model(project.model_file)
    assert payload["config"] == {"input_dim": 784, "hidden_dim": 64, "latent_dim": 4, "likelihood": "bernoulli",
                                 "arch": "mlp", "hidden_dims": [], "prior": "normal", "n_components": 0}
    assert len(payload["data_hash"]) == 64 and payload["params"]["train"]["epochs"] == 2
    reloaded = torch.load(project.model_file, weights_only=True)["state_dict"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in reloaded.items())


def test_outputs_history_and_pictures_are_written(project):
    run_train(params(), project)
    lines = project.history_file.read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_recon,train_kl,val_loss,val_recon,val_kl")
    assert len(lines) == 3
    for name in ("samples.png", "reconstructions.png"):
        assert (project.train_images_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diverging_loss_names_epoch_and_batch_and_keeps_last_good_checkpoint(project):
    run_train(params(**{"train.epochs": 1}), project)
    good = {p: p.read_bytes() for p in project.checkpoints_dir.rglob("*.pt")}
    with pytest.raises(TrainingDiverged, match=r"epoch 1, batch \d+"):
        run_train(params(**{"train.epochs": 2, "train.lr": 1e6}), project)
    assert {p: p.read_bytes() for p in project.checkpoints_dir.rglob("*.pt")} == good


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"


def test_gaussian_likelihood_trains(project):
    result = run_train(params(**{"model.likelihood": "gaussian"}), project)
    assert result["val_loss"] > 0


def test_missing_data_is_a_clear_error(tiny_mirror, tmp_path):
    from vae_mlops.data import DataError

    with pytest.raises(DataError, match="run the download stage first"):
        run_train(params(), Paths(tmp_path / "empty"))


class Arbitrary:
    """Not a tensor or plain data: unpickling it could run any code."""


def test_checkpoint_with_pickled_objects_is_refused(tmp_path: Path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Arbitrary()}, path)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be loaded safely"):
        checkpoint.load(path)
