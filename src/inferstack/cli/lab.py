"""`inferstack lab`: the curriculum's labs as commands that bring up what they need, measure and
explain (docs/labs.md)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, NoReturn

import typer

app = typer.Typer(help="Run the curriculum's labs: each starts what it needs, measures, and writes a report.",
                  no_args_is_help=True)


@app.command("list")
def list_labs() -> None:
    """Every lab: name, week, what it teaches, what it needs, how long it runs, and what this machine lacks."""
    from inferstack.lab.registry import LABS

    for lab in LABS.values():
        typer.echo(f"{lab.name:<20} week {lab.week}  {lab.teaches}")
        typer.echo(f"{'':<20}         needs: {', '.join(lab.needs)}; about {lab.minutes:g} min "
                   "(--quick: a short run)")
        if lab.missing():
            typer.echo(f"{'':<20}         [cannot run here: {lab.missing()}]")


@app.command()
def run(
    name: Annotated[str, typer.Argument(help="Lab name (see `inferstack lab list`).")],
    quick: Annotated[bool, typer.Option("--quick",
                                        help="Short runs (under a minute per lab; numbers are noisier).")] = False,
    out: Annotated[Path | None, typer.Option(help="Directory for report.md, results.json and plots "
                                                  "(default: ./lab-NAME).")] = None,
) -> None:
    """Run lab NAME and write its report; everything it started is stopped by PID at the end."""
    from inferstack.lab.hangup import Hangup, stop_on_hangup
    from inferstack.lab.registry import LABS
    from inferstack.lab.report import write_report
    from inferstack.lab.runtime import LabError, LabRun

    lab = LABS.get(name)
    if lab is None:
        typer.echo(f"error: no lab named {name!r}; labs: {', '.join(LABS)}", err=True)
        raise typer.Exit(2)
    if lab.missing():
        typer.echo(f"error: lab {name!r} cannot run on this machine: {lab.missing()}", err=True)
        raise typer.Exit(2)
    out = out or Path(f"lab-{name}")
    out.mkdir(parents=True, exist_ok=True)
    typer.echo(f"lab {name}: {lab.question}")
    t0 = time.monotonic()
    runner = LabRun(out, quick, echo=typer.echo)
    try:
        with stop_on_hangup():      # SIGHUP/SIGTERM or a closed stdout: the stacks' cleanup still runs
            result = lab.run(runner)
    except LabError as exc:
        typer.echo(f"error: lab {name} failed: {exc}", err=True)
        raise typer.Exit(1) from None
    except (Hangup, BrokenPipeError) as exc:
        _stopped(name, exc.signum if isinstance(exc, Hangup) else signal.SIGPIPE)
    setup = [*lab.needs, *result.setup]
    report = write_report(lab, result, out, quick, setup, time.monotonic() - t0)
    for f in result.findings:
        typer.echo(f"  → {f}")
    typer.echo(f"report: {report}")


def _stopped(name: str, signum: int) -> NoReturn:
    """Everything the lab started is stopped by now; say so where someone may still read, and exit
    128 + the signal like a shell would. stdout goes to /dev/null first: its reader may be gone, and
    Python's final flush would otherwise print a BrokenPipeError."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    with contextlib.suppress(OSError):
        typer.echo(f"lab {name}: stopped by {signal.Signals(signum).name}; everything it started is stopped",
                   err=True)
    raise typer.Exit(128 + signum)


@app.command()
def render(
    directory: Annotated[Path, typer.Argument(help="A lab's output directory (the one holding report.md).")],
    png: Annotated[Path | None, typer.Option(help="Also save a full-page screenshot of the page here "
                                                  "(needs Debian's chromium).")] = None,
) -> None:
    """Render DIRECTORY/report.md to one self-contained report.html (plots inlined), to read or share."""
    from inferstack.lab.browser import chromium_missing
    from inferstack.lab.render import render_html, screenshot_html

    report = directory / "report.md"
    if not report.is_file():
        typer.echo(f"error: {report} does not exist; run `inferstack lab run NAME --out {directory}` first", err=True)
        raise typer.Exit(2)
    page = render_html(report)
    typer.echo(f"html: {page}")
    if png is not None:
        if chromium_missing():
            typer.echo(f"error: cannot take a screenshot: {chromium_missing()}", err=True)
            raise typer.Exit(2)
        typer.echo(f"png: {screenshot_html(page, png)}")
