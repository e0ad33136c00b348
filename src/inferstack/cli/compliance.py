"""`inferstack compliance`: verify the audit log's hash chain and write the compliance report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Audit-log verification and EU AI Act compliance reports.",
    no_args_is_help=True,
)


@app.command("verify-log")
def verify_log(
    path: Annotated[Path, typer.Argument(help="Audit log directory (all segments) or one segment file.")],
    hmac_key_env: Annotated[
        str | None, typer.Option(help="Environment variable holding the HMAC key the log was written with.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verification report as JSON.")] = False,
) -> None:
    """Check that no audit record was edited, inserted, reordered or deleted. Exit 0 only if intact."""
    from inferstack.compliance.chain import verify_chain

    if not path.exists():
        typer.echo(f"error: {path} does not exist (give the audit directory from audit.directory)", err=True)
        raise typer.Exit(2)
    key = None
    if hmac_key_env:
        value = os.environ.get(hmac_key_env)
        if not value:
            typer.echo(f"error: environment variable {hmac_key_env} is empty; export the log's HMAC key", err=True)
            raise typer.Exit(2)
        key = value.encode()
    report = verify_chain(path, key=key)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        typer.echo(
            f"audit log intact: {report.records} records (seq {report.first_seq}..{report.last_seq}) in "
            f"{len(report.segments)} segment(s); {report.pruned_segments} segment(s) pruned by retention; "
            f"head {report.last_hash}"
        )
    else:
        for problem in report.problems:
            typer.echo(f"TAMPERED {path / problem.file if path.is_dir() else path}:{problem.line}: {problem.message}",
                       err=True)
    raise typer.Exit(0 if report.ok else 1)
