"""`inferstack config`: validate inferstack.yaml and export its JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Validate inferstack.yaml or print its JSON Schema.", no_args_is_help=True)


@app.command()
def validate(file: Annotated[Path, typer.Argument(help="Path to inferstack.yaml.")]) -> None:
    """Check FILE against the schema; errors are printed as FILE:LINE: path: message."""
    from inferstack.config import ConfigError, load_config

    try:
        cfg = load_config(file)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{file}: OK ({len(cfg.pools)} pools, {len(cfg.models)} models, {len(cfg.keys)} keys, "
               f"{len(cfg.tenants)} tenants)")


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Print the JSON Schema of inferstack.yaml (for editors and CI)."""
    from inferstack.config.schema import InferstackConfig

    text = json.dumps(InferstackConfig.model_json_schema(), indent=2)
    if out:
        out.write_text(text + "\n")
    else:
        typer.echo(text)
