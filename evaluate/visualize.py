"""Attention heatmaps of a trained run: `--mode=visualize --workdir=RUN`.

The run's own config.json builds the task and the model; its best
checkpoint gives the parameters. For each chosen example of a split
(configs/visualize.py says which examples, layers and heads), the encoder's
`attention_maps` gives, per layer, the dense probabilities the variant used
in the evaluation forward pass (av.attention_weights of that layer's q, k,
v, with the run's evaluation key). A match task's two documents are drawn
one after the other (`_a`, `_b`). Written to RUN/maps (or config.out_dir):

  example<i>[_a|_b]_heads.png   layers x heads heatmaps (query rows, key
                                columns) over the valid tokens, one colour
                                bar, token labels when short enough
  example<i>[_a|_b]_layers.png  the head-averaged map of every layer and,
                                for classification heads, a token-importance
                                strip: attention rollout (Abnar and Zuidema
                                2020: per layer 0.5 A + 0.5 I, rows
                                renormalised, multiplied from the first
                                layer up) read at the CLS row when
                                model.pooling is 'cls', averaged over the
                                valid rows when it is 'mean' (what mean
                                pooling reads); the figure says which
  maps.npz                      every array drawn, by the same names
  maps.json                     per example: index, tokens, length, tile
                                size, label, and per layer and head the mean
                                attention distance (tokens), the entropy
                                of the rows (nats) and, for a kind whose
                                pattern has components (sparse, bigbird,
                                longformer, lsh, sinkhorn: its docstring
                                names them), `share`: the mean share of a
                                row's mass on each (av.attention_parts;
                                lsh's 'own_bucket' is the mass on keys that
                                hashed to the query's own bucket)

The run's results.json, when there is one, gains `attention.looks`: those
per-layer, per-head summaries averaged over the examples drawn.

A compare sweep's directory (runs/<task>/<kind>/seed<k>, no config.json)
gets one figure per task instead, <task>_example<i>.png in SWEEP/maps: a
column per kind with a finished run of seed `cfg.seed`, the first of
`examples` (a match task's first document) at one layer (the first of
`layers`, else the last), head-averaged, above the kind's visibility at that
length (`visibility`: the share of heads that can see each key), each
column titled with its test accuracy and, for a kind with components, the
layer's share of mass on each (mean over heads); with maps.npz and
maps.json (per kind: run, step, layer, test accuracy, and the layer's
per-head summaries).

Long sequences: maps over more than `pool_above` tokens are drawn as the
mean over b x b tiles (b = ceil(length / pool_above); a tile past the end
is padded with zeros and still divided by b^2, so every pooled map sums to
b^-2 times its unpooled sum), and the figure says so. A sequence longer than
`max_length` tokens is refused with one line: its dense maps would not fit.
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

import attention_variants as av
from evaluate import plots
from models import transformer
from train import trainer as trainer_lib
from train import writer as writer_lib


def parse_indices(text: str, field: str, limit: int | None = None
                  ) -> list[int] | None:
  """'0,3,5' -> [0, 3, 5]; '' -> None (all). ValueError naming the field
  for anything else or an index outside [0, limit)."""
  text = str(text).strip()
  if not text:
    return None
  try:
    values = [int(x) for x in text.split(',')]
  except ValueError:
    raise ValueError(f'--config.{field}={text!r}: give comma-separated '
                     'integers, e.g. 0,2') from None
  bad = [v for v in values if v < 0 or (limit is not None and v >= limit)]
  if bad:
    raise ValueError(f'--config.{field}={text!r}: {bad[0]} is outside '
                     f'[0, {limit}) for this run')
  return values


def tile(block: int, length: int) -> int:
  """Tokens per tile side: 1 up to `block` tokens, else ceil(length / block)."""
  return 1 if length <= block else math.ceil(length / block)


def pool(maps: np.ndarray, b: int) -> np.ndarray:
  """[..., n, n] -> [..., ceil(n/b), ceil(n/b)]: means over b x b tiles
  (zero-padded at the end, divided by b^2 everywhere)."""
  if b == 1:
    return maps
  n = maps.shape[-1]
  m = math.ceil(n / b)
  padded = np.zeros(maps.shape[:-2] + (m * b, m * b), maps.dtype)
  padded[..., :n, :n] = maps
  tiles = padded.reshape(maps.shape[:-2] + (m, b, m, b))
  return tiles.sum(axis=(-3, -1)) / (b * b)


def summaries(maps: np.ndarray, part_rows: dict | None = None) -> dict:
  """Per layer and head of maps [layers, heads, n, n] (valid tokens only):
  the mean over query rows that hold any probability of the attention
  distance sum_j p_ij |i - j| and of the entropy -sum_j p_ij ln p_ij; with
  part_rows ({component: [layers, heads, n] the mass each row puts on it}),
  also `share`: {component: the mean over those rows of that mass over the
  row's}."""
  n = maps.shape[-1]
  pos = np.arange(n)
  distance = np.abs(pos[:, None] - pos[None, :])
  mass = maps.sum(-1)
  rows = mass > 0.5       # rows with no key (causal padding) sum to 0
  with np.errstate(divide='ignore', invalid='ignore'):
    plogp = np.where(maps > 0, maps * np.log(np.where(maps > 0, maps, 1)), 0)
  dist = (maps * distance).sum(-1)
  ent = -plogp.sum(-1)
  count = np.maximum(rows.sum(-1), 1)
  mean = lambda x: ((x * rows).sum(-1) / count).tolist()
  out = {'mean_distance': mean(dist), 'entropy': mean(ent)}
  if part_rows:
    out['share'] = {name: mean(m / np.where(rows, mass, 1.0))
                    for name, m in part_rows.items()}
  return out


def rollout(layer_means: np.ndarray) -> np.ndarray:
  """[layers, n, n] head-averaged maps -> [n, n] attention rollout."""
  n = layer_means.shape[-1]
  out = np.eye(n)
  for a in layer_means:
    a = 0.5 * a + 0.5 * np.eye(n)
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-30)
    out = a @ out
  return out


def importance(layer_means: np.ndarray, pooling: str) -> tuple[np.ndarray, str]:
  """(token importance [n] from the rollout, how it was read)."""
  r = rollout(layer_means)
  if pooling == 'cls':
    return r[0], 'attention rollout from the CLS row'
  return r.mean(0), 'attention rollout averaged over rows (mean pooling)'


def visibility(attention: dict, n: int, causal: bool, *, heads: int,
               length: int | None = None, head_dim: int = 16,
               seed: int = 0) -> np.ndarray:
  """bool [heads, n, n]: which keys each query of each head can see at
  length n (keys past `length` are padding), independent of training.

  Read off av.attention_weights on random queries and keys of small scale
  (scores near 0, so no visible key's probability underflows): a key is
  visible when its weight is not 0. Parameters a kind learns come from
  av.init_learned. Where the pattern depends on the input (lsh's buckets,
  sinkhorn's sorting) this is its pattern for that random input.
  """
  rng = np.random.default_rng(seed)
  shape = (1, n, heads, head_dim)
  q, k = (jnp.asarray(1e-3 * rng.standard_normal(shape), jnp.float32)
          for _ in range(2))
  v = jnp.zeros(shape, jnp.float32)
  lengths = jnp.asarray([n if length is None else length])
  learned = av.init_learned(attention, jax.random.key(seed), num_heads=heads,
                            num_kv_heads=heads, head_dim=head_dim, max_len=n)
  weights = jax.jit(lambda q, k, v, lengths, learned: av.attention_weights(
      q, k, v, attention, causal=causal, q_lengths=lengths,
      kv_lengths=lengths, rng=jax.random.key(seed), learned=learned or None))
  return np.asarray(weights(q, k, v, lengths, learned)[0]) != 0


def _labels(task, tokens) -> list[str] | None:
  if task.token_name is None:
    return None
  return [task.token_name(int(t)) for t in tokens]


def _norm(values, log_scale: bool):
  top = float(np.max(values)) if np.size(values) else 1.0
  if log_scale:
    positive = values[values > 0]
    low = max(float(positive.min()) if positive.size else 1e-6, top * 1e-4)
    return mcolors.LogNorm(vmin=low, vmax=max(top, low * 10), clip=True)
  return mcolors.Normalize(vmin=0.0, vmax=max(top, 1e-9))


def _axes_labels(ax, labels, cells, label_below, fontsize):
  ax.set_xlabel('key', fontsize=7)
  ax.set_ylabel('query', fontsize=7)
  if labels is not None and cells <= label_below:
    ax.set_xticks(range(cells), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(cells), labels, fontsize=fontsize)
  else:
    ax.tick_params(labelsize=6)


def _extent(cells: int, b: int):
  """imshow extent putting token positions on the axes of a map of
  `cells` tiles of b tokens (None: one cell per token, labelled by index)."""
  return None if b == 1 else (0, cells * b, cells * b, 0)


def _panel_inches(cells, labelled):
  return max(2.5, 0.14 * cells) if labelled else 3.0


def draw_heads(maps, layers, heads, labels, title, path, cfg, b=1,
               share=None):
  """maps [layers drawn, heads drawn, m, m] as a grid with one colour bar;
  share: summaries' {component: [layers drawn][heads drawn]}, if any."""
  share = share or {}
  rows, cols, m = maps.shape[0], maps.shape[1], maps.shape[-1]
  labelled = labels is not None and m <= cfg.label_below
  side = _panel_inches(m, labelled)
  fig = Figure(figsize=(side * cols + 1.2, side * rows + 0.9),
               layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  norm = _norm(maps, cfg.log_scale)
  for r, layer in enumerate(layers):
    for c, head in enumerate(heads):
      ax = axes[r][c]
      image = ax.imshow(maps[r, c], cmap='viridis', norm=norm,
                        interpolation='nearest', extent=_extent(m, b))
      ax.set_title(f'layer {layer}, head {head}' + _share_note(
          {name: v[r][c] for name, v in share.items()}), fontsize=8)
      _axes_labels(ax, labels, m, cfg.label_below, 5)
  fig.colorbar(image, ax=axes, shrink=0.8,
               label='probability' + (' (log scale)' if cfg.log_scale else ''))
  fig.suptitle(title, fontsize=9)
  plots.save_png(fig, path)


def draw_layers(means, layers, labels, strip, strip_note, title, path, cfg,
                b=1, share=None):
  """The head-averaged map of each layer drawn, and the importance strip;
  share as in draw_heads."""
  share = share or {}
  cols, m = means.shape[0], means.shape[-1]
  labelled = labels is not None and m <= cfg.label_below
  side = _panel_inches(m, labelled)
  height = side + (1.4 if strip is not None else 0.0) + 0.9
  fig = Figure(figsize=(side * cols + 1.2, height), layout='constrained')
  grid = fig.add_gridspec(2 if strip is not None else 1, cols,
                          height_ratios=[side, 1.0] if strip is not None
                          else None)
  norm = _norm(means, cfg.log_scale)
  axes = [fig.add_subplot(grid[0, c]) for c in range(cols)]
  for r, (ax, layer, mean) in enumerate(zip(axes, layers, means)):
    image = ax.imshow(mean, cmap='viridis', norm=norm, interpolation='nearest',
                      extent=_extent(m, b))
    ax.set_title(f'layer {layer}, mean over heads' + _share_note(
        {name: v[r] for name, v in share.items()}), fontsize=8)
    _axes_labels(ax, labels, m, cfg.label_below, 5)
  fig.colorbar(image, ax=axes, shrink=0.8,
               label='probability' + (' (log scale)' if cfg.log_scale else ''))
  if strip is not None:
    ax = fig.add_subplot(grid[1, :])
    if b == 1:
      ax.bar(np.arange(strip.size), strip, width=1.0, color='C1')
      ax.set_xlim(-0.5, strip.size - 0.5)
    else:                   # one bar per b-token span, at token positions
      ax.bar(b * np.arange(strip.size), strip, width=b, align='edge',
             color='C1')
      ax.set_xlim(0, b * strip.size)
      ax.set_xlabel('token', fontsize=7)
    ax.set_ylabel('importance', fontsize=8)
    ax.set_title(strip_note, fontsize=8)
    if labels is not None and strip.size <= cfg.label_below:
      ax.set_xticks(range(strip.size), labels, rotation=90, fontsize=5)
    else:
      ax.tick_params(labelsize=6)
  fig.suptitle(title, fontsize=9)
  plots.save_png(fig, path)


def _documents(example, head: str):
  """[(suffix, tokens [n], length)] of one example: two for match."""
  if head == 'match':
    return [(f'_{name}', example['inputs'][d], int(example['length'][d]))
            for d, name in enumerate('ab')]
  return [('', example['inputs'], int(example['length']))]


def _describe(suffix: str) -> str:
  return f', document {suffix[1:]}' if suffix else ''


def _mean_summaries(per_example: list[dict]) -> dict:
  """The summaries' mean over examples, key by key (shares nested)."""
  out = {}
  for key, first in per_example[0].items():
    values = [s[key] for s in per_example]
    out[key] = (_mean_summaries(values) if isinstance(first, dict) else
                np.mean([np.asarray(v) for v in values], 0).tolist())
  return out


def run(cfg, workdir: str) -> dict:
  """Draws the maps of a run, or the side-by-side figure of a compare
  sweep's directory; returns maps.json's content."""
  if (workdir and not os.path.exists(os.path.join(workdir, 'config.json'))
      and os.path.isdir(os.path.join(workdir, 'runs'))):
    return sweep(cfg, workdir)
  config = trainer_lib.run_config(workdir)
  trainer = trainer_lib.Trainer(config, workdir)
  try:
    return _run(cfg, config, workdir, trainer)
  finally:
    trainer.ckpts.close()


def _check_cfg(cfg):
  if cfg.pool_above < 1 or cfg.label_below < 0:
    raise ValueError('--config.pool_above must be >= 1 and '
                     '--config.label_below >= 0')


def _check_length(n, cfg, num_heads):
  if n > cfg.max_length:
    gib = n * n * num_heads * 4 / 2**30
    raise ValueError(
        f'the run\'s sequences are {n} tokens; dense attention maps are '
        f'computed up to --config.max_length={cfg.max_length} ({gib:.1f} GiB '
        'per layer and example at this length): raise it if that fits')


def _maps_fn(model, trainer):
  """document (tokens [n], length) -> (its maps [layers, heads, length,
  length], {component: [layers, heads, length] the mass each row puts on
  it}, {} for a kind without components); compiled once for all the
  documents of a run."""
  def layers(t, l):
    out = model.encoder.attention_maps(t, l, attention_rng=trainer.eval_key,
                                       parts=True)
    return ([w[0] for w, _ in out],
            [{name: p[0].sum(-1) for name, p in parts.items()}
             for _, parts in out])
  maps = jax.jit(layers)

  def document(tokens, length):
    weights, parts = maps(jnp.asarray(tokens[None]), jnp.asarray([length]))
    part_rows = {name: np.stack([np.asarray(p[name])[:, :length]
                                 for p in parts]) for name in parts[0]}
    return (np.stack([np.asarray(w)[:, :length, :length] for w in weights]),
            part_rows)
  return document


def _write_arrays(out_dir, arrays, record):
  """maps.npz (the arrays drawn) and maps.json (the record), atomically."""
  with writer_lib.atomic_path(os.path.join(out_dir, 'maps.npz')) as tmp:
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, **arrays)
  writer_lib.write_json_atomic(os.path.join(out_dir, 'maps.json'), record)


def _run(cfg, config, workdir, trainer):
  task, model_cfg = trainer.task, config.model
  _check_length(task.seq_len, cfg, model_cfg.num_heads)
  _check_cfg(cfg)
  layers = parse_indices(cfg.layers, 'layers', model_cfg.num_layers)
  layers = layers or list(range(model_cfg.num_layers))
  heads = parse_indices(cfg.heads, 'heads', model_cfg.num_heads)
  heads = heads or list(range(model_cfg.num_heads))
  source = task.source(cfg.split)
  examples = parse_indices(cfg.examples, 'examples', len(source))
  if examples is None:
    raise ValueError('--config.examples is empty: give example indices, '
                     'e.g. 0,1')
  model, best_step = trainer.best_model()
  document_maps = _maps_fn(model, trainer)
  out_dir = cfg.out_dir or os.path.join(workdir, 'maps')
  trainer_lib.prepare_dir(out_dir, '--config.out_dir')
  kind = config.attention.kind
  classify_like = task.head in ('classify', 'match')
  record = {'run': workdir, 'kind': kind, 'task': task.name,
            'split': cfg.split, 'best_step': best_step,
            'layers': layers, 'heads': heads, 'examples': []}
  arrays, looks = {}, []
  for index in examples:
    example = source[index]
    for suffix, tokens, length in _documents(example, task.head):
      every, part_rows = document_maps(tokens, length)  # [L, H, n, n]
      full = every[np.ix_(layers, heads)]
      stats = summaries(full, {name: m[np.ix_(layers, heads)]
                               for name, m in part_rows.items()})
      looks.append(stats)
      b = tile(cfg.pool_above, length)
      drawn = pool(full, b)
      means = drawn.mean(1)
      labels = _labels(task, tokens[:length]) if b == 1 else None
      name = f'example{index}{suffix}'
      pooled_note = (f'; means over {b} x {b} token tiles' if b > 1 else '')
      title = (f'{kind} on {task.name}, {cfg.split} example {index}'
               f'{_describe(suffix)}'
               f' ({length} tokens{pooled_note}), step {best_step}')
      strip, strip_note = None, ''
      if classify_like:
        # The rollout uses every layer and head, whatever is drawn.
        strip, strip_note = importance(every.mean(1), model_cfg.pooling)
        if b > 1:
          strip = np.pad(strip, (0, -length % b)).reshape(-1, b).mean(1)
          strip_note += f'; mean over {b}-token spans'
        arrays[f'{name}_importance'] = strip
      share = stats.get('share')
      draw_heads(drawn, layers, heads, labels, title,
                 os.path.join(out_dir, f'{name}_heads.png'), cfg, b, share)
      draw_layers(means, layers, labels, strip, strip_note, title,
                  os.path.join(out_dir, f'{name}_layers.png'), cfg, b, share)
      arrays[f'{name}_heads'] = drawn
      arrays[f'{name}_layers'] = means
      entry = {'name': name, 'index': index, 'length': length, 'tile': b,
               'tokens': [int(t) for t in tokens[:length]],
               'token_names': _labels(task, tokens[:length]),
               **({'importance': strip_note} if strip is not None else {}),
               **stats}
      if 'label' in example:
        entry['label'] = int(example['label'])
      record['examples'].append(entry)
  _write_arrays(out_dir, arrays, record)
  _add_to_results(workdir, cfg, examples, layers, heads, looks)
  logging.info('visualize: %d example(s) drawn in %s', len(examples), out_dir)
  print(f'maps of {len(examples)} example(s) written to {out_dir}')
  return record


def _sweep_runs(sweep_dir: str, seed: int) -> dict[str, dict[str, str]]:
  """task -> kind -> run directory, for the finished runs of one seed in
  a compare sweep (runs/<task>/<kind>/seed<k>), kinds in registry order."""
  root = os.path.join(sweep_dir, 'runs')
  found = {}
  for task in sorted(os.listdir(root)):
    kinds = {}
    for kind in av.KINDS:
      run_dir = os.path.join(root, task, kind, f'seed{seed}')
      if os.path.exists(os.path.join(run_dir, 'results.json')):
        kinds[kind] = run_dir
    if kinds:
      found[task] = kinds
  return found


def _share_note(share: dict) -> str:
  """A second title line, e.g. 'window 61% · stride 39%': each
  component's share (a list, e.g. over heads, is averaged), largest first;
  '' for none."""
  means = sorted(((float(np.mean(v)), name) for name, v in share.items()),
                 reverse=True)
  if not means:
    return ''
  return '\n' + ' · '.join(f'{name.replace("_", " ")} {100 * m:.0f}%'
                            for m, name in means)


def draw_sweep(maps, seen, kinds, notes, title, path, cfg, b=1):
  """One column per kind: its head-averaged map above its visibility."""
  cols = len(kinds)
  fig = Figure(figsize=(2.6 * cols + 1.4, 6.0), layout='constrained')
  axes = fig.subplots(2, cols, squeeze=False)
  norm = _norm(np.stack(maps), cfg.log_scale)
  for c, kind in enumerate(kinds):
    top, bottom = axes[0][c], axes[1][c]
    cells = maps[c].shape[-1]
    image = top.imshow(maps[c], cmap='viridis', norm=norm,
                       interpolation='nearest', extent=_extent(cells, b))
    top.set_title(f'{kind}\n{notes[c]}', fontsize=8)
    shown = bottom.imshow(seen[c], cmap='Greys', vmin=0.0, vmax=1.0,
                          interpolation='nearest', extent=_extent(cells, b))
    bottom.set_title(f'{kind}: keys it can see', fontsize=8)
    for ax in (top, bottom):
      ax.set_xlabel('key', fontsize=7)
      ax.set_ylabel('query', fontsize=7)
      ax.tick_params(labelsize=6)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
               label='probability, mean over heads' +
               (' (log scale)' if cfg.log_scale else ''))
  fig.colorbar(shown, ax=axes[1].tolist(), shrink=0.8,
               label='share of heads that see the key')
  fig.suptitle(title, fontsize=9)
  plots.save_png(fig, path)


def sweep(cfg, sweep_dir: str) -> dict:
  """The compare sweep's figure: per task, the same example at one layer
  for every kind of seed `cfg.seed`, above each kind's visibility."""
  _check_cfg(cfg)
  runs = _sweep_runs(sweep_dir, cfg.seed)
  if not runs:
    raise ValueError(f'--workdir={sweep_dir} holds no finished run of seed '
                     f'{cfg.seed} under runs/<task>/<kind>/seed{cfg.seed}')
  out_dir = cfg.out_dir or os.path.join(sweep_dir, 'maps')
  trainer_lib.prepare_dir(out_dir, '--config.out_dir')
  examples = parse_indices(cfg.examples, 'examples')
  if not examples:
    raise ValueError('--config.examples is empty: give an example index')
  index = examples[0]
  layer_choice = parse_indices(cfg.layers, 'layers')
  record = {'sweep': sweep_dir, 'split': cfg.split, 'seed': cfg.seed,
            'index': index, 'tasks': {}}
  arrays = {}
  for task_name, kinds in runs.items():
    maps, seen, notes, entry = [], [], [], {}
    for kind, run_dir in kinds.items():
      config = trainer_lib.run_config(run_dir)
      trainer = trainer_lib.Trainer(config, run_dir)
      try:
        task, model_cfg = trainer.task, config.model
        _check_length(task.seq_len, cfg, model_cfg.num_heads)
        source = task.source(cfg.split)
        parse_indices(str(index), 'examples', len(source))
        model, best_step = trainer.best_model()
        suffix, tokens, length = _documents(source[index], task.head)[0]
        every, part_rows = _maps_fn(model, trainer)(tokens, length)
      finally:
        trainer.ckpts.close()
      layer = (layer_choice[0] if layer_choice else every.shape[0] - 1)
      parse_indices(str(layer), 'layers', every.shape[0])
      attention = transformer.layer_spec(config.attention.to_dict(), layer)
      heads = model_cfg.num_heads
      visible = visibility(attention, task.seq_len, task.causal,
                           heads=heads, length=length)
      visible = visible[:, :length, :length].mean(0)
      b = tile(cfg.pool_above, length)
      maps.append(pool(every[layer].mean(0), b))
      # Tiles at the ragged end hold fewer cells: a share over real ones.
      seen.append(pool(visible, b) / pool(np.ones((length, length)), b))
      accuracy = writer_lib.read_json_object(
          os.path.join(run_dir, 'results.json'),
          "this run's results")['metrics']['test']['accuracy']
      stats = summaries(every[layer:layer + 1],
                        {name: m[layer:layer + 1]
                         for name, m in part_rows.items()})
      notes.append(f'test accuracy {100 * accuracy:.1f}%'
                   + _share_note(stats.get('share', {})))
      name = f'{task_name}_{kind}'
      arrays[f'{name}_map'] = maps[-1]
      arrays[f'{name}_visible'] = seen[-1]
      entry[kind] = {'run': run_dir, 'best_step': best_step, 'layer': layer,
                     'length': length, 'tile': b, 'document': suffix[1:],
                     'test_accuracy': accuracy, **stats}
    record['tasks'][task_name] = entry
    pooled_note = f'; means over {b} x {b} token tiles' if b > 1 else ''
    title = (f'{task_name}: {cfg.split} example {index} ({length} tokens'
             f'{pooled_note}), layer {layer}, seed {cfg.seed}')
    draw_sweep(maps, seen, list(kinds), notes, title,
               os.path.join(out_dir, f'{task_name}_example{index}.png'), cfg,
               b)
  _write_arrays(out_dir, arrays, record)
  print(f'side-by-side maps of {sum(len(k) for k in runs.values())} run(s) '
        f'written to {out_dir}')
  return record



def _add_to_results(workdir, cfg, examples, layers, heads, looks):
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return
  results = writer_lib.read_json_object(path, "this run's results")
  results.setdefault('attention', {})['looks'] = {
      'split': cfg.split, 'examples': examples, 'layers': layers,
      'heads': heads, **_mean_summaries(looks)}
  writer_lib.write_json_atomic(path, results)


def load(out_dir: str) -> tuple[dict, dict]:
  """(maps.json, maps.npz arrays) of a visualize output folder."""
  with open(os.path.join(out_dir, 'maps.json')) as f:
    record = json.load(f)
  with np.load(os.path.join(out_dir, 'maps.npz')) as z:
    return record, {k: z[k] for k in z.files}
