"""A lab report as one self-contained HTML page: report.md rendered with markdown-it-py, its PNG plots
inlined as data URIs, so the page can be mailed, attached to a ticket or opened offline; and, with
Chromium, a full-page PNG of it (how a report's readability is checked)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d2330;
       max-width: 980px; margin: 24px auto; padding: 0 24px; background: #fff; }
h1 { font-size: 24px; border-bottom: 2px solid #d8dde6; padding-bottom: 6px; }
h2 { font-size: 19px; margin-top: 28px; color: #243b6b; }
code { background: #f1f3f7; padding: 1px 4px; border-radius: 3px; font-size: 13px; }
pre { background: #f1f3f7; padding: 10px 12px; border-radius: 4px; overflow-x: auto; }
pre code { padding: 0; }
table { border-collapse: collapse; margin: 8px 0 18px; font-size: 13.5px; }
th, td { border: 1px solid #d8dde6; padding: 4px 9px; text-align: left; vertical-align: top; }
td { font-variant-numeric: tabular-nums; }
td code { word-break: break-word; font-size: 12px; }
th { background: #eef1f6; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; border: 1px solid #e3e6ec; margin: 6px 0; }
li { margin: 3px 0; }
"""

_IMG = re.compile(r'<img src="([^"]+\.png)"')


def _inline_images(body: str, base: Path) -> str:
    def data_uri(m: re.Match[str]) -> str:
        path = base / html.unescape(m.group(1))
        if not path.is_file():          # leave the link: the page says which plot is missing
            return m.group(0)
        return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'
    return _IMG.sub(data_uri, body)


def render_html(report_md: Path, out: Path | None = None) -> Path:
    """report.md (and the PNGs next to it) → one HTML file (default: report.html beside it)."""
    from markdown_it import MarkdownIt

    text = report_md.read_text()
    title = text.splitlines()[0].lstrip("# ").replace("`", "").strip() if text else report_md.stem
    # html off: a finding quoting "<none>" or "<b>" is text, never markup that breaks the page
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            f"{_inline_images(body, report_md.parent)}</body></html>\n")
    out = out or report_md.with_suffix(".html")
    out.write_text(page)
    return out


def screenshot_html(page: Path, png: Path, width: int = 1100) -> Path:
    """A full-page PNG of an HTML file in headless Chromium."""
    from inferstack.lab.browser import screenshot_page

    return screenshot_page(page.resolve().as_uri(), png, width=width, height=900,
                           ready_js="[...document.images].every(i => i.complete)")
