"""Process-wide CPU settings for inference and training: ``tune_allocator``.

PyTorch's CPU tensors come from the C library's malloc. glibc serves blocks above a threshold
(128 KiB, raised dynamically up to 32 MiB) with fresh ``mmap`` calls and gives them back to the
OS on free, and it trims the heap top whenever more than 128 KiB is free there. A purification
step allocates and frees the same few activation-sized buffers (9.6 MB for 64 x 48 x 28 x 28
floats) over and over, so every step pays for new zero-filled pages; raising the thresholds
makes purification markedly faster (docs/performance.md, 'Why the code is shaped this way').
Keeping freed memory in the heap costs nothing in peak memory (the same buffers are reused),
which the app's peak-RSS measurement in ``tendiff.bench`` checks.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30

_tuned: bool | None = None


def tune_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds so freed activation buffers are reused instead of
    being returned to the OS and faulted back in. Returns whether it applied (glibc Linux only;
    elsewhere a no-op). Idempotent."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):
        _tuned = False
    return _tuned


def machine() -> str:
    """What a measurement ran on, for records: the GPU(s) in use, else the CPU and its threads."""
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
