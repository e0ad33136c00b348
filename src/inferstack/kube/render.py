"""Render the packaged chart with Helm's own template engine (helm-python-sdk embeds Helm v4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferstack.kube.values import CHART_DIR


class RenderError(Exception):
    """The chart did not render: a `fail` in a template (bad values) or a missing Helm library."""


def render_chart(values: dict[str, Any], *, name: str = "inferstack", namespace: str = "default",
                 chart: Path = CHART_DIR) -> list[tuple[str, str]]:
    """(template path, manifest text) for every template that produced output, in path order."""
    try:
        import helm_python as helm
    except ImportError as exc:
        raise RenderError("rendering needs Helm's engine: pip install helm-python-sdk") from exc
    try:
        with helm.Chart.load(str(chart)) as c:
            out = c.render(values, name=name, namespace=namespace, is_install=True)
    except helm.HelmError as exc:
        raise RenderError(str(exc)) from None
    return [(src, text) for src, text in sorted(out.items()) if text.strip() and not src.endswith("NOTES.txt")]
