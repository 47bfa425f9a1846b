"""Byte-level language modelling: predict the next byte of real text.

Tokens are UTF-8 bytes + 1 (1..256, as in tasks/text.py), 0 pads, and DOC
(257) starts every document; vocabulary 258. The model reads causally and
the `lm` head scores every position whose next token is a byte (a DOC
target is not scored): loss in nats per byte, perplexity per byte and bits
per byte (tasks/heads/lm.py).

Datasets (`task.dataset`):
  pystdlib  (offline default) the .py files of this Python installation's
      standard library (sysconfig's 'stdlib' directory; test packages,
      site-packages and build folders left out: `documents`), about 740
      files and 12 MB for CPython 3.11: real code and prose written by
      CPython's authors, with structure at every range (a name defined
      thousands of bytes before its use). Documents are files; a file's
      split comes from a hash of (data_seed, its relative path), about
      `validation_percent` % to validation and `test_percent` % to test,
      so splits never share a document and do not move when another file
      is added. Each split's documents, in path order, form one stream
      DOC file DOC file ..., cut into windows of max_length + 1 tokens that
      overlap by one (every byte is a target exactly once; the last window
      is shorter and padded). The Python version is part of the data's
      name: another installation makes another dataset.
  lm1b  TFDS's One Billion Word benchmark (`lm1b`, downloaded and
      prepared on first use when `task.download` is True): one sentence
      per example (DOC, its bytes, truncated to max_length + 1 tokens,
      padded); validation is `validation_percent` % of train chosen at
      random by `data_seed`, test is lm1b's test split.

`num_train`, `num_validation`, `num_test` cap a split's examples (0: all);
the offline windows are written once per (Python version, max_length,
split percentages, seed) and capped on read.
"""
from __future__ import annotations

import functools
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base, builders, text

DOC_ID = text.CLS_ID               # 257: starts every document
VOCAB_SIZE = text.VOCAB_SIZE       # 258: padding, 256 bytes, DOC
DATASETS = ('pystdlib', 'lm1b')
LM1B = 'lm1b'
# Folders of the standard library that are not its sources: test suites,
# installed third-party packages, compiled extensions, the build config.
SKIPPED_DIRS = frozenset({'test', 'tests', 'idle_test', '__pycache__',
                          'site-packages', 'dist-packages', 'lib-dynload'})


def token_name(i: int) -> str:
  return 'DOC' if i == DOC_ID else text.token_name(i)


def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def python_version() -> str:
  return '.'.join(str(x) for x in sys.version_info[:3])


def documents(root: str) -> list[str]:
  """The standard library's .py files under root, as sorted relative paths
  (folders in SKIPPED_DIRS and config-* build folders left out)."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs
                     if d not in SKIPPED_DIRS and not d.startswith('config-'))
    rel = os.path.relpath(folder, root)
    found += [os.path.normpath(os.path.join(rel, f)) for f in files
              if f.endswith('.py')]
  return sorted(found)


def split_of(path: str, seed: int, validation_percent: int,
             test_percent: int) -> str:
  """A document's split, from a hash of (seed, its relative path)."""
  bucket = zlib.crc32(f'{seed}:{path}'.encode()) % 100
  if bucket < test_percent:
    return 'test'
  return 'validation' if bucket < test_percent + validation_percent else 'train'


def windows(stream: np.ndarray, seq_len: int) -> Iterator[np.ndarray]:
  """Windows of seq_len + 1 tokens, each starting where the last one's
  inputs end (one token of overlap: every token after the first is a
  target once); the last may be shorter."""
  for start in range(0, max(len(stream) - 1, 0), seq_len):
    yield stream[start:start + seq_len + 1]


def lm_record(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """{'tokens', 'scored'}: scored where the token is a byte."""
  tokens = np.asarray(tokens, np.int32)
  return {'tokens': tokens, 'scored': tokens != DOC_ID}


def stdlib_splits(params: Mapping[str, Any]) -> dict[str, Iterator[dict]]:
  root = params['source_dir']
  paths = documents(root)
  by_split = {split: [] for split in base.SPLITS}
  for path in paths:
    by_split[split_of(path, params['data_seed'],
                      params['validation_percent'],
                      params['test_percent'])].append(path)

  def examples(split):
    parts = []
    for path in by_split[split]:
      with open(os.path.join(root, path), 'rb') as f:
        parts += [[DOC_ID], text.byte_tokens(f.read())]
    stream = np.concatenate(parts).astype(np.int32) if parts else np.zeros(
        0, np.int32)
    for window in windows(stream, params['max_length']):
      yield lm_record(window)
  return {split: examples(split) for split in base.SPLITS}


class StdlibText(builders.OfflineBuilder, skip_registration=True):
  """Windows of the Python standard library's sources as bytes."""
  name = 'pystdlib_lm'
  FEATURES = builders.per_position_features
  GENERATE = stdlib_splits

  def check_inputs(self) -> None:
    p = self.builder_config.params
    paths = documents(p['source_dir'])
    if not paths:
      raise FileNotFoundError(
          f'no .py files under {p["source_dir"]}: task.dataset=pystdlib reads '
          'the standard library of the Python that runs main.py, or the '
          'folder in --config.task.source_dir')
    found = {split_of(path, p['data_seed'], p['validation_percent'],
                      p['test_percent']) for path in paths}
    for split in base.SPLITS:
      if split not in found:
        raise ValueError(
            f'none of the {len(paths)} documents under {p["source_dir"]} '
            f'falls in {split} (task.validation_percent='
            f'{p["validation_percent"]}, task.test_percent='
            f'{p["test_percent"]}): point --config.task.source_dir at more '
            'files, or raise those percentages')


def lm_example(record: Mapping[str, Any], seq_len: int
               ) -> dict[str, np.ndarray]:
  """A window (seq_len + 1 tokens or fewer) as a next-token example:
  inputs its tokens but the last, targets the tokens after them, weighted
  where the target is scored."""
  tokens = np.asarray(record['tokens'], np.int32)
  scored = np.asarray(record['scored'], bool)
  return {'inputs': builders.padded(tokens[:-1], seq_len),
          'length': np.int32(max(len(tokens) - 1, 0)),
          'targets': builders.padded(tokens[1:], seq_len),
          'weights': builders.padded(scored[1:], seq_len, np.float32)}


def sentence_example(record: Mapping[str, Any], seq_len: int
                     ) -> dict[str, np.ndarray]:
  """A TFDS {'text'} record (lm1b) as DOC + its bytes, cut to fit."""
  tokens = np.concatenate([[DOC_ID], text.byte_tokens(record['text'])])
  return lm_example(lm_record(tokens[:seq_len + 1]), seq_len)


class Lm1bSources:
  """split -> Examples over TFDS's lm1b (validation cut from train)."""

  def __init__(self, data_dir: str, download: bool, seq_len: int,
               validation_percent: int, seed: int, limits: Mapping[str, int]):
    self.data_dir = builders.absolute(data_dir)
    self.download = download
    self.preprocess = functools.partial(sentence_example, seq_len=seq_len)
    self.validation_percent = validation_percent
    self.seed = seed
    self.limits = dict(limits)

  def __call__(self, split: str) -> builders.Examples:
    builder = builders.prepare_catalog(
        tfds.builder(LM1B, data_dir=self.data_dir), LM1B, self.data_dir,
        self.download, offline='pystdlib')
    limit = self.limits.get(split, 0)
    if split == 'test':
      return builders.Examples(builder.as_data_source('test'),
                               self.preprocess, limit)
    train = builder.as_data_source('train')
    kept, held = builders.validation_cut(len(train), self.validation_percent,
                                         self.seed)
    return builders.Examples(
        text.Subset(train, kept if split == 'train' else held),
        self.preprocess, limit)


def check(task_config) -> None:
  if task_config.dataset not in DATASETS:
    raise ValueError(f'task.dataset={task_config.dataset!r}; valid: '
                     f'{", ".join(DATASETS)}')
  builders.check_range('max_length', task_config.max_length, 2,
                       because='a DOC token and at least one byte')
  builders.check_range('validation_percent', task_config.validation_percent,
                       1, 98)
  builders.check_range('test_percent', task_config.test_percent, 1,
                       99 - task_config.validation_percent,
                       because='validation and test leave some training '
                       'documents')
  for field in ('num_train', 'num_validation', 'num_test'):
    builders.check_range(field, task_config[field], 0,
                         because='0 keeps every example')
  builders.check_range('data_seed', task_config.data_seed, 0)


def limits(task_config) -> dict[str, int]:
  return {split: int(task_config[f'num_{split}']) for split in base.SPLITS}


def stdlib_params(task_config) -> tuple[str, dict[str, Any]]:
  """(config name, generator params) of the offline corpus's windows."""
  c = task_config
  params = {'source_dir': os.path.abspath(c.source_dir or stdlib_dir()),
            'max_length': int(c.max_length),
            'validation_percent': int(c.validation_percent),
            'test_percent': int(c.test_percent),
            'data_seed': int(c.data_seed)}
  # The sources are the Python's own unless the config points elsewhere;
  # either way the name says which, so two corpora never share files.
  origin = (f'py{python_version()}' if not c.source_dir else
            f'dir{zlib.crc32(params["source_dir"].encode()):08x}')
  name = (f'{origin}_l{c.max_length}_v{c.validation_percent}'
          f'-t{c.test_percent}_seed{c.data_seed}')
  return builders.check_config_name(name), params


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = int(task_config.max_length)
  if task_config.dataset == 'lm1b':
    sources = Lm1bSources(data_dir, bool(task_config.download), seq_len,
                          int(task_config.validation_percent),
                          int(task_config.data_seed), limits(task_config))
  else:
    name, params = stdlib_params(task_config)
    sources = builders.sources(
        StdlibText, name, params, data_dir,
        functools.partial(lm_example, seq_len=seq_len), limits(task_config))
  return base.Task(
      name=task_config.name, vocab_size=VOCAB_SIZE, seq_len=seq_len,
      num_classes=VOCAB_SIZE, head='lm', causal=True, sources=sources,
      token_name=token_name, text=decode)


def decode(tokens: Sequence[int]) -> str:
  """Token ids -> text (bytes decoded as UTF-8, invalid bytes replaced;
  DOC and padding dropped), for reading generated continuations."""
  data = bytes(int(t) - text.BYTE_OFFSET for t in tokens
               if text.BYTE_OFFSET <= int(t) < DOC_ID)
  return data.decode('utf-8', errors='replace')
