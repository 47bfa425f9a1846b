"""Pathfinder and Path-X (Long Range Arena; Linsley et al. 2018): is there a
path between the two marker dots? An 8-bit grey image read as a sequence of
its pixels (one token per pixel, row-major, token id = grey level;
vocabulary 256, no CLS: the model pools by `model.pooling='mean'`), 2
classes. Path-X is the same task at 128 x 128 (16,384 tokens) or 256 x 256
(65,536); the task names `pathfinder` and `pathx` share this module and differ
only in their configs.

Sources (`task.source`):
  generate     (default) the project's own generator, tasks/pathfinder_draw.py
      (the algorithm, its parameters per image size, measured rates), at
      `image_size` (32, 64, 128, 256) and `contour_length` (6, 9 or 14
      paddles; LRA uses 14), `num_train` / `num_validation` / `num_test`
      images with exactly balanced labels, deterministic from `data_seed`;
      `workers` processes draw in parallel (0: one per CPU core; the output
      does not depend on it). Stored as array_record with uint8 images and,
      per example, what defines its label: the markers' centres, which target
      curve each lies on, and the two target curves' vertices.
  lra_release  LRA's released PNGs, read from `manual_dir` (the folder that
      holds `pathfinder<size>/`, e.g. lra_release/lra_release):
      pathfinder<size>/<difficulty>/metadata/<i>.npy (text, one line per
      image: its folder, file name, an unused field, the label) and the PNGs
      they name, difficulty `curv_baseline` (contour 6),
      `curv_contour_length_9` or `curv_contour_length_14`. Every listed image
      that is not empty (the release has a few zero-byte PNGs) is kept; they
      are shuffled by `data_seed` and split 80% / 10% / 10% (the split of
      the Nyströmformer's and later LRA ports; the counts fields are not
      used). Converted once into an array_record dataset in the data dir.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from tasks import base
from tasks import builders
from tasks import pathfinder_draw as draw
from utils import progress as progress_lib

VOCAB_SIZE = 256
NUM_CLASSES = 2
SOURCES = ('generate', 'lra_release')
# LRA release folder of each contour length.
DIFFICULTY_DIRS = {6: 'curv_baseline', 9: 'curv_contour_length_9',
                   14: 'curv_contour_length_14'}
RELEASE_SPLIT = (0.8, 0.1)            # train, validation; test the rest


def generated_features() -> tfds.features.FeaturesDict:
  return builders.image_features(
      markers=tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
      marker_curve=tfds.features.Tensor(shape=(2,), dtype=np.int32),
      curves=tfds.features.Tensor(shape=(2, None, 2), dtype=np.float32))


def generated_splits(params: Mapping[str, Any]
                     ) -> dict[str, Iterable[dict[str, Any]]]:
  draw_params = draw.params_for(params['image_size'],
                                params['contour_length'])
  out = {}
  for index, split in enumerate(base.SPLITS):
    count = params['counts'][split]
    out[split] = _with_progress(
        f'pathfinder{params["image_size"]} {split}', count,
        draw.examples(params['data_seed'], index, count, draw_params,
                      workers=params['workers']))
  return out


def _with_progress(what: str, total: int, examples: Iterable[dict]):
  progress = progress_lib.Progress(what, total)
  for i, example in enumerate(examples, 1):
    yield example
    progress.update(i)
  progress.done()


class Pathfinder(builders.OfflineBuilder, skip_registration=True):
  """Pathfinder images from the project's generator."""
  name = 'pathfinder'
  FEATURES = generated_features
  GENERATE = generated_splits


def release_dir(manual_dir: str, image_size: int, contour_length: int) -> str:
  return os.path.join(manual_dir, f'pathfinder{image_size}',
                      DIFFICULTY_DIRS[contour_length])


def release_rows(folder: str) -> list[tuple[str, int]]:
  """(image path, label) of every metadata line, metadata files in numeric
  order, lines in file order."""
  meta = os.path.join(folder, 'metadata')
  files = sorted((f for f in os.listdir(meta) if f.endswith('.npy')),
                 key=lambda f: (len(f), f))
  rows = []
  for name in files:
    with open(os.path.join(meta, name)) as f:
      for line in f:
        fields = line.split()
        if len(fields) < 4:
          continue
        rows.append((os.path.join(folder, fields[0], fields[1]),
                     int(fields[3])))
  return rows


def release_splits(params: Mapping[str, Any]
                   ) -> dict[str, Iterable[dict[str, Any]]]:
  import PIL.Image  # pillow: only this source decodes PNGs
  folder = release_dir(params['manual_dir'], params['image_size'],
                       params['contour_length'])
  rows = [r for r in release_rows(folder)
          if os.path.isfile(r[0]) and os.path.getsize(r[0]) > 0]
  order = np.random.default_rng(params['data_seed']).permutation(len(rows))
  n_train = int(len(rows) * RELEASE_SPLIT[0])
  n_val = int(len(rows) * (RELEASE_SPLIT[0] + RELEASE_SPLIT[1])) - n_train
  parts = {'train': order[:n_train],
           'validation': order[n_train:n_train + n_val],
           'test': order[n_train + n_val:]}

  def read(indices):
    for i in indices:
      path, label = rows[i]
      with PIL.Image.open(path) as img:
        image = np.asarray(img.convert('L'), np.uint8)
      yield {'image': image, 'label': np.int32(label)}
  return {split: read(indices) for split, indices in parts.items()}


class PathfinderRelease(builders.OfflineBuilder, skip_registration=True):
  """LRA's released Pathfinder PNGs, converted from a manual_dir."""
  name = 'pathfinder_release'
  FEATURES = builders.image_features
  GENERATE = release_splits

  def check_inputs(self) -> None:
    p = self.builder_config.params
    folder = release_dir(p['manual_dir'], p['image_size'],
                         p['contour_length'])
    if not os.path.isdir(os.path.join(folder, 'metadata')):
      raise FileNotFoundError(
          f'no LRA Pathfinder release in {folder} (it needs metadata/ and '
          'the PNGs it lists): point --config.task.manual_dir at the folder '
          f'that holds pathfinder{p["image_size"]}/ from lra_release.gz, or '
          "use --config.task.source=generate")


def check(task_config) -> None:
  c = task_config
  if c.source not in SOURCES:
    raise ValueError(f'task.source={c.source!r}; valid: {", ".join(SOURCES)}')
  draw.params_for(int(c.image_size), int(c.contour_length))  # names the field
  if c.source == 'lra_release' and not c.manual_dir:
    raise ValueError("task.source='lra_release' reads LRA's PNGs from "
                     'task.manual_dir; set --config.task.manual_dir')
  builders.check_range('workers', c.workers, 0)
  builders.check_counts_and_seed(c)


def make(task_config, data_dir: str) -> base.Task:
  check(task_config)
  c = task_config
  size, length = int(c.image_size), int(c.contour_length)
  if c.source == 'generate':
    params = builders.generator_params(c, ('image_size', 'contour_length',
                                           'workers'))
    name = builders.config_name(c, f'{size}px', f'len{length}')
    builder = Pathfinder
  else:
    params = {'image_size': size, 'contour_length': length,
              'data_seed': int(c.data_seed),
              'manual_dir': os.path.abspath(c.manual_dir)}
    name = f'{size}px_len{length}_seed{c.data_seed}'
    builder = PathfinderRelease
  return base.Task(
      name=c.name, vocab_size=VOCAB_SIZE, seq_len=size * size,
      num_classes=NUM_CLASSES, head='classify', causal=False,
      sources=builders.sources(builder, name, params, data_dir,
                               builders.pixels_example))
