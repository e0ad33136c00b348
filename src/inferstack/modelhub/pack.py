"""`inferstack model pack`: a model folder or file -> a ModelPack OCI artifact in the local store.

One raw layer per file (weights are never tarred or compressed, so a layer digest *is* the file's
sha256 and signing reuses it). Digests are reproducible: files are sorted, JSON is canonical, file
metadata is normalised, and no timestamp enters the manifest or config unless asked for
(`--created` or SOURCE_DATE_EPOCH).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.errors import PackError
from inferstack.modelhub.modelinfo import ModelInfo, read_model_info
from inferstack.modelhub.reference import Reference
from inferstack.modelhub.store import Store, safe_relpath

# Never packed: VCS metadata (as model-signing ignores it), detached signatures, the engine's digest caches.
IGNORED_TOP = {".git", ".github", ".gitignore", ".gitattributes", ".inferstack"}


@dataclass
class PackedFile:
    relpath: str
    path: Path
    kind: str
    untested: bool
    digest: str = ""
    size: int = 0


@dataclass
class PackResult:
    reference: str
    manifest_digest: str
    manifest: dict[str, Any]
    config: dict[str, Any]
    info: ModelInfo
    files: list[PackedFile] = field(default_factory=list)


def is_ignored(relpath: str) -> bool:
    parts = relpath.split("/")
    return parts[0] in IGNORED_TOP or relpath.endswith(".sig") or relpath.endswith(".sha256")


def collect_files(source: Path) -> list[PackedFile]:
    if not source.exists():
        raise PackError(f"{source} does not exist")
    if source.is_file():
        kind, untested = mt.classify(source.name)
        return [PackedFile(source.name, source, kind, untested)]
    files: list[PackedFile] = []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        rel_dir = Path(dirpath).relative_to(source)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored((rel_dir / d).as_posix()))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = (rel_dir / name).as_posix()
            if is_ignored(rel):
                continue
            if path.is_symlink():
                raise PackError(f"{rel} is a symbolic link; copy the file in (links are not packed or signed)")
            safe_relpath(rel)
            kind, untested = mt.classify(rel)
            files.append(PackedFile(rel, path, kind, untested))
    files.sort(key=lambda f: f.relpath)
    if not files:
        raise PackError(f"{source} holds no files to pack (an empty model cannot be signed meaningfully)")
    if not any(f.kind == mt.WEIGHT for f in files):
        raise PackError(f"{source} holds no weight file (*.safetensors, *.gguf, *.bin, *.pt, ...)")
    return files


def created_timestamp(created: str | None) -> str | None:
    if created:
        return created
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return None


@cache
def config_schema() -> dict[str, Any]:
    text = resources.files("inferstack.modelhub").joinpath("schemas/modelpack-config.schema.json").read_text()
    return json.loads(text)


def validate_config(config: dict[str, Any]) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(config_schema(), format_checker=jsonschema.FormatChecker())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.path))
    if errors:
        where = "/".join(str(p) for p in errors[0].path) or "(root)"
        raise PackError(f"ModelPack config invalid at {where}: {errors[0].message}")


def build_config(info: ModelInfo, diff_ids: list[str], created: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    descriptor: dict[str, Any] = {"name": info.name, **extra}
    if info.family:
        descriptor.setdefault("family", info.family)
    if info.licenses:
        descriptor.setdefault("licenses", info.licenses)
    if info.datasets:
        descriptor.setdefault("datasetsURL", info.datasets)
    if created:
        descriptor["createdAt"] = created
    model_config: dict[str, Any] = {
        "architecture": info.architecture,
        "format": info.format,
        "paramSize": info.param_size,
        "precision": info.precision,
        "quantization": info.quantization,
        "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]},
    }
    if info.languages and all(len(x) == 2 for x in info.languages):
        model_config["capabilities"]["languages"] = info.languages
    config = {
        "descriptor": {k: v for k, v in descriptor.items() if v not in (None, "", [])},
        "config": {k: v for k, v in model_config.items() if v is not None},
        "modelfs": {"type": "layers", "diffIds": diff_ids},
    }
    validate_config(config)
    return config


def _file_metadata(f: PackedFile, mtime: str) -> str:
    mode = 0o755 if os.access(f.path, os.X_OK) else 0o644
    meta = {"name": f.relpath, "mode": mode, "uid": 0, "gid": 0, "size": f.size, "mtime": mtime, "typeflag": 48}
    return json.dumps(meta, separators=(",", ":"), sort_keys=True)


def pack(
    source: Path,
    reference: Reference,
    store: Store,
    *,
    name: str | None = None,
    created: str | None = None,
    descriptor: dict[str, Any] | None = None,
) -> PackResult:
    """Build the artifact into `store` and tag it as `reference`."""
    files = collect_files(source)
    for f in files:
        f.digest, f.size = store.ingest_file(f.path)
    root = source if source.is_dir() else source.parent
    model_name = name or reference.repository.rsplit("/", 1)[-1]
    try:
        info = read_model_info([f.path for f in files if f.kind == mt.WEIGHT], root, model_name)
    except (ValueError, OSError) as e:
        raise PackError(f"cannot read model metadata from {source}: {e}") from e
    if name:
        info.name = name
    created_at = created_timestamp(created)
    config = build_config(info, [f.digest for f in files], created_at, dict(descriptor or {}))
    config_bytes = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    config_digest = store.put_bytes(config_bytes)
    mtime = created_at or "1970-01-01T00:00:00Z"
    layers = []
    for f in files:
        annotations = {
            mt.ANN_TITLE: f.relpath,
            mt.ANN_FILEPATH: f.relpath,
            mt.ANN_FILE_METADATA: _file_metadata(f, mtime),
            mt.ANN_UNTESTED: "true" if f.untested else "false",
        }
        layers.append({
            "mediaType": mt.layer_media_type(f.kind),
            "digest": f.digest,
            "size": f.size,
            "annotations": annotations,
        })
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.MODEL_MANIFEST,
        "config": {"mediaType": mt.MODEL_CONFIG, "digest": config_digest, "size": len(config_bytes)},
        "layers": layers,
    }
    if created_at:
        manifest["annotations"] = {mt.ANN_CREATED: created_at}
    manifest_digest, _ = store.put_manifest(manifest)
    store.tag(str(reference), manifest_digest)
    return PackResult(str(reference), manifest_digest, manifest, config, info, files)
