"""Read the records a running server's audit writer puts on disk (it writes off the request path)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from inferstack.compliance.chain import ACTIVE_NAME


def wait_for_record(directory: Path, request_id: str, timeout: float = 10.0) -> dict:
    """The first record of ``request_id`` in the active segment, polled until it is written."""
    deadline = time.monotonic() + timeout
    path = directory / ACTIVE_NAME
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [r for r in map(json.loads, lines) if r.get("request_id") == request_id]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id} in {path}")
