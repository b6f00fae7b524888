"""The champion gate, the promotion log and concurrent registrations, against a real sqlite MLflow store."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.mlflow_store import fresh_store
from vae_mlops import cli, model_store, registry, tracking
from vae_mlops.metric_catalogue import CATALOGUE, GATE_METRICS
from vae_mlops.model import VAE, VAEConfig
from vae_mlops.params import RegisterParams

METRIC = "test.nll_iwae"


def _vae(seed: int = 0, likelihood: str = "bernoulli") -> VAE:
    torch.manual_seed(seed)
    return VAE(VAEConfig(784, 16, 2, likelihood)).eval()


def _candidate(
    value: float,
    dataset: str = "tiny",
    data_hash: str = "hash-1",
    seed: int = 0,
    likelihood: str = "bernoulli",
    binarize: str = "none",
) -> registry.Candidate:
    return registry.Candidate(
        model=_vae(seed, likelihood),
        metrics={METRIC: value, "test.elbo": -value - 1.0, "test.recon_mse": value / 1000},
        dataset=dataset,
        data_hash=data_hash,
        git_commit="0123456789abcdef",
        model_sha256=f"sha-{value}-{seed}",
        input_example=np.random.default_rng(0).random((2, 784), dtype=np.float32),
        binarize=binarize,
    )


def _no_rescore(vae) -> float:
    raise AssertionError("the champion was scored on the same data: no re-scoring expected")


# ---------------------------------------------------------------- the gate's rule


@pytest.mark.parametrize(
    "value, champion, min_delta, promote, why",
    [
        (100.0, None, 0.0, True, "first version"),
        (95.0, registry.Champion("1", "tiny", 100.0), 0.0, True, "better by 5.0000 >= min_delta"),
        (100.0, registry.Champion("1", "tiny", 100.0), 0.0, False, "no better"),
        (101.0, registry.Champion("1", "tiny", 100.0), 0.0, False, "worse by 1.0000"),
        (99.5, registry.Champion("1", "tiny", 100.0), 1.0, False, "better by only 0.5000 < min_delta"),
        (1.0, registry.Champion("1", "fashion-mnist", None), 0.0, False, "not compared"),
    ],
)
def test_the_gate_promotes_only_a_strict_improvement_of_at_least_min_delta_on_the_same_dataset(
    value, champion, min_delta, promote, why
):
    got, reason = registry.decide(METRIC, min_delta, value, "tiny", champion)
    assert got is promote and why in reason


def test_the_gate_reads_higher_is_better_metrics_the_other_way():
    champion = registry.Champion("1", "tiny", -100.0)
    assert registry.decide("test.elbo", 0.0, -95.0, "tiny", champion)[0] is True
    assert registry.decide("test.elbo", 0.0, -105.0, "tiny", champion)[0] is False


def test_a_metric_without_a_better_direction_cannot_drive_the_gate():
    with pytest.raises(registry.RegistryError, match="test.kl.*cannot drive the gate"):
        registry.decide("test.kl", 0.0, 1.0, "tiny", None)


@pytest.mark.parametrize("metric", [k for k in GATE_METRICS if CATALOGUE[k].per_likelihood])
def test_a_likelihood_dependent_metric_is_not_compared_across_likelihoods(metric):
    """A Gaussian density and a Bernoulli pmf are not numbers of one kind: the gate says so and what to do."""
    champion = registry.Champion("1", "tiny", 100.0, likelihood="bernoulli")
    for value in (1.0, 1000.0, -1000.0):  # however the numbers compare
        promote, reason = registry.decide(metric, 0.0, value, "tiny", champion, likelihood="gaussian")
        assert promote is False and reason.startswith("not compared: ")
    assert "bernoulli" in reason and "gaussian" in reason
    assert "register.metric" in reason and "test.recon_mse" in reason and "register.model_name" in reason
    assert registry.decide(metric, 0.0, 95.0, "tiny", champion, likelihood="bernoulli")[1].startswith(metric)


def test_a_metric_that_compares_across_likelihoods_is_compared():
    champion = registry.Champion("1", "tiny", 0.05, likelihood="bernoulli")
    assert registry.decide("test.recon_mse", 0.0, 0.04, "tiny", champion, likelihood="gaussian")[0] is True
    nmi_champion = registry.Champion("1", "tiny", 0.5, likelihood="bernoulli")
    promote, reason = registry.decide("latent.nmi", 0.0, 0.4, "tiny", nmi_champion, likelihood="gaussian")
    assert promote is False and "worse by 0.1000" in reason


def test_the_gate_metrics_are_the_catalogued_metrics_with_a_direction():
    assert set(GATE_METRICS) == {k for k, m in CATALOGUE.items() if m.lower_is_better is not None}
    assert {"test.kl", "test.active_units"}.isdisjoint(GATE_METRICS)
    assert CATALOGUE["test.nll_iwae"].lower_is_better and not CATALOGUE["test.elbo"].lower_is_better


# ---------------------------------------------------------------- against a real store


@dataclass
class Store:
    uri: str
    run: tracking.PipelineRun
    model_uri: str
    log: Path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """One sqlite store, one run, one logged model; each test registers under its own model name."""
    folder = tmp_path_factory.mktemp("registry")
    uri = fresh_store(folder)
    client = tracking.mlflow_client(uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "registry-tests", uri)).info.run_id
    run = tracking.PipelineRun(run_id, "1", uri)
    model_uri = model_store.log_vae(run, _vae(), _candidate(1.0).input_example, {})
    return Store(uri, run, model_uri, folder / "promotions.jsonl")


def _submit(store: Store, name: str, cand: registry.Candidate, min_delta: float = 0.0, rescore=_no_rescore):
    """Register a version of the shared logged model with `cand`'s tags and pass it through the gate."""
    reg = tracking.ModelRegistry(name, store.uri)
    version = reg.create_version(store.model_uri, store.run.run_id, registry.version_tags(cand))
    decision = registry.gate(reg, version.version, store.run.run_id, cand, RegisterParams(name, METRIC, min_delta), rescore)
    registry.record(reg, decision, store.log)
    return decision


def _aliases(store: Store, name: str) -> dict[str, str]:
    return tracking.ModelRegistry(name, store.uri).aliases()


def test_the_first_version_becomes_champion(store):
    d = _submit(store, "first", _candidate(100.0))
    assert (d.version, d.alias, d.decision) == ("1", "champion", "promoted")
    assert _aliases(store, "first") == {"champion": "1"}


def test_a_better_version_takes_the_champion_alias(store):
    _submit(store, "better", _candidate(100.0))
    d = _submit(store, "better", _candidate(95.0))
    assert d.alias == "champion" and (d.champion_version, d.champion_value) == ("1", 100.0)
    assert _aliases(store, "better") == {"champion": "2"}


def test_a_worse_or_equal_version_never_takes_the_champion_alias(store):
    _submit(store, "worse", _candidate(100.0))
    assert _submit(store, "worse", _candidate(101.0)).alias == "challenger"
    assert _submit(store, "worse", _candidate(100.0, seed=1)).alias == "challenger"
    assert _aliases(store, "worse") == {"champion": "1", "challenger": "3"}


def test_min_delta_holds_back_a_small_improvement(store):
    _submit(store, "delta", _candidate(100.0))
    assert _submit(store, "delta", _candidate(99.5), min_delta=1.0).alias == "challenger"
    assert _submit(store, "delta", _candidate(98.9), min_delta=1.0).alias == "champion"
    assert _aliases(store, "delta")["champion"] == "3"


def test_a_version_from_another_dataset_is_not_compared(store):
    _submit(store, "datasets", _candidate(100.0, dataset="tiny"))
    d = _submit(store, "datasets", _candidate(1.0, dataset="fashion-mnist"))
    assert d.alias == "challenger" and d.champion_value is None and "not compared" in d.reason
    assert _aliases(store, "datasets")["champion"] == "1"


def test_versions_are_tagged_with_their_likelihood():
    assert registry.version_tags(_candidate(1.0, likelihood="gaussian"))[registry.TAG_LIKELIHOOD] == "gaussian"


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({"likelihood": "gaussian"}, "champion v1 is bernoulli, this version gaussian"),
        ({"binarize": "dynamic"}, "champion v1 is data.binarize=none, this version data.binarize=dynamic"),
    ],
)
def test_a_champion_of_another_kind_is_not_compared_nor_rescored_and_the_decision_is_logged(store, other, why):
    """Another likelihood or another binarisation: a log-likelihood is not compared, whatever its value."""
    name = f"other-{next(iter(other))}"
    _submit(store, name, _candidate(100.0, data_hash="old"))
    d = _submit(store, name, _candidate(1.0, data_hash="new", **other))  # _no_rescore
    assert (d.alias, d.decision, d.champion_value) == ("challenger", "not promoted", None)
    assert (d.likelihood, d.champion_likelihood) == (other.get("likelihood", "bernoulli"), "bernoulli")
    assert d.reason.startswith("not compared: test.nll_iwae") and why in d.reason and "register.model_name" in d.reason
    assert _aliases(store, name)["champion"] == "1"
    logged = [r for r in registry.read_log(store.log) if r["model_name"] == name]
    assert [r["decision"] for r in logged] == ["promoted", "not promoted"] and logged[1]["reason"] == d.reason
    assert registry.registry_history(tracking.ModelRegistry(name, store.uri))[1] == logged[1]


def test_across_likelihoods_gate_on_a_metric_that_compares_across_them(store):
    name = "across"
    reg = tracking.ModelRegistry(name, store.uri)
    for value, likelihood in ((100.0, "bernoulli"), (50.0, "gaussian")):
        cand = _candidate(value, likelihood=likelihood)
        version = reg.create_version(store.model_uri, store.run.run_id, registry.version_tags(cand))
        d = registry.gate(reg, version.version, store.run.run_id, cand, RegisterParams(name, "test.recon_mse", 0.0),
                          _no_rescore)  # fmt: skip
    assert d.alias == "champion" and (d.value, d.champion_value) == (0.05, 0.1)


@pytest.mark.parametrize("metric", [k for k in GATE_METRICS if CATALOGUE[k].per_likelihood])
def test_a_likelihood_dependent_metric_is_not_compared_across_binarisations(metric):
    value = 1.0 if CATALOGUE[metric].lower_is_better else 1000.0  # far better than the champion
    champion = registry.Champion("1", "tiny", 100.0, likelihood="bernoulli", binarize="none")
    promote, reason = registry.decide(metric, 0.0, value, "tiny", champion, "bernoulli", binarize="dynamic")
    assert promote is False and "data.binarize=none" in reason and "data.binarize=dynamic" in reason
    assert registry.decide(metric, 0.0, value, "tiny", champion, "bernoulli", binarize="none")[0] is True


def test_a_metric_that_compares_across_binarisations_is_compared():
    champion = registry.Champion("1", "tiny", 0.05, likelihood="bernoulli", binarize="none")
    assert registry.decide("test.recon_mse", 0.0, 0.04, "tiny", champion, "bernoulli", binarize="dynamic")[0] is True


def test_versions_are_tagged_with_their_binarisation():
    assert registry.version_tags(_candidate(1.0, binarize="dynamic"))[registry.TAG_BINARIZE] == "dynamic"


def test_a_champion_without_a_binarisation_record_trained_on_grey_values(store):
    reg = tracking.ModelRegistry("unbinarised", store.uri)
    cand = _candidate(100.0)
    tags = {k: v for k, v in registry.version_tags(cand).items() if k != registry.TAG_BINARIZE}
    version = reg.create_version(store.model_uri, store.run.run_id, tags)  # as versions registered before the tag
    assert registry.champion_binarize(reg, reg.version(version.version)) == "none"


def test_a_champion_without_a_likelihood_tag_is_read_from_its_run(store):
    reg = tracking.ModelRegistry("untagged", store.uri)
    client = tracking.mlflow_client(store.uri)
    run_id = client.create_run(tracking.ensure_experiment(client, "registry-tests", store.uri)).info.run_id
    client.log_param(run_id, "model.likelihood", "gaussian")
    cand = _candidate(100.0, likelihood="gaussian")
    model_uri = model_store.log_vae(tracking.PipelineRun(run_id, "1", store.uri), cand.model, cand.input_example, {})
    tags = {k: v for k, v in registry.version_tags(cand).items() if k != registry.TAG_LIKELIHOOD}
    version = reg.create_version(model_uri, run_id, tags)
    assert registry.TAG_LIKELIHOOD not in reg.version(version.version).tags  # as versions registered before the tag
    assert registry.champion_likelihood(reg, reg.version(version.version)) == "gaussian"


def test_a_champion_scored_on_other_test_data_is_rescored_before_deciding(store):
    _submit(store, "rescore", _candidate(100.0, data_hash="old"))
    seen = []

    def rescore(vae) -> float:
        seen.append(vae)
        return 90.0  # the champion does better on the new test data than its old tag says

    d = _submit(store, "rescore", _candidate(95.0, data_hash="new"), rescore=rescore)
    assert d.alias == "challenger" and d.champion_value == 90.0 and "re-scored" in d.reason
    assert len(seen) == 1 and isinstance(seen[0], VAE)
    assert all(torch.equal(a, b) for a, b in zip(seen[0].state_dict().values(), _vae().state_dict().values()))
    d = _submit(store, "rescore", _candidate(89.0, data_hash="new"))  # the re-score is kept: no second one
    assert d.alias == "champion" and d.champion_value == 90.0


def test_every_decision_is_logged_and_tagged_and_history_prints_them(store, tmp_path, capsys):
    _submit(store, "history", _candidate(100.0))
    _submit(store, "history", _candidate(101.0))
    reg = tracking.ModelRegistry("history", store.uri)
    tagged = registry.registry_history(reg)
    assert [(r["version"], r["decision"]) for r in tagged] == [("1", "promoted"), ("2", "not promoted")]
    logged = [r for r in registry.read_log(store.log) if r["model_name"] == "history"]
    assert logged == tagged
    assert {"time", "version", "decision", "reason", "value", "champion_value", "git_commit"} <= set(logged[0])
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "promotions.jsonl").write_text(store.log.read_text())
    assert cli.main(["registry", "history", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "first version" in out and "worse by 1.0000" in out


def test_register_logs_the_model_and_the_champion_loads_with_pyfunc(store, tmp_path):
    cand = _candidate(100.0, seed=3)
    cfg = RegisterParams("pyfunc", METRIC, 0.0)
    d = registry.register(store.run, cand, cfg, tmp_path / "log.jsonl", _no_rescore)
    assert d.alias == "champion"
    again = registry.register(store.run, cand, cfg, tmp_path / "log.jsonl", _no_rescore)
    assert again == d and len(registry.read_log(tmp_path / "log.jsonl")) == 1  # no second version, no new line
    assert [v.version for v in tracking.ModelRegistry("pyfunc", store.uri).versions()] == ["1"]

    model = model_store.load_pyfunc("models:/pyfunc@champion", store.uri)
    x = cand.input_example
    recon = model.predict(x)["values"]
    mu = model.predict(x, params={"output": "mu"})["values"]
    log_std = model.predict(x, params={"output": "log_std"})["values"]
    with torch.no_grad():
        want_mu, want_log_std = cand.model.encode(torch.from_numpy(x))
        want_recon = cand.model.decode(want_mu)
    assert recon.shape == (2, 784) and mu.shape == log_std.shape == (2, 2)
    np.testing.assert_allclose(mu, want_mu.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(log_std, want_log_std.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(recon, want_recon.numpy(), rtol=1e-5, atol=1e-6)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # no store leaks into later calls or child processes


# ---------------------------------------------------------------- two registrations at once

# One registration in its own process. `sync` is a folder the test and the two workers share: a worker touches
# `blocked-<i>` when the gate's lock is held by someone else, and in "race" mode the two meet at a barrier
# between reading the champion and setting an alias (both have decided; worker 0 writes first, then worker 1),
# so the registrations overlap every time instead of when the scheduler happens to interleave them.
WORKER = textwrap.dedent(
    """
    import fcntl, json, sys, time
    from pathlib import Path
    import numpy as np, torch
    import mlflow.pytorch  # imported before the start line, so both race for the gate together
    from vae_mlops import registry, tracking
    from vae_mlops.model import VAE, VAEConfig
    from vae_mlops.params import RegisterParams

    uri, run_id, value, log_path, sync, index, mode = sys.argv[1:]
    sync, index = Path(sync), int(index)
    other = 1 - index

    def wait_for(name):
        deadline = time.monotonic() + 120
        while not (sync / name).exists():
            assert time.monotonic() < deadline, f"worker {index}: no {name} in 120 s"
            time.sleep(0.01)

    flock = fcntl.flock
    def observed_flock(fd, operation):
        try:
            return flock(fd, operation)
        except BlockingIOError:
            (sync / f"blocked-{index}").touch()
            raise
    fcntl.flock = observed_flock

    set_alias = tracking.ModelRegistry.set_alias
    def set_alias_at_the_barrier(self, alias, version):
        if (sync / f"decided-{index}").exists():
            return set_alias(self, alias, version)
        (sync / f"decided-{index}").touch()
        wait_for(f"decided-{other}")  # both have read the champion and decided
        if index == 1:
            wait_for("set-0")
        set_alias(self, alias, version)
        (sync / f"set-{index}").touch()
        if index == 0:
            wait_for("set-1")  # worker 1's alias now overwrites this one: what settling has to repair
    if mode == "race":
        tracking.ModelRegistry.set_alias = set_alias_at_the_barrier

    torch.manual_seed(int(float(value)))
    cand = registry.Candidate(VAE(VAEConfig(784, 16, 2, "bernoulli")), {"test.nll_iwae": float(value)}, "tiny",
                              "hash", "abc", f"sha-{value}", np.zeros((2, 784), np.float32))
    (sync / f"ready-{index}").touch()
    wait_for("go")
    d = registry.register(tracking.PipelineRun(run_id, "1", uri), cand, RegisterParams("race", "test.nll_iwae", 0.0),
                          Path(log_path), lambda vae: float("nan"))
    print(json.dumps(d.to_dict()))
    """
)


@contextlib.contextmanager
def workers(tmp_path: Path, uri: str, runs: list[str], values: tuple[str, str], logs: list[Path], mode: str):
    """The two workers, started and waiting at their start line (`sync/go`): (procs, sync); killed if left running."""
    (tmp_path / "worker.py").write_text(WORKER)
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, str(tmp_path / "worker.py"), uri, run, value, str(log), str(sync), str(i), mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i, (run, value, log) in enumerate(zip(runs, values, logs))
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not all((sync / f"ready-{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        yield procs, sync
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


@pytest.mark.slow
def test_two_registrations_at_once_leave_one_champion_and_a_consistent_log(tmp_path):
    """Two registrations at once never give two champions or none; the best one holds the alias."""
    uri = fresh_store(tmp_path)
    client = tracking.mlflow_client(uri)
    experiment = tracking.ensure_experiment(client, "race", uri)
    runs = [client.create_run(experiment).info.run_id for _ in range(2)]
    log = tmp_path / "promotions.jsonl"
    lock = registry.lock_path(tracking.local_store_path(uri))
    with workers(tmp_path, uri, runs, ("100.0", "90.0"), [log, log], "lock") as (procs, sync):
        with open(lock, "a+") as held:
            fcntl.flock(held, fcntl.LOCK_EX)  # hold the gate: both must queue behind it
            (sync / "go").touch()
            deadline = time.monotonic() + 120
            while not all((sync / f"blocked-{i}").exists() for i in range(2)):  # each found the gate taken
                ended = [i for i, p in enumerate(procs) if p.poll() is not None]
                assert not ended, f"worker {ended} finished while the test held the gate's lock: {procs[ended[0]].communicate()}"
                assert time.monotonic() < deadline, "the workers never tried the gate's lock"
                time.sleep(0.05)
            assert not log.exists() and tracking.ModelRegistry("race", uri).aliases() == {}  # both wait on the lock
            fcntl.flock(held, fcntl.LOCK_UN)
        outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    decisions = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(decisions) == 2
    first, second = decisions
    assert first["reason"].startswith("first version") and second["champion_version"] == first["version"]
    aliases = tracking.ModelRegistry("race", uri).aliases()
    by_version = {d["version"]: d for d in decisions}
    assert by_version[aliases["champion"]]["value"] == 90.0  # the better model holds it, whichever came first
    assert aliases.get("challenger") == (second["version"] if second["value"] == 100.0 else None)
