"""The Long Range Arena tables of a sweep directory, from its files alone.

Reads runs/<task>/<kind>/seed<k>/results.json and efficiency/<kind>_<len>.json
(evaluate/compare.py writes them) and writes to tables/:

  accuracy.{md,csv,tex,json}    LRA Table 1: a row per variant, a column per
                                task plus the average; test accuracy (%) as
                                mean ± std over seeds, with the seed count
  efficiency.{md,csv,tex,json}  LRA Table 2: training steps/s and peak memory
                                per variant at each length, with the ratio to
                                full attention, e.g. '12.3 (1.80x)'

Standard deviations are sample standard deviations (ddof=1, the estimate of
the spread across seeds); a cell from one seed has none. The average column
is the mean of the variant's task means, shown only when the variant has
every task; its ± is the sample std over seeds of the per-seed average across
tasks when all tasks ran the same seeds. Speed ratios are steps/s over full's
(above 1 is faster); memory ratios are bytes over full's (below 1 is less).

A results.json or efficiency file that cannot be used (invalid JSON, a
missing or non-numeric metric, a duplicate) is logged with its path, listed
under 'skipped' in the table's JSON, and left out of every number. CSV holds
the numbers unformatted; Markdown and LaTeX the formatted cells; JSON both.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os

from absl import logging

from train import writer as writer_lib
from utils import paths

DASH = '–'   # a cell with no data
PM = '±'


# -- reading -----------------------------------------------------------------


def _number(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      not math.isfinite(value)):
    raise ValueError(f'{name}={value!r} is not a finite number')
  return float(value)


def run_record(data) -> dict:
  """task, kind, seed and test accuracy of one results.json's content."""
  accuracy = _number(paths.get(data, 'metrics.test.accuracy'),
                     'metrics.test.accuracy')
  if not 0.0 <= accuracy <= 1.0:
    raise ValueError(f'metrics.test.accuracy={accuracy} is outside [0, 1]')
  task, kind, seed = (paths.get(data, 'task'),
                      paths.get(data, 'attention.kind'),
                      paths.get(data, 'seed'))
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f'seed={seed!r} is not an integer')
  return {'task': str(task), 'kind': str(kind), 'seed': seed,
          'accuracy': accuracy}


def efficiency_record(data) -> dict:
  """kind, seq_len, status and the numbers of one efficiency file."""
  kind, n, status = (paths.get(data, 'kind'), paths.get(data, 'seq_len'),
                     paths.get(data, 'status'))
  record = {'kind': str(kind), 'seq_len': int(_number(n, 'seq_len')),
            'status': status, 'device': data.get('device', ''),
            'batch_size': data.get('batch_size')}
  if status == 'ok':
    record['steps_per_sec'] = _number(paths.get(data, 'steps_per_sec'),
                                      'steps_per_sec')
    record['memory_bytes'] = _number(paths.get(data, 'memory_bytes'),
                                     'memory_bytes')
  elif status == 'does not fit':
    record['memory_bytes'] = _number(paths.get(data, 'memory_bytes'),
                                     'memory_bytes')
  else:
    record['error'] = str(data.get('error', ''))
  return record


def _read_all(paths, parse, key) -> tuple[list[dict], list[dict]]:
  """(records, skipped) of files; skipped ones are logged with their path."""
  records, skipped, seen = [], [], {}
  for path in paths:
    data, reason = writer_lib.read_json(path)
    if reason is None:
      try:
        record = parse(data)
      except (KeyError, ValueError, TypeError) as e:
        reason = str(e).strip('"\'')
      else:
        if key(record) in seen:
          reason = f'duplicate of {seen[key(record)]}'
        else:
          seen[key(record)] = path
          records.append(dict(record, path=path))
          continue
    logging.warning('skipping %s: %s', path, reason)
    skipped.append({'path': path, 'reason': reason})
  return records, skipped


def read_runs(sweep_dir: str) -> tuple[list[dict], list[dict]]:
  paths = sorted(glob.glob(os.path.join(sweep_dir, 'runs', '*', '*', 'seed*',
                                        'results.json')))
  return _read_all(paths, run_record,
                   lambda r: (r['task'], r['kind'], r['seed']))


def read_efficiency(sweep_dir: str) -> tuple[list[dict], list[dict]]:
  paths = sorted(glob.glob(os.path.join(sweep_dir, 'efficiency', '*.json')))
  return _read_all(paths, efficiency_record,
                   lambda r: (r['kind'], r['seq_len']))


# -- aggregating -------------------------------------------------------------


def mean_std(values) -> tuple[float, float | None]:
  """Mean and sample standard deviation (ddof=1; None for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def ordered(found, preferred=None) -> list:
  """`preferred` items that were found, in that order, then the rest sorted."""
  preferred = [x for x in (preferred or []) if x in found]
  return preferred + sorted(set(found) - set(preferred))


def accuracy_summary(records, kinds=None, tasks=None) -> dict:
  """Per (kind, task): mean/std/n over seeds of test accuracy, in %."""
  kinds = ordered({r['kind'] for r in records}, kinds)
  tasks = ordered({r['task'] for r in records}, tasks)
  by_cell = {}
  for r in records:
    by_cell.setdefault((r['kind'], r['task']), {})[r['seed']] = (
        100.0 * r['accuracy'])
  cells, average = {}, {}
  for kind in kinds:
    cells[kind] = {}
    for task in tasks:
      seeds = by_cell.get((kind, task))
      if seeds:
        mean, std = mean_std([seeds[s] for s in sorted(seeds)])
        cells[kind][task] = {'mean': mean, 'std': std, 'n': len(seeds),
                             'seeds': sorted(seeds)}
    average[kind] = task_average(cells[kind], by_cell, kind, tasks)
  return {'metric': 'metrics.test.accuracy', 'unit': '%',
          'std': 'sample (ddof=1)', 'kinds': kinds, 'tasks': tasks,
          'cells': cells, 'average': average}


def task_average(row: dict, by_cell: dict, kind: str, tasks) -> dict | None:
  """Mean of task means (None unless every task is there), with the std
  over seeds of per-seed averages when all tasks ran the same seeds."""
  if not tasks or any(t not in row for t in tasks):
    return None
  mean = sum(row[t]['mean'] for t in tasks) / len(tasks)
  seed_sets = {tuple(row[t]['seeds']) for t in tasks}
  std, n = None, None
  if len(seed_sets) == 1:
    seeds = seed_sets.pop()
    per_seed = [sum(by_cell[(kind, t)][s] for t in tasks) / len(tasks)
                for s in seeds]
    _, std = mean_std(per_seed)
    n = len(seeds)
  return {'mean': mean, 'std': std, 'n': n}


def efficiency_summary(cells, kinds=None, reference: str = 'full') -> dict:
  """Per (kind, length): steps/s, memory and their ratios to `reference`."""
  kinds = ordered({c['kind'] for c in cells}, kinds)
  lengths = sorted({c['seq_len'] for c in cells})
  by_cell = {(c['kind'], c['seq_len']): c for c in cells}
  table = {}
  for kind in kinds:
    table[kind] = {}
    for n in lengths:
      c = by_cell.get((kind, n))
      if c is None:
        continue
      entry = {'status': c['status']}
      if c['status'] == 'ok':
        ref = by_cell.get((reference, n), {})
        ok = ref.get('status') == 'ok'
        entry.update(
            steps_per_sec=c['steps_per_sec'], memory_bytes=c['memory_bytes'],
            speed_ratio=c['steps_per_sec'] / ref['steps_per_sec'] if ok
            else None,
            memory_ratio=c['memory_bytes'] / ref['memory_bytes'] if ok
            else None)
      elif c['status'] == 'does not fit':
        entry['memory_bytes'] = c['memory_bytes']
      else:
        entry['error'] = c.get('error', '')
      table[kind][str(n)] = entry
  return {'reference': reference, 'kinds': kinds, 'lengths': lengths,
          'devices': sorted({c['device'] for c in cells}),
          'batch_sizes': sorted({c['batch_size'] for c in cells
                                 if c['batch_size'] is not None}),
          'cells': table}


# -- formatting --------------------------------------------------------------


def fmt(value: float) -> str:
  """Three significant figures without exponents: 1234, 12.3, 1.23, 0.123."""
  if value >= 100:
    return f'{value:.0f}'
  if value >= 10:
    return f'{value:.1f}'
  if value >= 1:
    return f'{value:.2f}'
  return f'{value:#.3g}'


def length_label(n: int) -> str:
  return f'{n // 1024}K' if n % 1024 == 0 else str(n)


def memory_unit(values) -> tuple[str, float]:
  """('GB', 1e9) or smaller, so the largest value is at least 1."""
  top = max(values, default=0)
  for name, scale in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3)):
    if top >= scale:
      return name, scale
  return 'B', 1.0


def accuracy_display(s: dict) -> dict:
  """Caption, header and formatted rows of the accuracy table."""
  ns = {c['n'] for row in s['cells'].values() for c in row.values()}
  per_cell_n = len(ns) > 1

  def cell(c):
    if c is None:
      return DASH
    text = f'{c["mean"]:.2f}'
    if c['std'] is not None:
      text += f' {PM} {c["std"]:.2f}'
    if per_cell_n and c['n'] is not None:
      text += f' (n={c["n"]})'
    return text

  if per_cell_n:
    seeds = 'the n seeds given per cell'
  else:
    n = next(iter(ns), 0)
    seeds = f'n = {n} seed{"" if n == 1 else "s"}'
  caption = (f'Test accuracy (%) of the checkpoint best on validation: mean '
             f'{PM} sample standard deviation (ddof=1) over {seeds}. Avg: '
             'mean over tasks of the task means (only with every task).')
  rows = [[kind] + [cell(s['cells'][kind].get(t)) for t in s['tasks']]
          + [cell(s['average'][kind])] for kind in s['kinds']]
  return {'caption': caption, 'header': ['Model', *s['tasks'], 'Avg'],
          'rows': rows}


def accuracy_numbers(s: dict) -> dict:
  header = ['model']
  for name in [*s['tasks'], 'avg']:
    header += [f'{name}_mean', f'{name}_std', f'{name}_n']
  rows = []
  for kind in s['kinds']:
    row = [kind]
    for c in [s['cells'][kind].get(t) for t in s['tasks']] + [
        s['average'][kind]]:
      row += [c['mean'], c['std'], c['n']] if c else [None] * 3
    rows.append(row)
  return {'header': header, 'rows': rows}


def efficiency_display(s: dict) -> dict:
  """Caption, header and formatted rows of the efficiency table."""
  memory = [c['memory_bytes'] for row in s['cells'].values()
            for c in row.values() if c['status'] == 'ok']
  unit, scale = memory_unit(memory)

  def cell(c, value_key, ratio_key, div=1.0):
    if c is None:
      return DASH
    if c['status'] == 'does not fit':
      need_unit, need_scale = memory_unit([c['memory_bytes']])
      return f'does not fit ({fmt(c["memory_bytes"] / need_scale)} {need_unit})'
    if c['status'] != 'ok':
      return 'OOM' if _out_of_memory(c.get('error', '')) else 'failed'
    text = fmt(c[value_key] / div)
    if c[ratio_key] is not None:
      text += f' ({c[ratio_key]:.2f}x)'
    return text

  keys = [str(n) for n in s['lengths']]
  rows = []
  for kind in s['kinds']:
    row = s['cells'][kind]
    rows.append([kind]
                + [cell(row.get(k), 'steps_per_sec', 'speed_ratio')
                   for k in keys]
                + [cell(row.get(k), 'memory_bytes', 'memory_ratio', scale)
                   for k in keys])
  labels = [length_label(n) for n in s['lengths']]
  batch = ', '.join(str(b) for b in s['batch_sizes']) or '?'
  has_ratios = any(c.get('speed_ratio') is not None
                   for row in s['cells'].values() for c in row.values())
  caption = (f'Training steps per second and peak memory ({unit}) of one '
             f'train step per variant and sequence length (batch {batch}; '
             f'{", ".join(s["devices"]) or "no device"})' + (
                 f', with the ratio to {s["reference"]} attention at the '
                 'same length.' if has_ratios else
                 f'; no {s["reference"]} attention measured to compare to.'))
  return {'caption': caption,
          'header': ['Model'] + [f'steps/s {x}' for x in labels]
                    + [f'memory {x} ({unit})' for x in labels],
          'rows': rows}


def _out_of_memory(error: str) -> bool:
  e = error.lower()
  return 'resource_exhausted' in e or 'out of memory' in e


def efficiency_numbers(s: dict) -> dict:
  keys = [str(n) for n in s['lengths']]
  fields = ('steps_per_sec', 'speed_ratio', 'memory_bytes', 'memory_ratio')
  header = ['model'] + [f'{f}_{k}' for f in fields for k in keys]
  rows = [[kind] + [s['cells'][kind].get(k, {}).get(f) for f in fields
                    for k in keys] for kind in s['kinds']]
  return {'header': header, 'rows': rows}


# -- rendering ---------------------------------------------------------------


def markdown(t: dict) -> str:
  lines = [t['caption'], '', '| ' + ' | '.join(t['header']) + ' |',
           '|' + '|'.join(['---'] + ['---:'] * (len(t['header']) - 1)) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in t['rows']]
  return '\n'.join(lines) + '\n'


_LATEX_SPECIAL = {'\\': r'\textbackslash{}', '&': r'\&', '%': r'\%',
                  '$': r'\$', '#': r'\#', '_': r'\_', '{': r'\{', '}': r'\}',
                  '~': r'\textasciitilde{}', '^': r'\textasciicircum{}'}


def latex_text(text: str) -> str:
  escaped = ''.join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
  return escaped.replace(PM, r'$\pm$').replace(DASH, '--')


def latex(t: dict) -> str:
  cols = 'l' + 'r' * (len(t['header']) - 1)
  lines = [r'\begin{table}[t]', r'\centering',
           r'\caption{' + latex_text(t['caption']) + '}',
           r'\begin{tabular}{' + cols + '}', r'\toprule',
           ' & '.join(latex_text(h) for h in t['header']) + r' \\',
           r'\midrule']
  lines += [' & '.join(latex_text(c) for c in row) + r' \\'
            for row in t['rows']]
  lines += [r'\bottomrule', r'\end{tabular}', r'\end{table}']
  return '\n'.join(lines) + '\n'


def csv_text(numbers: dict) -> str:
  out = io.StringIO()
  w = csv.writer(out, lineterminator='\n')
  w.writerow(numbers['header'])
  for row in numbers['rows']:
    w.writerow(['' if v is None else v for v in row])
  return out.getvalue()


def write_table(out_dir: str, name: str, payload: dict, display: dict,
                numbers: dict) -> None:
  """name.md, name.csv, name.tex and name.json in out_dir."""
  base = os.path.join(out_dir, name)
  writer_lib.write_text_atomic(base + '.md', markdown(display))
  writer_lib.write_text_atomic(base + '.csv', csv_text(numbers))
  writer_lib.write_text_atomic(base + '.tex', latex(display))
  writer_lib.write_json_atomic(base + '.json', {**payload, 'table': display})


def failures(sweep_dir: str) -> dict:
  """failures.json of the sweep (runs that raised), {} if none."""
  data, _ = writer_lib.read_json(os.path.join(sweep_dir, 'failures.json'))
  return data if isinstance(data, dict) else {}


def write_all(sweep_dir: str, kinds=None, tasks=None) -> dict:
  """Writes both tables to sweep_dir/tables; returns their JSON payloads."""
  out_dir = os.path.join(sweep_dir, 'tables')
  os.makedirs(out_dir, exist_ok=True)
  records, skipped_runs = read_runs(sweep_dir)
  acc = accuracy_summary(records, kinds, tasks)
  acc.update(skipped=skipped_runs, failed=failures(sweep_dir),
             runs=[{k: r[k] for k in ('task', 'kind', 'seed', 'path')}
                   for r in records])
  write_table(out_dir, 'accuracy', acc, accuracy_display(acc),
              accuracy_numbers(acc))
  cells, skipped_cells = read_efficiency(sweep_dir)
  eff = efficiency_summary(cells, kinds)
  if len(eff['devices']) > 1:
    logging.warning('efficiency cells come from different devices (%s); '
                    'their ratios mix machines', ', '.join(eff['devices']))
  eff['skipped'] = skipped_cells
  write_table(out_dir, 'efficiency', eff, efficiency_display(eff),
              efficiency_numbers(eff))
  return {'accuracy': acc, 'efficiency': eff}
