"""Turns command-line config mistakes into one line that says what to change.

ml_collections reports an unknown preset or an unknown `--config.x.y`
override as a multi-screen traceback; `explain` reloads the config file and
names the bad field and its valid siblings instead.
"""
from __future__ import annotations

import importlib.util
import os
import re
import traceback

from utils import paths


def load(config_arg: str):
  """get_config(preset) of a 'path.py[:preset]' argument."""
  path, _, preset = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('_user_config', path)
  if spec is None or spec.loader is None:
    raise ValueError(f'--config={config_arg}: no such config file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset or None)


def describe_load_error(e: BaseException, path: str) -> str:
  """One line for an exception raised while loading a config file: the
  file and line for a syntax error or a crash in its code."""
  if isinstance(e, SyntaxError):
    return f'{e.filename or path} line {e.lineno}: {e.msg}'
  if isinstance(e, (ValueError, FileNotFoundError)):
    return str(e)   # our own messages (unknown preset, missing file)
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  where = f' ({path} line {frames[-1].lineno})' if frames else ''
  return f'{type(e).__name__}: {e}{where}'


def _unknown_override(config, argv) -> str | None:
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if not m:
      continue
    _, missing = paths.walk(config, m.group(1))
    if missing is not None:
      where, node, part = missing
      valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else ''
      return (f'unknown config field {m.group(1)!r}: {where or "config"} has '
              f'no field {part!r}' + (f'; valid: {valid}' if valid else ''))
  return None


def explain(error: Exception, argv) -> str:
  """One line for a flag-parsing failure of the config flag."""
  text = str(error)
  config_arg = next((a.split('=', 1)[1] for a in argv
                     if a.startswith('--config=')), None)
  if config_arg:
    try:
      config = load(config_arg)
    except Exception as e:  # noqa: BLE001  whatever the user's file raises
      return (f'--config={config_arg}: '
              f'{describe_load_error(e, config_arg.partition(":")[0])}')
    bad = _unknown_override(config, argv)
    if bad:
      return bad
  # Otherwise the innermost ValueError (e.g. a bad override value type).
  found = re.findall(r'(?:ValueError|TypeError|KeyError): (.+)', text)
  return found[-1].strip() if found else text.strip().splitlines()[0]
