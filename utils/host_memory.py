"""Keep freed host memory for reuse instead of returning it to the kernel.

On CPU, XLA allocates each step's large temporaries (attention scores are
hundreds of MB at 1K tokens) with malloc, and glibc serves a request above its
mmap threshold (at most 32 MB) with a fresh mmap that is unmapped again on
free: every step then faults in every page anew, and the kernel's time for
that can exceed the arithmetic (an image step at 784 tokens: 0.56 -> 0.94
steps/s with the setting below, measured on the project's 2-core VM). With
mmap off and trimming only above 2 GB, freed blocks stay in malloc's heap and
the next step reuses them. XLA's worker threads would each get a malloc
arena of their own, whose heaps glibc caps at 64 MB and cannot grow for such
requests (they were mapped anew each time even with mmap off: a 16 x 1K-token
text step spent 12 of its 33 CPU-minutes in the kernel), so one arena serves
every thread. The cost: the process keeps its peak resident memory until it
exits; one arena could contend under many small concurrent mallocs, which
XLA's few large buffers do not make.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_ABOVE = 2**31 - 1          # the largest value mallopt's int accepts


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to serve every size from one heap (the main
  arena, for every thread) and not to trim it; True when it took effect
  (False where malloc is not glibc's). Call it before threads allocate."""
  name = ctypes.util.find_library('c')
  try:
    mallopt = ctypes.CDLL(name).mallopt
  except (OSError, AttributeError, TypeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return (mallopt(_M_ARENA_MAX, 1) == 1
          and mallopt(_M_MMAP_MAX, 0) == 1
          and mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) == 1)
