"""The shape of the code: layers import one way, configs are data, and the
trainer and the model never branch on a head's name.

Layers, top to bottom: main.py -> evaluate -> train -> tasks, models ->
attention_variants; utils is below everything; configs are data that only
read the registries of attention_variants and tasks.
"""
import ast
import os
import subprocess
import sys

import pytest

import tasks
from tasks import heads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('attention_variants', 'configs', 'evaluate', 'models', 'tasks',
            'train', 'utils')
# package -> the project packages its modules may import.
ALLOWED = {
    'utils': set(),
    'attention_variants': {'utils'},
    'models': {'attention_variants', 'utils'},
    'tasks': {'utils'},
    'train': {'attention_variants', 'models', 'tasks', 'utils'},
    'evaluate': {'attention_variants', 'configs', 'models', 'tasks', 'train',
                 'utils'},
    'configs': {'attention_variants', 'tasks', 'utils'},
}


def _modules(package):
  for root, _, files in os.walk(os.path.join(ROOT, package)):
    for name in sorted(files):
      if name.endswith('.py'):
        yield os.path.join(root, name)


def _imports(path):
  """Top-level names of the project packages a module imports."""
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name.split('.')[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      found.add(node.module.split('.')[0])
  return found & set(PACKAGES)


@pytest.mark.parametrize('package', sorted(ALLOWED))
def test_layers_import_one_way(package):
  bad = {}
  for path in _modules(package):
    wrong = _imports(path) - ALLOWED[package] - {package}
    if wrong:
      bad[os.path.relpath(path, ROOT)] = sorted(wrong)
  assert not bad, f'imports against the layers: {bad}'


def test_every_package_has_a_rule():
  found = {name for name in os.listdir(ROOT)
           if os.path.isfile(os.path.join(ROOT, name, '__init__.py'))}
  assert found == set(ALLOWED)


def test_configs_are_data():
  """Importing every config (and building every preset) loads neither jax
  nor TFDS."""
  configs = sorted(name[:-3] for name in os.listdir(os.path.join(ROOT,
                                                                 'configs'))
                   if name.endswith('.py') and name != '__init__.py')
  code = '\n'.join([
      'import importlib, sys',
      f'for name in {configs!r}:',
      '  m = importlib.import_module("configs." + name)',
      '  if hasattr(m, "get_config"):',
      '    m.get_config()',
      'bad = [m for m in ("jax", "jaxlib", "flax", "tensorflow_datasets",',
      '                   "tensorflow") if m in sys.modules]',
      'print(bad)',
  ])
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]', out.stdout


def test_registries_are_data():
  code = ('import sys, attention_variants, tasks, tasks.heads; '
          'print([m for m in ("jax", "tensorflow_datasets") '
          'if m in sys.modules])')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == '[]', out.stdout


def test_trainer_and_model_never_name_a_head():
  names = set(heads.NAMES)
  for package in ('train', 'models'):
    for path in _modules(package):
      tree = ast.parse(open(path).read(), path)
      strings = {n.value for n in ast.walk(tree)
                 if isinstance(n, ast.Constant) and isinstance(n.value, str)}
      assert not strings & names, (path, strings & names)


def test_each_task_names_its_config_module():
  for name in tasks.NAMES:
    assert tasks.get_config(name, 'smoke').task.name == name
