"""PNG plots of a sweep, drawn from the tables' JSON payloads
(evaluate/tables.py), never from numbers typed in:

  accuracy_speed.png  LRA Figure 3: average test accuracy against training
                      steps/s at one length, marker area proportional to peak
                      memory, one labelled point per variant
  scaling.png         time per train step (1 / steps/s) and peak memory
                      against sequence length, log-log, a line per variant

Figures are drawn on matplotlib's Agg canvas directly (no pyplot state, no
display needed).
"""
from __future__ import annotations

import os

from absl import logging
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluate import tables
from train import writer as writer_lib


def _ok(cell) -> bool:
  return cell is not None and cell.get('status') == 'ok'


def plot_length(accuracy: dict, efficiency: dict, wanted: int = 0):
  """The length of the accuracy-vs-speed plot: `wanted` when measured, else
  the longest one every variant with an average has measured (else the
  longest measured at all); None without measurements."""
  lengths = efficiency['lengths']
  cells = efficiency['cells']
  if wanted:
    if wanted in lengths:
      return wanted
    logging.warning('speed_length=%d was not measured (lengths: %s); '
                    'choosing one', wanted, lengths)
  kinds = [k for k in efficiency['kinds'] if accuracy['average'].get(k)]
  complete = [n for n in lengths
              if kinds and all(_ok(cells[k].get(str(n))) for k in kinds)]
  return max(complete or lengths, default=None)


def accuracy_speed_points(accuracy: dict, efficiency: dict, length: int):
  """(kind, steps/s, memory bytes, average accuracy %) per plottable kind."""
  points = []
  for kind in efficiency['kinds']:
    avg = accuracy['average'].get(kind)
    cell = efficiency['cells'][kind].get(str(length))
    if avg and _ok(cell):
      points.append((kind, cell['steps_per_sec'], cell['memory_bytes'],
                     avg['mean']))
  return points


def colors(kinds) -> dict:
  """One colour per variant, the same in every plot of a sweep."""
  return {kind: f'C{i % 10}' for i, kind in enumerate(kinds)}


def save_png(fig: Figure, path: str) -> None:
  """Writes fig as a PNG at path, atomically."""
  FigureCanvasAgg(fig)
  with writer_lib.atomic_path(path) as tmp:
    fig.savefig(tmp, format='png', dpi=120, bbox_inches='tight')


def accuracy_speed(accuracy: dict, efficiency: dict, path: str,
                   wanted_length: int = 0) -> bool:
  """Writes the LRA Figure 3 plot; False (logged) when nothing to plot."""
  length = plot_length(accuracy, efficiency, wanted_length)
  points = (accuracy_speed_points(accuracy, efficiency, length)
            if length else [])
  if not points:
    logging.warning('no variant has both an average accuracy and a speed '
                    'measurement; %s not written', path)
    return False
  unit, scale = tables.memory_unit([p[2] for p in points])
  top = max(p[2] for p in points)
  color = colors(efficiency['kinds'])
  fig = Figure(figsize=(6, 4.5), layout='constrained')
  ax = fig.add_subplot()
  for kind, speed, memory, acc in points:
    ax.scatter(speed, acc, s=60 + 1200 * memory / top, alpha=0.5,
               color=color[kind])
    ax.annotate(f'{kind} ({tables.fmt(memory / scale)} {unit})',
                (speed, acc), textcoords='offset points', xytext=(6, 6),
                fontsize=8)
  ax.set_xlabel(f'training steps/s at length {length}')
  ax.set_ylabel('average test accuracy (%)')
  ax.set_title('accuracy vs speed (marker area: peak memory)')
  ax.grid(alpha=0.3)
  ax.margins(0.25)  # room for the labels and the largest markers
  save_png(fig, path)
  return True


def scaling_series(efficiency: dict):
  """kind -> (lengths, seconds per step, memory bytes), measured cells only."""
  series = {}
  for kind in efficiency['kinds']:
    ns = [n for n in efficiency['lengths']
          if _ok(efficiency['cells'][kind].get(str(n)))]
    if ns:
      cells = [efficiency['cells'][kind][str(n)] for n in ns]
      series[kind] = (ns, [1.0 / c['steps_per_sec'] for c in cells],
                      [c['memory_bytes'] for c in cells])
  return series


def scaling(efficiency: dict, path: str) -> bool:
  """Writes time and memory against length (log-log); False if no data."""
  series = scaling_series(efficiency)
  if not series:
    logging.warning('no efficiency measurements; %s not written', path)
    return False
  unit, scale = tables.memory_unit(
      [m for _, _, memory in series.values() for m in memory])
  color = colors(efficiency['kinds'])
  fig = Figure(figsize=(10, 4), layout='constrained')
  time_ax, mem_ax = fig.subplots(1, 2)
  for kind, (ns, seconds, memory) in series.items():
    time_ax.plot(ns, seconds, marker='o', label=kind, color=color[kind])
    mem_ax.plot(ns, [m / scale for m in memory], marker='o', label=kind,
                color=color[kind])
  lengths = sorted({n for ns, _, _ in series.values() for n in ns})
  for ax, label in ((time_ax, 'seconds per train step'),
                    (mem_ax, f'peak memory ({unit})')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.xaxis.set_minor_locator(ticker.NullLocator())  # lengths only
    ax.set_xlabel('sequence length')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which='both')
  time_ax.legend(fontsize=8)
  save_png(fig, path)
  return True


def write_all(accuracy: dict, efficiency: dict, out_dir: str,
              speed_length: int = 0) -> list[str]:
  """Both plots into out_dir; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  written = []
  path = os.path.join(out_dir, 'accuracy_speed.png')
  if accuracy_speed(accuracy, efficiency, path, speed_length):
    written.append(path)
  path = os.path.join(out_dir, 'scaling.png')
  if scaling(efficiency, path):
    written.append(path)
  return written
