"""The compliance report: which model bytes serve traffic, who signed them, how they were built, what
is logged and for how long, mapped onto EU AI Act Art. 11/12/13/19/50 with the evidence for each item.

Everything in the report is computed from artifacts (store, signatures, referrers, the audit log),
never typed in: an item without evidence is reported as `manual` or `fail`, not as passed.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferstack import __version__
from inferstack.compliance.chain import verify_chain
from inferstack.compliance.config import MIN_RETENTION_DAYS, AuditConfig
from inferstack.modelhub.policy import TrustPolicy


@dataclass
class ModelEvidence:
    reference: str
    path: str | None = None
    manifest_digest: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    signature_status: str = "unknown"  # verified | failed | unsigned | unsigned-allowed | not-checked
    signature_detail: str = ""
    signer: str | None = None
    key_fingerprint: str | None = None
    oms_root_digest: str | None = None
    provenance: dict[str, Any] | None = None
    aibom: dict[str, Any] | None = None
    licenses: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)


@dataclass
class CheckItem:
    article: str
    requirement: str
    status: str  # pass | fail | manual
    evidence: str


def collect_model_evidence(target: str, policy: TrustPolicy, store: Any | None = None) -> ModelEvidence:
    """Evidence for one served model: a store reference (registry/repo:tag) or a local path."""
    from inferstack.modelhub import mediatypes as mt
    from inferstack.modelhub.artifacts import payloads, sync_signatures
    from inferstack.modelhub.errors import ModelHubError, ModelVerificationError, StoreError
    from inferstack.modelhub.gate import verify_before_load
    from inferstack.modelhub.resolve import engine_path
    from inferstack.modelhub.store import Store

    ev = ModelEvidence(reference=target)
    name = target.removeprefix("oci://")
    local = Path(target)
    if local.exists():
        path = local
    else:
        store = store or Store()
        try:
            digest = store.resolve(name)
        except StoreError as e:
            ev.signature_status, ev.signature_detail = "not-checked", str(e)
            return ev
        ev.manifest_digest = digest
        manifest = store.manifest(digest)
        ev.config = json.loads(store.read_blob(manifest["config"]["digest"]))
        prov = payloads(store, digest, mt.IN_TOTO)
        bom = payloads(store, digest, mt.CYCLONEDX_JSON)
        ev.provenance = json.loads(next(iter(prov.values()))) if prov else None
        ev.aibom = json.loads(next(iter(bom.values()))) if bom else None
        path = engine_path(store.materialize(digest), manifest)
        sync_signatures(store, digest)
        descriptor = ev.config.get("descriptor", {})
        ev.licenses = list(descriptor.get("licenses", []))
        ev.datasets = list(descriptor.get("datasetsURL", []))
    ev.path = str(path)
    try:
        report = verify_before_load(path, policy)
    except ModelVerificationError as e:
        ev.signature_status = "unsigned" if "unsigned" in str(e) else "failed"
        ev.signature_detail = str(e)
        return ev
    except ModelHubError as e:
        ev.signature_status, ev.signature_detail = "failed", str(e)
        return ev
    ev.signature_status = report.status
    ev.signer, ev.key_fingerprint, ev.oms_root_digest = report.signer, report.key_fingerprint, report.root_digest
    ev.signature_detail = f"{report.files} files, {report.bytes} bytes, {report.algorithm}"
    return ev


def logging_evidence(audit: AuditConfig | None) -> dict[str, Any]:
    if audit is None or not audit.enabled:
        return {"enabled": False}
    directory = Path(audit.directory)
    out: dict[str, Any] = {
        "enabled": True,
        "directory": str(directory),
        "retention_days": audit.retention_days,
        "rotate_bytes": audit.rotate_bytes,
        "rotate_daily": audit.rotate_daily,
        "log_prompts": audit.log_prompts,
        "hmac": bool(audit.hmac_key_env),
        "fsync": audit.fsync,
    }
    if directory.is_dir():
        key = None
        if audit.hmac_key_env:
            import os

            value = os.environ.get(audit.hmac_key_env)
            key = value.encode() if value else None
        chain = verify_chain(directory, key=key) if (key or not audit.hmac_key_env) else None
        out["chain"] = chain.to_dict() if chain else {"ok": None, "problems": ["HMAC key not available to verify"]}
        out["request_records"], out["verification_events"], out["served_records_missing"] = _scan(directory)
    else:
        out["chain"] = {"ok": None, "problems": [f"{directory} does not exist yet (no request served)"]}
        out["request_records"], out["verification_events"], out["served_records_missing"] = 0, 0, {}
    return out


# What Art. 12(2)(b)-(c) monitoring needs from each served (status 200) request record.
MONITORING_FIELDS = ("time", "tenant", "key_id", "model", "model_digest", "prompt_tokens", "completion_tokens",
                     "status", "latency_ms")
_SAMPLE = 1000  # served records checked for those fields: the most recent ones


def _scan(directory: Path) -> tuple[int, int, dict[str, int]]:
    """(request records, model events, per monitoring field: how many of the last served records lack it)."""
    from collections import deque

    from inferstack.compliance.chain import segments

    requests = events = 0
    served: deque[bytes] = deque(maxlen=_SAMPLE)
    for seg in segments(directory):
        with seg.open("rb") as f:
            for line in f:
                if b'"type":"request"' in line:
                    requests += 1
                    if b'"status":200' in line:
                        served.append(line)
                elif b'"type":"model.' in line:
                    events += 1
    missing = dict.fromkeys(MONITORING_FIELDS, 0)
    for raw in served:
        rec = json.loads(raw)
        for name in MONITORING_FIELDS:
            missing[name] += rec.get(name) is None
    return requests, events, ({k: v for k, v in missing.items() if v} if served else {"(no served requests)": 0})


def _monitoring_item(log: dict[str, Any]) -> CheckItem:
    """Art. 12(2)(b)-(c), from the records themselves: do served requests carry what monitoring needs?"""
    title = "Logs support post-market monitoring and deployer monitoring"
    missing: dict[str, int] = log.get("served_records_missing", {})
    if not log.get("enabled"):
        return CheckItem("Art. 12(2)(b)-(c)", title, "fail", "audit log disabled")
    if "(no served requests)" in missing:
        return CheckItem("Art. 12(2)(b)-(c)", title, "manual",
                         "no served request recorded yet: nothing to check; run again after traffic")
    checked = f"the last {min(_SAMPLE, log.get('request_records', 0))} served request records"
    if missing:
        return CheckItem("Art. 12(2)(b)-(c)", title, "fail", f"{checked} lack: " + ", ".join(
            f"{k} ({n} records)" for k, n in missing.items()))
    return CheckItem("Art. 12(2)(b)-(c)", title, "pass", f"{checked} all carry {', '.join(MONITORING_FIELDS)}")


def checklist(models: list[ModelEvidence], log: dict[str, Any], policy: TrustPolicy,
              pools: dict[str, str | None]) -> list[CheckItem]:
    chain = log.get("chain") or {}
    undigested = sorted(name for name, digest in pools.items() if not digest)
    items = [
        CheckItem(
            "Art. 12(1)", "Automatic recording of events over the system's lifetime",
            "pass" if log.get("enabled") and chain.get("ok") else "fail",
            f"audit log {'enabled' if log.get('enabled') else 'disabled'}; {log.get('request_records', 0)} request "
            f"records; chain "
            f"{'intact' if chain.get('ok') else 'NOT verified: ' + '; '.join(chain.get('problems', []))}",
        ),
        CheckItem(
            "Art. 12(2)(a)", "Logs identify the model version in use (substantial modification)",
            "pass" if models and all(m.manifest_digest or m.oms_root_digest for m in models) and not undigested
            else "fail",
            "; ".join(f"{m.reference} -> {m.manifest_digest or m.oms_root_digest or 'no digest'}" for m in models)
            + (f"; gateway pools without pools.<name>.model_digest (records lack the digest): "
               f"{', '.join(undigested)}" if undigested else "")
            or "no served models listed",
        ),
        _monitoring_item(log),
        CheckItem(
            "Art. 19(1) / 26(6)", f"Logs kept at least six months ({MIN_RETENTION_DAYS} days)",
            "pass" if log.get("enabled") and log.get("retention_days", 0) >= MIN_RETENTION_DAYS else "fail",
            f"retention_days = {log.get('retention_days', 'n/a')}; pruning is recorded in the hash chain",
        ),
        CheckItem(
            "Integrity", "Logs are tamper-evident",
            "pass" if chain.get("ok") else "fail",
            f"SHA-256 hash chain{' with HMAC' if log.get('hmac') else ''}; head {chain.get('last_hash', 'n/a')}",
        ),
        CheckItem(
            "Art. 15(4) / supply chain", "Only signed, unmodified models are served (fail closed)",
            "pass" if models and policy.require_signature and all(m.signature_status == "verified" for m in models)
            else "fail",
            f"require_signature={policy.require_signature}; "
            + "; ".join(f"{m.reference}: {m.signature_status}" for m in models),
        ),
        CheckItem(
            "Art. 11 / Annex IV", "Technical documentation: provenance and bill of materials per model",
            "pass" if models and all(m.provenance and m.aibom for m in models) else "fail",
            "; ".join(f"{m.reference}: SLSA provenance {'yes' if m.provenance else 'no'}, CycloneDX ML-BOM "
                      f"{'yes' if m.aibom else 'no'}" for m in models),
        ),
        CheckItem(
            "Art. 13(3)(f)", "Instructions for use describe the logging mechanism",
            "manual", "your instructions for use must describe it (not observable here); inferstack's own "
            "description to adapt: docs/compliance.md (record format, verification, retention)",
        ),
        CheckItem(
            "Art. 50(1)", "Users are told they interact with an AI system",
            "manual", "a property of the client application; not observable by the inference platform",
        ),
        CheckItem(
            "Art. 50(2)", "Synthetic output is marked in a machine-readable way",
            "manual", "not yet applied by the gateway; document the marking your application applies",
        ),
    ]
    return items


def build_report(models: list[ModelEvidence], audit: AuditConfig | None, policy: TrustPolicy,
                 pools: dict[str, str | None] | None = None) -> dict[str, Any]:
    """`pools`: the gateway's pools and the model digest each one writes into audit records."""
    log = logging_evidence(audit)
    items = checklist(models, log, policy, pools or {})
    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "generator": f"inferstack {__version__}",
        "trust_policy": policy.model_dump(mode="json"),
        "models": [asdict(m) for m in models],
        "gateway_pools": pools or {},
        "logging": log,
        "checklist": [asdict(i) for i in items],
        "summary": {s: sum(1 for i in items if i.status == s) for s in ("pass", "fail", "manual")},
    }


def _model_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        cfg = m["config"].get("config", {})
        prov = m.get("provenance") or {}
        builder = prov.get("predicate", {}).get("runDetails", {}).get("builder", {}).get("id", "none")
        bom = m.get("aibom") or {}
        rows.append([
            m["reference"], m["manifest_digest"] or "-", m["oms_root_digest"] or "-",
            f"{m['signature_status']}" + (f" ({m['signer']})" if m["signer"] else ""),
            " / ".join(str(cfg.get(k, "-")) for k in ("architecture", "paramSize", "quantization")),
            builder if prov else "none", bom.get("serialNumber", "none"), ", ".join(m["licenses"]) or "-",
        ])
    return rows


_MODEL_HEADER = ["Model", "Manifest digest", "OMS root digest", "Signature", "Arch / params / quant", "Provenance",
                 "ML-BOM", "License"]


def render_markdown(report: dict[str, Any]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        esc = [[str(c).replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                         + ["| " + " | ".join(r) + " |" for r in esc])

    log = report["logging"]
    chain = log.get("chain") or {}
    s = report["summary"]
    lines = [
        "# Compliance report", "",
        f"Generated {report['generated_at']} by {report['generator']}. Checklist: {s['pass']} pass, {s['fail']} fail, "
        f"{s['manual']} manual.", "",
        "## Served models", "", table(_MODEL_HEADER, _model_rows(report)), "",
    ]
    for m in report["models"]:
        if m["signature_detail"]:
            lines.append(f"- `{m['reference']}`: {m['signature_detail']}")
    if report["gateway_pools"]:
        lines += ["", "Gateway pools and the model digest in their audit records:", ""]
        lines += [f"- `{name}`: `{digest or 'not configured'}`" for name, digest in report["gateway_pools"].items()]
    lines += ["", "## Trust policy", "", "```json", json.dumps(report["trust_policy"], indent=2), "```", "",
              "## Logging and retention", ""]
    if log.get("enabled"):
        lines += [
            f"- directory: `{log['directory']}`; retention {log['retention_days']} days; rotation at "
            f"{log['rotate_bytes']} bytes{' and daily' if log['rotate_daily'] else ''}",
            f"- prompt text logged: {'yes' if log['log_prompts'] else 'no (SHA-256 of the prompt only)'}; "
            f"HMAC chain: {'yes' if log['hmac'] else 'no'}; fsync per batch: {'yes' if log['fsync'] else 'no'}",
            f"- chain: {'intact' if chain.get('ok') else 'NOT verified'}; {chain.get('records', 0)} records "
            f"(seq {chain.get('first_seq')}..{chain.get('last_seq')}), {log.get('request_records', 0)} requests, "
            f"{log.get('verification_events', 0)} model lifecycle events; head `{chain.get('last_hash', '-')}`",
        ]
        lines += [f"- problem: {p}" for p in chain.get("problems", [])]
    else:
        lines.append("- audit logging is **disabled**")
    lines += ["", "## EU AI Act checklist", "",
              table(["Article", "Requirement", "Status", "Evidence"],
                    [[i["article"], i["requirement"], i["status"].upper(), i["evidence"]]
                     for i in report["checklist"]]),
              ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    s = report["summary"]
    log_json = html.escape(json.dumps(report["logging"], indent=2))
    policy_json = html.escape(json.dumps(report["trust_policy"], indent=2))
    checks = table(["Article", "Requirement", "Status", "Evidence"],
                   [[i["article"], i["requirement"], i["status"].upper(), i["evidence"]] for i in report["checklist"]])
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>inferstack compliance report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #999;"
        "padding:4px 8px;text-align:left;vertical-align:top}pre{background:#f4f4f4;padding:1em}</style></head><body>"
        f"<h1>Compliance report</h1><p>Generated {html.escape(report['generated_at'])} by "
        f"{html.escape(report['generator'])}. Checklist: {s['pass']} pass, {s['fail']} fail, {s['manual']} manual.</p>"
        f"<h2>Served models</h2>{table(_MODEL_HEADER, _model_rows(report))}"
        f"<h2>Trust policy</h2><pre>{policy_json}</pre>"
        f"<h2>Logging and retention</h2><pre>{log_json}</pre>"
        f"<h2>EU AI Act checklist</h2>{checks}</body></html>\n"
    )
