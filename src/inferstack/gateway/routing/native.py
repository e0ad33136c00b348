"""The compiled pick (``csrc/route_pick.c``): a profile's filters, scorers, totals, tie-break and reason in one
call, for the profiles whose every step it implements (`spec`), and the prefix index's insert loop
(`prefix.ApproxPrefixIndex.insert`); the Python steps stay the reference and the path for every other profile.

A plain CPython extension (no torch: the gateway does not import it), compiled with the C compiler Python was
built with on first use (or ahead with ``python -m inferstack.gateway.routing.build_native``, which
``scripts/setup.sh`` runs) into the cache folder under a name that hashes the source, the flags and the Python
version, so a stale build never loads. Without a compiler, or with ``INFERSTACK_NATIVE_ROUTING=0``, routing runs
the Python steps (same decisions, slower); the log says which.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shlex
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from inferstack.fileio import atomic_path
from inferstack.paths import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "route_pick.c"
# -ffp-contract=off: no fused multiply-adds, so every total rounds where the Python steps' additions round;
# -fno-strict-aliasing as CPython itself is built (object pointers are cast between struct types)
CFLAGS = ("-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-fPIC", "-shared", "-fvisibility=hidden")
ENV = "INFERSTACK_NATIVE_ROUTING"

# the step codes of csrc/route_pick.c
FILTER_CODES = {"healthy": 0, "not-overloaded": 1}
SCORER_CODES = {"prefix": 0, "in-flight": 1, "kv-cache": 2, "cold-spread": 3, "prefix-spread": 4, "lora-affinity": 5,
                "session-affinity": 6, "queue": 7, "running": 8, "least-load": 9}
PICKERS = frozenset({"max-score"})

Spec = tuple[tuple[int, ...], tuple[tuple[int, float, str], ...]]


def spec(filters: Sequence[str], scorers: Sequence[tuple[str, float]], picker: str) -> Spec | None:
    """The compiled pick's arguments for a profile (its filters' codes; its weighted scorers' codes, weights and
    names, in order), or None when a step has no compiled twin."""
    if picker not in PICKERS or any(f not in FILTER_CODES for f in filters) \
            or any(s not in SCORER_CODES for s, _ in scorers):
        return None
    return (tuple(FILTER_CODES[f] for f in filters),
            tuple((SCORER_CODES[s], float(w), sys.intern(s)) for s, w in scorers if w != 0))


def module_name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + sys.version.encode()).hexdigest()
    return f"inferstack_route_{digest[:16]}"


def library_path() -> Path:
    return cache_root() / "extensions" / (module_name() + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def build() -> Path:
    """Compile the extension into the cache folder (atomically: concurrent builders each write a whole file);
    raises OSError or CalledProcessError when it cannot."""
    name, out = module_name(), library_path()
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    include = sysconfig.get_paths()["include"]
    with atomic_path(out, 0o755) as tmp:
        subprocess.run([*cc, *CFLAGS, f"-DROUTE_MODULE={name}", f"-I{include}", str(SOURCE), "-o", str(tmp)],
                       check=True, capture_output=True, text=True)
    return out


def _load(path: Path) -> ModuleType:
    name = module_name()
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec_ = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec_ is not None
    module = importlib.util.module_from_spec(spec_)
    loader.exec_module(module)
    return module


@functools.cache
def native() -> ModuleType | None:
    """The compiled pick, built on first use; None when it is turned off or cannot be built (routing then runs
    its Python steps). Once per process."""
    if os.environ.get(ENV, "1") == "0":
        log.info("routing: compiled pick off (%s=0); the Python steps route", ENV)
        return None
    path = library_path()
    try:
        if not path.exists():
            log.info("routing: compiling the routing pick (%s) into %s", SOURCE.name, path)
            build()
        return _load(path)
    except (OSError, ImportError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.strip()[-500:] if isinstance(exc, subprocess.CalledProcessError) else exc
        log.warning("routing: compiled pick unavailable (%s); the Python steps route (same decisions, slower)",
                    detail)
        return None
