"""Read the `up` section of inferstack.yaml into `UpSettings`, with file:line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from inferstack.stack.settings import UpSettings


def _node_at(node: yaml.Node, path: tuple[Any, ...]) -> yaml.Node:
    """The deepest YAML node along `path` (mapping keys / sequence indexes) that exists."""
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == part), None)
            if nxt is None:
                return node
            # point at the key for unknown keys, at the value otherwise
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def load_up_settings(path: Path) -> UpSettings:
    """Raises ValueError('FILE:LINE: field: message') on a bad file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from e
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}:1: the top level must be a mapping with sections such as `up:`")
    section = data.get("up") or {}
    try:
        return UpSettings.model_validate(section)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            node = _node_at(root, ("up", *err["loc"])) if root is not None else None
            line = node.start_mark.line + 1 if node is not None else 1
            field = ".".join(str(p) for p in ("up", *err["loc"]))
            lines.append(f"{path}:{line}: {field}: {err['msg']}")
        raise ValueError("\n".join(lines)) from e
