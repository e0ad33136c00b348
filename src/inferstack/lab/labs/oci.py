"""`oci`: distribute a model through an OCI registry: pack, push, sign, pull cold and warm, digests.

Debian's `docker-registry` (CNCF distribution) runs on a free loopback port with its storage in the
run directory. A model folder written into the run is packed as a ModelPack artifact (one layer per
file), pushed, signed (the signature travels as an OCI referrer), then pulled into a fresh store
(cold: every layer crosses the wire) and again (warm: the store already holds every blob). A second
version that changes only config.json shows layer deduplication on push and pull."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.labs._common import compare
from inferstack.lab.labs.signing import MIB, write_keypair, write_model
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import Command, LabError, LabRun, http_ok
from inferstack.stack.supervisor import free_port

DOCKER_REGISTRY = "/usr/bin/docker-registry"
_DIGEST = re.compile(r"@(sha256:[0-9a-f]{64})")
_PUSHED = re.compile(r"\((\d+) new blobs?, (\d+) bytes")


def _registry_config(root: Path, port: int) -> Path:
    config = root / "config.yml"
    config.write_text("version: 0.1\nlog:\n  level: warn\n"
                      f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n")
    return config


def _digest(cmd: Command) -> str:
    m = _DIGEST.search(cmd.stdout)
    if not m:
        raise LabError(f"no digest in the command's output:\n{cmd.stdout[-1000:]}")
    return m.group(1)


def _pushed(cmd: Command) -> tuple[int, int]:
    m = _PUSHED.search(cmd.stdout)
    if not m:
        raise LabError(f"no upload count in the push output:\n{cmd.stdout[-1000:]}")
    return int(m.group(1)), int(m.group(2))


def _dir_mib(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / MIB


def _exercise(lab: LabRun, host: str, mib: int) -> tuple[list[list], dict]:
    model = write_model(lab.out / "model", mib)
    priv, pub = write_keypair(lab.out / "keys", "publisher")
    builder, consumer = lab.out / "store-publisher", lab.out / "store-consumer"
    shutil.rmtree(consumer, ignore_errors=True)
    ref, ref2 = f"{host}/models/lab:v1", f"{host}/models/lab:v2"
    http = ("--plain-http",)
    data = lab.out / "registry" / "data"
    startup = lab.cli("model", "--help")
    lab.cli("model", "pack", str(model), "-t", ref, "--store", str(builder))
    push = lab.cli("model", "push", ref, "--store", str(builder), *http)
    after_v1 = _dir_mib(data)
    lab.cli("model", "sign", ref, "--key", str(priv), "--store", str(builder), *http)
    cold = lab.cli("model", "pull", ref, "--store", str(consumer), *http)
    warm = lab.cli("model", "pull", ref, "--store", str(consumer), *http)
    verify = lab.cli("model", "verify", ref, "--public-key", str(pub), "--store", str(consumer), expect=None)
    (model / "config.json").write_text((model / "config.json").read_text().replace("}", ', "note": "v2"}'))
    lab.cli("model", "pack", str(model), "-t", ref2, "--store", str(builder))
    push2 = lab.cli("model", "push", ref2, "--store", str(builder), *http)
    grew = _dir_mib(data) - after_v1
    pull2 = lab.cli("model", "pull", ref2, "--store", str(consumer), *http)
    (blobs, size), (blobs2, size2) = _pushed(push), _pushed(push2)
    rows = [
        ["push v1 (empty registry)", size / MIB, blobs, after_v1, push.seconds],
        ["pull v1 cold (empty store)", size / MIB, "all", None, cold.seconds],
        ["pull v1 warm (store has it)", size / MIB, "none needed", None, warm.seconds],
        ["push v2 (config.json changed)", size2 / MIB, blobs2, grew, push2.seconds],
        ["pull v2 (store has v1)", size2 / MIB, "changed only", None, pull2.seconds],
    ]
    facts = {"cli_startup_s": startup.seconds, "digest_pushed": _digest(push), "digest_cold": _digest(cold),
             "digest_warm": _digest(warm),
             "verify_rc": verify.rc, "verify_out": (verify.stdout + verify.stderr).strip()[-300:],
             "referrers_line": cold.stdout.splitlines()[0] if cold.stdout else ""}
    return rows, facts


def _findings(rows: list[list], facts: dict) -> list[str]:
    same = facts["digest_pushed"] == facts["digest_cold"] == facts["digest_warm"]
    return [
        compare("Pull time", "cold", rows[1][4] * 1000, "warm", rows[2][4] * 1000) + ": a warm pull finds every "
        "blob by digest in the local store and downloads nothing but the manifest; "
        f"{facts['cli_startup_s']:.2f} s of each command is CLI start-up (`inferstack model --help` took that "
        "long), so the gap widens with model size (try a full run).",
        ("The pushed, cold-pulled and warm-pulled manifest digests are identical" if same else
         "WARNING: the digests differ") + f" ({facts['digest_pushed'][:19]}…): the digest names the bytes, so "
        "a reference by digest always means the same model.",
        f"Changing one small file uploaded {rows[3][2]} new blob(s) and grew the registry by "
        f"{rows[3][3] * MIB:,.0f} bytes, against {rows[0][2]} blobs and {rows[0][3] * MIB:,.0f} bytes for the first "
        f"push of the {rows[0][1]:.0f} MiB model: layers are per file, so unchanged weights are stored and "
        "sent once.",
        f"The signature came along as a referrer ({facts['referrers_line']}); verifying the pulled copy "
        + ("succeeded." if facts["verify_rc"] == 0 else f"FAILED: {facts['verify_out']}"),
    ]


def _unmet() -> str:
    return "" if Path(DOCKER_REGISTRY).exists() else \
        f"{DOCKER_REGISTRY} not found: install Debian's docker-registry (scripts/setup.sh does)"


def run(lab: LabRun) -> LabResult:
    root = lab.out / "registry"
    shutil.rmtree(root, ignore_errors=True)  # never push into a previous run's registry
    root.mkdir(parents=True)
    port = free_port()
    config = _registry_config(root, port)
    with lab.process("docker-registry", [DOCKER_REGISTRY, "serve", str(config)],
                     ready=lambda: http_ok(f"http://127.0.0.1:{port}/v2/")):
        rows, facts = _exercise(lab, f"127.0.0.1:{port}", 8 if lab.quick else 256)
    plot = bar_plot(lab.out / "transfer.png", "Registry transfers", "seconds (CLI wall)",
                    {"time": [r[4] for r in rows] + [facts["cli_startup_s"]]},
                    [r[0].split(" (")[0] for r in rows] + ["CLI start-up"])
    table = Table("inferstack model push / pull against docker-registry on loopback (plain HTTP)",
                  ["step", "artifact (MiB)", "blobs uploaded/fetched", "registry grew (MiB)",
                   "seconds (CLI wall)"], rows)
    return LabResult(_findings(rows, facts), [table], [plot], {"rows": rows, **facts})


LAB = Lab(
    name="oci", week=4, title="OCI model distribution",
    question="How does a model travel through an OCI registry, and what does a second pull or a new version cost?",
    teaches="pack, push, sign, pull cold vs warm, digests, layer deduplication",
    needs=("docker-registry (Debian package) on loopback", "inferstack model pack/push/sign/pull/verify"),
    minutes=1.0, run=run, unmet=_unmet)
