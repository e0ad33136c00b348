"""`inferstack lab render`: report.md becomes one self-contained HTML page — plots inlined as data URIs,
tables as tables, markup in findings escaped — and a missing plot stays a visible link."""

from __future__ import annotations

import base64
from pathlib import Path

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.render import render_html
from inferstack.lab.report import bar_plot, write_report


def test_report_renders_to_one_self_contained_page(tmp_path: Path) -> None:
    lab = Lab(name="demo", week=1, title="Demo", question="Does <b> stay text?", teaches="", needs=("a stack",),
              minutes=1.0, run=lambda run: LabResult([]))
    plot = bar_plot(tmp_path / "ttft.png", "TTFT", "ms", {"p50": [1.0, 2.0]}, ["a", "b"])
    result = LabResult(["TTFT p50: a 1.0 ms, b 2.0 ms"], [Table("runs", ["config", "completed"], [["a", 3]])],
                       [plot, tmp_path / "gone.png"])
    report = write_report(lab, result, tmp_path, quick=True, setup=["a stack"], took_s=1.0)
    page = render_html(report).read_text()
    inlined = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(inlined) == plot.read_bytes()
    assert 'src="gone.png"' in page                       # a missing plot is left as a link, not dropped
    assert "<table>" in page and "<td>a</td>" in page and "<td>3</td>" in page
    assert "Does &lt;b&gt; stay text?" in page and "<b> stay" not in page
    assert page.startswith("<!doctype html>") and "<title>Lab demo: Demo</title>" in page
