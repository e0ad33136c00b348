"""Drive Debian's headless Chromium over the DevTools protocol: load a page, collect console errors,
evaluate JS, take full-page screenshots. Started on a DevTools port the browser picks, stopped by PID.
Labs screenshot the live dashboard and rendered reports with it; the dashboard tests drive it too."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def chromium_missing() -> str:
    """Why a screenshot cannot be taken here ("" when it can)."""
    return "" if Path(CHROMIUM).exists() else "Debian's chromium is not installed (scripts/setup.sh installs it)"


class Browser:
    def __init__(self, width: int = 1400, height: int = 1600) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="inferstack-chromium-"))
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--window-size={width},{height}",
             f"--user-data-dir={self.profile}", "--remote-debugging-port=0", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromium did not start (no DevToolsActivePort)")
            time.sleep(0.1)
        self.port = int(port_file.read_text().splitlines()[0])
        self.console_errors: list[str] = []
        self._ids = itertools.count(1)
        self._ws: ClientConnection | None = None

    def open(self, url: str) -> None:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(req, timeout=30) as r:
            target = json.load(r)
        # Entered by hand: the connection lives across calls and close() leaves it.
        self._ws = connect(target["webSocketDebuggerUrl"], max_size=64 << 20, open_timeout=30).__enter__()
        for method in ("Runtime.enable", "Log.enable", "Page.enable"):
            self.call(method)
        self.call("Page.navigate", url=url)

    def _handle(self, msg: dict[str, Any]) -> None:
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.console_errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            self.console_errors.append(params["exceptionDetails"].get("exception", {}).get("description")
                                       or params["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.console_errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")

    def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self._ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._handle(msg)

    def pump(self, seconds: float) -> None:
        """Let the page run, collecting console events."""
        assert self._ws is not None
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self._handle(json.loads(self._ws.recv(timeout=left)))
            except TimeoutError:
                break

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JS error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


def screenshot_page(url: str, png: Path, width: int = 1000, height: int = 800, ready_js: str = "true",
                    timeout_s: float = 30.0) -> Path:
    """Open ``url``, wait until ``ready_js`` is truthy (or ``timeout_s``), save a full-page PNG."""
    browser = Browser(width, height)
    try:
        browser.open(url)
        deadline = time.monotonic() + timeout_s
        while not browser.evaluate(f"document.readyState === 'complete' && !!({ready_js})"):
            if time.monotonic() > deadline:
                break          # screenshot what is there: a half-drawn page still tells the reader something
            browser.pump(0.2)
        browser.screenshot(png)
    finally:
        browser.close()
    return png
