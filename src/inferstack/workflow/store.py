"""Runs, node results and the step cache in one SQLite file (stdlib sqlite3, WAL).

A node's result is committed the moment it finishes, so a run whose process died resumes from the
last committed node: finished nodes are read back, never re-run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY, app_path TEXT, app_digest TEXT, inputs TEXT, status TEXT,
  outputs TEXT, error TEXT, created REAL, updated REAL);
CREATE TABLE IF NOT EXISTS node_runs (
  run_id TEXT, node_key TEXT, node_id TEXT, node_type TEXT, status TEXT, outputs TEXT, branch TEXT,
  elapsed_s REAL, attempts INTEGER, cached INTEGER, tokens INTEGER, finished REAL,
  PRIMARY KEY (run_id, node_key));
CREATE TABLE IF NOT EXISTS step_cache (
  key TEXT PRIMARY KEY, outputs TEXT, branch TEXT, created REAL, expires REAL);
"""


def default_db_path() -> Path:
    """``$INFERSTACK_WORKFLOW_DB``, else ``$XDG_STATE_HOME/inferstack/workflows.sqlite``."""
    if os.environ.get("INFERSTACK_WORKFLOW_DB"):
        return Path(os.environ["INFERSTACK_WORKFLOW_DB"])
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state")
    return state / "inferstack" / "workflows.sqlite"


@dataclass(frozen=True)
class StoredNode:
    outputs: dict[str, Any]
    branch: str | None
    cached: bool


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    app_digest: str
    inputs: dict[str, Any]
    status: str


class RunStore:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def create_run(self, run_id: str, app_path: str, digest: str, inputs: dict[str, Any]) -> None:
        now = time.time()
        self.db.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?)",
                        (run_id, app_path, digest, json.dumps(inputs), "running", None, None, now, now))

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self.db.execute("SELECT run_id, app_digest, inputs, status FROM runs WHERE run_id=?",
                              (run_id,)).fetchone()
        return RunRecord(row[0], row[1], json.loads(row[2]), row[3]) if row else None

    def run_summaries(self, limit: int = 100) -> list[dict[str, Any]]:
        """Newest first: id, status, timestamps, outputs and error."""
        cur = self.db.execute("SELECT run_id, app_path, status, outputs, error, created, updated FROM runs "
                              "ORDER BY created DESC LIMIT ?", (limit,))
        rows = [dict(zip([c[0] for c in cur.description], row, strict=True)) for row in cur.fetchall()]
        for row in rows:
            row["outputs"] = json.loads(row["outputs"]) if row["outputs"] else None
        return rows

    def run_detail(self, run_id: str) -> dict[str, Any] | None:
        row = next((r for r in self.run_summaries(1 << 30) if r["run_id"] == run_id), None)
        if row is None:
            return None
        return {**row, "nodes": self.node_rows(run_id)}

    def finish_run(self, run_id: str, status: str, outputs: dict[str, Any] | None, error: str | None) -> None:
        self.db.execute("UPDATE runs SET status=?, outputs=?, error=?, updated=? WHERE run_id=?",
                        (status, json.dumps(outputs) if outputs is not None else None, error, time.time(), run_id))

    def finished_node(self, run_id: str, node_key: str) -> StoredNode | None:
        row = self.db.execute("SELECT outputs, branch, cached FROM node_runs WHERE run_id=? AND node_key=? "
                              "AND status='succeeded'", (run_id, node_key)).fetchone()
        return StoredNode(json.loads(row[0]), row[1], bool(row[2])) if row else None

    def record_node(self, run_id: str, node_key: str, node_id: str, node_type: str, result: StoredNode,
                    elapsed_s: float, attempts: int, tokens: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO node_runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (run_id, node_key, node_id, node_type, "succeeded", json.dumps(result.outputs),
                         result.branch, elapsed_s, attempts, int(result.cached), tokens, time.time()))

    def node_rows(self, run_id: str) -> list[dict[str, Any]]:
        cur = self.db.execute("SELECT node_key, node_type, status, elapsed_s, attempts, cached, tokens "
                              "FROM node_runs WHERE run_id=? ORDER BY finished", (run_id,))
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def cache_get(self, key: str, now: float) -> StoredNode | None:
        row = self.db.execute("SELECT outputs, branch FROM step_cache WHERE key=? AND expires>?",
                              (key, now)).fetchone()
        return StoredNode(json.loads(row[0]), row[1], True) if row else None

    def cache_put(self, key: str, result: StoredNode, now: float, ttl_s: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO step_cache VALUES (?,?,?,?,?)",
                        (key, json.dumps(result.outputs), result.branch, now, now + ttl_s))
