"""Host memory allocator settings for training on the CPU.

A CPU training step allocates and frees the same large activation and gradient buffers every
step. glibc's malloc serves big requests with fresh `mmap`s and hands freed memory straight back
to the kernel, so every step page-faults its whole working set in again (measured on
ConvNeXtV2-Tiny, batch 32: ~4M minor faults and ~10 s of kernel time per step). Raising the mmap
and trim thresholds keeps freed memory in the process for reuse: the faults drop to ~0 after the
first step.

The trainer switches this on once its steps have settled (after the first step, or after the
frozen-trunk compile decision and the first compiled step): a heap grown under one allocation
pattern (eager timing steps) and then reused by another (the compiled trunk) fragments, and the
retained holes raised the peak RSS of a both-towers-locked run by ~0.6 GiB. Settled first, the
peak stays at the working set.

Only glibc is touched (`mallopt`); other C libraries and platforms are left alone. Dataloader
workers forked after this call inherit the setting.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Optional

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Requests below the mmap threshold come from the heap, whose freed memory the trim threshold
# keeps. Activations of a 224 px batch reach hundreds of MiB, so the threshold is set high; old
# glibc (< 2.26) refuses anything above HEAP_MAX_SIZE / 2 (32 MiB), which still helps.
MMAP_THRESHOLD = 1 << 30
MMAP_THRESHOLD_OLD_GLIBC = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to ~2 GiB of free heap for reuse


def _glibc() -> Optional[ctypes.CDLL]:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def retain_freed_memory() -> Optional[str]:
    """Keep freed host memory for reuse instead of returning it to the kernel each step.
    Returns a line for the log saying what was set, or None where nothing could be set."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return None
    mmap = next((v for v in (MMAP_THRESHOLD, MMAP_THRESHOLD_OLD_GLIBC) if libc.mallopt(_M_MMAP_THRESHOLD, v) == 1), None)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if mmap is None and not ok_trim:
        return None
    return (f"host allocator: glibc mmap threshold {f'{mmap >> 20} MiB' if mmap else 'unchanged (refused)'}, "
            f"trim threshold {TRIM_THRESHOLD >> 20} MiB{'' if ok_trim else ' (refused)'} "
            "(freed buffers are reused, not page-faulted in again; --no-malloc-retain to keep glibc's defaults)")
