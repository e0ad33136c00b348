"""`compliance`: the evidence an EU AI Act record-keeping review asks for, produced by a running stack.

A small stack (`inferstack up`, emulated engines) runs with the gateway's audit log on (the `audit:`
section of inferstack.yaml, docs/compliance.md). A short bench run and one request for a model that
is not served go through it. After the stack stops (the gateway flushes the log on SIGTERM),
`inferstack compliance verify-log` checks the hash chain, `inferstack compliance report` gathers the
evidence for a model packed and signed in the run, and a copy of the log with one edited record
shows what verification says about tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import completed
from inferstack.lab.labs.signing import write_keypair, write_model
from inferstack.lab.runtime import LabError, LabRun

WORKLOAD = "synthetic:input=uniform(50,300),output=16"
MODEL_REF = "localhost/models/lab-compliance:v1"


def _signed_model(lab: LabRun, store: Path) -> Path:
    """Pack and sign a model into ``store`` (kept locally: no registry); returns the trust policy file."""
    priv, pub = write_keypair(lab.out / "keys", "publisher")
    model = write_model(lab.out / "model", 1)
    lab.cli("model", "pack", str(model), "-t", MODEL_REF, "--store", str(store), "--dataset",
            "https://example.org/lab-dataset")
    lab.cli("model", "sign", MODEL_REF, "--key", str(priv), "--store", str(store))
    policy = lab.out / "trust.yaml"
    policy.write_text(f"trusted_keys: [{pub}]\nrequire_signature: true\n")
    return policy


def _serve(lab: LabRun, audit_dir: Path) -> tuple[int, int]:
    """Requests through a gateway with the audit log on; returns (completed by bench, rejected status)."""
    duration, rate = (3.0, 3.0) if lab.quick else (20.0, 5.0)
    config = {"audit": {"directory": str(audit_dir), "fsync": False}}
    with lab.stack("--emulate", "l4:llama-3-8b", "--replicas", "1", config=config) as stack:
        s = lab.bench(stack.gateway, WORKLOAD, "audited", rate=rate, duration=duration)
        bad = httpx.post(f"{stack.gateway}/v1/chat/completions", timeout=30,
                         json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
    return completed(s), bad.status_code


def _tampered_copy(lab: LabRun, audit_dir: Path) -> tuple[int, str]:
    """Edit one record's token count in a copy of the log and verify it: (exit code, what it said)."""
    copy = lab.out / "audit-tampered"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(audit_dir, copy)
    seg = copy / "audit.jsonl"
    lines = seg.read_text().splitlines()
    edit = next(i for i, line in enumerate(lines) if json.loads(line).get("type") == "request")
    rec = json.loads(lines[edit])
    rec["completion_tokens"] = (rec.get("completion_tokens") or 0) + 1
    lines[edit] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    seg.write_text("\n".join(lines) + "\n")
    r = lab.cli("compliance", "verify-log", str(copy), expect=None)
    return r.rc, (r.stdout + r.stderr).strip()


def run(lab: LabRun) -> LabResult:
    audit_dir, store = lab.out / "audit", lab.out / "store"
    for d in (audit_dir, store):
        shutil.rmtree(d, ignore_errors=True)  # evidence from this run only
    policy = _signed_model(lab, store)
    done, bad_status = _serve(lab, audit_dir)
    intact = json.loads(lab.cli("compliance", "verify-log", str(audit_dir), "--json").stdout)
    args = ("--model", MODEL_REF, "--policy", str(policy), "--audit-dir", str(audit_dir), "--store", str(store))
    report = json.loads(lab.cli("compliance", "report", *args, "--format", "json").stdout)
    lab.cli("compliance", "report", *args, "--format", "markdown", "--out", str(lab.out / "compliance-report.md"))
    records = [json.loads(line) for seg in sorted(audit_dir.glob("audit*.jsonl")) for line in
               seg.read_text().splitlines()]
    requests = [r for r in records if r.get("type") == "request"]
    rejected = [r for r in requests if r.get("status") == bad_status]
    if not requests:
        raise LabError(f"the gateway wrote no request records into {audit_dir}")
    tamper_rc, tamper_said = _tampered_copy(lab, audit_dir)
    checklist = report["checklist"]
    with_digest = sum(1 for r in requests if r.get("model_digest"))
    statuses = [c["status"] for c in checklist]
    model = report["models"][0]
    findings = [
        f"The gateway wrote {len(requests)} request records for {done} completed bench requests plus one "
        f"request for an unknown model (answered {bad_status}; {len(rejected)} record(s) carry that status): "
        "rejected requests are evidence too.",
        f"verify-log: the chain of {len(records)} records is " + ("intact" if intact.get("ok") else "BROKEN")
        + "; after one token count was edited in a copy it said: "
        + (tamper_said.splitlines()[-1] if tamper_rc else "nothing (NOT detected)") + ".",
        f"The packed and signed model's signature status under the trust policy: {model['signature_status']}. "
        f"{with_digest} of {len(requests)} request records carry a model digest"
        + (": the gateway records one only when the pool sets `model_digest` (docs/compliance.md), and this "
           "stack's pools (made by `inferstack up`) do not." if with_digest < len(requests) else "."),
        f"EU AI Act checklist: {statuses.count('pass')} pass, {statuses.count('fail')} fail, "
        f"{statuses.count('manual')} manual (not observable by the platform): "
        + "; ".join(f"{c['article']} {c['status']}" for c in checklist if c["status"] != "pass") + ".",
    ]
    fields = sorted({k for r in requests for k, v in r.items() if v not in (None, "")} - {"hash", "prev"})
    evidence = Table("What this run produced", ["evidence", "count", "detail"], [
        ["audit request records", len(requests), ", ".join(fields)],
        ["audit records in the chain", len(records), f"head {str(intact.get('last_hash', ''))[:16]}…"],
        ["served models in the report", len(report["models"]), f"{MODEL_REF}: {model['signature_status']}"],
        ["checklist items", len(checklist), f"{statuses.count('pass')} pass, {statuses.count('fail')} fail"],
    ])
    items = Table("EU AI Act checklist (inferstack compliance report)", ["item", "status", "evidence"],
                  [[c["article"], c["status"], str(c.get("evidence", ""))[:160]] for c in checklist])
    return LabResult(findings, [evidence, items], [], {"verify_log": intact, "report": report,
                                                       "tampered": {"rc": tamper_rc, "said": tamper_said}})


LAB = Lab(
    name="compliance", week=4, title="Compliance reporting",
    question="What record-keeping evidence does a running stack produce, and can it show it was not altered?",
    teaches="gateway audit log, hash-chain verification, tampering detected, EU AI Act checklist with evidence",
    needs=("an emulated engine and the gateway with the audit log on (inferstack up)",
           "inferstack model pack/sign", "inferstack compliance verify-log/report"),
    minutes=1.0, run=run)
