"""Batches for training and evaluation, with grain.

Training batch i is a pure function of (source, batch size, seed, i): the
shuffled, repeated and batched grain MapDataset is indexed by step, so a run
resumed at step s sees exactly the batches an uninterrupted run would (each
epoch is reshuffled). In a run of several processes each reads only its
rows of each batch (`rows`), the rows its devices hold. Evaluation walks a split in order in batches of one
fixed size, so nothing recompiles: the last batch is filled up with copies
of its last row, and the caller keeps only the first `real` rows of what
comes back.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np


def train_batches(source: Sequence, batch_size: int, seed: int,
                  rows: tuple[int, int] | None = None):
  """Random-access dataset: `ds[step]` is the batch for that step, or with
  `rows` = (start, stop) only those rows of it (what one process of a
  multi-process run reads: nothing else of the batch is loaded)."""
  if len(source) < batch_size:
    raise ValueError(f'train.batch_size={batch_size} exceeds the '
                     f'{len(source)} training examples')
  examples = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
  if rows is None or rows == (0, batch_size):
    return examples.batch(batch_size, drop_remainder=True)
  return _Rows(examples, batch_size, *rows)


class _Rows:
  """Rows [start, stop) of each batch of the shuffled, repeated stream:
  row r of batch i is its example i * batch_size + r, as in the batched
  dataset, so every process's rows together make the same batch."""

  def __init__(self, examples, batch_size: int, start: int, stop: int):
    self.examples, self.batch_size = examples, batch_size
    self.start, self.stop = start, stop

  def __getitem__(self, step: int) -> dict:
    first = step * self.batch_size
    return _stack([self.examples[first + r]
                   for r in range(self.start, self.stop)])


def _stack(rows: list[dict]) -> dict:
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def eval_batches(source: Sequence, batch_size: int,
                 rows: tuple[int, int] | None = None
                 ) -> Iterator[tuple[dict, int]]:
  """(batch, number of real rows) over a split in order, last batch padded
  (with copies of its last real row); with `rows` = (start, stop), only
  those rows of each batch (the count of real rows stays the whole
  batch's)."""
  n = len(source)
  start, stop = rows or (0, batch_size)
  for first in range(0, n, batch_size):
    real = min(batch_size, n - first)
    # Padding repeats the batch's last real example.
    indices = [first + min(r, real - 1) for r in range(start, stop)]
    yield _stack([source[i] for i in indices]), real
