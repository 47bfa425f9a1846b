"""The image task: Fashion-MNIST from idx files, TFDS's cifar10 in grey.

Everything is read from files the tests write (conftest's idx files, a tiny
cifar10 prepared here); nothing is downloaded.
"""
import io
import os

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

import tasks
from tasks import image
from tests.conftest import write_fashion_mnist, write_idx


def _config(**overrides):
  c = tasks.get_config('image', 'smoke').task
  c.update(overrides)
  return c


def _all(source):
  return source.__getitems__(range(len(source)))


@pytest.mark.parametrize('name', ['x.gz', 'x'])
def test_idx_round_trip(tmp_path, name):
  array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
  write_idx(tmp_path / name, array)
  np.testing.assert_array_equal(image.read_idx(str(tmp_path / name)), array)


def test_idx_with_a_bad_header_is_refused(tmp_path):
  (tmp_path / 'x').write_bytes(b'\x00\x00\x0d\x01' + b'\x00' * 8)
  with pytest.raises(ValueError, match='not an unsigned-byte idx file'):
    image.read_idx(str(tmp_path / 'x'))
  write_idx(tmp_path / 'y', np.zeros((4, 2), np.uint8))
  (tmp_path / 'y').write_bytes((tmp_path / 'y').read_bytes()[:-1])
  with pytest.raises(ValueError, match='its header says'):
    image.read_idx(str(tmp_path / 'y'))


def test_fashion_mnist_splits_are_the_files(tmp_path):
  files = write_fashion_mnist(tmp_path / 'src', num_train=50, num_test=12)
  task = tasks.get(_config(source_dir=str(tmp_path / 'src'), max_train=0,
                           max_validation=0, max_test=0),
                   str(tmp_path / 'data'))
  assert (task.seq_len, task.vocab_size, task.num_classes) == (784, 256, 10)
  assert not task.cls_token
  data = {split: _all(task.source(split)) for split in tasks.SPLITS}
  assert [len(data[s]) for s in tasks.SPLITS] == [45, 5, 12]  # 10% held out
  for x in data['train'][:3]:
    assert x['inputs'].shape == (784,) and x['length'] == 784
  # Train and validation partition the training file; test is the test file.
  train_images, train_labels = files['train']
  rows = {r.tobytes(): i for i, r in enumerate(train_images.reshape(50, -1))}
  seen = [rows[x['inputs'].astype(np.uint8).tobytes()]
          for split in ('train', 'validation') for x in data[split]]
  assert sorted(seen) == list(range(50))
  kept = [rows[x['inputs'].astype(np.uint8).tobytes()] for x in data['train']]
  assert kept == sorted(kept)                    # train keeps file order
  for i, x in zip(seen, data['train'] + data['validation']):
    assert x['label'] == train_labels[i]
  test_images, test_labels = files['test']
  for x, img, label in zip(data['test'], test_images, test_labels):
    np.testing.assert_array_equal(x['inputs'], img.reshape(-1))
    assert x['label'] == label


def test_split_caps_keep_the_first_examples(tmp_path):
  full = tasks.get(_config(max_train=0), str(tmp_path))
  capped = tasks.get(_config(max_train=5), str(tmp_path))
  assert len(capped.source('train')) == 5
  for a, b in zip(_all(capped.source('train')), _all(full.source('train'))):
    np.testing.assert_array_equal(a['inputs'], b['inputs'])


def test_missing_package_names_it(tmp_path, monkeypatch):
  monkeypatch.setattr(image, 'FASHION_MNIST_DIR', str(tmp_path / 'absent'))
  task = tasks.get(_config(), str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError,
                     match='apt-get install dataset-fashion-mnist, or point '
                     '--config.task.source_dir'):
    task.source('train')
  with pytest.raises(FileNotFoundError, match='check the folder'):
    tasks.get(_config(source_dir=str(tmp_path)), str(tmp_path)).source('test')
  assert not (tmp_path / 'data').exists() or not any(
      p.is_file() for p in (tmp_path / 'data').rglob('*'))


def test_cls_pooling_is_refused_without_a_cls_token(smoke_config, tmp_path):
  from train import trainer
  config = smoke_config('image', model__pooling='cls')
  with pytest.raises(ValueError, match="model.pooling='cls' reads a CLS "
                     'token, which task image does not put at position 0'):
    trainer.train_and_evaluate(config, str(tmp_path / 'run'))


def _png(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


class _TinyCifar10(tfds.image_classification.Cifar10,
                   skip_registration=True):
  """cifar10's own features and version, with a few random images made here
  instead of the download (as PNG bytes: TFDS encodes arrays with
  TensorFlow, which is not installed)."""
  name = 'cifar10'
  ENCODE = staticmethod(_png)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._examples(20, 0), 'test': self._examples(6, 1)}

  def _examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield i, {'id': f'{seed}_{i}', 'label': i % 10,
                'image': type(self).ENCODE(image)}


class _ArraysCifar10(_TinyCifar10, skip_registration=True):
  """As TFDS's own builder does: arrays, which need TensorFlow to encode."""
  ENCODE = staticmethod(lambda image: image)


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('cifar'))
  _TinyCifar10(data_dir=folder).download_and_prepare(
      file_format='array_record')
  return folder


def test_cifar10_reads_tfds_in_grey_with_lras_splits(cifar_dir):
  task = tasks.get(_config(dataset='cifar10', download=False, max_train=0,
                           max_validation=0, max_test=0), cifar_dir)
  assert (task.seq_len, task.vocab_size) == (1024, 256)
  data = {split: _all(task.source(split)) for split in tasks.SPLITS}
  assert [len(data[s]) for s in tasks.SPLITS] == [18, 2, 6]  # 90% / 10%
  raw = tfds.data_source('cifar10', split='train', data_dir=cifar_dir,
                         download=False)
  for i in (0, 17):
    rgb = raw[i]['image'].astype(np.float64)
    # tf.image.rgb_to_grayscale on uint8, written out.
    grey = np.floor((rgb / 255 @ [0.2989, 0.5870, 0.1140]) * 255.5)
    np.testing.assert_allclose(data['train'][i]['inputs'], grey.reshape(-1),
                               atol=1)  # float32 rounding at the boundary
    assert data['train'][i]['label'] == raw[i]['label']
  assert data['validation'][0]['label'] == raw[18]['label']


def test_cifar10_without_data_or_download_says_what_to_do(tmp_path):
  task = tasks.get(_config(dataset='cifar10', download=False), str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match='cifar10 is not prepared in .*download=True'):
    task.source('train')


def test_cifar10_preparation_without_tensorflow_says_where_to_do_it(
    tmp_path, monkeypatch):
  monkeypatch.setattr(image, '_cifar10_builder',
                      lambda data_dir: _ArraysCifar10(data_dir=data_dir))
  task = tasks.get(_config(dataset='cifar10', download=True), str(tmp_path))
  with pytest.raises(FileNotFoundError, match='needs TensorFlow to write its '
                     'PNG images.*tfds build cifar10'):
    task.source('train')


def test_unknown_dataset_is_refused(tmp_path):
  with pytest.raises(ValueError, match="task.dataset='mnist'; valid: "
                     'fashion_mnist, cifar10'):
    tasks.get(_config(dataset='mnist'), str(tmp_path))


DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'  # conftest patches the default


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR),
                    reason='Debian dataset-fashion-mnist is not installed')
def test_the_debian_files_parse():
  x = image.read_idx(image.idx_path(DEBIAN_DIR, 'train-labels-idx1-ubyte'))
  assert x.shape == (60_000,) and set(np.unique(x)) == set(range(10))
