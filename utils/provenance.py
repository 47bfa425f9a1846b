"""Which code produced a result: the git commit of the checkout that runs,
recorded in results.json and benchmark.json so a table's numbers can be
traced to the code that made them."""
from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(root: str, *args: str) -> str | None:
  try:
    out = subprocess.run(['git', '-C', root, *args], capture_output=True,
                         text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def code_version(root: str = ROOT) -> dict | None:
  """{'commit': HEAD's hash, 'dirty': tracked files differ from it}, or
  None where `root` is not a git checkout or git is missing (an installed
  copy, an unpacked archive)."""
  commit = _git(root, 'rev-parse', 'HEAD')
  if not commit:
    return None
  status = _git(root, 'status', '--porcelain', '--untracked-files=no')
  return {'commit': commit, 'dirty': bool(status)}
