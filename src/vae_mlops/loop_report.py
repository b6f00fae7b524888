"""`reports/loop.html`: the closed loop's timeline as one self-contained page (`make loop-demo` writes it).

Per monitor window: the served ELBO against the champion's reference, the drift
statistics and their calibrated thresholds; markers where drift was found, the
retraining started, the new champion was promoted and the server switched; the
loop's measures (false alarms, detection delay, time to the new champion, served
ELBO of the shifted traffic before and after). The timeline is also written as
JSON (`reports/loop.json`), from which the page can be rendered again.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vae_mlops import atomic, html_page

MARKER_KINDS = {  # kind -> (colour, what the line means)
    "drift": ("#b42318", "drift found"),
    "retrain": ("#9a6700", "retraining started"),
    "promoted": ("#1a7f37", "new champion promoted"),
    "switched": ("#0969da", "server switched"),
}
PHASE_COLOURS = {"a": "#eaeef2", "b": "#fff1e5", "c": "#dafbe1"}


@dataclass(frozen=True)
class Check:
    """One monitor window: what the served version saw, and how far it was from its reference."""

    time: float  # seconds since the demo started
    phase: str
    version: str
    images: int  # images sent so far in the demo
    elbo_mean: float
    ref_elbo_mean: float
    ks_elbo: float
    ks_threshold: float
    mmd_mu: float
    mmd_threshold: float
    over: bool
    drift: bool = False


@dataclass(frozen=True)
class Marker:
    time: float
    kind: str  # a key of MARKER_KINDS
    label: str


@dataclass(frozen=True)
class Phase:
    name: str  # a, b, c
    start: float
    end: float
    traffic: str


@dataclass
class Timeline:
    """Everything the page shows; `measures` are the loop's numbers, as text with units."""

    title: str
    checks: list[Check] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    measures: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Timeline":
        return cls(
            title=d["title"], checks=[Check(**c) for c in d["checks"]], markers=[Marker(**m) for m in d["markers"]],
            phases=[Phase(**p) for p in d["phases"]], measures=dict(d["measures"]), settings=dict(d["settings"]),
            notes=list(d["notes"]), created=d["created"],
        )  # fmt: skip


# ---------------------------------------------------------------- the picture


def timeline_figure(t: Timeline) -> Figure:
    """Three panels over time: served vs reference ELBO, KS of the ELBO, MMD of the latent means; phases and markers."""
    fig = Figure(figsize=(11, 8.2), layout="constrained")  # no pyplot: no global state, no display
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    x = [c.time for c in t.checks]
    panels = (
        ("window mean ELBO (nats)", [c.elbo_mean for c in t.checks], [c.ref_elbo_mean for c in t.checks], "reference"),
        ("KS statistic, ELBO", [c.ks_elbo for c in t.checks], [c.ks_threshold for c in t.checks], "threshold"),
        ("MMD², latent means", [c.mmd_mu for c in t.checks], [c.mmd_threshold for c in t.checks], "threshold"),
    )
    for ax, (name, values, line, line_name) in zip(axes, panels):
        for p in t.phases:
            ax.axvspan(p.start, p.end, color=PHASE_COLOURS.get(p.name, "#f6f8fa"), zorder=0)
        ax.plot(x, values, "o-", color="#1f77b4", ms=4, label="served window")
        ax.step(x, line, where="post", color="#57606a", ls="--", label=line_name)
        over = [(c.time, v) for c, v in zip(t.checks, values) if c.over]
        if over:
            ax.plot(*zip(*over), "o", color="#b42318", ms=7, mfc="none", label="over the threshold")
        for m in t.markers:
            ax.axvline(m.time, color=MARKER_KINDS[m.kind][0], lw=1.4)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].legend(loc="upper left", fontsize=8)
    top = axes[0]
    for p in t.phases:
        top.text((p.start + p.end) / 2, 1.02, f"phase {p.name}", transform=top.get_xaxis_transform(),
                 ha="center", va="bottom", fontsize=9)  # fmt: skip  (the page names each phase's traffic)
    for m in t.markers:
        axes[2].text(m.time, 0.98, " " + MARKER_KINDS[m.kind][1], transform=axes[2].get_xaxis_transform(), rotation=90,
                     va="top", ha="right", fontsize=8, color=MARKER_KINDS[m.kind][0])  # fmt: skip
    axes[2].set_xlabel("seconds since the demo started")
    return fig


# ---------------------------------------------------------------- the page

STYLE = """\
  th, td { border-bottom: 1px solid var(--line); padding: 3px 10px; text-align: right; font-variant-numeric: tabular-nums; }
  th:first-child, td:first-child, td.text { text-align: left; }
  tr.over td { color: #b42318; } tr.drift td { font-weight: 700; }
"""

BODY = """\
<h1>{{ t.title }}</h1>
<p>{% for p in t.phases %}<b>phase {{ p.name }}</b>: {{ p.traffic }}{% if not loop.last %} · {% endif %}{% endfor %}</p>

<h2>The loop in numbers</h2>
<table id="measures"><tbody>
{%- for k, v in t.measures.items() %}<tr><td class="text">{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}
</tbody></table>

<h2>Timeline</h2>
{%- if picture %}<img src="{{ picture }}" alt="per-window ELBO, drift statistics, thresholds and events over time" width="1100">
{%- else %}<p class="missing">No monitor check ran.</p>{% endif %}

<h2>Events</h2>
<table id="events"><thead><tr><th>time (s)</th><th>event</th><th>what</th></tr></thead><tbody>
{%- for m in t.markers %}<tr><td>{{ "%.1f"|format(m.time) }}</td>
<td class="text"><span class="swatch" style="background: {{ kinds[m.kind][0] }}"></span>{{ kinds[m.kind][1] }}</td>
<td class="text">{{ m.label }}</td></tr>{% endfor %}
</tbody></table>

<h2>Monitor checks</h2>
<table id="checks"><thead><tr><th>time (s)</th><th>phase</th><th>version</th><th>images sent</th><th>ELBO</th>
<th>reference ELBO</th><th>KS</th><th>KS threshold</th><th>MMD²</th><th>MMD² threshold</th><th>over</th><th>drift</th></tr></thead><tbody>
{%- for c in t.checks %}<tr class="{{ 'over' if c.over }} {{ 'drift' if c.drift }}"><td>{{ "%.1f"|format(c.time) }}</td><td>{{ c.phase }}</td>
<td>v{{ c.version }}</td><td>{{ c.images }}</td><td>{{ "%.1f"|format(c.elbo_mean) }}</td><td>{{ "%.1f"|format(c.ref_elbo_mean) }}</td>
<td>{{ "%.3f"|format(c.ks_elbo) }}</td><td>{{ "%.3f"|format(c.ks_threshold) }}</td><td>{{ "%.4f"|format(c.mmd_mu) }}</td>
<td>{{ "%.4f"|format(c.mmd_threshold) }}</td><td>{{ "yes" if c.over else "" }}</td><td>{{ "DRIFT" if c.drift else "" }}</td></tr>{% endfor %}
</tbody></table>

<h2>Settings</h2>
<table id="settings"><tbody>
{%- for k, v in t.settings.items() %}<tr><td class="text"><code>{{ k }}</code></td><td class="text">{{ v }}</td></tr>{% endfor %}
</tbody></table>
{%- if t.notes %}
<h2>Notes</h2>
<ul class="notes">{% for n in t.notes %}<li>{{ n }}</li>{% endfor %}</ul>
{%- endif %}
<footer>vae-mlops loop demo · made {{ t.created }}</footer>
"""
TEMPLATE = html_page.template("{{ t.title }}", STYLE, BODY)


def render_html(t: Timeline) -> str:
    picture = html_page.figure_uri(timeline_figure(t)) if t.checks else ""
    return html_page.environment().from_string(TEMPLATE).render(t=t, picture=picture, kinds=MARKER_KINDS)


def write(t: Timeline, html_path: Path) -> tuple[Path, Path]:
    """`loop.html` and `loop.json` beside it, each written whole or not at all."""
    json_path = html_path.with_suffix(".json")
    atomic.write_text(json_path, json.dumps(t.to_dict(), indent=2) + "\n")
    atomic.write_text(html_path, render_html(t))
    return html_path, json_path
