"""The QC's HTML report in a real headless browser (Debian chromium): it renders the summary table, its
links and snapshots resolve, and a screenshot shows the table."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pacs2bids.derivatives.qc import QC_DIR, run_qc
from pacs2bids.derivatives.qc_report import render
import test_qc
from test_qc import GENERATED_BY, settings

converted, dataset = test_qc.converted, test_qc.dataset  # the converted sample's fixtures, shared

# run in the page once everything is loaded; the result is read back from the dumped DOM
_PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src);
  const dangling = [...document.querySelectorAll('a[href^="#"]')]
    .filter(a => !document.getElementById(a.getAttribute("href").slice(1))).map(a => a.getAttribute("href"));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images: document.images.length, broken, dangling,
    rows: document.querySelectorAll("#summary tbody tr").length});
  document.body.appendChild(probe);
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed, and CI=true: scripts/bootstrap.sh installs it")
        pytest.skip("chromium is not installed (Debian package chromium)")
    return exe


def browse(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--virtual-time-budget=10000", *args, page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=tmp)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.srcs: list[str] = []
        self.rows: list[str] = []
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "tr" and "session-row" in (a.get("class") or ""):
            self._row = []

    def handle_data(self, data):
        if self._row is not None:
            self._row.append(data.strip())

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(" ".join(t for t in self._row if t))
            self._row = None


@pytest.fixture
def report(dataset):
    protocol = {"series": [{"match": "epi", "count": 3, "parameters": {"EchoTime": {"value": 0.04}}},
                           {"match": "bold"}]}
    result = run_qc(dataset, settings(protocol, snapshots=True), GENERATED_BY)
    return dataset / QC_DIR, result


def test_report_renders_and_links_resolve(report, tmp_path):
    out, result = report
    page = out / "index.html"
    probed = out / "probe.html"  # the same page, beside it (same relative links), with the probe script
    probed.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = browse(probed, tmp_path, "--dump-dom").stdout
    parsed = _Links()
    parsed.feed(dom)
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    probe = json.loads(dom[start:dom.index("</pre>", start)].replace("&quot;", '"'))
    n_images = sum(len(s.images) for s in result.sessions)
    assert probe == {"images": n_images, "broken": [], "dangling": [], "rows": len(result.sessions)}, probe
    # one row per session, with its status; the failing NIH session shows its four deviations
    by_label = {s.label: s for s in result.sessions}
    assert sorted(r.split()[0] for r in parsed.rows) == sorted(by_label)
    for row in parsed.rows:  # session, status, images, missing, duplicated, extra, deviations
        s = by_label[row.split()[0]]
        counts = [len(x) for x in (s.images, s.missing, s.duplicated, s.extra, s.deviations)]
        assert row.split()[1:7] == [s.status, *map(str, counts)], row
    assert by_label["sub-01_ses-nih"].deviations and by_label["sub-01_ses-nih"].duplicated  # not all zeros
    # each out-of-tolerance parameter is marked in its image's table (the four epi EchoTimes)
    assert dom.count('<tr class="fail"><td>EchoTime</td>') == 4
    # every in-page link has its target; every file link and snapshot exists
    for href in parsed.hrefs:
        if href.startswith("#"):
            assert href[1:] in parsed.ids, href
        else:
            assert (out / href).is_file(), href
    assert len(parsed.srcs) == n_images and all((out / s).is_file() for s in parsed.srcs)
    assert {f"{s.label}" for s in result.sessions} <= parsed.ids


def test_screenshot_shows_the_table(report, tmp_path):
    out, result = report
    shot = tmp_path / "shot.png"
    browse(out / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1100,700")
    pic = Image.open(shot).convert("RGB")
    assert pic.size == (1100, 700)
    colours = pic.getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, "the screenshot is (nearly) one colour"
    # the summary table is drawn: its header's grey and the failing rows' colour are on screen
    present = {c for _, c in colours}
    assert {s.status for s in result.sessions} == {"fail"}
    assert (0xEE, 0xEE, 0xEE) in present and (0xF6, 0xC2, 0xC2) in present
    # without a protocol, the rows take the "no protocol" colour instead
    run_qc(out.parent.parent, settings(None), GENERATED_BY)
    browse(out / "index.html", tmp_path, f"--screenshot={shot}", "--window-size=1100,700")
    present = {c for _, c in Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (0xDD, 0xE5, 0xF2) in present and (0xF6, 0xC2, 0xC2) not in present


def test_report_escapes_sidecar_text(report):
    """Values come from sidecars: markup in them is shown as text, never run."""
    _, result = report
    image = result.sessions[0].images[0]
    image.parameters["SoftwareVersions"] = '<script>alert("x")</script>'
    html = render(result.sessions, has_protocol=True)
    assert '<script>alert("x")</script>' not in html and "&lt;script&gt;" in html
