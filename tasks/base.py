"""What every task gives the trainer: data sources of fixed-shape examples
plus the facts its head needs.

A task module exposes `make(task_config, data_dir) -> Task`. The TFDS builder
behind it generates its data offline on first use into `data_dir`
(deterministic from the config's seed) and is read back as an array_record
data source; `Task.source(split)` returns a random-access sequence of
preprocessed numpy examples, all of the same shape, with the fields its head
reads (`tasks.heads.<head>.FIELDS`, documented in each head's module):
'classify' (inputs, length, label), 'per_position' (inputs, length, targets,
weights), 'match' (two documents: inputs [2, n], length [2], label).
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
  num_classes: int       # classes per example or per position
  head: str              # a name of tasks.heads.NAMES
  causal: bool           # whether attention must be causal for this task
  sources: Callable[[str], Sequence[dict[str, Any]]]  # split -> examples
  cls_token: bool = False  # whether position 0 of every input is a CLS token
  # token id -> a short label for pictures (--mode=visualize); None when the
  # tokens are not worth reading one by one (pixels)
  token_name: Callable[[int], str] | None = None
  # token ids -> text for generation metrics (BLEU, ROUGE); None: the
  # tokens' names joined by spaces (copy's symbols as words)
  text: Callable[[Sequence[int]], str] | None = None

  def as_text(self, tokens: Sequence[int]) -> str:
    if self.text is not None:
      return self.text(tokens)
    name = self.token_name or str
    return ' '.join(name(int(t)) for t in tokens)

  def source(self, split: str):
    if split not in SPLITS:
      raise ValueError(f'unknown split {split!r}; valid: {", ".join(SPLITS)}')
    return self.sources(split)
