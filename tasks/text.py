"""Byte-level document classification (Long Range Arena's Text task).

Tokens are a document's UTF-8 bytes: token id = byte + 1 (1..256), 0 is
padding, and every input starts with a CLS token (id 257; vocabulary 258),
so both `model.pooling` modes work. Truncation and padding: the first
`max_length - 1` bytes follow the CLS token; a shorter document is
right-padded with 0 to `max_length` (LRA kept a review's first 1,000 bytes in
its repository's config, 4,000 in the paper; it had no CLS token of its
own).

Datasets (`task.dataset`):
  wordnet  (offline default) documents of WordNet 3.0 glosses labelled by
      their lexicographer file (tasks/wordnet.py: Debian's `wordnet-base`,
      classes `task.classes`, documents of at least `doc_bytes` bytes, splits
      by synset), generated once into an array_record TFDS dataset in the
      data dir. Balanced: example i of a split is of class i mod the number
      of classes.
  imdb_reviews  LRA's setting: TFDS `imdb_reviews/plain_text`, read with
      `tfds.data_source` from the data dir (downloaded and prepared on first
      use when `task.download` is True; needs the internet). Validation is
      a `validation_percent` % subset of the 25K training reviews chosen at
      random by `data_seed` (train keeps the rest, in order); test is the
      25K test reviews, never used for model selection (LRA's pipeline
      evaluated on test as its validation set).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base, builders, wordnet

BYTE_OFFSET = 1                    # token id of byte b is b + 1; 0 pads
CLS_ID = 256 + BYTE_OFFSET         # 257
VOCAB_SIZE = CLS_ID + 1            # 258: padding, 256 bytes, CLS
DATASETS = ('wordnet', 'imdb_reviews')


def token_name(i: int) -> str:
  """'CLS', '' for padding, the byte's character when printable ASCII
  ('␣' for a space), else its hex escape."""
  if i == CLS_ID:
    return 'CLS'
  if i < BYTE_OFFSET:
    return ''
  b = i - BYTE_OFFSET
  if b == 32:
    return '\u2423'
  return chr(b) if 33 <= b < 127 else f'\\x{b:02x}'
IMDB = 'imdb_reviews/plain_text'
IMDB_CLASSES = ('neg', 'pos')


def byte_tokens(text: bytes | str) -> np.ndarray:
  """A document's token ids (its UTF-8 bytes + 1), int32."""
  if isinstance(text, str):
    text = text.encode('utf-8')
  return np.frombuffer(text, np.uint8).astype(np.int32) + BYTE_OFFSET


def document_inputs(tokens: np.ndarray, seq_len: int
                    ) -> tuple[np.ndarray, np.int32]:
  """(CLS + the first seq_len - 1 tokens, right-padded; its length)."""
  kept = np.concatenate([[CLS_ID], np.asarray(tokens, np.int32)
                         [:seq_len - 1]]).astype(np.int32)
  return builders.padded(kept, seq_len), np.int32(len(kept))


def tokens_example(record: Mapping[str, Any], seq_len: int
                   ) -> dict[str, np.ndarray]:
  """A stored {'tokens', 'label'} record as a classify example."""
  inputs, length = document_inputs(record['tokens'], seq_len)
  return {'inputs': inputs, 'length': length,
          'label': np.int32(record['label'])}


def text_example(record: Mapping[str, Any], seq_len: int
                 ) -> dict[str, np.ndarray]:
  """A TFDS {'text', 'label'} record (IMDb) as a classify example."""
  inputs, length = document_inputs(byte_tokens(record['text']), seq_len)
  return {'inputs': inputs, 'length': length,
          'label': np.int32(record['label'])}


# -- the offline corpus ------------------------------------------------------

def wordnet_splits(params: Mapping[str, Any]) -> dict[str, Any]:
  corpus = wordnet.Corpus(params['source_dir'], params['classes'],
                          params['data_seed'])
  num_classes = len(params['classes'])

  def examples(split):
    for i in range(params['counts'][split]):
      label = i % num_classes
      doc, = corpus.documents(split, label, params['doc_bytes'], 1,
                              corpus.rng(split, i))
      yield {'tokens': byte_tokens(doc), 'label': label}
  return {split: examples(split) for split in base.SPLITS}


class WordnetText(builders.OfflineBuilder, skip_registration=True):
  """Documents of WordNet 3.0 glosses as bytes, labelled by lexicographer
  file (Debian's wordnet-base)."""
  name = 'wordnet_text'
  FEATURES = builders.classify_features
  GENERATE = wordnet_splits

  def check_inputs(self) -> None:
    p = self.builder_config.params
    wordnet.check_files(p['source_dir'], p['classes'])


def wordnet_params(task_config) -> tuple[str, dict[str, Any]]:
  """(config name, generator params) of the offline corpus's settings."""
  names = wordnet.classes(task_config)
  builders.check_counts_and_seed(task_config)
  builders.check_range('doc_bytes', task_config.doc_bytes, 1)
  params = builders.generator_params(task_config, ('doc_bytes',))
  params |= {'classes': list(names),
             'source_dir': os.path.abspath(wordnet.source_dir(task_config))}
  # The class list is spelled by its index in LEXNAMES (config names are
  # short and TFDS-safe).
  spelled = 'c' + '-'.join(str(wordnet.LEXNAMES.index(n)) for n in names)
  return builders.config_name(task_config, spelled,
                              f'b{task_config.doc_bytes}'), params


# -- IMDb through TFDS -------------------------------------------------------

def _imdb_builder(data_dir: str | None):
  return tfds.builder(IMDB, data_dir=data_dir)


class Subset(Sequence):
  """Random access to `source` at the given indices."""

  def __init__(self, source: Sequence, indices: np.ndarray):
    self._source, self._indices = source, np.asarray(indices)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index):
    return self._source[int(self._indices[index])]

  def __getitems__(self, indices: Sequence[int]) -> list:
    return self._source.__getitems__([int(self._indices[i])
                                      for i in indices])


class ImdbSources:
  """split -> Examples over TFDS's imdb_reviews (validation cut from train),
  prepared (downloaded) on first use when allowed."""

  def __init__(self, data_dir: str, download: bool, seq_len: int,
               validation_percent: int, seed: int):
    self.data_dir = builders.absolute(data_dir)
    self.download = download
    self.preprocess = functools.partial(text_example, seq_len=seq_len)
    self.validation_percent = validation_percent
    self.seed = seed

  def __call__(self, split: str) -> builders.Examples:
    builder = builders.prepare_catalog(
        _imdb_builder(self.data_dir), IMDB, self.data_dir, self.download,
        offline='wordnet')
    if split == 'test':
      return builders.Examples(builder.as_data_source('test'),
                               self.preprocess)
    train = builder.as_data_source('train')
    kept, held = builders.validation_cut(len(train), self.validation_percent,
                                self.seed)
    return builders.Examples(Subset(train, kept if split == 'train' else held),
                             self.preprocess)


# -- the task ----------------------------------------------------------------

def check_documents(task_config, datasets: Sequence[str]) -> None:
  """The fields every byte-level task has: dataset and max_length."""
  if task_config.dataset not in datasets:
    raise ValueError(f'task.dataset={task_config.dataset!r}; valid: '
                     f'{", ".join(datasets)}')
  builders.check_range('max_length', task_config.max_length, 2,
                       because='a CLS token and at least one byte')


def check(task_config) -> None:
  check_documents(task_config, DATASETS)
  builders.check_range('validation_percent', task_config.validation_percent,
                       1, 99)


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = int(task_config.max_length)
  if task_config.dataset == 'imdb_reviews':
    num_classes = len(IMDB_CLASSES)
    sources = ImdbSources(data_dir, bool(task_config.download), seq_len,
                          int(task_config.validation_percent),
                          int(task_config.data_seed))
  else:
    name, params = wordnet_params(task_config)
    num_classes = len(params['classes'])
    sources = builders.sources(
        WordnetText, name, params, data_dir,
        functools.partial(tokens_example, seq_len=seq_len))
  return base.Task(
      name=task_config.name, vocab_size=VOCAB_SIZE, seq_len=seq_len,
      num_classes=num_classes, head='classify', causal=False,
      cls_token=True, sources=sources, token_name=token_name)
