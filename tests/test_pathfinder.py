"""The pathfinder and pathx tasks: generated data through TFDS, and LRA's
released PNGs read from a manual_dir (PNGs the test writes)."""
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import tasks
from tasks import pathfinder


def _config(name='pathfinder', preset='smoke', **overrides):
  c = tasks.get_config(name, preset).task
  c.update(overrides)
  return c


def _all(source):
  return source.__getitems__(range(len(source)))


def test_generated_images_are_stored_with_their_geometry(tmp_path):
  c = _config(num_train=24, num_validation=8, num_test=8)
  task = tasks.get(c, str(tmp_path))
  assert (task.seq_len, task.vocab_size, task.num_classes) == (1024, 256, 2)
  train = _all(task.source('train'))
  assert len(train) == 24
  labels = [int(x['label']) for x in train]
  assert sum(labels) == 12                       # balanced
  assert all(x['inputs'].shape == (1024,) and x['length'] == 1024
             for x in train)
  # The stored records keep what defines the label.
  builder = task.sources.builder()
  raw = builder.as_data_source('train')
  for i in range(4):
    record = raw[i]
    assert record['image'].shape == (32, 32)
    np.testing.assert_array_equal(record['image'].reshape(-1),
                                  train[i]['inputs'])
    same_curve = record['marker_curve'][0] == record['marker_curve'][1]
    assert int(record['label']) == int(same_curve)
    assert record['curves'].shape == (2, c.contour_length + 1, 2)


def test_pathx_shares_the_generator_at_its_own_size(tmp_path):
  task = tasks.get(_config('pathx', 'cpu'), str(tmp_path))
  assert task.name == 'pathx' and task.seq_len == 128 * 128
  lra256 = tasks.get(_config('pathx', 'lra256'), str(tmp_path))
  assert lra256.seq_len == 65_536


@pytest.mark.parametrize('field, value, message', [
    ('image_size', 48, 'image_size'),
    ('contour_length', 7, 'contour_length'),
    ('source', 'web', "task.source='web'; valid: generate, lra_release"),
    ('workers', -1, 'task.workers=-1 is out of range'),
])
def test_bad_parameters_name_the_field(tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    tasks.get(_config(**{field: value}), str(tmp_path))


def _write_release(root, size=32, length=14, count=20):
  """LRA's layout: pathfinder<size>/<difficulty>/{metadata/<i>.npy, imgs/<i>/}
  with two metadata files and one empty PNG (as in the release)."""
  folder = os.path.join(root, f'pathfinder{size}',
                        pathfinder.DIFFICULTY_DIRS[length])
  rng = np.random.default_rng(0)
  images = {}
  for meta_index in range(2):
    os.makedirs(os.path.join(folder, 'imgs', str(meta_index)), exist_ok=True)
    os.makedirs(os.path.join(folder, 'metadata'), exist_ok=True)
    lines = []
    for i in range(count // 2):
      name = f'sample_{i}.png'
      path = os.path.join(folder, 'imgs', str(meta_index), name)
      label = (i + meta_index) % 2
      if meta_index == 1 and i == 0:
        open(path, 'wb').close()               # an empty PNG: skipped
      else:
        image = rng.integers(0, 256, (size, size), dtype=np.uint8)
        PIL.Image.fromarray(image).save(path)
        images[image.tobytes()] = label
      lines.append(f'imgs/{meta_index} {name} 0 {label} 14 1.5 2 1\n')
    with open(os.path.join(folder, 'metadata', f'{meta_index}.npy'),
              'w') as f:
      f.writelines(lines)
  return images


def test_lra_release_pngs_are_read_from_the_manual_dir(tmp_path):
  images = _write_release(str(tmp_path / 'release'))
  task = tasks.get(_config(source='lra_release', contour_length=14,
                           manual_dir=str(tmp_path / 'release')),
                   str(tmp_path / 'data'))
  data = {split: _all(task.source(split)) for split in tasks.SPLITS}
  assert [len(data[s]) for s in tasks.SPLITS] == [15, 2, 2]  # 19 of 20 read
  seen = []
  for split in tasks.SPLITS:
    for x in data[split]:
      key = x['inputs'].astype(np.uint8).tobytes()
      assert images[key] == x['label']          # the metadata's label
      seen.append(key)
  assert sorted(seen) == sorted(images)         # each image exactly once


def test_missing_release_says_where_to_point(tmp_path):
  task = tasks.get(_config(source='lra_release',
                           manual_dir=str(tmp_path / 'none')),
                   str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError,
                     match='point --config.task.manual_dir at the folder'):
    task.source('train')
  with pytest.raises(ValueError, match='set --config.task.manual_dir'):
    tasks.get(_config(source='lra_release'), str(tmp_path))


def test_the_features_need_no_tensorflow():
  # Tensors with zlib encoding decode with numpy alone (no Image feature).
  features = pathfinder.generated_features()
  assert not any(isinstance(f, tfds.features.Image)
                 for f in features.values())
