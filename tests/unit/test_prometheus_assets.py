"""The shipped Prometheus and Grafana assets are valid for the real tools and match their generators."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from inferstack.stack import prometheus as prom
from inferstack.telemetry import grafana

PROMTOOL = shutil.which("promtool")
RULES = prom.DEPLOY / "prometheus"
GRAFANA_JSON = prom.DEPLOY / "grafana" / "inferstack.json"
EBPF_JSON = prom.DEPLOY / "grafana" / "observe-ebpf.json"
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def test_rule_files_pass_promtool_check() -> None:
    r = promtool("check", "rules", str(RULES / "recording-rules.yml"), str(RULES / "alert-rules.yml"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_alerts_fire_when_they_should_promtool_unit_tests() -> None:
    r = promtool("test", "rules", "alert-rules.test.yml", cwd=RULES)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested() -> None:
    alerts = {r["alert"] for g in yaml.safe_load((RULES / "alert-rules.yml").read_text())["groups"]
              for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((RULES / "alert-rules.test.yml").read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    # the slow-burn and TPOT burn alerts share the fast TTFT alert's expression shape
    assert alerts - tested <= {"InferstackTTFTBudgetBurnSlow", "InferstackTPOTBudgetBurnFast"}


def test_shipped_scrape_config_is_the_rendered_one_and_valid(tmp_path: Path) -> None:
    assert prom.SHIPPED_CONFIG.read_text() == prom.render_config()
    rules = tmp_path / "rules"
    prom.install_rules(rules)
    (tmp_path / "targets").mkdir()
    prom.write_targets(tmp_path / "targets", prom.ENGINE_JOB,
                       prom.target_groups({"engine-0": ["http://127.0.0.1:4100"]}, {"component": "engine"}))
    config = tmp_path / "prometheus.yml"
    config.write_text(prom.render_config(str(tmp_path / "targets"), str(rules), 1.0))
    r = promtool("check", "config", str(config))
    assert r.returncode == 0, r.stdout + r.stderr
    groups = json.loads((tmp_path / "targets" / f"{prom.ENGINE_JOB}.json").read_text())
    assert groups == [{"targets": ["127.0.0.1:4100"], "labels": {"component": "engine", "replica": "engine-0"}}]


def test_shipped_grafana_dashboards_are_the_generated_ones() -> None:
    hint = f"regenerate: PYTHONPATH=src python -m inferstack.telemetry.grafana {GRAFANA_JSON} {EBPF_JSON}"
    assert GRAFANA_JSON.read_text() == grafana.render(), hint
    assert EBPF_JSON.read_text() == grafana.render(grafana.ebpf_dashboard()), hint


def test_grafana_dashboard_is_windowed_and_has_slo_goodput_and_replica_panels() -> None:
    dash = json.loads(GRAFANA_JSON.read_text())
    exprs = grafana.expressions(dash)
    titles = {p["title"] for p in dash["panels"]}
    assert any("attainment" in t for t in titles) and any("Goodput" in t for t in titles)
    assert sum("per replica" in t for t in titles) >= 4
    for title, expr in exprs:
        assert "_sum" not in expr, f"{title}: lifetime averages (_sum/_count) are not windowed"
        for counter in re.findall(r"(\w[\w:]*_(?:total|bucket|count))\b", expr):
            assert re.search(rf"rate\({re.escape(counter)}", expr), f"{title}: {counter} outside rate()"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", [GRAFANA_JSON, EBPF_JSON], ids=lambda p: p.name)
def test_grafana_expressions_parse(tmp_path: Path, path: Path) -> None:
    """promtool has no expression checker; recording rules are expressions it parses."""
    rules = [{"record": f"check:expr_{i}", "expr": substitute(expr)}
             for i, (_, expr) in enumerate(grafana.expressions(json.loads(path.read_text())))]
    f = tmp_path / "exprs.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    r = promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


def substitute(expr: str, window: str = "1m") -> str:
    """Grafana variables as a live query would expand them with 'All' selected."""
    for var in ("$model", "$replica", "$target", "$job"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", window)
