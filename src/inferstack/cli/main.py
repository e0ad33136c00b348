"""Root of the `inferstack` command: each capability registers its own sub-app module here."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="inferstack",
    help="inferstack — an AI inference stack: engine, gateway, benchmarks, KV tiers and model supply chain.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# (module under inferstack.cli, command name). Each module exposes a Typer `app` (a command group)
# or a `register(app)` function that adds top-level commands such as `up`.
SUBCOMMANDS: list[tuple[str, str]] = [
    ("compliance", "compliance"),
    ("model", "model"),
    ("engine", "engine"),
    ("bench", "bench"),
    ("gateway", "gateway"),
    ("epp", "epp"),
    ("config", "config"),
    ("up", "up"),
    ("deploy", "deploy"),
    ("sim", "sim"),
    ("observe", "observe"),
    ("lab", "lab"),
    ("workflow", "workflow"),
    ("agent", "agent"),
]


def _register() -> None:
    for module_name, command in SUBCOMMANDS:
        module = importlib.import_module(f"inferstack.cli.{module_name}")
        if hasattr(module, "register"):
            module.register(app)
        else:
            app.add_typer(module.app, name=command)


@app.command()
def version() -> None:
    """Print the inferstack version."""
    from inferstack import __version__

    typer.echo(__version__)


_register()


def main() -> None:
    app()
