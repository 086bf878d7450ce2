"""The glibc malloc tuning that keeps freed multi-MiB buffers for reuse (fmask.core.cpu_allocator)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the tuning applies to glibc only"
)

# Allocates 16 MiB with libc's malloc and reports whether glibc served it with its own mmap (a "held block"),
# which it does under its default thresholds and must not do once tuned.
PROBE = r"""
import ctypes
from fmask.core.cpu_allocator import tune_cpu_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
tuned = tune_cpu_allocator()
before = libc.mallinfo2().hblks
block = libc.malloc(16 << 20)
mmapped = libc.mallinfo2().hblks > before
libc.free(block)
print(tuned, mmapped)
"""


def _probe(**env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "FMASK_MALLOC"))}
    environment.update(env)
    result = subprocess.run([sys.executable, "-c", PROBE], env=environment, capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def test_tuned_malloc_serves_large_blocks_from_the_heap():
    assert _probe() == "True False"


def test_tuning_can_be_turned_off_and_yields_to_the_users_own_settings():
    assert _probe(FMASK_MALLOC_TUNING="0") == "False True"
    # The user's glibc setting wins: here a threshold that keeps 16 MiB blocks mmapped.
    assert _probe(MALLOC_MMAP_THRESHOLD_=str(1 << 20)) == "False True"
