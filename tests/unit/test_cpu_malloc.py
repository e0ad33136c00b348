"""The CPU engine's allocator settings: a large step buffer, freed and made again, reuses its pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt settings are glibc's")

# Page faults of ten SwiGLU-shaped rounds over 2,048-row activations (6-24 MB each) after three untimed
# ones. "kept" applies the engine's settings; "fresh" pins glibc's mmap threshold at its 128 KiB default (a fixed
# threshold turns off glibc's own adaptive raising), so every large tensor is a new mapping: the reference for what
# the settings save, measured on the same machine in the same test.
_PROBE = """
import ctypes, ctypes.util, resource, sys, torch
from inferstack.engine.cpu_malloc import M_MMAP_THRESHOLD, keep_step_buffers
if sys.argv[1] == "kept":
    assert keep_step_buffers()
else:
    assert ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1
x = torch.randn(2048, 3072)
def layer():
    gate, up = x.split(1536, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    return (h.sum(-1, keepdim=True) * x).sum()
for _ in range(3):
    layer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    layer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_step_buffers_are_reused_instead_of_faulted_in_again():
    kept, fresh = _faults("kept"), _faults("fresh")
    # A round makes ~12,288 pages of activations (two of [2048, 1536] floats, one of [2048, 3072]), so fresh
    # mappings fault ~120,000 in ten rounds. Kept: a growth of the heap now and then (3,072 to 15,360 pages seen
    # in whole runs, the latter on a loaded CI machine), never a fresh mapping per tensor.
    assert fresh > 60_000
    assert kept < fresh / 4, (kept, fresh)
