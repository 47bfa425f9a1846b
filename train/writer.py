"""Where a run's records go: metrics.jsonl (one JSON object per record),
TensorBoard event files (tensorboardX; no TensorFlow), and the JSON files
of a workdir, written atomically and read back with errors that name them.

metrics.jsonl stays truthful across restarts: a run resumed from step s
first drops the records past s (written after that checkpoint by the
attempt that died) and a torn last line, so the file holds exactly the
records an uninterrupted run writes. TensorBoard is told the same
(`purge_step`), so it hides events past s.
"""
from __future__ import annotations

import contextlib
import json
import os

from absl import logging
from tensorboardX import SummaryWriter


def read_json(path: str):
  """(parsed JSON, None) or (None, reason it cannot be read)."""
  try:
    with open(path, 'rb') as f:
      return json.loads(f.read().decode('utf-8')), None
  except FileNotFoundError:
    return None, 'missing'
  except UnicodeDecodeError:
    return None, 'not UTF-8 text (binary?)'
  except IsADirectoryError:
    return None, 'a directory, not a file'
  except OSError as e:
    return None, f'unreadable ({e.strerror})'
  except ValueError as e:
    return None, f'invalid JSON ({e})'


def read_json_object(path: str, what: str) -> dict:
  """The JSON object in path; ValueError naming the file otherwise."""
  data, reason = read_json(path)
  if reason is None and not isinstance(data, dict):
    reason = f'a JSON {type(data).__name__}, not an object'
  if reason is not None:
    raise ValueError(f'{path} is {reason}; it should hold {what}: restore '
                     'it, or move it away')
  return data


@contextlib.contextmanager
def atomic_path(path: str):
  """Yields a temporary path to write; renamed to `path` when the block
  ends without error, so a reader never sees half a file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w') as f:
    f.write(text)


def write_json_atomic(path: str, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2) + '\n')


def _records_through(path: str, step: int) -> tuple[list[str], int, bool]:
  """(lines of records with step <= `step`, number dropped, whether the
  file needs rewriting)."""
  try:
    with open(path, 'rb') as f:
      text = f.read().decode('utf-8', errors='replace')
  except FileNotFoundError:
    return [], 0, False
  lines = text.split('\n')
  kept, dropped = [], 0
  for line in lines:
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      keep = isinstance(record, dict) and int(record['step']) <= step
    except (ValueError, KeyError, TypeError):
      keep = False                       # a torn or foreign line
    if keep:
      kept.append(line)
    else:
      dropped += 1
  return kept, dropped, bool(dropped or (text and not text.endswith('\n')))


class MetricWriter:
  """Appends records; `resume_step` is the step the run restarts from."""

  def __init__(self, workdir: str, resume_step: int = 0):
    path = os.path.join(workdir, 'metrics.jsonl')
    kept, dropped, rewrite = _records_through(path, resume_step)
    if dropped:
      logging.info('%s: dropped %d record(s) past step %d (written after '
                   'that checkpoint by an interrupted attempt)', path,
                   dropped, resume_step)
    if rewrite:
      write_text_atomic(path, ''.join(line + '\n' for line in kept))
    self._jsonl = open(path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=resume_step + 1)

  def write(self, step: int, scalars: dict):
    self._jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self._jsonl.flush()
    for name, value in scalars.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    self._jsonl.close()
    self._tb.close()


class NoWriter:
  """A MetricWriter that writes nothing: the run's processes other than
  process 0 (which writes the records of all of them)."""

  def write(self, step: int, scalars: dict):
    del step, scalars

  def close(self):
    pass
