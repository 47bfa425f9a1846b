"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023),
generated offline as a causal next-token task.

A sequence of `seq_len` tokens starts with `num_pairs` key-value pairs
`k1 v1 k2 v2 ...` (distinct keys from the lower half of the vocabulary,
[1, V/2); distinct values from the upper half, [V/2, V); drawn afresh per
example, so only recall from the context can answer). The rest of the
sequence is cut into 2-token slots; each key is asked once, as `k 0` in a
slot chosen uniformly at random without replacement, in random order. Other
positions hold 0. The model reads the sequence causally and is scored only
at each query key, where the target is that key's value. As in Zoology, the
value is only a target (the record's `answers`), never an input: if it
followed its query in the inputs, every answered query would rule its value
out for the later ones, and guessing among the values not yet seen would
score H_n / n (34% for 8 pairs) without any recall.

Differences from Zoology's `multiquery_ar`, on purpose:
  - query slots are uniform over the rest of the sequence (Zoology biases
    them toward the start with a power law, power_a=0.01), so recall
    distances span the whole sequence;
  - filler is 0 (Zoology's default replaces filler by random tokens from the
    whole vocabulary). All seq_len positions are valid input: length =
    seq_len, and 0 here is an ordinary filler token, not padding.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base
from tasks import builders

def key_range(vocab_size: int) -> tuple[int, int]:
  """[low, high) of key ids: the lower half, without padding id 0."""
  return 1, vocab_size // 2


def value_range(vocab_size: int) -> tuple[int, int]:
  """[low, high) of value ids: the upper half."""
  return vocab_size // 2, vocab_size


def distinct_rows(rng: np.random.Generator, rows: int, low: int, high: int,
                  size: int) -> np.ndarray:
  """[rows, size] ints from [low, high), distinct within a row, in random
  order (the `size` smallest of uniform scores, ordered by score)."""
  scores = rng.random((rows, high - low))
  picked = np.argpartition(scores, size - 1, axis=1)[:, :size]
  order = np.argsort(np.take_along_axis(scores, picked, axis=1), axis=1)
  return low + np.take_along_axis(picked, order, axis=1)


def sequences(rng: np.random.Generator, rows: int, seq_len: int,
              num_pairs: int, vocab_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """tokens, scored and answers, each [rows, seq_len]: the inputs; True on
  the slot after each query; the inputs with each query's value in that
  slot (where the inputs hold 0)."""
  keys = distinct_rows(rng, rows, *key_range(vocab_size), num_pairs)
  values = distinct_rows(rng, rows, *value_range(vocab_size), num_pairs)
  context = 2 * num_pairs
  slots = distinct_rows(rng, rows, 0, (seq_len - context) // 2, num_pairs)
  query_at = context + 2 * slots        # position of the i-th key's query
  tokens = np.zeros((rows, seq_len), np.int32)
  tokens[:, 0:context:2] = keys
  tokens[:, 1:context:2] = values
  np.put_along_axis(tokens, query_at, keys, axis=1)
  answers = tokens.copy()
  np.put_along_axis(answers, query_at + 1, values, axis=1)
  scored = np.zeros((rows, seq_len), bool)
  np.put_along_axis(scored, query_at + 1, True, axis=1)
  return tokens, scored, answers


def splits(params: Mapping[str, Any]) -> dict[str, Iterable[dict]]:
  rows = functools.partial(sequences, seq_len=params['seq_len'],
                           num_pairs=params['num_pairs'],
                           vocab_size=params['vocab_size'])
  # distinct_rows scores every key candidate and every slot of a row.
  values_per_row = params['vocab_size'] + params['seq_len']
  return builders.per_position_splits('mqar', params, values_per_row, rows)


class Mqar(builders.OfflineBuilder, skip_registration=True):
  """Multi-query associative recall (Zoology); generated offline."""
  name = 'mqar'
  VERSION = tfds.core.Version('2.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'First generator.',
      '2.0.0': 'Values are answers only, not inputs after their query.',
  }
  FEATURES = builders.per_position_answer_features
  GENERATE = splits


def check(task_config) -> None:
  """ValueError naming the field for parameters no sequence can satisfy."""
  c = task_config
  builders.check_range('vocab_size', c.vocab_size, 4)
  key_low, key_high = key_range(c.vocab_size)
  builders.check_range(
      'num_pairs', c.num_pairs, 1, key_high - key_low,
      because=f'distinct keys from [{key_low}, {key_high}) for vocab_size='
      f'{c.vocab_size}')
  builders.check_range(
      'seq_len', c.seq_len, 4 * c.num_pairs,
      because=f'{c.num_pairs} pairs and their queries take 2 tokens each')
  builders.check_counts_and_seed(c)


def params(task_config) -> dict[str, Any]:
  return builders.generator_params(task_config,
                                   ('seq_len', 'num_pairs', 'vocab_size'))


def config_name(task_config) -> str:
  c = task_config
  return builders.config_name(c, f'seq{c.seq_len}', f'p{c.num_pairs}',
                              f'v{c.vocab_size}')


def token_namer(vocab_size: int):
  """id -> 'k<id>' for a key, 'v<id>' for a value, '.' for filler 0."""
  low = value_range(vocab_size)[0]
  return lambda i: '.' if i == 0 else (f'k{i}' if i < low else f'v{i}')


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = int(task_config.seq_len)
  return base.Task(
      name='mqar', vocab_size=int(task_config.vocab_size), seq_len=seq_len,
      num_classes=int(task_config.vocab_size), head='per_position',
      causal=True, token_name=token_namer(int(task_config.vocab_size)),
      sources=builders.sources(
          Mqar, config_name(task_config), params(task_config), data_dir,
          builders.next_token_preprocess(seq_len)))
