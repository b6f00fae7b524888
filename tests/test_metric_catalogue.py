"""One metric catalogue: the docs' table (docs/pipeline.md), the pandera schema and the gate all read it."""

from __future__ import annotations

import math
import re

import pytest

from tests.support.project import ROOT
from vae_mlops import metrics
from vae_mlops.metric_catalogue import CATALOGUE, GATE_METRICS, HIGHER, LOWER, METRIC_KEYS, markdown_table

START = re.compile(r"<!-- metric-catalogue:[^>]*-->\n")
END = "<!-- /metric-catalogue -->"


DOC = ROOT / "docs" / "pipeline.md"  # where users read what each metric means


def test_the_documented_metrics_table_is_the_catalogue():
    readme = DOC.read_text()
    start = START.search(readme)
    assert start, f"{DOC} lost its <!-- metric-catalogue: ... --> marker"
    table = readme[start.end() : readme.index(END, start.end())]
    assert table == markdown_table(), "regenerate with: python -c 'from vae_mlops.metric_catalogue import " \
                                      "markdown_table; print(markdown_table())'"  # fmt: skip


def test_every_metric_has_a_meaning_a_sane_range_and_a_known_direction():
    assert METRIC_KEYS == tuple(metrics.METRIC_KEYS) and len(set(METRIC_KEYS)) == len(METRIC_KEYS)
    for m in CATALOGUE.values():
        assert m.meaning and m.low < m.high and m.direction in (LOWER, HIGHER, None), m.key
        assert m.key.startswith(("test.", "latent.")), m.key
    assert GATE_METRICS == tuple(k for k, m in CATALOGUE.items() if m.direction is not None)


def test_likelihood_dependent_metrics_are_the_densities_and_their_parts():
    per_likelihood = {k for k, m in CATALOGUE.items() if m.per_likelihood}
    assert per_likelihood == {"test.elbo", "test.nll_iwae", "test.recon_bce", "test.kl"}


def _values_at(edge: str) -> dict[str, float]:
    """Every metric at the low or high end of its catalogued range (a finite stand-in for an open end)."""
    out = {}
    for key, m in CATALOGUE.items():
        v = m.low if edge == "low" else m.high
        out[key] = v if math.isfinite(v) else (-50.0 if edge == "low" else 50.0)
    out["test.nll_iwae"] = -out["test.elbo"]  # keep the cross-key check satisfied
    return out


@pytest.mark.parametrize("edge", ["low", "high"])
def test_the_schema_accepts_each_end_of_the_catalogued_range(edge):
    metrics.validate_metrics(_values_at(edge))


@pytest.mark.parametrize("key", [k for k, m in CATALOGUE.items() if math.isfinite(m.low) or math.isfinite(m.high)])
def test_the_schema_refuses_a_value_outside_the_catalogued_range(key):
    m = CATALOGUE[key]
    bad = m.high + 1.0 if math.isfinite(m.high) else m.low - m.slack - 1.0
    with pytest.raises(metrics.MetricsError) as err:
        metrics.validate_metrics({**_values_at("low"), key: bad})
    assert [p.split(":")[0] for p in err.value.problems] == [key]
