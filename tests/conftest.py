"""Shared fixtures: one offline data dir per test session, small configs,
and small files standing in for Debian's Fashion-MNIST and WordNet."""
import atexit
import gzip
import os
import shutil
import tempfile

import numpy as np
import pytest

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
# One persistent XLA compilation cache for the session, shared with the
# main.py subprocesses the tests launch (they inherit the environment):
# many tests compile the same smoke models, and on 2 cores compiling is most
# of their time. It lives and dies with the session, so no test ever sees
# an executable from another checkout.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='jax-test-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')


def write_idx(path, array):
  """An unsigned-byte idx file (gzipped when path ends in .gz)."""
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, '>u4').tobytes()
  opener = gzip.open if str(path).endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def write_fashion_mnist(folder, num_train=80, num_test=20, seed=0):
  """Random 28 x 28 images and labels 0-9 under the package's file names;
  returns {'train': (images, labels), 'test': (...)}."""
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  out = {}
  for split, n, prefix in (('train', num_train, 'train'),
                           ('test', num_test, 't10k')):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n, dtype=np.uint8) % 10
    write_idx(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    out[split] = images, labels
  return out


@pytest.fixture(scope='session', autouse=True)
def fashion_mnist_dir(tmp_path_factory):
  """The image task's default source: small idx files this session wrote
  (tests never depend on the Debian package being installed)."""
  from tasks import image
  folder = str(tmp_path_factory.mktemp('fashion-mnist'))
  write_fashion_mnist(folder)
  real, image.FASHION_MNIST_DIR = image.FASHION_MNIST_DIR, folder
  yield folder
  image.FASHION_MNIST_DIR = real


def write_wordnet(folder, per_class=100, seed=0):
  """data.noun and data.verb in WordNet's layout: `per_class` synsets in
  every lexicographer file of those parts of speech, each synset's words
  naming its file (e.g. 'act3 word'), after a licence header as the real
  files have. Returns {lexname: [synset line text, ...]} as
  tasks.wordnet.synset_text renders them."""
  from tasks import wordnet
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  texts = {}
  for pos, data_file in (('noun', 'data.noun'), ('verb', 'data.verb')):
    lines = ['  1 This software and database is provided by Princeton.  \n',
             '  2 (a licence header line, as in the real files)  \n']
    offset = 1000
    for lexfile, name in enumerate(wordnet.LEXNAMES):
      if not name.startswith(pos + '.'):
        continue
      stem = name.split('.')[1].lower()
      for i in range(per_class):
        words = [f'{stem}{i}', f'{stem}_thing_{i}']
        gloss = ' '.join(rng.choice(['of', 'a', 'the', stem, 'kind',
                                     'part', 'with'], 8))
        lines.append(f'{offset:08d} {lexfile:02d} {pos[0]} 02 {words[0]} 0 '
                     f'{words[1]} 0 000 | {gloss}  \n')
        texts.setdefault(name, []).append(
            f'{words[0]}, {words[1].replace("_", " ")}: {gloss}\n')
        offset += 100
    with open(os.path.join(folder, data_file), 'w') as f:
      f.writelines(lines)
  return texts


@pytest.fixture(scope='session', autouse=True)
def wordnet_dir(tmp_path_factory):
  """The text tasks' default source: small data.* files this session wrote
  (tests never depend on Debian's wordnet-base being installed)."""
  from tasks import wordnet
  folder = str(tmp_path_factory.mktemp('wordnet'))
  write_wordnet(folder)
  real, wordnet.WORDNET_DIR = wordnet.WORDNET_DIR, folder
  yield folder
  wordnet.WORDNET_DIR = real


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """TFDS data dir shared by the session so each task generates once."""
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture
def smoke_config(data_dir):
  """listops:smoke with the session's data dir; tests tweak it further."""
  def make(task='listops', **overrides):
    import tasks
    config = tasks.get_config(task, 'smoke')
    config.data_dir = data_dir
    for dotted, value in overrides.items():
      node = config
      *parents, leaf = dotted.split('__')
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config
  return make
