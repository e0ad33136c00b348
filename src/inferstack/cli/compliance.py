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
            where = path / problem.file if path.is_dir() else path
            typer.echo(f"{problem.kind.upper()} {where}:{problem.line}: {problem.message}", err=True)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def report(
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="A served model: store reference (registry/repo:tag) or local path. Repeatable."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="inferstack.yaml with `trust:` and `audit:` sections.")] = None,
    policy: Annotated[Path | None, typer.Option(help="A trust-policy YAML (overrides the config's `trust:`).")] = None,
    audit_dir: Annotated[Path | None, typer.Option(help="Audit log directory (overrides audit.directory).")] = None,
    store: Annotated[Path | None, typer.Option(help="Local model store.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="markdown | html | json")] = "markdown",
    out: Annotated[Path | None, typer.Option(help="Write the report here instead of stdout.")] = None,
    strict: Annotated[bool, typer.Option(help="Exit 1 when any checklist item fails.")] = False,
) -> None:
    """Compliance report: served models with digests, signature status, provenance and ML-BOM, logging and
    retention settings, and an EU AI Act Art. 11/12/19/50 checklist with the evidence for each item."""
    from inferstack.compliance.config import AuditConfig
    from inferstack.compliance.report import (
        build_report,
        collect_model_evidence,
        render_html,
        render_markdown,
    )
    from inferstack.config.loader import ConfigError, load_config
    from inferstack.modelhub.errors import ModelHubError
    from inferstack.modelhub.policy import TrustPolicy, load_trust_policy
    from inferstack.modelhub.store import Store

    if fmt not in ("markdown", "md", "html", "json"):
        typer.echo("error: --format must be markdown, html or json", err=True)
        raise typer.Exit(2)
    try:
        cfg = load_config(config) if config is not None else None
        trust_policy = load_trust_policy(policy) if policy else (cfg.trust if cfg and cfg.trust else TrustPolicy())
        audit_cfg = cfg.audit if cfg is not None else None
        if audit_dir is not None:
            audit_cfg = (audit_cfg or AuditConfig()).model_copy(update={"directory": audit_dir})
    except (ConfigError, ModelHubError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    pools = {name: p.model_digest for name, p in cfg.pools.items()} if cfg is not None else {}
    s = Store(store)
    evidence = [collect_model_evidence(m, trust_policy, s) for m in model or []]
    data = build_report(evidence, audit_cfg, trust_policy, pools)
    text = (json.dumps(data, indent=2) if fmt == "json" else render_html(data) if fmt == "html"
            else render_markdown(data))
    if out:
        out.write_text(text)
        typer.echo(f"wrote {out} ({data['summary']['pass']} pass, {data['summary']['fail']} fail, "
                   f"{data['summary']['manual']} manual)")
    else:
        typer.echo(text)
    raise typer.Exit(1 if strict and data["summary"]["fail"] else 0)
