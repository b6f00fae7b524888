"""Headless Chromium for the tests that render a page: the binary, its flags, and what a probe saw drawn."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.requires import require

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip


def render(html: str, probe: str, tmp_path: Path) -> dict[str, str]:
    """Open `html` with the `probe` script appended; the `data-*` attributes the probe set on <body>.

    The probe records what the browser drew once the page loaded (it must set `data-images`), for
    `--dump-dom` to show.
    """
    require(CHROMIUM.exists(), f"Chromium ({CHROMIUM})", "`make setup` installs Debian's chromium")
    tmp_path.mkdir(parents=True, exist_ok=True)
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("</body>", probe + "</body>"))
    cmd = [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
           "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, f"Chromium printed no DOM (rc {proc.returncode}): {proc.stderr[-2000:]}"
    drawn = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert "images" in drawn, f"the page's load event never came: {proc.stdout[:500]}"
    return drawn
