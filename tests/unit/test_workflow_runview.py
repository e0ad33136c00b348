"""The run view: stored node rows folded onto the graph (status, time, tokens, cache hits; iteration steps
summed onto their iteration), columns by longest path, and the page it renders."""

from __future__ import annotations

from pathlib import Path

from inferstack.workflow.dsl import load_app
from inferstack.workflow.runview import node_views, render_html

EXAMPLE = Path(__file__).resolve().parents[2] / "src/inferstack/assets/workflows/agent_team.yml"


def row(key: str, node_type: str, elapsed: float, tokens: int = 0, cached: bool = False) -> dict:
    return {"node_key": key, "node_type": node_type, "status": "succeeded", "elapsed_s": elapsed, "attempts": 1,
            "cached": int(cached), "tokens": tokens}


DETAIL = {"run_id": "r1", "status": "failed",
          "error": "node writer (llm) 'Writer agent' failed after 1 attempt(s): x",
          "nodes": [row("start", "start", 0.0), row("route", "question-classifier", 0.5, 70),
                    row("lookup", "tool", 0.2), row("roles", "code", 0.1, cached=True),
                    row("experts[0]/experts_start", "iteration-start", 0.0),
                    row("experts[0]/expert", "llm", 1.0, 100), row("experts[1]/expert", "llm", 1.2, 110, True),
                    row("experts[2]/expert", "llm", 0.9, 90), row("experts", "iteration", 1.3),
                    row("reviewer", "llm", 0.7, 150)]}


def test_node_views_fold_rows_onto_the_graph() -> None:
    views = {v.id: v for v in node_views(load_app(EXAMPLE), DETAIL)}
    assert "expert" not in views  # an iteration's children are summed onto it, not drawn
    assert (views["route"].status, views["route"].tokens, views["route"].elapsed_s) == ("succeeded", 70, 0.5)
    assert views["roles"].status == "cached"
    experts = views["experts"]
    assert (experts.tokens, experts.child_steps, experts.child_cache_hits) == (300, 3, 1)
    assert views["writer"].status == "failed" and views["off_topic"].status == "not run"
    assert [views[n].column for n in ("start", "route", "lookup", "roles", "experts", "reviewer", "writer")] == \
        [0, 1, 2, 3, 4, 5, 6]
    assert views["answer"].column == 7 and views["off_topic"].column == 2 and views["off_topic"].row == 1


def test_page_shows_each_node_and_reloads_only_while_running() -> None:
    page = render_html(load_app(EXAMPLE), DETAIL)
    assert page.count('class="node ') == 10 and 'data-node="experts"' in page
    assert "3 steps, 1 cached" in page and "300 tok" in page and "failed after 1 attempt" in page
    assert 'http-equiv="refresh"' not in page
    running = render_html(load_app(EXAMPLE), {**DETAIL, "status": "running", "error": None})
    assert 'http-equiv="refresh"' in running and 'class="node running" data-node="writer"' in running
