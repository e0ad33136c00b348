"""HF model directories: ``config.json`` plus one or more safetensors files (sharded via an index)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from inferstack.engine.models.shape import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path.parent}: missing {path.name} ({what})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object ({what})")
    return data


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    return read_json(model_dir / "config.json", "the model's configuration, as written by save_pretrained")


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of an HF directory, in shard order; each named file must exist."""
    index = model_dir / INDEX_FILE
    if index.exists():
        weight_map = read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: no 'weight_map' mapping tensor names to shard files")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(f"{model_dir}: missing shard {f.name}, listed in {INDEX_FILE}")
        return files
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = f" (found {', '.join(other)}: convert them to safetensors)" if other else ""
    raise ModelLoadError(f"{model_dir}: no model.safetensors or {INDEX_FILE}{hint}")


class SafetensorsCheckpoint:
    """Name → tensor over several safetensors files, reading each tensor only when asked for."""

    def __init__(self, files: list[Path]) -> None:
        self._handles = []
        self._where: dict[str, int] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ModelLoadError(f"{f}: not a readable safetensors file ({e})") from None
            self._handles.append(handle)
            for name in handle.keys():  # noqa: SIM118 - safe_open has keys(), not iteration
                self._where[name] = len(self._handles) - 1

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)
