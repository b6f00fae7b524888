"""The hand-written ELBO step (`accel.fused_elbo`) against autograd, in float32 and bf16, and the loop's precisions."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.support.project import ROOT, tiny_raw_params
from tests.support.synthetic import digits
from vae_mlops import accel, tracking
from vae_mlops.archs.mlp import MLPNetwork
from vae_mlops.distributed import Single
from vae_mlops.likelihoods import LIKELIHOODS, get_likelihood
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import parse_params
from vae_mlops.paths import Paths
from vae_mlops.precision import cpu_flags, resolve_precision
from vae_mlops.step import ELBOSums, Stepper, batch_losses, build_stepper
from vae_mlops.train import TrainState, fit, make_optimizer

NAMES = tuple(LIKELIHOODS)  # every registered likelihood, a new one included
BETA = 0.7  # != 1, so a mix-up of the recon and KL gradients shows


D, H, L = 12, 7, 3  # small enough for gradcheck's finite differences of every weight


def small_vae(likelihood: str, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(D, H, L, likelihood)).double()


def batch(n: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, D), generator=g, dtype=torch.float64), torch.randn((n, L), generator=g, dtype=torch.float64)


def grads_of(model: VAE, parts: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    parts.backward(torch.tensor([1.0, beta], dtype=parts.dtype))
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def default_width(likelihood: str) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """What training runs: float32, batch 128, the default network's width."""
    torch.manual_seed(0)
    model = VAE(VAEConfig(784, 400, 20, likelihood))
    g = torch.Generator().manual_seed(1)
    return model, torch.rand((128, 784), generator=g), torch.randn((128, 20), generator=g)


# ---------------------------------------------------------------- one step against autograd


@pytest.mark.parametrize("likelihood", NAMES)
def test_fused_sums_equal_autograds(likelihood):
    model = small_vae(likelihood)
    x, eps = batch()
    fused = ELBOSums(model, "float32", fused=True)(x, eps)
    recon, kl = batch_losses(model, x, eps, likelihood, "float32")
    torch.testing.assert_close(fused, torch.stack([recon, kl]), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("likelihood", NAMES)
def test_fused_gradients_equal_autograds_in_float64(likelihood):
    model = small_vae(likelihood)
    x, eps = batch()
    want = grads_of(model, torch.stack(batch_losses(model, x, eps, likelihood, "float32")), BETA)
    got = grads_of(model, ELBOSums(model, "float32", fused=True)(x, eps), BETA)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("likelihood", NAMES)
def test_fused_gradients_equal_autograds_in_float32(likelihood):
    model, x, eps = default_width(likelihood)
    want = grads_of(model, torch.stack(batch_losses(model, x, eps, likelihood, "float32")), BETA)
    got = grads_of(model, ELBOSums(model, "float32", fused=True)(x, eps), BETA)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("likelihood", NAMES)
def test_fused_backward_passes_gradcheck(likelihood):
    """Finite differences in float64, for any weighting of (recon, kl): gradcheck draws its own."""
    model = small_vae(likelihood)
    x, eps = batch()
    params = [p.detach().clone().requires_grad_(True) for p in model.fused_params()]
    lik = model.likelihood
    assert torch.autograd.gradcheck(lambda *w: accel.fused_elbo(w, x, eps, lik), params, eps=1e-6, atol=1e-6)


class ReorderedVAE(VAE):
    """The same layers declared in another order: a positional reading of the parameters would mix them up."""

    def __init__(self, config: VAEConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        self.fc4 = nn.Linear(config.hidden_dim, config.input_dim)
        self.fc3 = nn.Linear(config.latent_dim, config.hidden_dim)
        self.fc_log_std = nn.Linear(config.hidden_dim, config.latent_dim)
        self.fc_mu = nn.Linear(config.hidden_dim, config.latent_dim)
        self.fc1 = nn.Linear(config.input_dim, config.hidden_dim)
        self.likelihood = get_likelihood(config.likelihood)


def test_fused_step_takes_the_layers_by_name():
    model = small_vae("bernoulli")
    other = ReorderedVAE(model.config).double()
    other.load_state_dict(model.state_dict())
    assert [n for n, _ in other.named_parameters()] != [n for n, _ in model.named_parameters()]
    x, eps = batch()

    def sums(vae: VAE) -> torch.Tensor:
        return ELBOSums(vae, "float32", fused=True)(x, eps)

    torch.testing.assert_close(sums(other), sums(model), rtol=0, atol=0)
    torch.testing.assert_close(grads_of(other, sums(other), BETA), grads_of(model, sums(model), BETA))


def test_the_fused_step_reads_the_mlps_layer_list():
    """`MLPNetwork.LAYERS` names every Linear of the `mlp`, in order, and is what `fused_params` hands the step."""
    model = small_vae("bernoulli")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(MLPNetwork.LAYERS) == linears
    named = dict(model.named_parameters())
    want = [named[f"{layer}.{p}"] for layer in MLPNetwork.LAYERS for p in ("weight", "bias")]
    assert [id(p) for p in model.fused_params()] == [id(p) for p in want]
    with pytest.raises(ValueError, match="no fused step for arch 'mlp-deep'"):
        VAE(VAEConfig(D, H, L, "bernoulli", arch="mlp-deep", hidden_dims=(6, 5))).fused_params()


# ---------------------------------------------------------------- the bf16 step


@pytest.mark.parametrize("likelihood", NAMES)
def test_bf16_fused_step_is_close_to_float32_and_keeps_float32_master_weights(likelihood):
    model, x, eps = default_width(likelihood)
    full = ELBOSums(model, "float32", fused=True)(x, eps)
    want = grads_of(model, full, BETA)
    half = ELBOSums(model, "bf16", fused=True)(x, eps)
    got = grads_of(model, half, BETA)
    assert half.dtype == torch.float32  # the sums accumulate in float32
    torch.testing.assert_close(half, full, rtol=2e-3, atol=0.0)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        cosine = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine.item())


def test_bf16_fused_step_runs_no_autocast(monkeypatch):
    """The casts are written out: the step would fail if it entered an autocast region."""

    def refuse(*args, **kwargs):
        raise AssertionError("autocast used by the fused bf16 step")

    monkeypatch.setattr(torch, "autocast", refuse)
    model, x, eps = default_width("bernoulli")
    grads_of(model, ELBOSums(model, "bf16", fused=True)(x, eps), BETA)


# ---------------------------------------------------------------- train.precision: auto


def test_auto_precision_picks_bf16_only_where_the_cpu_has_native_bf16():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, flags=["avx512f", "avx512_bf16"]) == "bf16"
    assert resolve_precision("auto", cpu, flags=["amx_bf16", "amx_tile"]) == "bf16"
    assert resolve_precision("auto", cpu, flags=["avx2", "avx512f"]) == "float32"
    assert resolve_precision("auto", cpu, flags=[]) == "float32"
    assert resolve_precision("float32", cpu, flags=["avx512_bf16"]) == "float32"
    assert resolve_precision("bf16", cpu, flags=[]) == "bf16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path):
    info = tmp_path / "cpuinfo"
    core = "processor\t: {}\nflags\t\t: fpu avx512_bf16 sse\n"
    info.write_text(core.format(0) + "\n" + core.format(1))
    assert cpu_flags(info) == ["avx512_bf16", "fpu", "sse"]
    assert cpu_flags(tmp_path / "missing") == []


def test_auto_is_the_default_precision_and_is_legal(tiny_mirror):
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["precision"] == "auto"
    assert parse_params(tiny_raw_params(**{"train.precision": "auto"})).train.precision == "auto"


# ---------------------------------------------------------------- whole runs


@pytest.fixture
def train_params(tiny_mirror):
    return lambda **extra: parse_params(tiny_raw_params(**{"train.epochs": 3, **extra})).train


def run(cfg, likelihood: str = "bernoulli") -> list[dict]:
    images, _ = digits(400, seed=0)
    x = torch.from_numpy(images.reshape(400, -1)).float() / 255
    torch.manual_seed(cfg.seed)
    model = VAE(VAEConfig(784, 32, 4, likelihood))
    state = TrainState(model, make_optimizer(model, cfg.lr, x.device), torch.Generator().manual_seed(cfg.seed))
    return fit(state, x[:300], x[300:], cfg, likelihood)


def losses(history: list[dict]) -> list[list[float]]:
    return [[row[k] for k in row if k not in ("epoch", "seconds")] for row in history]


@pytest.mark.parametrize("likelihood", NAMES)
def test_fused_and_autograd_training_give_the_same_history(train_params, likelihood):
    common = {"train.beta": BETA, "train.precision": "float32"}
    fused = run(train_params(**{"train.fused": True, **common}), likelihood)
    autograd = run(train_params(**{"train.fused": False, **common}), likelihood)
    assert len(fused) == 3
    torch.testing.assert_close(torch.tensor(losses(fused)), torch.tensor(losses(autograd)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-bf16", "autocast-bf16"])
def test_bf16_trains_to_a_finite_loss_close_to_float32s(train_params, fused):
    full = run(train_params(**{"train.precision": "float32"}))
    bf16 = run(train_params(**{"train.precision": "bf16", "train.fused": fused}))
    assert all(math.isfinite(v) for row in losses(bf16) for v in row)
    assert bf16[-1]["train_loss"] < bf16[0]["train_loss"]  # it learns
    assert bf16[-1]["val_loss"] == pytest.approx(full[-1]["val_loss"], rel=0.02)


def test_the_chosen_precision_is_logged_and_tagged(tmp_path: Path, caplog, tiny_mirror):  # params name `tiny`
    params = parse_params(tiny_raw_params(**{"train.precision": "auto"}))
    chosen = resolve_precision("auto", torch.device("cpu"))
    tags = tracking.run_tags(params, Paths(tmp_path), "cpu", {"data_hash": "0" * 64, "files": {}})
    assert tags[tracking.TAG_PRECISION] == chosen
    model = VAE(VAEConfig(784, 8, 2, "bernoulli"))
    with caplog.at_level("INFO", logger="vae_mlops.step"):
        stepper = build_stepper(model, make_optimizer(model, 1e-3, torch.device("cpu")), params.train, Single())
    assert f"train.precision auto: {chosen} on cpu" in caplog.text
    assert stepper.module.precision == chosen


# ---------------------------------------------------------------- the direct step (no autograd)


def _two_steppers(precision: str, likelihood: str = "bernoulli"):
    """Two identical models and optimisers: one stepped through autograd and optimizer.step(), one directly."""
    out = []
    for direct in (False, True):
        torch.manual_seed(0)
        model = VAE(VAEConfig(784, 48, 5, likelihood))
        stepper = Stepper(
            ELBOSums(model, precision, fused=True), make_optimizer(model, 1e-3, model.fc1.weight.device), False
        )
        assert stepper.direct  # the fused step outside DDP, compile and CUDA graphs takes the direct path
        stepper.direct = direct
        out.append((model, stepper))
    return out


@pytest.mark.parametrize("precision", ["float32", "bf16"])
@pytest.mark.parametrize("likelihood", NAMES)
def test_direct_step_gives_bit_identical_weights_and_adam_state(precision, likelihood):
    """Same kernels in the same order: the skipped autograd engine and Adam's Python change no bit."""
    (ref, ref_step), (got, got_step) = _two_steppers(precision, likelihood)
    g = torch.Generator().manual_seed(4)
    coef = torch.tensor([1 / 32, BETA / 32])
    for _ in range(4):
        x, eps = torch.rand((32, 784), generator=g), torch.randn((32, 5), generator=g)
        torch.testing.assert_close(got_step(x, eps, coef, full=True), ref_step(x, eps, coef, full=True), rtol=0, atol=0)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name
    want, have = ref_step.optimizer.state_dict()["state"], got_step.optimizer.state_dict()["state"]
    for i in want:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(want[i][key], have[i][key]), (i, key)


def test_direct_step_equals_autograds_after_a_resume():
    """Adam's state loaded from a checkpoint (new tensors) is what the next direct step updates."""
    (ref, ref_step), (got, got_step) = _two_steppers("float32")
    x, eps, coef = torch.rand(16, 784), torch.randn(16, 5), torch.tensor([1 / 16, 1 / 16])
    ref_step(x, eps, coef, full=True)
    got_step(x, eps, coef, full=True)
    got_step.optimizer.load_state_dict(copy.deepcopy(ref_step.optimizer.state_dict()))  # as from a file
    for _ in range(2):
        ref_step(x, eps, coef, full=True)
        got_step(x, eps, coef, full=True)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), got.parameters()))
