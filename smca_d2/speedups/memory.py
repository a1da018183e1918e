"""Keep freed memory in the process when training on the CPU (glibc ``malloc`` settings).

By default glibc serves every request above its mmap threshold (128 KiB, rising to at most
32 MiB) with a fresh ``mmap`` and unmaps it when it is freed, and hands the top of its heap back
to the kernel once that exceeds the trim threshold. A training step on the CPU allocates and
frees gigabytes of activations, so every step faults its memory in again, page by page. With
mmap and trimming off, what one step frees is reused by the next: no page faults once the heap has grown to the step's peak.

The cost: the process keeps its peak memory until it exits, which a training process does
anyway. The settings apply to the whole process: :func:`smca_d2.speedups.apply_speedups` uses
them on the CPU (``train.speedups.keep_freed_cpu_memory``), a library user opts in with
:func:`keep_freed_cpu_memory`.
"""

import ctypes
import logging
import os
import platform

__all__ = [
    "glibc_malloc",
    "keep_freed_cpu_memory",
    "keeps_freed_cpu_memory",
    "malloc_settings_from_environment",
]

logger = logging.getLogger(__name__)
_applied = False

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_MAX = -4
_ENVIRONMENT = (
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def glibc_malloc() -> bool:
    """Whether this process's ``malloc`` is glibc's (Linux with glibc): the one these settings tune."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def malloc_settings_from_environment() -> list:
    """The environment variables through which the user already chose malloc settings or another
    allocator (jemalloc, tcmalloc via ``LD_PRELOAD``); those are left alone."""
    return [name for name in _ENVIRONMENT if os.environ.get(name)]


def keep_freed_cpu_memory() -> bool:
    """Make glibc's ``malloc`` keep the memory that is freed for reuse: no ``mmap`` for large
    blocks (``M_MMAP_MAX = 0``) and no trimming of the heap (``M_TRIM_THRESHOLD = -1``).

    Returns True if the settings were applied; False, changing nothing, where the C library is
    not glibc or :func:`malloc_settings_from_environment` names a variable the user set.
    """
    if not glibc_malloc():
        return False
    chosen = malloc_settings_from_environment()
    if chosen:
        logger.info("malloc settings left as chosen through %s", ", ".join(chosen))
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success. A trim threshold of -1 disables trimming (mallopt(3)).
    global _applied
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    _applied = _applied or applied
    if applied:
        logger.info("malloc keeps freed memory for reuse (M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1)")
    return applied


def keeps_freed_cpu_memory() -> bool:
    """Whether :func:`keep_freed_cpu_memory` has applied its settings in this process."""
    return _applied
