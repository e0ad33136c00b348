"""A progress bar on stderr, refreshed twice a second from counters (never per request)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressView:
    def __init__(self, enabled: bool, duration_s: float, label: str) -> None:
        self.enabled = enabled
        self.duration_s, self.label = duration_s, label
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[stats]}"), console=Console(stderr=True),
                                 refresh_per_second=2, disable=not self.enabled)
        self.task = self.progress.add_task(label, total=duration_s, stats="")
        self._drain = False

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def draining(self) -> None:
        self._drain = True

    def show(self, run: Any) -> None:
        elapsed = max(0.0, time.perf_counter() - run.clock0)
        stats = (f"sent {len(run.records)} · done {run.done} · failed {run.failed} · in flight {run.in_flight}"
                 + (" · draining" if self._drain and run.in_flight else ""))
        self.progress.update(self.task, completed=min(elapsed, self.duration_s), stats=stats)

    async def follow(self, run: Any) -> None:
        while self.enabled:
            self.show(run)
            await asyncio.sleep(0.5)
