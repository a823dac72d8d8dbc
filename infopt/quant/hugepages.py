"""Quantized weights in transparent-huge-page memory (Linux, CPU).

Decode streams every weight once per token. With 4 KiB pages a 1.9 GB int4 model spans ~470k
pages and the GEMV kernels' prefetches keep missing the TLB; in 2 MiB pages they do not.
Measured on the 2-core Xeon (Qwen2.5-1.5B up/gate matrices streamed from DRAM, 2 threads):
int4 x int8-activation GEMV 40-45 -> 49 G weights/s, fp32-activation int4 GEMV 29-31 -> 32.

Many kernels (this one included: ``transparent_hugepage/enabled = madvise``) give huge pages
only to memory that asked for them, which PyTorch's allocator does not do by default
(``THP_MEM_ALLOC_ENABLE=1`` turns that on for every large tensor). So the quantized buffers
are copied into a fresh anonymous mapping advised ``MADV_HUGEPAGE`` *before* it is touched.
Where that is impossible (not Linux, Python without ``mmap.MADV_HUGEPAGE``) tensors stay where
they are and :func:`status` says why. ``INFOPT_HUGEPAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

__all__ = ["MIN_BYTES", "hugepage_copy", "status"]

#: Smaller tensors are left alone (a 2 MiB page would be mostly padding).
MIN_BYTES = 4 << 20
_HUGE = 2 << 20


def status() -> str | None:
    """None if :func:`hugepage_copy` can advise memory here, else the reason it cannot."""
    if os.environ.get("INFOPT_HUGEPAGES", "1") in ("0", "false", "no"):
        return "disabled by INFOPT_HUGEPAGES=0"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this platform's mmap has no MADV_HUGEPAGE (transparent huge pages are Linux-only)"
    return None


def hugepage_copy(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor ``t`` in memory advised for 2 MiB pages, or ``t`` itself
    when it is small, not on the CPU, or :func:`status` says no. Same shape, dtype and values.
    """
    nbytes = t.numel() * t.element_size()
    if t.device.type != "cpu" or nbytes < MIN_BYTES or status() is not None:
        return t
    # Over-allocate by one huge page so the data can start on a 2 MiB boundary.
    # Private (a shared anonymous map is shmem, which THP serves only if shmem_enabled says so).
    buf = mmap.mmap(-1, nbytes + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buf)
    offset = -ctypes.addressof(view) % _HUGE
    del view  # (a live ctypes export would pin the mapping)
    # Advise only whole 2 MiB pages of the data, before the first touch (faults then take huge
    # pages): a partly used last huge page would be resident in full, up to 2 MiB per tensor.
    if nbytes >= _HUGE:
        buf.madvise(mmap.MADV_HUGEPAGE, offset, nbytes // _HUGE * _HUGE)
    # frombuffer keeps `buf` alive for as long as the tensor's storage lives.
    out = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offset).view(t.shape)
    out.copy_(t)
    return out
