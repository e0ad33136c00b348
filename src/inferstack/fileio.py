"""Files that readers must never see half-written: atomic replace, and the ready-file contract.

Every writer goes through a temporary file in the same folder (or a given one on the same file
system) and `os.replace`, so a reader sees the old content or the new, never a torn mix; a crash
leaves at most a stray temporary file. A leaf module (no inferstack imports).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path, mode: int = 0o644, tmp_dir: Path | None = None) -> Iterator[Path]:
    """A temporary path to write by name (e.g. a library's ``save_file(..., tmp)``); on a clean exit
    it replaces ``path`` in one rename, on an exception it is deleted and ``path`` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes | bytearray | memoryview | str, mode: int = 0o644, *,
                 durable: bool = False, tmp_dir: Path | None = None) -> None:
    """Replace ``path`` with ``data`` in one rename. ``durable`` fsyncs the file and its folder, so the
    new content survives a power loss (manifests, refs); leave it off for caches and hints."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, mode, tmp_dir) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (the folder's entry list is data too)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_ready_file(path: Path | str | None, payload: dict[str, Any]) -> str:
    """The server start-up contract (docs/architecture.md): once serving, print one JSON line
    (``{"urls": [...], "pid": N, ...}``) on stdout and, with ``--ready-file``, write the same line
    there atomically, so a watcher polling for the file never reads half of it. Returns the line."""
    line = json.dumps(payload, separators=(",", ":"))  # one compact line, as orjson writes it
    print(line, flush=True)
    if path:
        atomic_write(Path(path), line + "\n")
    return line
