"""Headless Chromium for the dashboard tests: the lab's driver (inferstack.lab.browser) plus a probe that
counts what each chart canvas drew."""

from inferstack.lab.browser import Browser

__all__ = ["CANVAS_PIXELS_JS", "Browser"]

# Count, per chart canvas, pixels that are not background: > 0 means the chart drew lines/axes;
# "lines" counts saturated (coloured) pixels, which only data series produce (axes are grey).
CANVAS_PIXELS_JS = """
(() => {
  const out = {};
  for (const card of document.querySelectorAll('#charts .card')) {
    const c = card.querySelector('canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let ink = 0, lines = 0;
    for (let i = 0; i < d.length; i += 4) {
      if (d[i + 3] === 0) continue;
      ink++;
      const mx = Math.max(d[i], d[i + 1], d[i + 2]), mn = Math.min(d[i], d[i + 1], d[i + 2]);
      if (mx - mn > 60) lines++;
    }
    out[card.id] = {ink, lines, width: c.width, height: c.height};
  }
  return out;
})()
"""
