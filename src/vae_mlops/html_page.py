"""The shell of every self-contained HTML page the project writes: the comparison report and the loop demo's page.

One head, one base style and one Jinja2 set-up, so the pages look alike and a fix to the shell is made once.
Pictures are embedded as PNG data URIs: a page reads on its own (mailed, or opened from a run's artifacts).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from io import BytesIO

import jinja2
from matplotlib.figure import Figure

BASE_STYLE = """\
  :root { --line: #d0d7de; }
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
         max-width: 1240px; margin: 0 auto; padding: 20px 28px 40px; }
  h1 { font-size: 22px; margin: 0 0 6px; }
  h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
  table { border-collapse: collapse; }
  .swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; vertical-align: -1px; margin-right: 4px; }
  code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
  .missing, footer, .notes li { color: #57606a; }"""


def template(title: str, style: str, body: str) -> str:
    """A whole page's Jinja2 template: the shared head and base style, then the page's own `style` and `body`.

    `title` is a Jinja2 expression (`{{ r.title }}`); the page's style comes after the base, so it may override it.
    """
    return f"""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{BASE_STYLE}
{style.rstrip()}
</style>
</head>
<body>
{body.strip()}
</body>
</html>
"""


def environment(**filters: Callable) -> jinja2.Environment:
    """Autoescaped (a run's name or a note never becomes markup) and strict (a missing field fails, not blanks)."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(filters)
    return env


def png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Figure) -> bytes:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def figure_uri(fig: Figure) -> str:
    """A matplotlib figure as a PNG data URI, for an <img> of a self-contained page."""
    return png_uri(figure_png(fig))
