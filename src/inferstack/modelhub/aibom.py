"""CycloneDX 1.6 ML-BOM for a packed model: a `machine-learning-model` component with a model card,
its files as sub-components with SHA-256 hashes, and datasets as `data` components.

cyclonedx-python-lib does not implement `modelCard` yet (its code is commented out), so the document
is built as plain JSON and checked against the official 1.6 schema in the tests.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from inferstack import __version__
from inferstack.modelhub.modelinfo import ModelInfo
from inferstack.modelhub.reference import Reference


def default_limitations(info: ModelInfo) -> list[str]:
    out = [
        "Generated text can be wrong, biased or unsafe; review outputs before relying on them.",
        "No evaluation results were recorded when this artifact was packed.",
    ]
    if info.quantization:
        out.append(f"Weights are quantized ({info.quantization}); quality may be below the unquantized model.")
    return out


def purl(ref: Reference, manifest_digest: str) -> str:
    name = ref.repository.rsplit("/", 1)[-1]
    url = quote(f"{ref.registry}/{ref.repository}", safe="/")
    return f"pkg:oci/{name}@{quote(manifest_digest, safe='')}?repository_url={url}" + (
        f"&tag={ref.tag}" if ref.tag else ""
    )


def _model_parameters(info: ModelInfo, dataset_refs: list[str]) -> dict[str, Any]:
    """CycloneDX modelCard.modelParameters: task, text in and out, architecture, the datasets' refs."""
    params: dict[str, Any] = {
        "task": info.task,
        "inputs": [{"format": "text"}],
        "outputs": [{"format": "text"}],
    }
    if info.family or info.architecture:
        params["architectureFamily"] = info.family or info.architecture
    if info.architecture:
        params["modelArchitecture"] = info.architecture
    if dataset_refs:
        params["datasets"] = [{"ref": r} for r in dataset_refs]
    return params


def _model_properties(info: ModelInfo) -> list[dict[str, str]]:
    """The ModelPack (org.cncf.model.*) facts known for the model, as CycloneDX name/value properties."""
    return [
        {"name": name, "value": value}
        for name, value in (
            ("org.cncf.model.format", info.format),
            ("org.cncf.model.paramSize", info.param_size),
            ("org.cncf.model.precision", info.precision),
            ("org.cncf.model.quantization", info.quantization or "none"),
            ("parameters", str(info.param_count) if info.param_count else None),
        )
        if value
    ]


def ml_bom(
    *,
    ref: Reference,
    manifest_digest: str,
    info: ModelInfo,
    files: list[tuple[str, str, int]],
    datasets: list[str] | None = None,
    limitations: list[str] | None = None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """`files` are (relative path, sha256 digest, size) of the packed layers."""
    datasets = list(datasets if datasets is not None else info.datasets)
    dataset_refs = [f"dataset-{i}" for i in range(len(datasets))]
    model: dict[str, Any] = {
        "type": "machine-learning-model",
        "bom-ref": "model",
        "name": info.name,
        "version": ref.tag or manifest_digest,
        "hashes": [{"alg": "SHA-256", "content": manifest_digest.split(":", 1)[1]}],
        "purl": purl(ref, manifest_digest),
        "modelCard": {
            "modelParameters": _model_parameters(info, dataset_refs),
            "considerations": {"technicalLimitations": list(limitations or default_limitations(info))},
            "properties": _model_properties(info),
        },
        "components": [
            {
                "type": "file",
                "bom-ref": f"file:{rel}",
                "name": rel,
                "hashes": [{"alg": "SHA-256", "content": digest.split(":", 1)[1]}],
                "properties": [{"name": "size", "value": str(size)}],
            }
            for rel, digest, size in files
        ],
    }
    if info.licenses:
        model["licenses"] = [{"license": {"name": lic}} for lic in info.licenses]
    components = [model] + [
        {"type": "data", "bom-ref": r, "name": url,
         "data": [{"type": "dataset", "name": url, "contents": {"url": url}}]}
        for r, url in zip(dataset_refs, datasets, strict=True)
    ]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.6",
        "serialNumber": f"urn:uuid:{uuid.uuid4()}",
        "version": 1,
        "metadata": {
            "timestamp": (timestamp or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "tools": {"components": [{"type": "application", "name": "inferstack", "version": __version__}]},
            "component": {"type": "machine-learning-model", "bom-ref": "artifact", "name": info.name,
                          "version": ref.tag or manifest_digest},
        },
        "components": components,
    }
