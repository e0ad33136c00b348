"""Prometheus configuration for the local stack: one renderer for the shipped file and `--with-prometheus`.

Targets are file-based service discovery (JSON files Prometheus re-reads on change), so a replica that
restarts on another port is picked up without restarting Prometheus.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from inferstack.fileio import atomic_write

DEPLOY = Path(__file__).resolve().parent.parent / "assets" / "deploy"
RULE_FILES = ("prometheus/recording-rules.yml", "prometheus/alert-rules.yml")
GATEWAY_JOB = "inferstack-gateway"
ENGINE_JOB = "inferstack-engine"


SHIPPED_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"


def render_config(targets_dir: str = "targets", rules_dir: str = ".", interval_s: float = 2.0) -> str:
    interval = f"{interval_s:g}s"
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "external_labels": {"stack": "inferstack-local"}},
        "rule_files": [f"{rules_dir}/{Path(f).name}" for f in RULE_FILES],
        "scrape_configs": [
            {"job_name": job, "metrics_path": "/metrics",
             "file_sd_configs": [{"files": [f"{targets_dir}/{job}.json"], "refresh_interval": "5s"}]}
            for job in (GATEWAY_JOB, ENGINE_JOB)
        ],
    }
    header = ("# Prometheus scrape config for the local stack started by `inferstack up`.\n"
              "# `inferstack up --with-prometheus` starts Prometheus with this config (real paths) itself.\n"
              "# To use your own Prometheus: `inferstack up --log-dir DIR` keeps the target files in\n"
              "# DIR/prometheus/targets/; copy this file and the rule files into DIR/prometheus/ and run\n"
              "# `prometheus --config.file=DIR/prometheus/prometheus.yml`.\n"
              "# Rendered by inferstack.stack.prometheus.render_config (a test keeps them equal).\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def _hostport(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc


def target_groups(urls_by_replica: dict[str, list[str]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """file_sd groups: one per replica, labelled `replica` so dashboards can show per-replica panels."""
    return [
        {"targets": [_hostport(u) for u in urls], "labels": {**labels, "replica": name}}
        for name, urls in sorted(urls_by_replica.items()) if urls
    ]


def write_targets(targets_dir: Path, job: str, groups: list[dict[str, Any]]) -> None:
    """Atomic replace: Prometheus must never read a half-written file."""
    atomic_write(targets_dir / f"{job}.json", json.dumps(groups, indent=1))


def install_rules(rules_dir: Path) -> None:
    rules_dir.mkdir(parents=True, exist_ok=True)
    for rel in RULE_FILES:
        (rules_dir / Path(rel).name).write_text((DEPLOY / rel).read_text())
