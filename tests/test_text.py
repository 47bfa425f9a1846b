"""The byte-level text tasks' data: WordNet documents (small data.* files
written by conftest), TFDS's imdb_reviews (a tiny one prepared here with
TFDS's own builder class), and the byte encoding; nothing is downloaded."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

import tasks
from tasks import text, wordnet


def _config(**overrides):
  c = tasks.get_config('text', 'smoke').task
  c.update(overrides)
  return c


def _decode(example):
  """The bytes after CLS, up to the example's length."""
  ids = example['inputs'][1:example['length']]
  return bytes((ids - text.BYTE_OFFSET).astype(np.uint8).tolist())


def test_byte_encoding_truncation_and_padding():
  tokens = text.byte_tokens('ab\u00e9')  # é is two UTF-8 bytes
  np.testing.assert_array_equal(tokens, [98, 99, 196, 170])
  inputs, length = text.document_inputs(tokens, 8)
  np.testing.assert_array_equal(inputs, [text.CLS_ID, 98, 99, 196, 170, 0,
                                         0, 0])
  assert length == 5
  inputs, length = text.document_inputs(tokens, 3)  # CLS + first 2 bytes
  np.testing.assert_array_equal(inputs, [text.CLS_ID, 98, 99])
  assert length == 3
  assert text.byte_tokens(b'\x00\xff').tolist() == [1, 256]
  assert text.VOCAB_SIZE == 258


def test_synset_line_parsing():
  line = (b'01234567 20 n 02 oak 0 oak_tree 0 001 @ 01 n 0000 | a deciduous '
          b'tree of the genus Quercus  \n')
  lexfile, rendered = wordnet.synset_text(line)
  assert wordnet.LEXNAMES[lexfile] == 'noun.plant'
  assert rendered == b'oak, oak tree: a deciduous tree of the genus Quercus\n'


def test_documents_are_balanced_long_and_split_by_synset(smoke_config,
                                                         wordnet_dir):
  config = smoke_config('text')
  task = tasks.get(config.task, config.data_dir)
  names = wordnet.classes(config.task)
  assert task.num_classes == len(names) == 13
  assert task.cls_token and task.vocab_size == text.VOCAB_SIZE
  lines = {}
  for split in tasks.SPLITS:
    source = task.source(split)
    assert len(source) == config.task[f'num_{split}']
    examples = list(source)
    labels = np.array([e['label'] for e in examples])
    np.testing.assert_array_equal(labels, np.arange(len(labels)) % 13)
    lines[split] = set()
    for e in examples:
      assert e['inputs'][0] == text.CLS_ID
      assert e['inputs'].shape == (config.task.max_length,)
      doc = _decode(e)
      # Every whole line is a synset of the example's own class (conftest's
      # words name the file).
      stem = names[e['label']].split('.')[1].lower()
      for line in doc.split(b'\n')[:-1]:
        assert line.startswith(stem.encode()), (line, stem)
        lines[split].add(line)
  # No synset is in two splits.
  assert not lines['train'] & lines['test']
  assert not lines['train'] & lines['validation']
  assert not lines['validation'] & lines['test']


def test_documents_reach_doc_bytes_and_are_deterministic(tmp_path):
  config = _config(max_length=600, doc_bytes=500, num_train=20,
                   num_validation=4, num_test=4)
  first = tasks.get(config, str(tmp_path / 'a')).source('train')
  again = tasks.get(config, str(tmp_path / 'b')).source('train')
  for x, y in zip(first, again):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])
    assert x['length'] - 1 >= 500       # at least doc_bytes bytes
  other = tasks.get(_config(max_length=600, doc_bytes=500, num_train=20,
                            num_validation=4, num_test=4, data_seed=1),
                    str(tmp_path / 'c')).source('train')
  assert any(not np.array_equal(x['inputs'], y['inputs'])
             for x, y in zip(first, other))


def test_classes_can_be_chosen_and_are_checked(tmp_path):
  config = _config(classes='verb.motion, noun.food')
  task = tasks.get(config, str(tmp_path))
  assert task.num_classes == 2
  doc = _decode(task.source('train')[1])
  assert doc.startswith(b'food')
  with pytest.raises(ValueError, match='unknown lexicographer file.*'
                                       'noun.nope'):
    tasks.get(_config(classes='noun.nope,noun.act'), str(tmp_path))
  with pytest.raises(ValueError, match='valid: 2 to 20'):
    tasks.get(_config(classes='noun.act'), str(tmp_path))
  with pytest.raises(ValueError, match='names a file twice'):
    tasks.get(_config(classes='noun.act,noun.act'), str(tmp_path))


def test_missing_package_names_it(tmp_path, monkeypatch):
  empty = str(tmp_path / 'none')
  monkeypatch.setattr(wordnet, 'WORDNET_DIR', empty)
  task = tasks.get(_config(), str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError,
                     match=f'apt-get install {wordnet.WORDNET_PACKAGE}'):
    task.source('train')
  task = tasks.get(_config(source_dir=str(tmp_path / 'elsewhere')),
                   str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError, match='check the folder'):
    task.source('train')


def test_a_pool_too_small_for_a_document_is_refused(tmp_path):
  task = tasks.get(_config(doc_bytes=5000), str(tmp_path))
  with pytest.raises(ValueError, match='too few for 1 document.*'
                                       'task.doc_bytes=5000'):
    task.source('train')


def test_bad_settings_are_refused(tmp_path):
  for overrides, message in (({'dataset': 'nope'}, "task.dataset='nope'"),
                             ({'max_length': 1}, 'task.max_length=1'),
                             ({'doc_bytes': 0}, 'task.doc_bytes=0')):
    with pytest.raises(ValueError, match=message):
      tasks.get(_config(**overrides), str(tmp_path))


class _TinyImdb(tfds.builder_cls('imdb_reviews'), skip_registration=True):
  """imdb_reviews' own features, configs and version, with a few reviews
  made here instead of the download."""
  name = 'imdb_reviews'

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._reviews('train', 40),
            'test': self._reviews('test', 10),
            'unsupervised': self._reviews('unsup', 2)}

  def _reviews(self, split, n):
    for i in range(n):
      yield f'{split}{i}', {'text': f'{split} review {i} ' + 'x' * i,
                            'label': i % 2}


@pytest.fixture(scope='module')
def imdb_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('imdb'))
  _TinyImdb(data_dir=folder, config='plain_text').download_and_prepare(
      file_format='array_record')
  return folder


def test_imdb_reads_tfds_with_validation_cut_from_train(imdb_dir):
  config = _config(dataset='imdb_reviews', download=False, max_length=16,
                   validation_percent=25)
  task = tasks.get(config, imdb_dir)
  assert task.num_classes == 2
  docs = {split: [_decode(e) for e in task.source(split)]
          for split in tasks.SPLITS}
  assert len(docs['train']) == 30 and len(docs['validation']) == 10
  assert len(docs['test']) == 10
  assert all(d.startswith(b'train') for d in docs['train'] +
             docs['validation'])
  assert all(d.startswith(b'test') for d in docs['test'])
  assert not set(docs['train']) & set(docs['validation'])
  raw = tfds.data_source(text.IMDB, split='train', data_dir=imdb_dir)
  assert set(docs['train']) | set(docs['validation']) == {
      r['text'][:15] for r in raw}
  # The cut is chosen by data_seed.
  other = tasks.get(_config(dataset='imdb_reviews', download=False,
                            max_length=16, validation_percent=25,
                            data_seed=1), imdb_dir)
  assert [_decode(e) for e in other.source('validation')] != docs[
      'validation']
  example = task.source('train')[0]
  assert example['inputs'][0] == text.CLS_ID and example['length'] == 16


def test_imdb_without_data_or_download_says_what_to_do(tmp_path):
  task = tasks.get(_config(dataset='imdb_reviews', download=False),
                   str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match='imdb_reviews/plain_text is not prepared in .*'
                           'download=True'):
    task.source('train')


def test_imdb_download_failure_is_one_line(tmp_path, monkeypatch):
  class _Offline:
    def is_prepared(self):
      return False

    def download_and_prepare(self, **_):
      raise ConnectionError('no route to host\nmore detail')
  monkeypatch.setattr(text, '_imdb_builder', lambda data_dir: _Offline())
  task = tasks.get(_config(dataset='imdb_reviews'), str(tmp_path))
  with pytest.raises(FileNotFoundError,
                     match=r'could not be downloaded .*\(no route to host\); '
                           '.*dataset=wordnet') as e:
    task.source('train')
  assert '\n' not in str(e.value)
