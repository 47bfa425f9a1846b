"""WordNet 3.0 as a byte-level text corpus: documents of glosses, labelled
by the lexicographer file their synsets were filed in.

The source is Debian's `wordnet-base` package (/usr/share/wordnet/data.noun
and friends; Princeton's WordNet 3.0 licence: use, copy, modify and
distribute for any purpose, keeping its copyright notice). Each synset line
of a `data.<pos>` file gives its lexicographer file number (the lexicographer
source file, e.g. noun.animal, that WordNet's editors wrote the synset in:
metadata, not content), its words and its gloss. A synset becomes one line
of text:

    oak, oak tree: a deciduous tree of the genus Quercus; has acorns ...

(words joined by ', ' with '_' read as a space, then ': ' and the gloss).

Splits are made by synset, never by document: each class's synsets are
permuted by `data_seed` and cut 80 / 10 / 10 % into train, validation and
test pools (`SPLIT_PERCENT`), so no synset of a test document was ever seen
in training. A document of a class is a run of synsets drawn at random
without replacement from that class's pool of the split, in the order
drawn, until it holds at least `doc_bytes` bytes; example i of a split uses
its own generator seeded by (data_seed, split, i), so any example can be
redrawn alone and a split does not change when another grows. The same
synset may appear in several documents of its split (the pools are smaller
than the number of documents); two documents of one retrieval pair never
share a synset.
"""
from __future__ import annotations

import collections
import os
from collections.abc import Mapping, Sequence

import numpy as np

from tasks import base

WORDNET_DIR = '/usr/share/wordnet'
WORDNET_PACKAGE = 'wordnet-base'
# lexnames(5WN): lexicographer file number -> name.
LEXNAMES = (
    'adj.all', 'adj.pert', 'adv.all', 'noun.Tops', 'noun.act', 'noun.animal',
    'noun.artifact', 'noun.attribute', 'noun.body', 'noun.cognition',
    'noun.communication', 'noun.event', 'noun.feeling', 'noun.food',
    'noun.group', 'noun.location', 'noun.motive', 'noun.object',
    'noun.person', 'noun.phenomenon', 'noun.plant', 'noun.possession',
    'noun.process', 'noun.quantity', 'noun.relation', 'noun.shape',
    'noun.state', 'noun.substance', 'noun.time', 'verb.body', 'verb.change',
    'verb.cognition', 'verb.communication', 'verb.competition',
    'verb.consumption', 'verb.contact', 'verb.creation', 'verb.emotion',
    'verb.motion', 'verb.perception', 'verb.possession', 'verb.social',
    'verb.stative', 'verb.weather', 'adj.ppl')
# The data file that holds each part of speech's synsets.
DATA_FILES = {'noun': 'data.noun', 'verb': 'data.verb', 'adj': 'data.adj',
              'adv': 'data.adv'}
# Default classes: the noun files with at least 2,500 synsets (WordNet 3.0:
# act 6,650, animal 7,509, artifact 11,587, attribute 3,039, cognition
# 2,964, communication 5,607, food 2,573, group 2,624, location 3,209, person
# 11,087, plant 8,030, state 3,544, substance 2,983).
DEFAULT_CLASSES = (
    'noun.act', 'noun.animal', 'noun.artifact', 'noun.attribute',
    'noun.cognition', 'noun.communication', 'noun.food', 'noun.group',
    'noun.location', 'noun.person', 'noun.plant', 'noun.state',
    'noun.substance')
SPLIT_PERCENT = {'train': 80, 'validation': 10, 'test': 10}


def source_dir(task_config) -> str:
  return task_config.source_dir or WORDNET_DIR


def classes(task_config) -> tuple[str, ...]:
  """task.classes ('' -> DEFAULT_CLASSES), checked against LEXNAMES."""
  names = tuple(n.strip() for n in task_config.classes.split(',')
                if n.strip()) or DEFAULT_CLASSES
  unknown = [n for n in names if n not in LEXNAMES]
  if unknown:
    raise ValueError(f'task.classes: unknown lexicographer file(s) '
                     f'{", ".join(unknown)}; valid: {", ".join(LEXNAMES)}')
  if len(set(names)) != len(names):
    raise ValueError(f'task.classes={task_config.classes!r} names a file '
                     'twice')
  if not 2 <= len(names) <= 20:
    raise ValueError(f'task.classes names {len(names)} files; valid: 2 to 20')
  return names


def missing_files(folder: str, names: Sequence[str]) -> list[str]:
  needed = sorted({DATA_FILES[n.split('.')[0]] for n in names})
  return [f for f in needed if not os.path.isfile(os.path.join(folder, f))]


def check_files(folder: str, names: Sequence[str]) -> None:
  """A FileNotFoundError naming the Debian package when files are absent."""
  missing = missing_files(folder, names)
  if missing:
    hint = (f'apt-get install {WORDNET_PACKAGE}' if folder == WORDNET_DIR
            else 'check the folder')
    raise FileNotFoundError(
        f'WordNet is not in {folder} (missing {", ".join(missing)}): {hint}, '
        'or point --config.task.source_dir at a folder holding its data.* '
        'files')


def synset_text(line: bytes) -> tuple[int, bytes]:
  """(lexicographer file number, 'words: gloss\\n') of a data.* synset line.

  Layout (wndb(5WN)): offset lex_filenum ss_type w_cnt(hex) {word lex_id}
  ... '|' gloss.
  """
  head, _, gloss = line.partition(b' | ')
  fields = head.split()
  lexfile, count = int(fields[1]), int(fields[3], 16)
  words = [fields[4 + 2 * i].replace(b'_', b' ') for i in range(count)]
  return lexfile, b', '.join(words) + b': ' + gloss.strip() + b'\n'


def read_synsets(folder: str, names: Sequence[str]) -> list[list[bytes]]:
  """Each class's synset texts, in file order."""
  wanted = {LEXNAMES.index(n): i for i, n in enumerate(names)}
  out: list[list[bytes]] = [[] for _ in names]
  for data_file in sorted({DATA_FILES[n.split('.')[0]] for n in names}):
    with open(os.path.join(folder, data_file), 'rb') as f:
      for line in f:
        if line.startswith(b'  '):   # the licence header
          continue
        lexfile, text = synset_text(line)
        if lexfile in wanted:
          out[wanted[lexfile]].append(text)
  empty = [names[i] for i, texts in enumerate(out) if not texts]
  if empty:
    raise ValueError(f'WordNet in {folder} has no synsets in '
                     f'{", ".join(empty)}; choose other task.classes')
  return out


class Corpus:
  """Per class and split, the pool of synset texts documents draw from."""

  def __init__(self, folder: str, names: Sequence[str], seed: int):
    self.names = tuple(names)
    self.seed = seed
    self.pools: dict[str, list[list[bytes]]] = collections.defaultdict(list)
    rng = np.random.default_rng(seed)
    for texts in read_synsets(folder, names):
      order = rng.permutation(len(texts))
      cut = np.cumsum([len(texts) * SPLIT_PERCENT[s] // 100
                       for s in base.SPLITS[:-1]])
      for split, part in zip(base.SPLITS, np.split(order, cut)):
        self.pools[split].append([texts[j] for j in part])
    for split, pools in self.pools.items():
      small = [n for n, p in zip(self.names, pools) if not p]
      if small:
        raise ValueError(f'WordNet class(es) {", ".join(small)} have too '
                         f'few synsets for a {split} split; choose other '
                         'task.classes')

  def rng(self, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, base.SPLITS.index(split), index])

  def documents(self, split: str, label: int, doc_bytes: int, count: int,
                rng: np.random.Generator) -> list[bytes]:
    """`count` documents of class `label` that share no synset, each at
    least doc_bytes long; a ValueError if the class's pool of the split is
    too small for them."""
    pool = self.pools[split][label]
    order = iter(rng.permutation(len(pool)))
    docs = []
    for _ in range(count):
      doc = b''
      for j in order:
        doc += pool[j]
        if len(doc) >= doc_bytes:
          break
      if len(doc) < doc_bytes:
        raise ValueError(
            f'{self.names[label]} has {len(pool)} {split} synsets '
            f'({sum(map(len, pool))} bytes), too few for {count} '
            f'document(s) of task.doc_bytes={doc_bytes}: lower doc_bytes or '
            'choose larger files in task.classes')
      docs.append(doc)
    return docs

  def class_counts(self, split: str) -> Mapping[str, int]:
    return {n: len(p) for n, p in zip(self.names, self.pools[split])}
