"""utils.provenance: the commit of the running checkout, or None."""
import shutil
import subprocess

import pytest

from utils import provenance


def test_a_checkout_reports_its_head_commit(tmp_path):
  if shutil.which('git') is None:
    pytest.skip('git is not installed')
  run = lambda *a: subprocess.run(['git', '-C', str(tmp_path), *a],
                                  check=True, capture_output=True, text=True)
  run('init', '-q')
  (tmp_path / 'f.txt').write_text('one\n')
  run('add', 'f.txt')
  run('-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'c')
  head = run('rev-parse', 'HEAD').stdout.strip()
  assert provenance.code_version(str(tmp_path)) == {'commit': head,
                                                     'dirty': False}
  (tmp_path / 'f.txt').write_text('two\n')
  (tmp_path / 'untracked.txt').write_text('x\n')  # ignored: not tracked
  assert provenance.code_version(str(tmp_path)) == {'commit': head,
                                                     'dirty': True}


def test_outside_a_checkout_it_is_none(tmp_path):
  assert provenance.code_version(str(tmp_path)) is None
