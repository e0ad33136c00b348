"""`inferstack lab`: every lab runs --quick from the CLI, writes a readable report from its own
numbers, and leaves no process behind.

The quick runs go three at a time (`quick_runs`): most of a lab's time is servers starting and
emulated engines pacing steps in real time, so running them side by side keeps the suite's time
down; the eBPF lab runs alone afterwards, since attaching bpftrace is slow on a busy machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inferstack.lab.browser import chromium_missing
from inferstack.lab.registry import LABS
from support.procs import pid_gone

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "inferstack", "lab", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_list_shows_every_lab():
    out = _cli("list").stdout
    for name, lab in LABS.items():
        assert f"{name:<20} week {lab.week}" in out


def test_an_unknown_lab_is_a_clear_error(tmp_path):
    r = _cli("run", "nosuch", "--out", str(tmp_path))
    assert r.returncode == 2 and "no lab named 'nosuch'" in r.stderr and "routing" in r.stderr


def test_a_lab_nobody_listens_to_stops_its_stack(tmp_path):
    """`inferstack lab run X | head`: the reader goes away while a stack is up; the lab stops the
    `inferstack up` it started (its own session, so nothing else would) and exits 128 + the signal.
    The watcher turns the closed reader into SIGHUP, so this is also the path of a closed terminal;
    SIGTERM, SIGHUP and a silent lab's closed reader are in tests/unit/test_lab_hangup.py."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    with (tmp_path / "stderr.log").open("wb") as err:
        lab = subprocess.Popen([sys.executable, "-m", "inferstack", "lab", "run", "compliance", "--quick", "--out",
                                str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=err, env=env, cwd=tmp_path)
    stack_dir = tmp_path / "out" / "logs" / "stack-1"
    deadline = time.monotonic() + 180
    while not ((stack_dir / "up.ready.json").exists() and (stack_dir / "up.ready.json").read_text().strip()):
        assert lab.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
        time.sleep(0.1)
    supervisor = json.loads((stack_dir / "up.ready.json").read_text().splitlines()[0])["pid"]
    children = [c["pid"] for c in json.loads((stack_dir / "state.json").read_text())["children"] if c.get("pid")]
    assert children and not pid_gone(supervisor)
    lab.stdout.close()        # what `| head` does once it has its lines
    rc = lab.wait(120)
    # the watcher turns a closed reader into SIGHUP; a write that loses the race is a BrokenPipeError
    assert rc in (128 + signal.SIGHUP, 128 + signal.SIGPIPE), rc
    deadline = time.monotonic() + 30
    while not all(pid_gone(p) for p in [supervisor, *children]):
        assert time.monotonic() < deadline, [p for p in [supervisor, *children] if not pid_gone(p)]
        time.sleep(0.1)
    assert "everything it started is stopped" in (tmp_path / "stderr.log").read_text()


PARALLEL = 3
ALONE = {"ebpf"}
# The heaviest quick runs start first (CPU seconds of `lab run X --quick`, docs/testing.md), so the three
# workers finish together instead of one starting `caching` while the others are idle; the rest keep the
# registry's order.
HEAVY_FIRST = ("caching", "quantization", "routing", "pd", "dashboards", "workflow", "agents", "tuning",
               "production")


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every lab this machine can run, `--quick`, each in its own directory."""
    assert set(HEAVY_FIRST) <= set(LABS), set(HEAVY_FIRST) - set(LABS)
    runnable = sorted((n for n, lab in LABS.items() if not lab.missing()),
                      key=lambda n: HEAVY_FIRST.index(n) if n in HEAVY_FIRST else len(HEAVY_FIRST))

    def one(name: str) -> tuple[subprocess.CompletedProcess, Path]:
        out = tmp_path_factory.mktemp(f"lab-{name}")
        return _cli("run", name, "--quick", "--out", str(out), timeout=900), out

    with ThreadPoolExecutor(PARALLEL) as pool:
        runs = dict(zip([n for n in runnable if n not in ALONE],
                        pool.map(one, [n for n in runnable if n not in ALONE]), strict=True))
    runs.update({n: one(n) for n in runnable if n in ALONE})
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LABS))
def test_lab_runs_quick_and_reports(name, quick_runs):
    if LABS[name].missing():  # a binary or root this machine lacks; CI installs them (scripts/setup.sh)
        pytest.skip(LABS[name].missing())
    r, tmp_path = quick_runs[name]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    assert report.startswith(f"# Lab `{name}`") and "**Question.**" in report and "## Findings" in report
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True and results["findings"]
    first = results["tables"][0]
    col = first["columns"].index("completed") if "completed" in first["columns"] else 1
    assert first["rows"] and all(row[col] > 0 for row in first["rows"]), first  # every configuration completed requests
    for plot in results["plots"]:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # nothing left running: every child the supervisor started is gone
    for state in tmp_path.glob("logs/stack-*/state.json"):
        for child in json.loads(state.read_text())["children"]:
            assert not Path(f"/proc/{child['pid']}").exists() or \
                Path(f"/proc/{child['pid']}/stat").read_text().split(")")[-1].split()[0] == "Z", child
    if name == RENDERED:
        _render_and_look(tmp_path, results)


RENDERED = "network"   # the fastest lab with plots: its report is rendered to HTML and screenshot


def _render_and_look(out: Path, results: dict) -> None:
    """`inferstack lab render --png`: one self-contained page (plots inlined, every finding and table there),
    and a full-page Chromium screenshot tall enough to hold all of it."""
    if chromium_missing():
        pytest.skip(chromium_missing())
    png = out / "report.png"
    r = _cli("render", str(out), "--png", str(png), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(results["plots"]) and 'src="' + results["plots"][0] not in page
    assert "<table>" in page and all(f.split(":")[0] in page for f in results["findings"])
    from PIL import Image

    with Image.open(png) as shot:
        width, height = shot.size
        assert width >= 1000 and height > 1500, shot.size   # the whole report, not one viewport
        assert len(shot.convert("L").resize((64, 256)).getcolors(4096) or ()) > 20   # drawn, not blank
