"""`inferstack deploy`: Kubernetes deployment from the same inferstack.yaml (docs/kubernetes-chart.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Deploy on Kubernetes: Helm chart values from inferstack.yaml, the chart's path, "
                       "and a local render.", no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="The inferstack.yaml you run locally.")]
PoolOpt = Annotated[str | None, typer.Option(help="Pool to deploy (default: the config's only pool).")]
EngineOpt = Annotated[str, typer.Option(help="Model server in the pods: inferstack, vllm or sglang.")]
ModelOpt = Annotated[str | None, typer.Option(
    "--model-uri", help="Model for the pods instead of up.model: oci://registry/repo:tag, pvc://claim/path, "
                        "hf://org/model (vLLM/SGLang).")]
GatewayOpt = Annotated[str | None, typer.Option(help="Name of the Gateway the HTTPRoute attaches to.")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write here instead of stdout.")]


def _values(config: Path, pool: str | None, engine: str, model_uri: str | None, gateway: str | None) -> dict:
    from inferstack.config import ConfigError, load_config
    from inferstack.kube.values import ValuesError, chart_values

    try:
        cfg = load_config(config)
        return chart_values(cfg, config.resolve().parent, pool=pool, engine=engine, model_uri=model_uri,
                            gateway=gateway)
    except (ConfigError, ValuesError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _emit(text: str, out: Path | None) -> None:
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


@app.command()
def values(config: ConfigOpt, out: OutOpt = None, pool: PoolOpt = None, engine: EngineOpt = "inferstack",
           model_uri: ModelOpt = None, gateway: GatewayOpt = None) -> None:
    """Print Helm values for the packaged chart from inferstack.yaml.

    Example: inferstack deploy values --config inferstack.yaml --out values.yaml
             helm install llm "$(inferstack deploy chart)" -f values.yaml
    """
    import yaml

    class _Dumper(yaml.SafeDumper):
        """PEM keys and other multi-line strings as `|` blocks, readable in the values file."""

    _Dumper.add_representer(str, lambda d, s: d.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
    header = f"# Helm values for the inferstack chart, from {config} (inferstack deploy values)\n"
    text = yaml.dump(_values(config, pool, engine, model_uri, gateway), Dumper=_Dumper, sort_keys=False)
    _emit(header + text, out)


@app.command()
def chart() -> None:
    """Print the directory of the Helm chart shipped in this package (for `helm install NAME DIR`)."""
    from inferstack.kube.values import CHART_DIR

    typer.echo(str(CHART_DIR))


@app.command()
def render(config: ConfigOpt, out: OutOpt = None, pool: PoolOpt = None, engine: EngineOpt = "inferstack",
           model_uri: ModelOpt = None, gateway: GatewayOpt = None,
           name: Annotated[str, typer.Option(help="Helm release name.")] = "inferstack",
           namespace: Annotated[str, typer.Option(help="Namespace the objects go to.")] = "default") -> None:
    """Render the chart's manifests with Helm's engine (like `helm template`), no cluster needed.

    Needs `pip install helm-python-sdk` (Helm v4 as a library).
    """
    from inferstack.kube.render import RenderError, render_chart

    try:
        docs = render_chart(_values(config, pool, engine, model_uri, gateway), name=name, namespace=namespace)
    except RenderError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _emit("".join(f"---\n# Source: {src}\n{text.strip()}\n" for src, text in docs), out)
