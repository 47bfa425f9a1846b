"""Batches for training and evaluation, with grain.

Training batch i is a pure function of (source, batch size, seed, i): the
shuffled, repeated and batched grain MapDataset is indexed by step, so a run
resumed at step s sees exactly the batches an uninterrupted run would (each
epoch is reshuffled). Evaluation walks a split in order in batches of one
fixed size, so nothing recompiles: the last batch is filled up with copies
of its last row, and the caller keeps only the first `real` rows of what
comes back.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np


def train_batches(source: Sequence, batch_size: int, seed: int):
  """Random-access dataset: `ds[step]` is the batch for that step."""
  if len(source) < batch_size:
    raise ValueError(f'train.batch_size={batch_size} exceeds the '
                     f'{len(source)} training examples')
  return (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
          .batch(batch_size, drop_remainder=True))


def eval_batches(source: Sequence, batch_size: int) -> Iterator[tuple[dict, int]]:
  """(batch, number of real rows) over a split in order, last batch padded."""
  n = len(source)
  for start in range(0, n, batch_size):
    rows = [source[i] for i in range(start, min(start + batch_size, n))]
    real = len(rows)
    rows += [rows[-1]] * (batch_size - real)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    yield batch, real
