"""What the offline tasks share: the TFDS builder, config naming, parameter
checks, the on-disk features and the preprocessing into the fixed-shape
examples of tasks/base.py.

Each task module supplies a generator `splits(params) -> {split: examples}`
(generated, or converted from local files such as Debian's Fashion-MNIST,
which the builder's `check_inputs` looks for first);
`OfflineBuilder` writes those examples with file_format='array_record' (no
TensorFlow needed) under `data_dir/<task>/<config name>/<version>/`, and
`sources()` reads them back as random-access data sources. One parameter set
is one TFDS BuilderConfig whose name spells the parameters, so different
settings never collide in a data dir and a second run reuses the first one's
files.

On disk an example keeps only what the generator decided, with variable
length: 'tokens' (int32, no CLS, no padding) plus either 'label' (classify
tasks) or 'scored' (per-position tasks: which tokens are prediction targets);
image tasks keep 'image' (uint8 [h, w]) and 'label'. Padding, CLS, the
next-token shift and the flattening of images happen on read, here, once for
all tasks.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from tasks import base
from utils import progress as progress_lib

FILE_FORMAT = 'array_record'
# What TFDS accepts as a config name (tensorflow_datasets/core/naming.py).
_CONFIG_NAME = re.compile(r'^[\w+.-]+$')


def check_range(field: str, value: int, low: int, high: int | None = None,
                because: str = '') -> None:
  """Raises a ValueError naming task.<field>, its value and the valid range."""
  if value < low or (high is not None and value > high):
    valid = f'{low} <= {field}' + (f' <= {high}' if high is not None else '')
    why = f' ({because})' if because else ''
    raise ValueError(
        f'task.{field}={value} is out of range; valid: {valid}{why}')


def check_counts_and_seed(task_config) -> None:
  for field in ('num_train', 'num_validation', 'num_test'):
    check_range(field, task_config[field], 1)
  check_range('data_seed', task_config.data_seed, 0)  # numpy seeds are >= 0


def counts(task_config) -> dict[str, int]:
  """Examples per split, in generation order."""
  return {split: int(task_config[f'num_{split}']) for split in base.SPLITS}


def generator_params(task_config, fields: Iterable[str]) -> dict[str, Any]:
  """The generator's inputs: the named integer fields, the seed and counts."""
  return ({f: int(task_config[f]) for f in (*fields, 'data_seed')}
          | {'counts': counts(task_config)})


def config_name(task_config, *parts: str) -> str:
  """Task-specific parts + split sizes + seed, '_'-joined, checked against
  what TFDS accepts; e.g. 'w63_s15_n5000-500-500_seed0'."""
  sizes = 'n' + '-'.join(str(n) for n in counts(task_config).values())
  return check_config_name(
      '_'.join([*parts, sizes, f'seed{task_config.data_seed}']))


def check_config_name(name: str) -> str:
  """name, or a ValueError when TFDS would reject it as a config name."""
  if not _CONFIG_NAME.match(name):
    raise ValueError(f'config name {name!r} has characters TFDS rejects')
  return name


def split_rng(seed: int, split: str) -> np.random.Generator:
  """One stream per split, so a split does not change when another grows."""
  return np.random.default_rng([seed, base.SPLITS.index(split)])


# Per-position generators draw a chunk of rows at a time with numpy; this
# bounds a chunk's random draws (a few tens of MB).
_CHUNK_VALUES = 1 << 22


def per_position_splits(
    task: str, params: Mapping[str, Any], values_per_row: int,
    rows: Callable[[np.random.Generator, int], tuple[np.ndarray, ...]]
) -> dict[str, Iterable[dict[str, np.ndarray]]]:
  """{split: lazily generated {'tokens', 'scored'[, 'answers']} examples}.

  `rows(rng, n)` returns tokens and scored arrays of shape [n, length], plus
  answers of the same shape for tasks whose targets are not their inputs
  (see per_position_answer_features), and draws about `values_per_row` random
  numbers per row. Each split has its own stream from (data_seed, split).
  """
  chunk = max(1, _CHUNK_VALUES // max(1, values_per_row))
  return {split: _chunked_examples(
              f'{task} {split}', params['counts'][split], chunk,
              functools.partial(rows, split_rng(params['data_seed'], split)))
          for split in base.SPLITS}


def _chunked_examples(what: str, total: int, chunk: int,
                      rows: Callable[[int], tuple[np.ndarray, np.ndarray]]
                      ) -> Iterable[dict[str, np.ndarray]]:
  progress = progress_lib.Progress(what, total)
  for start in range(0, total, chunk):
    arrays = rows(min(chunk, total - start))
    names = ('tokens', 'scored', 'answers')[:len(arrays)]
    for row in zip(*arrays):
      yield dict(zip(names, row))
    progress.update(start + len(arrays[0]))
  progress.done()


@dataclasses.dataclass(eq=False)
class GeneratorConfig(tfds.core.BuilderConfig):
  """A BuilderConfig that carries the generator's parameters."""
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _tokens_feature():
  # zlib: token ids are small and repetitive; ListOps at LRA scale is ~4x
  # smaller on disk with it, and decoding needs no TensorFlow.
  return tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding='zlib')


def classify_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'tokens': _tokens_feature(),
      'label': tfds.features.Scalar(dtype=np.int32),
  })


def image_features(**extra) -> tfds.features.FeaturesDict:
  """image: uint8 [height, width] grey levels (zlib: images are mostly
  background), label, plus any `extra` features."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                    encoding='zlib'),
      'label': tfds.features.Scalar(dtype=np.int32),
      **extra,
  })


def per_position_features() -> tfds.features.FeaturesDict:
  """tokens (the inputs) and scored (which next tokens are targets)."""
  return tfds.features.FeaturesDict({
      'tokens': _tokens_feature(),
      'scored': tfds.features.Tensor(shape=(None,), dtype=np.bool_,
                                     encoding='zlib'),
  })


def per_position_answer_features() -> tfds.features.FeaturesDict:
  """As per_position_features, plus answers: the token to predict at each
  scored position when it must not appear in the inputs (MQAR's values)."""
  features = dict(per_position_features())
  features['answers'] = _tokens_feature()
  return tfds.features.FeaturesDict(features)


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes the examples its task's generator returns, in generation order.

  Subclasses set `name`, `FEATURES` (a function returning the features) and
  `GENERATE` (params -> {split: iterable of feature dicts}). They are not
  registered with TFDS: the task modules construct them directly, and the
  global registry would refuse a second class with the same name.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First generator.'}
  FEATURES: Callable[[], tfds.features.FeaturesDict]
  GENERATE: Callable[[Mapping[str, Any]], Mapping[str, Iterable[dict]]]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums file lives beside code that downloads nothing; and TFDS's
    # lookup of it for a builder inside a package imports the optional
    # `importlib_resources`, which the pinned requirements do not include.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly rather than dataset_info_from_configs(), which
    # would scan this package's folder for TFDS metadata files.
    return tfds.core.DatasetInfo(
        builder=self, description=type(self).__doc__,
        features=type(self).FEATURES(),
        disable_shuffling=True)  # keep generation order: index i is example i

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    splits = type(self).GENERATE(self.builder_config.params)
    return {split: self._generate_examples(examples)
            for split, examples in splits.items()}

  def _generate_examples(self, examples):
    for index, example in enumerate(examples):
      yield index, example

  def check_inputs(self) -> None:
    """Raises a FileNotFoundError saying what to install or point at when
    the files a builder converts are missing; called only before writing."""


class Examples(Sequence):
  """Random-access view of a data source with a preprocessing function;
  `limit` > 0 keeps only the first `limit` examples."""

  def __init__(self, source: Sequence, preprocess: Callable[[dict], dict],
               limit: int = 0):
    self._source = source
    self._preprocess = preprocess
    self._len = min(len(source), limit) if limit > 0 else len(source)

  def __len__(self) -> int:
    return self._len

  def _index(self, index: int) -> int:
    # Sequence semantics: negative indices count from the end, and iteration
    # stops at the IndexError.
    n = len(self)
    index = int(index)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {n} examples')
    return index % n

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self._preprocess(self._source[self._index(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    records = self._source.__getitems__([self._index(i) for i in indices])
    return [self._preprocess(r) for r in records]


@dataclasses.dataclass(frozen=True)
class Sources:
  """split -> Examples; writes the data on the first call, reuses it after.
  `limits` caps a split's examples (split -> count; absent or 0: all)."""
  builder_cls: type[OfflineBuilder]
  name: str                      # the BuilderConfig's name
  params: Mapping[str, Any]      # the generator's inputs
  data_dir: str | None           # absolute, or None for TFDS's default
  preprocess: Callable[[dict], dict]
  limits: Mapping[str, int] = dataclasses.field(default_factory=dict)

  def builder(self) -> OfflineBuilder:
    # A new builder per call: one made before another Sources (the same
    # config, another task) wrote the data would not see the data's splits.
    return self.builder_cls(
        data_dir=self.data_dir, file_format=FILE_FORMAT,
        config=GeneratorConfig(name=self.name, params=dict(self.params)))

  def __call__(self, split: str) -> Examples:
    builder = self.builder()
    if not builder.is_prepared():
      builder.check_inputs()
      builder.download_and_prepare(file_format=FILE_FORMAT)
    remove_stale_incomplete(builder)
    return Examples(builder.as_data_source(split), self.preprocess,
                    self.limits.get(split, 0))


def remove_stale_incomplete(builder: tfds.core.DatasetBuilder) -> None:
  """Deletes the `incomplete.*` folders that generation runs killed before
  their rename left beside this config's finished data. Once the data is
  there, such a folder can never become it (the rename would fail), so it is
  only disk space."""
  parent, version = os.path.split(os.fspath(builder.data_dir).rstrip('/'))
  for stale in glob.glob(os.path.join(parent, f'incomplete.*_{version}')):
    if os.path.isdir(stale):
      logging.info('removing %s, left by an interrupted generation', stale)
      shutil.rmtree(stale, ignore_errors=True)


def sources(builder_cls: type[OfflineBuilder], name: str,
            params: Mapping[str, Any], data_dir: str,
            preprocess: Callable[[dict], dict],
            limits: Mapping[str, int] | None = None) -> Sources:
  # Absolute: TFDS and array_record resolve paths on their own threads.
  return Sources(builder_cls, name, dict(params), absolute(data_dir),
                 preprocess, dict(limits or {}))


def absolute(data_dir: str) -> str | None:
  """data_dir made absolute ('' stays None: TFDS's default)."""
  return os.path.abspath(data_dir) if data_dir else None


def validation_cut(n: int, percent: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(kept indices in order, held-out indices in order) of n examples, the
  held-out ones `percent` % of them chosen at random by seed."""
  held = np.zeros(n, bool)
  held[np.random.default_rng(seed).permutation(n)[:n * percent // 100]] = True
  return np.flatnonzero(~held), np.flatnonzero(held)


def prepare_catalog(builder: tfds.core.DatasetBuilder, name: str,
                    data_dir: str | None, download: bool, offline: str,
                    explain: Callable[[Exception, str], str | None] = (
                        lambda error, where: None)
                    ) -> tfds.core.DatasetBuilder:
  """A TFDS catalog dataset's builder (cifar10, imdb_reviews), downloaded
  and prepared on first use when `download` is True. What stops it is one
  FileNotFoundError line: `explain(error, where)` when it has one, else the
  download failure's first line and the offline dataset to use instead."""
  if builder.is_prepared():
    return builder
  where = data_dir or 'the TFDS data dir'
  if not download:
    raise FileNotFoundError(
        f'{name} is not prepared in {where}: set '
        '--config.task.download=True on a machine with internet access, '
        'or --config.data_dir to a TFDS data dir that holds it')
  try:
    builder.download_and_prepare(file_format=FILE_FORMAT)
  except Exception as e:  # network, disk, missing packages: one line
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise FileNotFoundError(
        explain(e, where) or
        f'{name} could not be downloaded into {where} ({first}); run once '
        'where the internet is reachable, or use '
        f'--config.task.dataset={offline} (offline)') from e
  return builder


def padded(tokens: np.ndarray, seq_len: int, dtype=np.int32) -> np.ndarray:
  """tokens right-padded with 0 to seq_len."""
  out = np.zeros(seq_len, dtype)
  out[:len(tokens)] = tokens
  return out


def classify_example(record: Mapping[str, Any], seq_len: int,
                     prefix: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
  """inputs = prefix + tokens, padded; length; label."""
  tokens = np.concatenate([np.asarray(prefix, np.int32),
                           np.asarray(record['tokens'], np.int32)])
  return {'inputs': padded(tokens, seq_len),
          'length': np.int32(len(tokens)),
          'label': np.int32(record['label'])}


def pixels_example(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """An image as a sequence: one token per pixel, row-major, the token id
  being the 8-bit grey level (vocabulary 256, no CLS, no padding)."""
  tokens = np.asarray(record['image'], np.uint8).reshape(-1).astype(np.int32)
  return {'inputs': tokens, 'length': np.int32(len(tokens)),
          'label': np.int32(record['label'])}


def next_token_example(record: Mapping[str, Any],
                       seq_len: int) -> dict[str, np.ndarray]:
  """Causal LM view: targets[t] = answers[t + 1], weighted where t + 1 is
  scored; answers are the tokens themselves unless the record has its own.

  The last position has no next token: target 0, weight 0.
  """
  tokens = np.asarray(record['tokens'], np.int32)
  scored = np.asarray(record['scored'], bool)
  answers = np.asarray(record.get('answers', tokens), np.int32)
  return {'inputs': padded(tokens, seq_len),
          'length': np.int32(len(tokens)),
          'targets': padded(answers[1:], seq_len),
          'weights': padded(scored[1:], seq_len, np.float32)}


def classify_preprocess(seq_len: int, prefix: tuple[int, ...] = ()):
  # partial of a module-level function, so sources pickle (grain workers).
  return functools.partial(classify_example, seq_len=seq_len, prefix=prefix)


def next_token_preprocess(seq_len: int):
  return functools.partial(next_token_example, seq_len=seq_len)
