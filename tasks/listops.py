"""ListOps (Long Range Arena; Nangia & Bowman 2018), generated offline with
the closing brackets kept as tokens (the original LRA tokenizer dropped them,
which made the task ambiguous).

An example is a prefix expression such as `[MAX 2 9 [MIN 4 7 ] 0 ]`; the
label is its value, 0-9. Trees follow the LRA generator: the root is at depth
1; below `max_depth` a node is a digit with probability 0.75, otherwise an
operator chosen uniformly with a uniformly chosen 2..max_args arguments; a
node at `max_depth` is a digit. Trees with min_length < tokens < max_length
are kept, duplicates dropped, until num_train + num_validation + num_test
unique ones exist; they are split in that order. A tree is abandoned as soon
as it reaches max_length tokens, so rejected giants cost little.

Vocabulary: 0 padding, 1 CLS, then the 15 symbols of `SYMBOLS`. The model
sees CLS + tokens (CLS pooling reads position 0), so seq_len = max_length.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tasks import base
from tasks import builders
from utils import progress as progress_lib

CLS = 1
DIGITS = tuple(str(d) for d in range(10))
OPERATORS = ('[MAX', '[MIN', '[MED', '[SM')
CLOSE = ']'
SYMBOLS = DIGITS + OPERATORS + (CLOSE,)
_FIRST_SYMBOL = 2                       # ids 0 and 1 are padding and CLS
ID = {s: _FIRST_SYMBOL + i for i, s in enumerate(SYMBOLS)}
VOCAB_SIZE = _FIRST_SYMBOL + len(SYMBOLS)
NUM_CLASSES = 10
_DIGIT0, _OP0, _CLOSE_ID = ID['0'], ID[OPERATORS[0]], ID[CLOSE]
OPERATOR_PROB = 0.25                    # P(operator) below max_depth (LRA)
# Give up when this many trees in a row bring no new example: the
# parameters admit too few distinct trees (or almost none of the right size).
_MAX_FRUITLESS_TREES = 200_000
_DEEPEST = 200                          # well inside Python's recursion limit


def encode(text: str) -> np.ndarray:
  """Symbol ids of a space-separated expression (no CLS)."""
  return np.array([ID[s] for s in text.split()], np.int32)


def decode(ids: Sequence[int]) -> str:
  """Expression text of symbol ids; padding and CLS are skipped."""
  return ' '.join(SYMBOLS[i - _FIRST_SYMBOL] for i in ids
                  if i >= _FIRST_SYMBOL)


def apply(operator: str, args: Sequence[int]) -> int:
  """Value of one operator node; MED truncates the (averaged) median."""
  if operator == '[MAX':
    return max(args)
  if operator == '[MIN':
    return min(args)
  if operator == '[MED':
    # int(np.median(args)) for non-negative ints, without numpy's per-call
    # overhead (most of the labelling time at LRA scale).
    ordered, mid = sorted(args), len(args) // 2
    if len(args) % 2:
      return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) // 2
  if operator == '[SM':
    return sum(args) % 10
  raise ValueError(f'unknown operator {operator!r}')


def value(ids: Sequence[int]) -> int:
  """Value (0-9) of an expression given as symbol ids (CLS/padding skipped)."""
  stack: list[list] = [[]]              # one frame per open operator
  for i in np.asarray(ids).tolist():    # Python ints iterate ~10x faster
    if i < _FIRST_SYMBOL:
      continue
    symbol = SYMBOLS[i - _FIRST_SYMBOL]
    if symbol in OPERATORS:
      stack.append([symbol])
    elif symbol == CLOSE:
      if len(stack) < 2 or len(stack[-1]) < 2:
        raise ValueError(f'unmatched or empty operator: {decode(ids)!r}')
      operator, *args = stack.pop()
      stack[-1].append(apply(operator, args))
    else:
      stack[-1].append(int(symbol))
  if len(stack) != 1 or len(stack[0]) != 1:
    raise ValueError(f'not one complete expression: {decode(ids)!r}')
  return stack[0][0]


def _uniforms(rng: np.random.Generator, block: int = 1 << 16
              ) -> Iterator[float]:
  # Python floats drawn by numpy in blocks: next() costs ~50 ns where a
  # scalar rng call costs ~1 us, and trees need several draws per node.
  while True:
    yield from rng.random(block).tolist()


def _grow(draw, depth: int, max_depth: int, max_args: int, out: list[int],
          limit: int) -> bool:
  """Appends one random subtree to `out`; False once it reaches `limit`."""
  if depth >= max_depth or draw() >= OPERATOR_PROB:
    out.append(_DIGIT0 + int(draw() * 10))
    return len(out) < limit
  out.append(_OP0 + int(draw() * len(OPERATORS)))
  for _ in range(2 + int(draw() * (max_args - 1))):
    if not _grow(draw, depth + 1, max_depth, max_args, out, limit):
      return False
  out.append(_CLOSE_ID)
  return len(out) < limit


def random_tree(draw, max_depth: int, max_args: int,
                max_length: int) -> bytes | None:
  """Symbol ids of one random tree as bytes, or None if >= max_length."""
  out: list[int] = []
  if not _grow(draw, 1, max_depth, max_args, out, max_length):
    return None
  return bytes(out)                     # ids < 256: compact, hashable


def unique_trees(params: Mapping[str, Any], total: int) -> list[bytes]:
  """`total` distinct trees of the allowed lengths, in generation order."""
  draw = _uniforms(np.random.default_rng(params['data_seed'])).__next__
  min_length, max_length = params['min_length'], params['max_length']
  seen: set[bytes] = set()
  trees: list[bytes] = []
  progress = progress_lib.Progress('listops', total)
  tried = fruitless = 0
  while len(trees) < total:
    tree = random_tree(draw, params['max_depth'], params['max_args'],
                       max_length)
    tried += 1
    fruitless += 1
    if tree is not None and len(tree) > min_length and tree not in seen:
      seen.add(tree)
      trees.append(tree)
      fruitless = 0
      progress.update(len(trees), f', {tried} trees tried')
    elif fruitless >= _MAX_FRUITLESS_TREES:
      raise ValueError(
          f'ListOps found only {len(trees)} of {total} distinct trees with '
          f'{min_length} < length < {max_length}, max_depth='
          f'{params["max_depth"]}, max_args={params["max_args"]}; widen the '
          'lengths, raise max_depth/max_args or ask for fewer examples')
  progress.done()
  return trees


def _example(tree: bytes) -> dict[str, Any]:
  tokens = np.frombuffer(tree, np.uint8).astype(np.int32)
  return {'tokens': tokens, 'label': np.int32(value(tokens))}


def splits(params: Mapping[str, Any]) -> dict[str, Iterable[dict[str, Any]]]:
  """All trees at once (uniqueness holds across splits), split in order.

  Trees stay compact bytes until written (~100 MB at LRA scale); examples
  are made lazily.
  """
  sizes = params['counts']
  trees = unique_trees(params, sum(sizes.values()))
  out, start = {}, 0
  for split in base.SPLITS:
    out[split] = map(_example, trees[start:start + sizes[split]])
    start += sizes[split]
  return out


class Listops(builders.OfflineBuilder, skip_registration=True):
  """ListOps (LRA) with brackets kept; generated offline."""
  name = 'listops'
  FEATURES = builders.classify_features
  GENERATE = splits


def longest_tree(max_depth: int, max_args: int) -> int:
  """Tokens in the largest possible tree (every node max_args operators)."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def check(task_config) -> None:
  """ValueError naming the field for parameters no tree can satisfy."""
  builders.check_range('max_depth', task_config.max_depth, 1, _DEEPEST,
                       because='trees are grown by recursion')
  builders.check_range('max_args', task_config.max_args, 2)
  builders.check_range('min_length', task_config.min_length, 0)
  builders.check_range(
      'max_length', task_config.max_length, task_config.min_length + 2,
      because='min_length < length < max_length needs a length in between')
  longest = longest_tree(task_config.max_depth, task_config.max_args)
  builders.check_range(
      'min_length', task_config.min_length, 0, longest - 1,
      because=f'the largest tree with max_depth={task_config.max_depth}, '
      f'max_args={task_config.max_args} has {longest} tokens')
  builders.check_counts_and_seed(task_config)


def params(task_config) -> dict[str, Any]:
  return builders.generator_params(
      task_config, ('min_length', 'max_length', 'max_depth', 'max_args'))


def config_name(task_config) -> str:
  c = task_config
  return builders.config_name(c, f'len{c.min_length}-{c.max_length}',
                              f'd{c.max_depth}', f'a{c.max_args}')


def token_name(i: int) -> str:
  """'' for padding, 'CLS', else the symbol."""
  return ('', 'CLS')[i] if i < _FIRST_SYMBOL else SYMBOLS[i - _FIRST_SYMBOL]


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = int(task_config.max_length)  # CLS + at most max_length - 1 symbols
  return base.Task(
      name='listops', vocab_size=VOCAB_SIZE, seq_len=seq_len,
      num_classes=NUM_CLASSES, head='classify', causal=False, cls_token=True,
      token_name=token_name, sources=builders.sources(
          Listops, config_name(task_config), params(task_config), data_dir,
          builders.classify_preprocess(seq_len, prefix=(CLS,))))
