"""Turns command-line config mistakes into one line that says what to change.

ml_collections reports an unknown preset or an unknown `--config.x.y`
override as a multi-screen traceback; `explain` reloads the config file and
names the bad field and its valid siblings instead.
"""
from __future__ import annotations

import importlib.util
import re


def load(config_arg: str):
  """get_config(preset) of a 'path.py[:preset]' argument."""
  path, _, preset = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location('_user_config', path)
  if spec is None or spec.loader is None:
    raise ValueError(f'--config={config_arg}: no such config file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset or None)


def _unknown_override(config, argv) -> str | None:
  for arg in argv:
    m = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split('.'):
      if not hasattr(node, 'keys') or part not in node:
        where = '.'.join(walked) or 'config'
        valid = ', '.join(sorted(node.keys())) if hasattr(node, 'keys') else ''
        return (f'unknown config field {m.group(1)!r}: {where} has no field '
                f'{part!r}' + (f'; valid: {valid}' if valid else ''))
      node = node[part]
      walked.append(part)
  return None


def explain(error: Exception, argv) -> str:
  """One line for a flag-parsing failure of the config flag."""
  text = str(error)
  config_arg = next((a.split('=', 1)[1] for a in argv
                     if a.startswith('--config=')), None)
  if config_arg:
    try:
      config = load(config_arg)
    except (ValueError, FileNotFoundError, OSError) as e:
      return f'--config={config_arg}: {e}'
    bad = _unknown_override(config, argv)
    if bad:
      return bad
  # Otherwise the innermost ValueError (e.g. a bad override value type).
  found = re.findall(r'(?:ValueError|TypeError|KeyError): (.+)', text)
  return found[-1].strip() if found else text.strip().splitlines()[0]
