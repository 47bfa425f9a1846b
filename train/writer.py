"""Where a run's scalars go: metrics.jsonl (one JSON object per record) and
TensorBoard event files (tensorboardX; no TensorFlow)."""
from __future__ import annotations

import json
import os

from tensorboardX import SummaryWriter


class MetricWriter:

  def __init__(self, workdir: str):
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON via a temporary file so a crash never leaves half a file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
    f.write('\n')
  os.replace(tmp, path)
