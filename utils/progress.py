"""Progress lines with an ETA for long loops (data generation, sweeps)."""
from __future__ import annotations

import time

from absl import logging


def format_duration(seconds: float) -> str:
  """'4m05s', or '1h02m03s' from an hour on."""
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else f'{m}m{s:02d}s'


class Progress:
  """Progress over `total` units of `what`; the ETA is the mean time per
  unit so far times the units left."""

  def __init__(self, what: str, total: int, unit: str = 'examples',
               every_s: float = 10.0):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self._start = self._last = time.monotonic()

  def _left(self, done: int) -> float | None:
    if done <= 0:
      return None
    return (time.monotonic() - self._start) / done * (self.total - done)

  def update(self, done: int, note: str = '') -> None:
    """'what: done / total unit (rate/s, ~ETA left)note', at most every
    `every_s` seconds."""
    now = time.monotonic()
    if now - self._last < self.every_s:
      return
    self._last = now
    rate = done / max(now - self._start, 1e-9)
    logging.info('%s: %d / %d %s (%.0f/s, ~%s left)%s', self.what, done,
                 self.total, self.unit, rate,
                 format_duration(self._left(done) or 0), note)

  def start_item(self, index: int, name: str) -> None:
    """'what index/total: name; ~ETA left' when item `index` (1-based)
    starts, the ones before it done."""
    left = self._left(index - 1)
    logging.info('%s %d/%d: %s%s', self.what, index, self.total, name,
                 '' if left is None else f'; ~{format_duration(left)} left')

  def done(self) -> None:
    logging.info('%s: %d %s in %.1f s', self.what, self.total, self.unit,
                 time.monotonic() - self._start)
