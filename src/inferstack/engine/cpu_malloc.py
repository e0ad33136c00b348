"""Keep a CPU engine's step buffers in the heap instead of fresh ``mmap`` pages for every tensor.

torch allocates CPU tensors with the C library's ``malloc``. glibc serves every block above its mmap
threshold (128 KiB at first, raised only as far as the largest block freed so far) with a fresh ``mmap``
and gives it back with ``munmap`` on free, so each large activation of a step (a 2,048-row prefill chunk
of SmolLM2 makes dozens of 5-25 MB tensors per layer) is a new mapping whose every page faults in and
is zeroed by the kernel, and every elementwise op pays that again. Raising the threshold to glibc's
maximum (32 MiB) and keeping freed memory at the top of the heap (trim threshold, top pad) lets the
next step reuse the same pages: in a 2,048-row prefill step of the bundled GGUF with fp32 activations,
SiLU·up took 197 instead of 604 ms of CPU and rotary 170 instead of 440 ms (one pair of runs; glibc's own
adaptive threshold sometimes gets there too; docs/benchmarks.md, "helper c14c").

The heap then holds about one step's peak of activations after the step ends (the trim threshold
bounds what it keeps beyond that). Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20      # glibc's maximum on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30       # give heap memory back only when this much is free at its top
TOP_PAD = 256 << 20            # grow the heap in large steps: fewer brk calls while a step allocates


def keep_step_buffers() -> bool:
    """Apply the settings above to this process's glibc allocator; False (and nothing done) elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.warning("mallopt refused the step-buffer settings; large CPU tensors stay on mmap")
    return ok
