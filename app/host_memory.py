"""CPU training: keep freed heap memory in the process instead of handing it back to the OS every step.

A training step frees and re-allocates the same activation buffers every update. glibc's malloc
trims the top of the heap as soon as more than ``M_TRIM_THRESHOLD`` (128 KiB by default, adapted
upward only slowly) is free there, so each step returns the activations' pages to the kernel and
faults them back in (zeroed) on the next forward. Measured on the quickstart model on a 2-core CPU
(``benchmarks/overhead.py``), that costs 3-7 % of a step inside Lightning's loop, whose allocation
order defeats glibc's adaptation more than a minimal loop does. Raising the trim threshold and the
top pad (the ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_`` knobs, set here with ``mallopt``)
makes the step's memory stay mapped: the process keeps its peak resident size, which a training
process reaches every step anyway. GPU memory has its own caching allocator and is not affected.
No library does this for PyTorch on the CPU, hence this module.

Set ``NTNG_KEEP_FREED_MEMORY=0`` to keep glibc's defaults (a process that must shrink after training).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD = -1, -2  # glibc's mallopt parameters (malloc.h)
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest a C int holds: never trim during training
TOP_PAD_BYTES = 2**30  # grow the heap by at least 1 GiB at a time


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to keep freed memory mapped (see the module docstring); idempotent.

    Returns:
        True when the setting was applied: Linux with glibc, and ``NTNG_KEEP_FREED_MEMORY`` is not ``0``.
    """
    if not sys.platform.startswith("linux") or os.environ.get("NTNG_KEEP_FREED_MEMORY", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no mallopt), or no libc found
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(_M_TOP_PAD, TOP_PAD_BYTES))
