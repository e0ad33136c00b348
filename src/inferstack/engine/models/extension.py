"""The engine's C++ extension (``csrc/*.cpp``): built ahead of time, loaded when built, never compiled here.

One shared library holds the batch-1 decoder layers (``fused_decode.py``) and the grouped-int8 matmul
(``quant_linear.py``, kind ``int8g``). It is built once (``python -m inferstack.engine.models.fused_decode
--build``, which ``scripts/setup.sh`` runs) into the cache folder under a name that hashes the sources
and the torch version, so a stale build never loads. Without a matching build every caller keeps its
pure-torch path.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from inferstack.paths import cache_root

# -ffp-contract=off: no fused multiply-adds, so the decode layers' loops round where torch's kernels round.
# -fopenmp: torch's CPU at::parallel_for is OpenMP pragmas in its headers; without it they run one thread.
# The library then needs libgomp.so.1, which the loader binds by soname to the copy torch already loaded
# (torch/lib/libgomp.so.1): one OpenMP runtime and one pool, sized by torch.set_num_threads (docs/engine.md).
# The int8 kernel's vector variants are compiled per function (target attributes) and picked at run time,
# so the build does not depend on the build machine's CPU.
CFLAGS = ("-O2", "-ffp-contract=off", "-fopenmp")
SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("decode_layers.cpp", "q8_matmul.cpp",
                                                                         "paged_attention.cpp", "int8_blocks.cpp",
                                                                         "rotary.cpp", "rms_norm.cpp", "kv_write.cpp"))

# A build for one instruction set only, as a CPU without the wider ones runs it: the attention loops get
# only that target_clones variant and the int8 kernel takes the wider vector units as absent. This CPU
# has AVX-512, so without these builds the AVX2 and baseline paths would first run on someone else's CPU.
# "" is the normal build (every variant, picked at run time). Chosen by $INFERSTACK_DECODE_ISA or the
# ``isa`` argument; part of the name, so each variant has its own build and a process can load several.
ISA_DEFINES: dict[str, tuple[str, ...]] = {
    "": (), "avx2": ("-DINFERSTACK_ISA_AVX2",), "baseline": ("-DINFERSTACK_ISA_BASELINE",)}
ISA_ENV = "INFERSTACK_DECODE_ISA"


def isa_variant(isa: str | None = None) -> str:
    """``isa``, or $INFERSTACK_DECODE_ISA when None: a key of :data:`ISA_DEFINES`."""
    chosen = os.environ.get(ISA_ENV, "") if isa is None else isa
    if chosen not in ISA_DEFINES:
        raise ValueError(f"{ISA_ENV} must be one of {sorted(ISA_DEFINES)}, got {chosen!r}")
    return chosen


def extension_name(isa: str | None = None) -> str:
    """The module name of the build that matches these sources, this torch and the ISA variant."""
    variant = isa_variant(isa)
    flags = CFLAGS + ISA_DEFINES[variant]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()
                            + " ".join(flags).encode()).hexdigest()
    return f"inferstack_decode_{digest[:16]}" + (f"_{variant}" if variant else "")


def build_dir(isa: str | None = None) -> Path:
    return cache_root() / "extensions" / extension_name(isa)


def build(verbose: bool = False, isa: str | None = None) -> Path:
    """Compile the extension (needs g++ and ninja); returns the shared library's path."""
    from torch.utils import cpp_extension

    variant = isa_variant(isa)
    name, out = extension_name(variant), build_dir(variant)
    out.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(name, [str(p) for p in SOURCES], build_directory=str(out),
                       extra_cflags=list(CFLAGS + ISA_DEFINES[variant]), extra_ldflags=["-fopenmp"],
                       verbose=verbose)
    return out / f"{name}.so"


def load_extension(isa: str | None = None) -> ModuleType | None:
    """The built extension, or None when it is not built for these sources and torch (never compiles)."""
    name = extension_name(isa)
    path = build_dir(isa) / f"{name}.so"
    if not path.is_file():
        return None
    if name in sys.modules:     # a shared library initializes once per process; later loads reuse it
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        return None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module
