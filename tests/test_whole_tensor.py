"""The whole-tensor loop: no DataLoader, the split stays one tensor on the device, one host sync per epoch.

A host sync is any read of a device value by Python: `.item()`, `bool(t)`, `int(t)`, `.tolist()`, `.numpy()`.
On a GPU each one waits for every queued kernel; on the CPU nothing waits, but the same reads happen, so they are
counted on the CPU path: by a TorchDispatchMode for the ones that reach the dispatcher (`aten._local_scalar_dense`
under item/bool/int/float, `aten.is_nonzero`, `aten.equal`), plus `Tensor.tolist` and `Tensor.numpy`, which read
CPU memory without dispatching (on CUDA they dispatch a device-to-host copy) and are therefore counted by wrapping.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.support.project import tiny_raw_params
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.stages.download import download as run_download
from vae_mlops.stage_inputs import load_train_data
from vae_mlops.stages.train import build_state
from vae_mlops.stages.train import train as run_train
from vae_mlops.train import epoch_permutation, fit, train_epoch

SYNC_OPS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}


class HostReads(TorchDispatchMode):
    """Counts host reads of tensor values, and the gathers (`aten.index`, `aten.index_select`) of one watched tensor."""

    def __init__(self, watched: torch.Tensor | None = None) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()
        self.gathers = 0
        self.watched = watched
        self._saved: dict[str, object] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNC_OPS:
            self.reads[name] += 1
        gather = name.startswith(("aten.index.Tensor", "aten.index_select"))
        if gather and self.watched is not None and args[0] is self.watched:
            self.gathers += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for attr in ("tolist", "numpy"):
            original = getattr(torch.Tensor, attr)
            self._saved[attr] = original

            def counted(t, *a, _original=original, _attr=attr, **k):
                self.reads[f"Tensor.{_attr}"] += 1
                return _original(t, *a, **k)

            setattr(torch.Tensor, attr, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for attr, original in self._saved.items():
            setattr(torch.Tensor, attr, original)
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.reads.values())


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.arange(4.0)
    with HostReads() as counter:
        t[0].item(), bool(t[1] > 0), int(t[2]), t.tolist(), t.numpy(), torch.equal(t, t)  # noqa: B018
        (t * 2).sum()  # no read
    assert counter.total == 6, counter.reads


@pytest.fixture
def tiny_data(data_env, tmp_path):
    params = parse_params(tiny_raw_params(**{"train.epochs": 3}))
    paths = Paths(tmp_path)
    run_download(params.data, paths)
    return params, paths


def test_training_uses_no_dataloader(tiny_data, monkeypatch):
    """The train stage never builds a DataLoader (or touches a Dataset): batches are slices of one tensor."""

    def refuse(*args, **kwargs):
        raise AssertionError("training built a DataLoader")

    monkeypatch.setattr(torch.utils.data.DataLoader, "__init__", refuse)
    monkeypatch.setattr(torch.utils.data.Dataset, "__getitem__", refuse)
    params, paths = tiny_data
    result = run_train(params, paths)
    assert paths.model_file.is_file() and result is not None


def test_an_epoch_gathers_the_split_once_and_reads_the_host_once(tiny_data):
    """Per epoch: one gather of the whole training tensor (its shuffled order), then slices; one host read."""
    params, paths = tiny_data
    device = torch.device("cpu")
    data = load_train_data(params, paths, device)
    assert data.x_train.device == device and data.x_train.dim() == 2 and data.x_train.is_contiguous()
    state = build_state(params, device)
    epochs = params.train.epochs
    with HostReads(watched=data.x_train) as counter:
        fit(state, data.x_train, data.x_val, params.train, params.model.likelihood)
    assert state.epoch == epochs
    assert counter.gathers == epochs  # the data stays one tensor: one index op on it per epoch, batches are views
    assert counter.total == epochs, f"{counter.total} host reads in {epochs} epochs: {dict(counter.reads)}"


def test_the_shuffled_copy_is_one_buffer_reused_every_epoch(tiny_data):
    """The epoch's gather writes into the previous epoch's buffer (no fresh allocation of the split's size)."""
    params, paths = tiny_data
    data = load_train_data(params, paths, torch.device("cpu"))
    state = build_state(params, torch.device("cpu"))
    pointers = []
    for epoch in range(1, 3):
        train_epoch(state, data.x_train, params.train, params.model.likelihood, 2)
        state.epoch = epoch
        pointers.append(state.shuffled.data_ptr())
        order = epoch_permutation(len(data.x_train), params.train.seed, epoch, torch.device("cpu"))
        assert torch.equal(state.shuffled, data.x_train[order])  # this epoch's order, all of it
    assert pointers[0] == pointers[1]
