"""The QC's one HTML report per dataset (``derivatives/pacs2bids-qc/index.html``), opened in a browser.

A self-contained page (inline CSS, no script, no network): a summary table (one row per session:
status, counts of missing, duplicated and extra series and of deviations, QC time, a link to its
detail), then one section per session (anchor ``#<sub-X_ses-Y>``): the out-of-tolerance
parameters, and each image with its parameters, indices and snapshot (relative links to the PNGs
beside it). Rendered by Jinja2 with autoescaping: values from sidecars are text, never markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from jinja2 import Environment, select_autoescape

if TYPE_CHECKING:
    from pacs2bids.derivatives.qc import SessionQC

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1em}
th,td{border:1px solid #bbb;padding:.25em .6em;text-align:left;vertical-align:top;font-size:.9em}
th{background:#eee}
.pass{background:#cfeccf}.warn{background:#fbe7b5}.fail{background:#f6c2c2}.none{background:#dde5f2}
section{border-top:2px solid #888;margin-top:1.5em}
.image{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}
img{display:block;max-width:100%;background:#000}
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title><style>{{ style }}</style></head>
<body>
<h1>{{ title }}</h1>
<p>{{ sessions|length }} session(s).
{% if has_protocol %}Checked against the project's declared protocol.
{% else %}No protocol is declared in the project spec: image indices only, each session "no protocol".{% endif %}
Parameters come from the BIDS sidecars (seconds, degrees) and NIfTI headers (mm, voxels).</p>
<table id="summary">
<thead><tr><th>Session</th><th>Status</th><th>Images</th><th>Missing</th><th>Duplicated</th><th>Extra</th>
<th>Deviations</th><th>Lowest SNR</th><th>QC seconds</th></tr></thead>
<tbody>
{% for s in sessions %}<tr class="session-row {{ css(s.status) }}" data-status="{{ s.status }}">
<td><a href="#{{ s.label }}">{{ s.label }}</a></td><td>{{ s.status }}</td><td>{{ s.images|length }}</td>
<td>{{ s.missing|length }}</td><td>{{ s.duplicated|length }}</td><td>{{ s.extra|length }}</td>
<td>{{ s.deviations|length }}</td><td>{{ lowest_snr(s) }}</td><td>{{ "%.2f"|format(s.seconds) }}</td></tr>
{% endfor %}</tbody></table>
{% for s in sessions %}
<section id="{{ s.label }}">
<h2>{{ s.label }} <span class="{{ css(s.status) }}">{{ s.status }}</span></h2>
<p><a href="{{ s.json }}">{{ s.json }}</a> · <a href="#summary">back to the summary</a></p>
{% if s.missing %}<h3>Missing series</h3><ul>{% for m in s.missing %}
<li>{{ m.Series }}: {{ m.Found }} found, {{ m.Expected }} expected</li>{% endfor %}</ul>{% endif %}
{% if s.duplicated %}<h3>Duplicated series</h3><ul>{% for m in s.duplicated %}
<li>{{ m.Series }}: {{ m.Found }} found, {{ m.Expected }} expected ({{ m.Images|join(", ") }})</li>
{% endfor %}</ul>{% endif %}
{% if s.extra %}<h3>Extra series (not in the protocol)</h3><ul>{% for e in s.extra %}<li>{{ e }}</li>{% endfor %}</ul>
{% endif %}
{% if s.unreadable %}<h3>Images that could not be read</h3><ul>{% for u in s.unreadable %}
<li>{{ u.Image }}: {{ u.Reason }}</li>{% endfor %}</ul>{% endif %}
{% if s.deviations %}<h3>Parameters out of tolerance</h3>
<table class="deviations"><tr><th>Image</th><th>Parameter</th><th>Value</th><th>Why</th></tr>
{% for d in s.deviations %}<tr class="fail"><td>{{ d.Image }}</td><td>{{ d.Parameter }}</td><td>{{ d.Value }}</td>
<td>{{ d.Reason }}</td></tr>{% endfor %}</table>{% endif %}
{% for i in s.images %}
<h3 id="{{ i.name }}">{{ i.name }}{% if i.series %} ({{ i.series }}){% endif %}</h3>
<div class="image"><table class="parameters"><tr><th>Parameter</th><th>Value</th></tr>
{% for k, v in i.parameters.items() %}<tr{% if (i.name, k) in s.deviated %} class="fail"{% endif %}><td>{{ k }}</td>
<td>{{ show(v) }}</td></tr>{% endfor %}
<tr><td>SNR</td><td>{{ show(i.indices.snr) }}</td></tr>
<tr><td>Ghosting{% if i.indices.phase_axis %} (axis {{ i.indices.phase_axis }}){% endif %}</td>
<td>{{ show(i.indices.ghosting) }}</td></tr></table>
{% if i.indices.note %}<p>{{ i.indices.note }}</p>{% endif %}
{% if i.snapshot %}<img src="{{ i.snapshot }}" alt="middle slices of {{ i.name }}">{% endif %}</div>
{% endfor %}
</section>
{% endfor %}
</body></html>
"""


def _show(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, list):
        return " × ".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _lowest_snr(session: "SessionQC") -> str:
    values = [i.indices.get("snr") for i in session.images if i.indices.get("snr") is not None]
    return f"{min(values):.1f}" if values else "–"


def _css(status: str) -> str:
    return {"pass": "pass", "warn": "warn", "fail": "fail"}.get(status, "none")


def render(sessions: list["SessionQC"], has_protocol: bool, title: str = "pacs2bids protocol QC") -> str:
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    template = env.from_string(_TEMPLATE)
    return template.render(title=title, style=_STYLE, sessions=sessions, has_protocol=has_protocol,
                           css=_css, show=_show, lowest_snr=_lowest_snr)


def write_report(out: Path, sessions: list["SessionQC"], has_protocol: bool) -> Path:
    """Write ``out/index.html``; returns its path."""
    path = out / "index.html"
    path.write_text(render(sessions, has_protocol), encoding="utf-8")
    return path
