"""The comparison report's page, a Jinja2 template (autoescaped): kept in a module so DVC's lineage sees it.

`compare.render_html` fills it with a `compare.Report` as `r`; every picture is a data URI, so the page is one file.
"""

HTML_TEMPLATE = """\
<!DOCTYPE html>
{#- The comparison report (vae_mlops.compare): one self-contained page, every picture a data URI. -#}
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ r.title }}</title>
<style>
  :root { --baseline: #ff7f0e; --candidate: #1f77b4; --good: #1a7f37; --bad: #b42318; --line: #d0d7de; }
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
         max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
  h1 { font-size: 22px; margin: 0 0 6px; }
  h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
  .runs { display: flex; gap: 24px; flex-wrap: wrap; color: #57606a; }
  .swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 4px; }
  .baseline .swatch { background: var(--baseline); } .candidate .swatch { background: var(--candidate); }
  code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
  .gate { border: 1px solid var(--line); border-left: 6px solid #8c959f; border-radius: 6px; padding: 10px 14px; }
  .gate.promoted { border-left-color: var(--good); } .gate.not-promoted { border-left-color: var(--bad); }
  .gate b { text-transform: uppercase; letter-spacing: .03em; }
  table { border-collapse: collapse; }
  table.metrics th, table.metrics td, table.params th, table.params td {
    border-bottom: 1px solid var(--line); padding: 4px 12px; text-align: right; font-variant-numeric: tabular-nums; }
  table.metrics th:first-child, table.metrics td:first-child, table.params td, table.params th { text-align: left; }
  table.metrics thead th { border-bottom: 2px solid #8c959f; }
  td.better-candidate { color: var(--candidate); font-weight: 600; }
  td.better-baseline { color: var(--baseline); font-weight: 600; }
  td.dir { color: #57606a; }
  .pair { display: flex; gap: 24px; flex-wrap: wrap; align-items: flex-start; }
  figure { margin: 0; } figcaption { font-weight: 600; margin-bottom: 4px; }
  img.digits { image-rendering: pixelated; }
  table.recon th { text-align: right; padding-right: 12px; font-weight: 600; white-space: nowrap; }
  table.recon td { padding: 2px 0; }
  .missing { color: #57606a; font-style: italic; }
  .notes li { color: #57606a; }
  footer { margin-top: 32px; color: #57606a; font-size: 12px; }
</style>
</head>
<body>
<h1>{{ r.title }}</h1>
<div class="runs">
{%- for role, side in r.sides %}
  <span class="{{ role }}"><span class="swatch"></span><b>{{ role }}</b>: {{ side.label }} · run <code>{{ side.run.run_id }}</code>
  {%- if side.run.name and side.run.name != side.label %} ({{ side.run.name }}){% endif %}</span>
{%- endfor %}
</div>

<h2>Promotion gate</h2>
{%- if r.gate %}
<div class="gate {{ r.gate.decision | replace(' ', '-') }}" id="gate">
  <b>{{ r.gate.decision }}</b> · v{{ r.gate.version }} → <code>{{ r.gate.alias }}</code>
  {%- if r.gate.champion_version %} · against champion v{{ r.gate.champion_version }}{% endif %}
  · <code>{{ r.gate.metric }}</code> = {{ r.gate.value | num }}{% if r.gate.champion_value is not none %} vs {{ r.gate.champion_value | num }}{% endif %}
  <div>{{ r.gate.reason }}</div>
</div>
{%- else %}
<div class="gate" id="gate">No promotion decision is recorded for the candidate (its run registered no version).</div>
{%- endif %}

<h2>Metrics</h2>
<table class="metrics" id="metrics">
  <thead><tr><th>metric</th>
  {%- for role, side in r.sides %}<th class="{{ role }}"><span class="swatch"></span>{{ side.label }}</th>{% endfor %}
  {%- if r.baseline %}<th>delta</th><th>better</th>{% endif %}<th>direction</th></tr></thead>
  <tbody>
  {%- for row in r.rows %}
  <tr><td><code>{{ row.key }}</code></td>
    {%- if r.baseline %}<td>{{ row.baseline | num }}</td>{% endif %}<td>{{ row.candidate | num }}</td>
    {%- if r.baseline %}<td>{{ row.delta | delta }}</td>
    <td class="better-{{ row.better or 'none' }}">{% if row.better == 'candidate' %}{{ r.candidate.label }}{% elif row.better == 'baseline' %}{{ r.baseline.label }}{% elif row.better %}{{ row.better }}{% elif not row.comparable %}not comparable{% else %}—{% endif %}</td>
    {%- endif %}
    <td class="dir">{% if row.lower_is_better is none %}—{% elif row.lower_is_better %}lower is better{% else %}higher is better{% endif %}</td></tr>
  {%- endfor %}
  </tbody>
</table>

{%- if r.params_diff %}
<h2>Params that differ</h2>
<table class="params">
  <thead><tr><th>param</th><th>{{ r.baseline.label }}</th><th>{{ r.candidate.label }}</th></tr></thead>
  <tbody>{% for key, a, b in r.params_diff %}<tr><td><code>{{ key }}</code></td><td>{{ a }}</td><td>{{ b }}</td></tr>{% endfor %}</tbody>
</table>
{%- endif %}

<h2>Loss per epoch</h2>
{%- if r.pictures.get('loss') %}
<img src="{{ r.pictures.get('loss') }}" alt="train and validation loss per epoch" width="800">
{%- else %}<p class="missing">No per-epoch loss was logged.</p>{% endif %}

<h2>The same {{ n_digits }} test digits, reconstructed</h2>
{%- if r.pictures.get('digits') %}
<table class="recon">
  <tr><th>test digits</th><td><img class="digits" src="{{ r.pictures.get('digits') }}" alt="test digits" width="{{ (30 * n_digits + 2) * 2 }}"></td></tr>
  {%- for role, side in r.sides %}
  <tr class="{{ role }}"><th><span class="swatch"></span>{{ side.label }}</th><td>
    {%- if r.pictures.get(role ~ '.recon') %}<img class="digits" src="{{ r.pictures.get(role ~ '.recon') }}" alt="reconstructions by {{ side.label }}" width="{{ (30 * n_digits + 2) * 2 }}">
    {%- else %}<span class="missing">no model to reconstruct with</span>{% endif %}</td></tr>
  {%- endfor %}
</table>
{%- else %}<p class="missing">The test split is not available here.</p>{% endif %}

<h2>Samples (the same {{ n_samples }} draws of z ~ N(0, I))</h2>
<div class="pair">
{%- for role, side in r.sides %}
  <figure class="{{ role }}"><figcaption><span class="swatch"></span>{{ side.label }}</figcaption>
  {%- if r.pictures.get(role ~ '.samples') %}<img class="digits" src="{{ r.pictures.get(role ~ '.samples') }}" alt="samples from {{ side.label }}" width="484">
  {%- else %}<span class="missing">no model</span>{% endif %}</figure>
{%- endfor %}
</div>

<h2>Latent maps of the test set</h2>
<div class="pair">
{%- for role, side in r.sides %}
  <figure class="{{ role }}"><figcaption><span class="swatch"></span>{{ side.label }}</figcaption>
  {%- if r.pictures.get(role ~ '.latent') %}<img src="{{ r.pictures.get(role ~ '.latent') }}" alt="latent map of {{ side.label }}" width="580">
  {%- else %}<span class="missing">no model or no test split</span>{% endif %}</figure>
{%- endfor %}
</div>

{%- if r.notes %}
<h2>Notes</h2>
<ul class="notes">{% for note in r.notes %}<li>{{ note }}</li>{% endfor %}</ul>
{%- endif %}
<footer>vae-mlops comparison report · deltas are candidate − baseline · made {{ r.created }}</footer>
</body>
</html>
"""
