"""Host (CPU) memory for the paged KV cache: zeroed, 2 MiB-aligned, on transparent huge pages where the kernel
allows them.

Why: a NIXL READ between two processes on one host is a CMA copy (`process_vm_readv`), which pins the peer's
pages for every call; on 2 MiB pages it pins 512 times fewer of them, and the copy's TLB misses drop too
(measured in docs/disaggregation.md, "Huge pages"). Kernels commonly ship THP as ``madvise`` (only regions
that ask get huge pages), and torch's allocator does not ask, so the KV cache asks here. Where the kernel has
no THP the advice fails or is ignored and the memory is the same zeroed memory on 4 KiB pages.
"""

from __future__ import annotations

import contextlib
import math
import mmap

import torch

HUGE_PAGE = 2 << 20


def huge_page_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed, contiguous CPU tensor whose memory starts on a 2 MiB boundary, is advised onto huge pages
    (``MADV_HUGEPAGE``) and is already touched. The tensor keeps its anonymous private mapping alive; freeing
    the tensor unmaps it."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE           # a multiple of the 4 KiB page: the mapping is page-aligned
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):        # no THP in this kernel: plain pages
            area.madvise(advice, start, nbytes)
    tensor = raw[start:start + nbytes].view(dtype).view(shape)
    # touched now, as torch.zeros does: the page faults (2 MiB zeroed at a time) happen at start-up, not in the
    # first requests' forward passes, and the memory is committed up front as before
    return tensor.zero_()


def huge_page_layers(layers: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[torch.Tensor]:
    """``layers`` zeroed, contiguous caches of ``shape``, views of one `huge_page_zeros` area, one after another.

    One area, not one per layer: a huge page needs a 2 MiB-aligned 2 MiB of one mapping, so a layer of less than
    2 MiB (a 16 MB transfer's 22 blocks of SmolLM2 are 540 KB a layer) never got one, and every layer's tail past
    its last 2 MiB boundary stayed on 4 KiB pages. In one area only the whole cache's tail does; a 16 MB NIXL READ
    between two such caches took 16 % less CPU (docs/disaggregation.md, "NIXL's 16 MB time")."""
    return list(huge_page_zeros((layers, *shape), dtype).unbind(0))
