"""What every task gives the trainer: data sources of fixed-shape examples
plus the facts the model head and the metrics need.

A task module exposes `make(task_config, data_dir) -> Task`. The TFDS builder
behind it generates its data offline on first use into `data_dir`
(deterministic from the config's seed) and is read back as an array_record
data source; `Task.source(split)` returns a random-access sequence of
preprocessed numpy examples, all of the same shape:

  classification tasks ('classify' head):
    inputs  int32 [seq_len]   token ids, 0 is padding (right-padded)
    length  int32 []          number of valid tokens
    label   int32 []          class id in [0, num_classes)
  per-position tasks ('per_position' head):
    inputs  int32 [seq_len]
    length  int32 []
    targets int32 [seq_len]   class id per position
    weights float32 [seq_len] 1.0 where the position is scored, else 0.0
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  vocab_size: int        # embedding rows, padding id 0 included
  seq_len: int           # model input length after preprocessing
  num_classes: int       # classes per example ('classify') or per position
  head: str              # 'classify' | 'per_position'
  causal: bool           # whether attention must be causal for this task
  sources: Callable[[str], Sequence[dict[str, Any]]]  # split -> examples

  def source(self, split: str):
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
    return self.sources(split)
