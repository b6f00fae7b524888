"""What one stage reads that another wrote: the splits exactly as training held them out, the model.

Train, evaluate and register (and the tests) read these the same way; the stages import
them from here, never from each other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from vae_mlops import binarize, checkpoint, data, snapshots
from vae_mlops.datasets import get_dataset
from vae_mlops.model import VAE
from vae_mlops.params import Params
from vae_mlops.paths import Paths
from vae_mlops.train import split_train_val, to_unit_float

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainData:
    """The training and validation tensors on the device, and the data's identity.

    Under `data.binarize: dynamic` `x_val` is its fixed binary draw; `x_train` stays grey (a fresh draw per epoch).
    """

    x_train: Tensor
    x_val: Tensor
    manifest: dict


def load_train_data(params: Params, paths: Paths, device: torch.device) -> TrainData:
    """Load the training split once onto the device, hold out `val_size`, and add the named snapshots' shares."""
    spec = get_dataset(params.data.dataset)
    raw_dir = paths.raw_dir(params.data.dataset)
    manifest = snapshots.training_manifest(params.data, paths)  # its data_hash covers the snapshots
    images_u8, _ = data.load_split(raw_dir, spec, "train")
    train_idx, val_idx = split_train_val(len(images_u8), params.train.val_size, params.train.seed)
    x = to_unit_float(images_u8, device)
    incoming = snapshots.load_incoming(params.data, paths, n_base_train=len(train_idx))
    if incoming.capped:
        log.info("data.incoming_max_fraction leaves %d snapshot images out of training", incoming.capped)
    x_train = torch.cat([x[train_idx], to_unit_float(torch.from_numpy(incoming.train), device)])
    x_val = torch.cat([x[val_idx], to_unit_float(torch.from_numpy(incoming.val), device)])
    return TrainData(x_train, binarize.fixed_images(x_val, params.data.binarize, "validation"), manifest)


def load_test_split(params: Params, paths: Paths, device: torch.device) -> tuple[Tensor, Tensor]:
    """The test images as float32 (N, 784) on [0, 1] on the device, and their labels (N,) on the CPU.

    The named snapshots' test shares follow the dataset's test split, labelled `snapshots.UNLABELLED`.
    Under `data.binarize: dynamic`, the images are the test split's one fixed binary draw.
    """
    spec = get_dataset(params.data.dataset)
    images_u8, labels = data.load_split(paths.raw_dir(params.data.dataset), spec, "test")
    extra = torch.from_numpy(snapshots.load_incoming(params.data, paths, n_base_train=0).test)  # (the cap is on train)
    images_u8 = torch.cat([images_u8, extra])
    labels = torch.cat([labels, torch.full((len(extra),), snapshots.UNLABELLED, dtype=labels.dtype)])
    return binarize.fixed_images(to_unit_float(images_u8, device), params.data.binarize, "test"), labels


def test_data_hash(params: Params, paths: Paths) -> str:
    """The identity of what `load_test_split` returns: the dataset, the named snapshots' shares and the binarisation."""
    return binarize.data_hash(snapshots.data_hash(params.data, paths), params.data.binarize)


def load_probe_split(params: Params, paths: Paths, device: torch.device) -> tuple[Tensor, Tensor]:
    """The dataset's labelled training split, float32 on the device (binarised as the test split), and its labels:
    what the linear probe fits."""
    spec = get_dataset(params.data.dataset)
    images_u8, labels = data.load_split(paths.raw_dir(params.data.dataset), spec, "train")
    return binarize.fixed_images(to_unit_float(images_u8, device), params.data.binarize, "probe"), labels


def load_trained(paths: Paths, device: torch.device) -> tuple[VAE, dict]:
    model, payload = checkpoint.load_model(paths.model_file, map_location=device)
    return model.to(device).eval(), payload
