"""The comparison report's page, a Jinja2 template (autoescaped): kept in a module so DVC's lineage sees it.

`compare.render_html` fills it with a `compare.Report` as `r`; every picture is a data URI, so the page is one file.
"""

from vae_mlops import html_page

STYLE = """\
  :root { --baseline: #ff7f0e; --candidate: #1f77b4; --good: #1a7f37; --bad: #b42318; }
  .runs { display: flex; gap: 24px; flex-wrap: wrap; color: #57606a; }
  .baseline .swatch { background: var(--baseline); } .candidate .swatch { background: var(--candidate); }
  .gate { border: 1px solid var(--line); border-left: 6px solid #8c959f; border-radius: 6px; padding: 10px 14px; }
  .gate.promoted { border-left-color: var(--good); } .gate.not-promoted { border-left-color: var(--bad); }
  .gate b { text-transform: uppercase; letter-spacing: .03em; }
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
  .missing { font-style: italic; }
  footer { margin-top: 32px; font-size: 12px; }
"""

BODY = """\
{#- The comparison report (vae_mlops.compare): one self-contained page, every picture a data URI. -#}
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

<h2>Samples: {{ n_samples }} draws of z from each model's own prior p(z)</h2>
<p class="missing">One seed for both: two N(0, I) priors of one latent size decode the same z.</p>
<div class="pair" id="samples">
{%- for role, side in r.sides %}
  <figure class="{{ role }}"><figcaption><span class="swatch"></span>{{ side.label }}{% if side.prior %} · z ~ {{ side.prior }}{% endif %}</figcaption>
  {%- if r.pictures.get(role ~ '.samples') %}<img class="digits" src="{{ r.pictures.get(role ~ '.samples') }}" alt="samples from {{ side.label }}" width="484">
  {%- else %}<span class="missing">no model</span>{% endif %}</figure>
{%- endfor %}
</div>

<h2>Latent maps of the test set</h2>
<div class="pair" id="latent-maps">
{%- for role, side in r.sides %}
  <figure class="{{ role }}"><figcaption><span class="swatch"></span>{{ side.label }}</figcaption>
  {%- if r.pictures.get(role ~ '.latent') %}<img src="{{ r.pictures.get(role ~ '.latent') }}" alt="latent map of {{ side.label }}" width="580">
  {%- if (role ~ '.latent') in r.from_run %}<div class="missing">as its run's evaluate stage logged it</div>
  {%- else %}<div class="missing">drawn here: <code>evaluate.latent_map</code> = {{ r.latent_map }}</div>{% endif %}
  {%- else %}<span class="missing">no model or no test split, and the run logged no latent map</span>{% endif %}</figure>
{%- endfor %}
</div>

{%- if r.has_mixture %}
<h2>Mixture components</h2>
<p class="missing">Samples of each component, one row per cluster, labelled with the test label it mostly holds;
then the clusters, argmax q(c|x), against the test labels.</p>
<div class="pair" id="mixture">
{%- for role, side in r.sides %}
  <figure class="{{ role }}"><figcaption><span class="swatch"></span>{{ side.label }}</figcaption>
  {%- if r.pictures.get(role ~ '.cluster_samples') %}
  <img class="cluster-samples" src="{{ r.pictures.get(role ~ '.cluster_samples') }}" alt="samples of each component of {{ side.label }}" width="480">
  {%- if r.pictures.get(role ~ '.cluster_confusion') %}
  <img class="cluster-confusion" src="{{ r.pictures.get(role ~ '.cluster_confusion') }}" alt="clusters of {{ side.label }} against the labels" width="480">
  {%- endif %}
  {%- if (role ~ '.cluster_samples') in r.from_run %}<div class="missing">as its run's evaluate stage logged them</div>{% endif %}
  {%- elif side.model is not none and not side.model.prior.n_components %}<span class="missing">no components: its prior is {{ side.prior }}</span>
  {%- else %}<span class="missing">no model or no test split, and the run logged no mixture pictures</span>{% endif %}</figure>
{%- endfor %}
</div>
{%- endif %}

{%- if r.notes %}
<h2>Notes</h2>
<ul class="notes">{% for note in r.notes %}<li>{{ note }}</li>{% endfor %}</ul>
{%- endif %}
<footer>vae-mlops comparison report · deltas are candidate − baseline · made {{ r.created }}</footer>
"""
HTML_TEMPLATE = html_page.template("{{ r.title }}", STYLE, BODY)
