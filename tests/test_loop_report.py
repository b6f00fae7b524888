"""`reports/loop.html`: one self-contained page, as headless Chromium renders it, and its JSON round trip."""

from __future__ import annotations

import json

import pytest

from tests.support import browser
from tests.test_compare import assert_self_contained
from vae_mlops.loop_report import Check, Marker, Phase, Timeline, render_html, write

# Appended to a copy of the page: what the browser drew, for --dump-dom to show.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const drawn = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const shown = (sel) => [...document.querySelectorAll(sel)].filter((r) => r.getBoundingClientRect().height > 0).length;
  document.body.dataset.images = `${drawn.length}/${imgs.length}`;
  document.body.dataset.checkRows = String(shown("#checks tbody tr"));
  document.body.dataset.eventRows = String(shown("#events tbody tr"));
  document.body.dataset.driftRows = String(shown("#checks tbody tr.drift"));
});
</script>"""


def timeline() -> Timeline:
    """Three phases: quiet digits, shifted traffic found after two windows, the new champion serving it."""
    checks = []
    for i in range(24):
        phase = "a" if i < 10 else "b" if i < 16 else "c"
        shifted = phase == "b"
        checks.append(Check(
            time=10.0 * i, phase=phase, version="1" if phase != "c" else "2", images=200 * (i + 1),
            elbo_mean=-300.0 if shifted else -100.0, ref_elbo_mean=-100.0 if phase != "c" else -120.0,
            ks_elbo=0.9 if shifted else 0.05, ks_threshold=0.12, mmd_mu=0.5 if shifted else 0.001,
            mmd_threshold=0.01, over=shifted, drift=i == 11,
        ))  # fmt: skip
    markers = [Marker(110.0, "drift", "v1: 2 windows over"), Marker(115.0, "retrain", "vae-retrain started"),
               Marker(150.0, "promoted", "v2 champion"), Marker(158.0, "switched", "the server answers with v2")]  # fmt: skip
    phases = [Phase("a", 0, 95, "MNIST test digits"), Phase("b", 95, 160, "Fashion-MNIST <b>&</b>"),
              Phase("c", 160, 240, "Fashion-MNIST, new champion")]  # fmt: skip
    return Timeline("loop demo", checks, markers, phases, {"false alarms in phase a": "0 of 10 checks"},
                    {"train.epochs": 1}, ["a note"])  # fmt: skip


def render(html: str, tmp_path) -> dict[str, str]:
    """Open the page in headless Chromium; what it drew."""
    return browser.render(html, PROBE, tmp_path)


def test_the_loop_page_renders_whole_in_chromium(tmp_path):
    html = render_html(timeline())
    assert_self_contained(html)
    assert "Fashion-MNIST &lt;b&gt;&amp;&lt;/b&gt;" in html  # text from the run is escaped
    drawn = render(html, tmp_path)
    assert drawn == {"images": "1/1", "check-rows": "24", "event-rows": "4", "drift-rows": "1"}, drawn


def test_the_timeline_round_trips_through_its_json(tmp_path):
    t = timeline()
    html_path, json_path = write(t, tmp_path / "loop.html")
    assert html_path.read_text() == render_html(Timeline.from_dict(json.loads(json_path.read_text())))
    assert Timeline.from_dict(json.loads(json_path.read_text())) == t


@pytest.mark.parametrize("kind", ["drift", "retrain", "promoted", "switched"])
def test_every_marker_kind_is_drawn_and_named(kind):
    t = Timeline("t", [], [Marker(1.0, kind, "x")], [], {}, {}, [])
    assert {"drift": "drift found", "retrain": "retraining started", "promoted": "new champion promoted",
            "switched": "server switched"}[kind] in render_html(t)  # fmt: skip
