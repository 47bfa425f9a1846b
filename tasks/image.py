"""Image classification over pixels (Long Range Arena's Image task): an
8-bit grey image read as a sequence of its pixels, one token per pixel in
row-major order, the token id being the grey level (vocabulary 256; no CLS
token, so the model pools by `model.pooling='mean'`), 10 classes.

Datasets (`task.dataset`):
  fashion_mnist  (offline default) Fashion-MNIST, 28 x 28 = 784 tokens, read
      from the idx files of Debian's `dataset-fashion-mnist` package
      (/usr/share/datasets/fashion-mnist/, or `task.source_dir`) and
      converted once into an array_record TFDS dataset in the data dir.
      Splits: the 60K training images minus a validation set of
      `validation_percent` percent of them, chosen at random by `data_seed`
      (train keeps the file order of the rest); test is the 10K test file.
      The images are grey already and used as they are. The conversion is
      named by (validation_percent, data_seed), not by the folder: to
      convert other idx files, use another --config.data_dir.
  cifar10  LRA's setting: TFDS `cifar10` (32 x 32 = 1,024 tokens), read with
      `tfds.data_source` from the data dir. When it is not there and
      `task.download` is True, TFDS's builder downloads and prepares it,
      which needs the internet and TensorFlow (it encodes PNGs with it; this
      project installs none): prepare it once where both are (`tfds build
      cifar10 --file_format=array_record`) and copy the folder; reading
      needs neither.
      Splits as LRA: train[:90%] (45K), train[90%:] (5K) for validation,
      test (10K). Colour becomes grey on read as LRA did with
      tf.image.rgb_to_grayscale: the ITU-R 601 luma 0.2989 R + 0.5870 G +
      0.1140 B of the [0, 1] channels, back to 8 bits by TF's
      convert_image_dtype (times 255.5, truncated).

`max_train`, `max_validation`, `max_test` (0: all) keep only the first
examples of a split, for quick runs.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base
from tasks import builders

VOCAB_SIZE = 256                 # grey levels 0..255 are the token ids
NUM_CLASSES = 10
DATASETS = ('fashion_mnist', 'cifar10')
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_PACKAGE = 'dataset-fashion-mnist'
# idx file stems in the Debian package (each may be gzipped or not).
IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
SIZES = {'fashion_mnist': 28, 'cifar10': 32}
CIFAR10_SPLITS = {'train': 'train[:90%]', 'validation': 'train[90%:]',
                  'test': 'test'}
# tf.image.rgb_to_grayscale's weights (ITU-R 601-2 luma).
LUMA = np.array([0.2989, 0.5870, 0.1140])

# idx dtype codes (http://yann.lecun.com/exdb/mnist/): 0x08 is unsigned byte.
_IDX_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
  """An idx file (gzipped when the name ends in .gz) as a uint8 array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
    raise ValueError(f'{path} is not an unsigned-byte idx file')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, offset=4))
  values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if values.size != int(np.prod(shape)):
    raise ValueError(f'{path} holds {values.size} bytes of data, its header '
                     f'says {shape}')
  return values.reshape(shape)


def idx_path(source_dir: str, stem: str) -> str | None:
  """The file for `stem` in source_dir, gzipped or not; None if neither."""
  for name in (stem + '.gz', stem):
    path = os.path.join(source_dir, name)
    if os.path.isfile(path):
      return path
  return None


def source_dir(task_config) -> str:
  return task_config.source_dir or FASHION_MNIST_DIR


def _missing_files(folder: str) -> list[str]:
  return [stem + '.gz' for stems in IDX_FILES.values() for stem in stems
          if idx_path(folder, stem) is None]


def fashion_mnist_splits(params: Mapping[str, Any]) -> dict[str, Any]:
  """{split: examples}: validation a seeded random subset of train."""
  arrays = {}
  for split, (images, labels) in IDX_FILES.items():
    x = read_idx(idx_path(params['source_dir'], images))
    y = read_idx(idx_path(params['source_dir'], labels))
    if x.ndim != 3 or y.shape != x.shape[:1]:
      raise ValueError(f'Fashion-MNIST {split} files disagree: images '
                       f'{x.shape}, labels {y.shape}')
    arrays[split] = x, y.astype(np.int32)
  x, y = arrays['train']
  kept, held = builders.validation_cut(
      len(x), params['validation_percent'], params['data_seed'])
  parts = {'train': (x[kept], y[kept]), 'validation': (x[held], y[held]),
           'test': arrays['test']}
  return {split: ({'image': image, 'label': label}
                  for image, label in zip(*part))
          for split, part in parts.items()}


class FashionMnist(builders.OfflineBuilder, skip_registration=True):
  """Fashion-MNIST (Xiao et al. 2017) from the idx files of Debian's
  dataset-fashion-mnist, as 28 x 28 grey images."""
  name = 'fashion_mnist_idx'
  FEATURES = builders.image_features
  GENERATE = fashion_mnist_splits

  def check_inputs(self) -> None:
    folder = self.builder_config.params['source_dir']
    missing = _missing_files(folder)
    if missing:
      hint = (f'apt-get install {FASHION_MNIST_PACKAGE}' if folder ==
              FASHION_MNIST_DIR else 'check the folder')
      raise FileNotFoundError(
          f'Fashion-MNIST is not in {folder} (missing {", ".join(missing)}): '
          f'{hint}, or point --config.task.source_dir at a folder holding '
          'the idx files')


def grey_from_rgb(image: np.ndarray) -> np.ndarray:
  """[h, w, 3] uint8 -> [h, w] uint8 exactly as tf.image.rgb_to_grayscale on
  a uint8 image: luma of the [0, 1] channels, times 255.5, truncated."""
  luma = (np.asarray(image, np.float32) / 255.0) @ LUMA.astype(np.float32)
  return (luma * 255.5).astype(np.uint8)


def cifar10_example(record: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return builders.pixels_example({'image': grey_from_rgb(record['image']),
                                  'label': record['label']})


def _cifar10_builder(data_dir: str | None):
  return tfds.builder('cifar10', data_dir=data_dir)


def _why_not_prepared(error: Exception, where: str) -> str | None:
  """What to do when preparing cifar10 failed for want of TensorFlow."""
  chain, e = [], error
  while e is not None:
    chain.append(e)
    e = e.__cause__ or e.__context__
  if any(isinstance(e, ModuleNotFoundError) and 'tensorflow' in str(e)
         for e in chain):
    return ('TFDS\'s cifar10 builder needs TensorFlow to write its PNG '
            'images, and this project installs none: prepare it once where '
            'TensorFlow is installed (tfds build cifar10 '
            '--file_format=array_record) and copy its cifar10 folder into '
            f'{where}; reading it needs no TensorFlow')
  return None


class Cifar10Sources:
  """split -> Examples over TFDS's cifar10, prepared (downloaded) on first
  use when allowed."""

  def __init__(self, data_dir: str, download: bool, limits: Mapping[str, int]):
    self.data_dir = builders.absolute(data_dir)
    self.download = download
    self.limits = dict(limits)

  def __call__(self, split: str) -> builders.Examples:
    builder = builders.prepare_catalog(
        _cifar10_builder(self.data_dir), 'cifar10', self.data_dir,
        self.download, offline='fashion_mnist', explain=_why_not_prepared)
    source = builder.as_data_source(CIFAR10_SPLITS[split])
    return builders.Examples(source, cifar10_example,
                             self.limits.get(split, 0))


def check(task_config) -> None:
  if task_config.dataset not in DATASETS:
    raise ValueError(f'task.dataset={task_config.dataset!r}; valid: '
                     f'{", ".join(DATASETS)}')
  builders.check_range('validation_percent', task_config.validation_percent,
                       1, 99)
  for split in base.SPLITS:
    builders.check_range(f'max_{split}', task_config[f'max_{split}'], 0)
  builders.check_range('data_seed', task_config.data_seed, 0)


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  size = SIZES[task_config.dataset]
  limits = {split: int(task_config[f'max_{split}']) for split in base.SPLITS}
  if task_config.dataset == 'cifar10':
    sources = Cifar10Sources(data_dir, bool(task_config.download), limits)
  else:
    params = {'source_dir': os.path.abspath(source_dir(task_config)),
              'validation_percent': int(task_config.validation_percent),
              'data_seed': int(task_config.data_seed)}
    name = (f'val{params["validation_percent"]}pc_seed{params["data_seed"]}')
    sources = builders.sources(FashionMnist, name, params, data_dir,
                               builders.pixels_example, limits)
  return base.Task(
      name=task_config.name, vocab_size=VOCAB_SIZE, seq_len=size * size,
      num_classes=NUM_CLASSES, head='classify', causal=False,
      cls_token=False, sources=sources)
