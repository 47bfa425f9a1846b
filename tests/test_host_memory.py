"""utils/host_memory: glibc's malloc keeps freed memory for reuse."""
import platform
import subprocess
import sys

import pytest

from tests.test_errors import ROOT

# Faults in a 256 MB malloc'd buffer, frees it, and again, in a thread of
# its own as XLA's workers do; prints the page faults of the second round
# (the first one may grow the heap).
_CODE = '''
import ctypes, resource, threading
{setting}
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(1 << 28)
  libc.memset(p, 1, 1 << 28)
  libc.free(p)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds = []
worker = threading.Thread(target=lambda: rounds.extend([faults(), faults()]))
worker.start()
worker.join()
print(rounds[-1])
'''


def _faults(setting: str) -> int:
  out = subprocess.run([sys.executable, '-c', _CODE.format(setting=setting)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='mallopt is glibc-only')
def test_large_buffers_are_reused_not_remapped():
  # Fresh processes: the setting lasts for the process.
  assert _faults('') > 10_000            # 65,536 pages, mapped anew
  assert _faults('from utils import host_memory\n'
                 'assert host_memory.keep_freed_memory()') < 1_000
