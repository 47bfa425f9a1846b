"""Dotted paths ('train.num_steps') into nested mappings: configs
(ConfigDict or dict) and records such as results.json."""
from __future__ import annotations


def flatten(tree, prefix: str = '') -> dict:
  """{'a.b': leaf} of a nested mapping (anything with .items())."""
  out = {}
  for key, value in (tree.items() if tree is not None else ()):
    path = f'{prefix}{key}'
    if hasattr(value, 'items'):
      out.update(flatten(value, path + '.'))
    else:
      out[path] = value
  return out


def walk(tree, dotted: str):
  """(value, None) at the path, or (None, (parent path, parent, missing
  part)) for the first part that is not there."""
  node, walked = tree, []
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return None, ('.'.join(walked), node, part)
    node = node[part]
    walked.append(part)
  return node, None


def get(tree, dotted: str):
  """tree[a][b]... for 'a.b'; KeyError naming the path when absent."""
  value, missing = walk(tree, dotted)
  if missing is not None:
    raise KeyError(f'missing {dotted}')
  return value


def set_value(tree, dotted: str, value, where: str) -> None:
  """Sets an existing field at a dotted path; ValueError naming `where` and
  the path when there is no such field or the value has the wrong type."""
  *parents, leaf = dotted.split('.')
  node, missing = walk(tree, '.'.join(parents)) if parents else (tree, None)
  if missing is not None or not hasattr(node, 'keys') or leaf not in node:
    raise ValueError(f'{where}: {dotted!r} is not a field of the run config')
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f'{where}: {dotted}={value!r} has the wrong type ({e})'
                     ) from e
