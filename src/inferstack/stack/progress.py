"""What `inferstack up` prints: progress while children load, the banner once ready, runtime events."""

from __future__ import annotations

import json
import time

from rich.console import Console
from rich.markup import escape
from rich.status import Status

from inferstack.stack.children import Child, ChildState


class Reporter:
    """A spinner with per-child status on a terminal; a line every few seconds otherwise (logs, CI)."""

    def __init__(self, console: Console | None = None, plain_every_s: float = 5.0) -> None:
        self.console = console or Console(highlight=False)
        self.plain_every_s = plain_every_s
        self._status: Status | None = None
        self._last_plain = 0.0

    def step(self, msg: str) -> None:
        self.console.print(f"[bold]•[/bold] {escape(msg)}", soft_wrap=True)

    def event(self, msg: str) -> None:
        self.console.print(f"[yellow]![/yellow] {time.strftime('%H:%M:%S')} {escape(msg)}", soft_wrap=True)

    def error(self, msg: str) -> None:
        self.console.print(f"[bold red]error:[/bold red] {escape(msg)}", soft_wrap=True)

    def waiting(self, children: list[Child], started: float) -> None:
        elapsed = time.monotonic() - started
        parts = []
        for c in children:
            if c.state == ChildState.READY:
                parts.append(f"{c.spec.name} ready")
            else:
                hint = c.last_log_line()
                parts.append(f"{c.spec.name} loading" + (f" ({hint})" if hint else ""))
        text = escape(f"{elapsed:4.0f}s  " + " · ".join(parts))
        if self.console.is_terminal:
            if self._status is None:
                self._status = self.console.status(text)
                self._status.start()
            else:
                self._status.update(text)
        elif time.monotonic() - self._last_plain >= self.plain_every_s:
            self._last_plain = time.monotonic()
            self.console.print(f"  … {text}", soft_wrap=True)

    def done_waiting(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def banner(self, gateway: str, model: str, dashboard: str | None, endpoints: list[tuple[str, str, int | None]],
               prometheus: str | None, log_dir: str, took_s: float, shown: int = 4) -> None:
        c = self.console
        c.print(f"\n[bold green]inferstack is up[/bold green] in {took_s:.1f}s\n")
        c.print(f"  OpenAI API   {gateway}/v1")
        if dashboard:
            c.print(f"  Dashboard    {dashboard}")
        c.print(f"  Metrics      {gateway}/metrics")
        for name, url, pid in endpoints[:shown]:
            c.print(f"  {name:<12} {url}  (pid {pid})")
        if len(endpoints) > shown:
            c.print(f"  … and {len(endpoints) - shown} more endpoints (see state.json)")
        if prometheus:
            c.print(f"  Prometheus   {prometheus}")
        c.print(f"  Logs         {log_dir}\n")
        body = json.dumps({"model": model, "max_tokens": 32,
                           "messages": [{"role": "user", "content": "Say hello in five words."}]})
        c.print("Try it:", style="bold")
        c.print(f"  curl {gateway}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                f"    -d '{body}'\n", soft_wrap=True, markup=False)
        c.print("Press Ctrl-C to stop everything.")
