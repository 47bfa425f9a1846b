"""Two-document byte-level retrieval (Long Range Arena's Retrieval task):
two documents in, one label out, through the `match` head (one shared
encoder embeds each document; no attention between the two).

Each document is tokenised as the text task does (tasks/text.py): CLS (id
257) then its first `max_length - 1` UTF-8 bytes as ids byte + 1,
right-padded with 0 to `max_length` (LRA: 4,000 bytes per document).
Examples: inputs int32 [2, max_length], length [2], label.

Datasets (`task.dataset`):
  wordnet  (offline default) pairs of WordNet documents (tasks/wordnet.py:
      runs of glosses of one lexicographer file, at least `doc_bytes` bytes,
      splits by synset): label 1 when both documents come from the same
      lexicographer file, 0 when from two different ones. Balanced: even
      examples are pairs from one file, odd ones from two (the second file
      uniform over the other classes); the first document's file cycles
      through the classes. The documents carry no header, title or file
      name, and the two of a pair never share a synset, so no identical
      line can give the answer away.
  lra_release  LRA's ACL Anthology Network pairs (does one paper cite the
      other): `new_aan_pairs.{train,eval,test}.tsv` read from `manual_dir`
      (the folder of lra_release/lra_release/tsv_data). Each line is five
      tab-separated fields with no header and no quoting, as LRA read them:
      label (a float, 0 or 1), id1, id2, text1, text2. Converted once into
      array_record keeping the bytes a document can use (max_length - 1);
      eval is the validation split. The conversion is named by the length,
      not the folder: to convert other TSVs, use another --config.data_dir.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base, builders, text, wordnet

NUM_CLASSES = 2
DATASETS = ('wordnet', 'lra_release')
AAN_FILES = {'train': 'new_aan_pairs.train.tsv',
             'validation': 'new_aan_pairs.eval.tsv',
             'test': 'new_aan_pairs.test.tsv'}


def pair_features() -> tfds.features.FeaturesDict:
  """tokens_a, tokens_b (the two documents' token ids) and label."""
  tokens = lambda: tfds.features.Tensor(shape=(None,), dtype=np.int32,
                                        encoding='zlib')
  return tfds.features.FeaturesDict({
      'tokens_a': tokens(), 'tokens_b': tokens(),
      'label': tfds.features.Scalar(dtype=np.int32)})


def pair_example(record: Mapping[str, Any], seq_len: int
                 ) -> dict[str, np.ndarray]:
  """A stored pair as a match example: inputs [2, seq_len], length [2]."""
  (a, la), (b, lb) = (text.document_inputs(record[f], seq_len)
                      for f in ('tokens_a', 'tokens_b'))
  return {'inputs': np.stack([a, b]), 'length': np.array([la, lb], np.int32),
          'label': np.int32(record['label'])}


# -- the offline corpus ------------------------------------------------------

def wordnet_pairs(params: Mapping[str, Any]) -> dict[str, Any]:
  corpus = wordnet.Corpus(params['source_dir'], params['classes'],
                          params['data_seed'])
  num_classes = len(params['classes'])
  doc_bytes = params['doc_bytes']

  def examples(split):
    for i in range(params['counts'][split]):
      rng = corpus.rng(split, i)
      same, first = i % 2 == 0, (i // 2) % num_classes
      if same:
        a, b = corpus.documents(split, first, doc_bytes, 2, rng)
      else:
        other = (first + 1 + int(rng.integers(num_classes - 1))) % num_classes
        a, = corpus.documents(split, first, doc_bytes, 1, rng)
        b, = corpus.documents(split, other, doc_bytes, 1, rng)
      yield {'tokens_a': text.byte_tokens(a), 'tokens_b': text.byte_tokens(b),
             'label': int(same)}
  return {split: examples(split) for split in base.SPLITS}


class WordnetPairs(builders.OfflineBuilder, skip_registration=True):
  """Pairs of WordNet gloss documents: from the same lexicographer file, or
  from two different ones (Debian's wordnet-base)."""
  name = 'wordnet_pairs'
  FEATURES = pair_features
  GENERATE = wordnet_pairs

  def check_inputs(self) -> None:
    p = self.builder_config.params
    wordnet.check_files(p['source_dir'], p['classes'])


# -- LRA's released TSVs -----------------------------------------------------

def tsv_rows(path: str, keep_bytes: int) -> Iterator[dict[str, Any]]:
  """The pairs of one LRA TSV file, each document cut to keep_bytes."""
  with open(path, 'rb') as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip(b'\r\n')
      if not line:
        continue
      fields = line.split(b'\t')
      if len(fields) != 5:
        raise ValueError(f'{path}:{number} has {len(fields)} tab-separated '
                         'fields; LRA\'s pairs have 5 (label, id1, id2, '
                         'text1, text2)')
      try:
        label = float(fields[0])
      except ValueError:
        label = -1.0
      if label not in (0.0, 1.0):
        raise ValueError(f'{path}:{number}: label {fields[0][:20]!r} is not '
                         '0 or 1')
      yield {'tokens_a': text.byte_tokens(fields[3][:keep_bytes]),
             'tokens_b': text.byte_tokens(fields[4][:keep_bytes]),
             'label': int(label)}


def release_splits(params: Mapping[str, Any]) -> dict[str, Any]:
  return {split: tsv_rows(os.path.join(params['manual_dir'], name),
                          params['keep_bytes'])
          for split, name in AAN_FILES.items()}


class AanPairs(builders.OfflineBuilder, skip_registration=True):
  """LRA's ACL Anthology Network citation pairs, from its released TSVs."""
  name = 'aan_pairs'
  FEATURES = pair_features
  GENERATE = release_splits

  def check_inputs(self) -> None:
    folder = self.builder_config.params['manual_dir']
    missing = [n for n in AAN_FILES.values()
               if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise FileNotFoundError(
          f'LRA\'s retrieval pairs are not in {folder} (missing '
          f'{", ".join(missing)}): point --config.task.manual_dir at the '
          'tsv_data folder of lra_release.gz')


# -- the task ----------------------------------------------------------------

def check(task_config) -> None:
  text.check_documents(task_config, DATASETS)
  if task_config.dataset == 'lra_release' and not task_config.manual_dir:
    raise ValueError("task.dataset='lra_release' reads LRA's TSVs from "
                     'task.manual_dir; set --config.task.manual_dir')


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  seq_len = int(task_config.max_length)
  if task_config.dataset == 'lra_release':
    builder_cls = AanPairs
    params = {'manual_dir': os.path.abspath(task_config.manual_dir),
              'keep_bytes': seq_len - 1}
    name = f'b{seq_len - 1}'
  else:
    builder_cls = WordnetPairs
    name, params = text.wordnet_params(task_config)
  return base.Task(
      name=task_config.name, vocab_size=text.VOCAB_SIZE, seq_len=seq_len,
      num_classes=NUM_CLASSES, head='match', causal=False, cls_token=True,
      token_name=text.token_name, sources=builders.sources(builder_cls, name, params, data_dir,
                               functools.partial(pair_example,
                                                 seq_len=seq_len)))
