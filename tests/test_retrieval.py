"""The retrieval task's data: WordNet pairs (small data.* files written by
conftest) and LRA's released TSVs (a small one written here)."""
import numpy as np
import pytest

import tasks
from tasks import retrieval, text, wordnet


def _config(**overrides):
  c = tasks.get_config('retrieval', 'smoke').task
  c.update(overrides)
  return c


def _doc(inputs, length):
  return bytes((inputs[1:length] - text.BYTE_OFFSET).astype(np.uint8)
               .tolist())


def _files(doc: bytes) -> set:
  """The lexicographer files (conftest's word stems) of a document's whole
  synset lines."""
  return {line.split(b',')[0].rstrip(b'0123456789')
          for line in doc.split(b'\n')[:-1]}


def test_wordnet_pairs_are_balanced_and_labelled_by_their_files(
    smoke_config):
  config = smoke_config('retrieval')
  task = tasks.get(config.task, config.data_dir)
  assert task.head == 'match' and task.num_classes == 2 and task.cls_token
  names = [n.split('.')[1].lower().encode()
           for n in wordnet.classes(config.task)]
  for split in tasks.SPLITS:
    examples = list(task.source(split))
    labels = np.array([e['label'] for e in examples])
    np.testing.assert_array_equal(labels, (np.arange(len(labels)) + 1) % 2)
    for i, e in enumerate(examples):
      assert e['inputs'].shape == (2, config.task.max_length)
      assert (e['inputs'][:, 0] == text.CLS_ID).all()
      a, b = (_doc(e['inputs'][k], e['length'][k]) for k in (0, 1))
      files_a, files_b = _files(a), _files(b)
      assert len(files_a) == len(files_b) == 1
      assert files_a == {names[(i // 2) % len(names)]}
      assert (files_a == files_b) == bool(e['label'])
      if e['label']:  # the two documents of a pair share no synset
        assert not set(a.split(b'\n')[:-1]) & set(b.split(b'\n')[:-1])


def _write_tsv(folder, rows_per_split=6):
  folder.mkdir(parents=True, exist_ok=True)
  written = {}
  for split, name in retrieval.AAN_FILES.items():
    rows = [(float(i % 2), f'{split}-a{i}', f'{split}-b{i}',
             f'{split} paper {i} ' + 'p' * 40, f'cited {i}')
            for i in range(rows_per_split)]
    with open(folder / name, 'w') as f:
      f.writelines('\t'.join(str(x) for x in r) + '\n' for r in rows)
    written[split] = rows
  return written


def test_lra_release_tsvs_are_read_as_lra_did(tmp_path):
  rows = _write_tsv(tmp_path / 'tsv_data')
  config = _config(dataset='lra_release', manual_dir=str(tmp_path /
                                                         'tsv_data'),
                   max_length=21)
  task = tasks.get(config, str(tmp_path / 'data'))
  for split in tasks.SPLITS:
    examples = list(task.source(split))
    assert len(examples) == len(rows[split])
    for e, (label, _, _, text1, text2) in zip(examples, rows[split]):
      assert e['label'] == int(label)
      assert _doc(e['inputs'][0], e['length'][0]) == text1.encode()[:20]
      assert _doc(e['inputs'][1], e['length'][1]) == text2.encode()[:20]


def test_a_bad_tsv_line_is_named(tmp_path):
  _write_tsv(tmp_path / 'tsv')
  with open(tmp_path / 'tsv' / retrieval.AAN_FILES['train'], 'a') as f:
    f.write('1.0\tonly\tthree\n')
  task = tasks.get(_config(dataset='lra_release',
                           manual_dir=str(tmp_path / 'tsv')),
                   str(tmp_path / 'data'))
  with pytest.raises(ValueError, match=r'new_aan_pairs.train.tsv:7 has 3 '
                                       'tab-separated fields'):
    task.source('train')


def test_missing_tsvs_and_manual_dir_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match='set --config.task.manual_dir'):
    tasks.get(_config(dataset='lra_release'), str(tmp_path))
  task = tasks.get(_config(dataset='lra_release', manual_dir=str(tmp_path)),
                   str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError,
                     match='missing new_aan_pairs.train.tsv, '
                           'new_aan_pairs.eval.tsv'):
    task.source('train')
