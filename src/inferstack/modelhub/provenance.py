"""SLSA v1 provenance for `inferstack model pack`: what was built, from which files, by what, when.

The statement is attached to the model manifest as an OCI referrer (never inside the manifest), so
its timestamps do not disturb the model's reproducible digest.
"""

from __future__ import annotations

import platform
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from inferstack import __version__
from inferstack.modelhub import mediatypes as mt

BUILD_TYPE = "https://github.com/inferstack/inferstack/blob/main/docs/supply-chain.md#pack-v1"
BUILDER_ID = "https://github.com/inferstack/inferstack/cli/model-pack"


def iso(ts: datetime) -> str:
    return ts.isoformat(timespec="seconds").replace("+00:00", "Z")


def slsa_provenance(
    *,
    reference: str,
    manifest_digest: str,
    config_digest: str,
    source: Path,
    files: list[tuple[str, str]],
    started: datetime,
    finished: datetime,
    base_model: str | None = None,
    datasets: list[str] | None = None,
) -> dict[str, Any]:
    """An in-toto Statement v1 with an SLSA provenance v1 predicate.

    `files` are (relative path, sha256 digest) of the packed inputs; `base_model` (REF@sha256:...) and
    `datasets` record lineage (model-transparency #588).
    """
    deps: list[dict[str, Any]] = [
        {"name": rel, "uri": f"file:{rel}", "digest": {"sha256": digest.split(":", 1)[1]}} for rel, digest in files
    ]
    if base_model:
        dep: dict[str, Any] = {"name": "base-model", "uri": f"oci://{base_model}"}
        if "@sha256:" in base_model:
            dep["digest"] = {"sha256": base_model.rsplit("@sha256:", 1)[1]}
        deps.append(dep)
    deps += [{"name": "dataset", "uri": url} for url in datasets or []]
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": reference, "digest": {"sha256": manifest_digest.split(":", 1)[1]}}],
        "predicateType": mt.SLSA_PREDICATE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"source": str(source), "reference": reference},
                "internalParameters": {"python": platform.python_version(), "layerEncoding": "raw"},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"inferstack": __version__}},
                "metadata": {"invocationId": f"urn:uuid:{uuid.uuid4()}", "startedOn": iso(started),
                             "finishedOn": iso(finished)},
                "byproducts": [{"name": "modelpack-config", "mediaType": mt.MODEL_CONFIG,
                                "digest": {"sha256": config_digest.split(":", 1)[1]}}],
            },
        },
    }
