"""Duplication task of the Reformer paper (Kitaev et al. 2020), offline.

A sequence is `S w S w`: a separator, a word w of `word_length` symbols drawn
uniformly, the separator again, and w again (Reformer: w of 511 symbols from
1..127, 1024 tokens in all). The model reads it causally and is scored only
where the next token belongs to the second copy of w, which it can predict
only by attending word_length + 1 positions back.

Ids are shifted from the paper's so that the separator is not the padding
id: 0 padding, 1 separator, symbols 2..num_symbols+1; vocab_size =
num_symbols + 2 and seq_len = 2 * word_length + 2.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from tasks import base
from tasks import builders

SEPARATOR = 1
FIRST_SYMBOL = 2


def vocab_size(num_symbols: int) -> int:
  return FIRST_SYMBOL + num_symbols


def sequences(rng: np.random.Generator, rows: int, word_length: int,
              num_symbols: int) -> tuple[np.ndarray, np.ndarray]:
  """tokens [rows, 2L+2] and scored [rows, 2L+2] (True on the second w)."""
  words = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + num_symbols,
                       size=(rows, word_length), dtype=np.int32)
  separator = np.full((rows, 1), SEPARATOR, np.int32)
  tokens = np.concatenate([separator, words, separator, words], axis=1)
  scored = np.zeros(tokens.shape, bool)
  scored[:, word_length + 2:] = True
  return tokens, scored


def splits(params: Mapping[str, Any]) -> dict[str, Iterable[dict]]:
  rows = functools.partial(sequences, word_length=params['word_length'],
                           num_symbols=params['num_symbols'])
  return builders.per_position_splits('copy', params, params['word_length'],
                                      rows)


class Copy(builders.OfflineBuilder, skip_registration=True):
  """Reformer duplication task `S w S w`; generated offline."""
  name = 'copy'
  FEATURES = builders.per_position_features
  GENERATE = splits


def check(task_config) -> None:
  """ValueError naming the field for impossible parameters."""
  builders.check_range('word_length', task_config.word_length, 1)
  builders.check_range('num_symbols', task_config.num_symbols, 1)
  builders.check_counts_and_seed(task_config)


def params(task_config) -> dict[str, Any]:
  return builders.generator_params(task_config,
                                   ('word_length', 'num_symbols'))


def config_name(task_config) -> str:
  c = task_config
  return builders.config_name(c, f'w{c.word_length}', f's{c.num_symbols}')


def token_name(i: int) -> str:
  """'' for padding, 'S' for the separator, else the symbol's number."""
  return ('', 'S')[i] if i < FIRST_SYMBOL else str(i - FIRST_SYMBOL)


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = 2 * int(task_config.word_length) + 2
  vocab = vocab_size(int(task_config.num_symbols))
  return base.Task(
      name='copy', vocab_size=vocab, seq_len=seq_len, num_classes=vocab,
      head='per_position', causal=True, token_name=token_name,
      sources=builders.sources(
          Copy, config_name(task_config), params(task_config), data_dir,
          builders.next_token_preprocess(seq_len)))
