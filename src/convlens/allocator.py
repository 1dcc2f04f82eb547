"""glibc's allocator around convlens's work: freed memory kept for reuse while it runs.

A CNN forward pass allocates and frees tens of megabytes per layer. By default glibc maps blocks
over 32 MiB fresh from the kernel and unmaps them again, so every model call pays page faults.
:func:`freed_memory_kept` raises the thresholds for the length of a block (every explanation,
metric and feature function runs in one), :func:`keep_freed_memory` for the process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

__all__ = [
    "KEPT_AFTER",
    "default_batch_size",
    "freed_memory_kept",
    "keep_freed_memory",
    "keeping_freed_memory",
]

log = logging.getLogger(__name__)

# glibc mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# mirrors the process-wide allocator setting, which is global itself
_KEPT = {"active": False, "scoped": False}
_SCOPES = [0]  # freed_memory_kept blocks open now, in any thread
_SCOPE_GUARD = threading.Lock()
# resident bytes when the outermost freed_memory_kept block opened, and what the blocks have
# left resident since the last trim (the growth inside each, summed)
_RESIDENT_AT_START = [0]
_LEFT = [0]
_STARTED = [0.0]  # _clock() then
_clock = time.monotonic
# blocks longer than this (seconds) always return their freed memory: for them the trim and the
# page faults after it cost little, and a long batched call ran 5% slower on memory kept (Score-CAM
# on the bundled model, 8.3 against 8.6 s)
LONG_BLOCK = 1.0
# the freed memory the blocks may leave resident in all, for the next call: calls under it (a
# gradient method at 224 px on EfficientNet-Lite0 grows the heap by about 170 MB) then reuse it
# instead of paying page faults for it again
KEPT_AFTER = 256 << 20


def _resident() -> int:
    """The process's resident memory in bytes (Linux; 0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _trim() -> None:
    """Return the heap's freed memory to the system (glibc's ``malloc_trim``)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _set_thresholds(mmap: int, trim: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        kept = libc.mallopt(_M_MMAP_THRESHOLD, mmap) == 1
        return libc.mallopt(_M_TRIM_THRESHOLD, trim) == 1 and kept
    except (OSError, AttributeError):
        return False


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A CNN forward pass allocates and frees tens of megabytes per layer. By default glibc maps
    blocks over 32 MiB fresh from the kernel and unmaps them again, so every model call pays
    page faults: on a 2-core machine the kernel's share of a perturbation run reached 60% and
    batch 32 ran at a third of its speed. With both thresholds raised to ``limit``, blocks up to
    that size are recycled from the heap (measured: system time 9 s -> 0.3 s, Score-CAM 36 ->
    120 images/s). The cost: freed memory stays resident in the process.

    This is process-wide and lasting. :func:`convlens.explain` does the same for the duration of
    one call only, and the ``convlens`` command for the duration of its run
    (:func:`freed_memory_kept`). Linux/glibc only; returns whether it took effect.
    """
    kept = _set_thresholds(limit, limit)
    _KEPT["active"] = _KEPT["active"] or kept
    if kept:
        log.info("glibc malloc keeps freed blocks up to %d bytes for reuse", limit)
    return kept


@contextmanager
def freed_memory_kept(limit: int = 1 << 30) -> Iterator[bool]:
    """Keep freed memory for reuse (:func:`keep_freed_memory`) inside the block only.

    On leaving, blocks over 32 MiB are mapped fresh again (the value glibc's own adaptive rule
    reaches once such a block has been freed; any CNN forward frees one), and glibc returns the
    top of the heap beyond ``KEPT_AFTER`` (256 MiB) as memory is freed. The blocks' growth in
    resident memory is summed; once it passes ``KEPT_AFTER``, after a block longer than
    ``LONG_BLOCK`` (1 s), or where resident memory cannot be read, ``malloc_trim`` returns all
    freed memory to the system and the sum restarts. Below it the memory stays for the next
    call, which would otherwise fault it in again (``python -m bench relevance``: DeepLIFT on
    the bundled model at 224 px, 0.198 -> 0.092 s per call). Does nothing where
    :func:`keep_freed_memory` is already active or the platform is not Linux/glibc. Yields
    whether freed memory is kept inside the block.
    """
    with _SCOPE_GUARD:  # blocks in several threads: the last one out restores the thresholds
        owned = not _KEPT["active"] and (_KEPT["scoped"] or _set_thresholds(limit, limit))
        if owned:
            if _SCOPES[0] == 0:
                _RESIDENT_AT_START[0], _STARTED[0] = _resident(), _clock()
            _SCOPES[0] += 1
            _KEPT["scoped"] = True
        kept = _KEPT["active"] or owned
    try:
        yield kept
    finally:
        if owned:
            with _SCOPE_GUARD:
                _SCOPES[0] -= 1
                if _SCOPES[0] == 0:
                    _KEPT["scoped"] = False
                    _set_thresholds(32 << 20, KEPT_AFTER)
                    now, start = _resident(), _RESIDENT_AT_START[0]
                    _LEFT[0] = max(0, _LEFT[0] + now - start)
                    long = _clock() - _STARTED[0] > LONG_BLOCK
                    if long or not (now and start) or _LEFT[0] > KEPT_AFTER:
                        _trim()
                        _LEFT[0] = 0


def keeping_freed_memory() -> bool:
    """Whether freed memory is kept for reuse now (:func:`keep_freed_memory`, or inside
    :func:`freed_memory_kept`)."""
    return _KEPT["active"] or _KEPT["scoped"]


def default_batch_size(preferred: int) -> int:
    """A method's default batch size: its preferred one when freed memory is kept, else at most
    8, which measured fastest in a fresh process where large blocks go back to the kernel."""
    return preferred if keeping_freed_memory() else min(preferred, 8)
