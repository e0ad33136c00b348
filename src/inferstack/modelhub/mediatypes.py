"""ModelPack / OCI identifiers (modelpack/model-spec v0.0.7) and how files map onto layer kinds."""

from __future__ import annotations

from pathlib import PurePosixPath

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

MODEL_MANIFEST = "application/vnd.cncf.model.manifest.v1+json"
MODEL_CONFIG = "application/vnd.cncf.model.config.v1+json"
# Older artifacts (before model-spec 859889f, 2025-06-30) use the cnai prefix; we read both.
LEGACY_MODEL_MANIFEST = "application/vnd.cnai.model.manifest.v1+json"

SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
CYCLONEDX_JSON = "application/vnd.cyclonedx+json"
SLSA_PREDICATE = "https://slsa.dev/provenance/v1"
ANN_PREDICATE_TYPE = "in-toto.io/predicate-type"

ANN_TITLE = "org.opencontainers.image.title"
ANN_CREATED = "org.opencontainers.image.created"
ANN_FILEPATH = "org.cncf.model.filepath"
ANN_FILEPATH_LEGACY = "org.cnai.model.filepath"
ANN_FILE_METADATA = "org.cncf.model.file.metadata+json"
ANN_UNTESTED = "org.cncf.model.file.mediatype.untested"

WEIGHT = "weight"
WEIGHT_CONFIG = "weight.config"
DOC = "doc"
CODE = "code"
DATASET = "dataset"

_WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack", ".npz"}
_CONFIG_SUFFIXES = {".json", ".model", ".tiktoken", ".jinja", ".txt", ".yaml", ".yml", ".vocab"}
_CODE_SUFFIXES = {".py", ".sh", ".ipynb", ".js", ".ts"}
_DOC_SUFFIXES = {".md", ".rst", ".pdf", ".html"}
_DATASET_SUFFIXES = {".parquet", ".csv", ".jsonl", ".arrow", ".tsv"}
_DOC_STEMS = {"license", "licence", "readme", "notice", "copying", "authors", "citation"}


def layer_media_type(kind: str, encoding: str = "raw") -> str:
    return f"application/vnd.cncf.model.{kind}.v1.{encoding}"


def classify(relpath: str) -> tuple[str, bool]:
    """Layer kind for a file, and whether the choice is a guess (ModelPack's `untested` annotation)."""
    p = PurePosixPath(relpath)
    suffix = p.suffix.lower()
    stem = p.name.split(".")[0].lower()
    parts = {part.lower() for part in p.parts[:-1]}
    if suffix in _WEIGHT_SUFFIXES and not (suffix == ".bin" and "training_args" in p.name):
        return WEIGHT, False
    if "datasets" in parts or "dataset" in parts or suffix in _DATASET_SUFFIXES:
        return DATASET, False
    if stem in _DOC_STEMS or suffix in _DOC_SUFFIXES:
        return DOC, False
    if suffix in _CODE_SUFFIXES:
        return CODE, False
    if suffix in _CONFIG_SUFFIXES or stem.startswith("tokenizer"):
        return WEIGHT_CONFIG, False
    return DOC, True


def layer_kind(media_type: str) -> str | None:
    """Inverse of layer_media_type for both cncf and cnai prefixes; None for foreign media types."""
    for prefix in ("application/vnd.cncf.model.", "application/vnd.cnai.model."):
        if media_type.startswith(prefix):
            rest = media_type[len(prefix):]
            kind, _, _ = rest.partition(".v1.")
            return kind
    return None


def layer_encoding(media_type: str) -> str:
    return media_type.rpartition(".v1.")[2]
