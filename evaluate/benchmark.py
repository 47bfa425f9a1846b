"""Attention benchmark: each registered kind against jax.nn.dot_product_attention.

For every kind, length and pass (forward; forward+backward) it compiles the
computation once, reads FLOPs (XLA cost analysis) and peak bytes (XLA memory
analysis of the executable: temporaries + outputs; plus the allocator's peak
on GPU/TPU), and times `repeats` runs after `warmup` (median). The peers run
in the same process on the same inputs: plain dot_product_attention for every
kind, and dot_product_attention(local_window_size=w) for `local`. A cell
whose compiled peak would not fit in memory is reported, not run.
Writes benchmark.json and benchmark.md to the workdir after every cell
(`complete` false until the last) and prints the table.

The `decode` pass (configs/benchmark.py: --config.passes=decode) is the
decode table: for every causal kind and context length N, the time of one
generated token from the kind's decoding state (av.decode_step at position
N - 1 of a state made for N positions, the state donated so a cache is
updated in place) and the state's bytes, beside its peer measured in the
same run: recomputing the prefix, the causal forward pass over N tokens
that generation otherwise runs per token (evaluate/generate.py). Kinds
without a decoding state get the recompute time only; bidirectional-only
kinds are skipped. The exponent of time against N is fitted over 1K..16K.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import attention_variants as av
from attention_variants import full
from attention_variants import local
from evaluate.compare import names
from train import profile
from train import trainer
from train import writer as writer_lib
from utils import provenance

PEER = 'dot_product_attention'


def _functions(config, spec):
  """name -> (attend fn(q, k, v, rng, learned), implementation label, peer
  name, the kind's spec or None for a peer)."""
  causal = config.causal
  fns = {}
  for kind in names(config.kinds):
    kind_spec = dict(spec, kind=kind)
    av.validate(kind_spec)
    peer = f'{PEER}(window)' if kind == 'local' else PEER
    fns[kind] = (lambda q, k, v, rng, learned, s=kind_spec: av.attend(
        q, k, v, s, causal=causal, rng=rng, learned=learned),
                 spec['implementation'], peer, kind_spec)
  impl = 'xla'
  fns[PEER] = (lambda q, k, v, rng, _: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation=impl), impl, None, None)
  if 'local' in fns:
    window = local.extents(spec['local'], causal)
    fns[f'{PEER}(window)'] = (
        lambda q, k, v, rng, _: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, local_window_size=window,
            implementation=impl), impl, None, None)
  return fns


def _program(fn, pass_name):
  if pass_name == 'forward':
    return jax.jit(fn)
  def loss(q, k, v, rng, learned):
    return jnp.sum(fn(q, k, v, rng, learned).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _median_seconds(compiled, args, warmup, repeats, min_time_s=0.0):
  """Median wall time of at least `repeats` calls, and of as many more as
  fit in `min_time_s` of timed calls: a fast cell gets enough samples for a
  stable median on a noisy machine; a slow one costs only `repeats` calls."""
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  while len(times) < repeats or sum(times) < min_time_s:
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _inputs(config, spec, n):
  """(q, k, v [batch, n, heads, head_dim], learned): random inputs from
  config.seed, and the kind's parameters freshly initialised for length n
  when it owns some (`spec`; None for a peer)."""
  dtype = jnp.dtype(config.dtype)
  keys = jax.random.split(jax.random.key(config.seed), 4)
  shape = (config.batch_size, n, config.heads, config.head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  learned = None
  if spec is not None and av.owns_parameters(spec):
    learned = av.init_learned(spec, keys[3], num_heads=config.heads,
                              num_kv_heads=config.heads,
                              head_dim=config.head_dim, max_len=n)
  return q, k, v, learned


def measure(config, name, fn, pass_name, n, implementation, spec=None):
  """One row of benchmark.json. A kind that owns parameters (`spec`) gets
  them freshly initialised for length n, as an argument (the backward pass
  differentiates q, k and v only)."""
  q, k, v, learned = _inputs(config, spec, n)
  args = (q, k, v, jax.random.key(config.seed), learned)
  row = {'kind': name, 'length': n, 'pass': pass_name,
         'implementation': implementation}
  try:
    compiled = _program(fn, pass_name).lower(*args).compile()
  except Exception as e:  # e.g. the compiler itself runs out of memory
    return {**row, 'status': f'compile failed: {type(e).__name__}'}
  mem = profile.compiled_memory(compiled)
  row.update(flops=profile.compiled_flops(compiled),
             peak_bytes=mem['peak_bytes'])
  if mem['peak_bytes'] > config.memory_fraction * (
      profile.available_bytes() or profile.host_available_bytes()):
    return {**row, 'status': 'does not fit in memory'}
  try:
    row['time_s'] = _median_seconds(compiled, args, config.warmup,
                                    config.repeats, config.min_time_s)
  except Exception as e:  # resource exhaustion at run time on accelerators
    if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower():
      return {**row, 'status': 'out of memory'}
    raise
  device_peak = profile.device_peak_bytes()
  if device_peak is not None:
    row['device_peak_bytes'] = device_peak
  row['status'] = 'ok'
  return row


def measure_decode(config, name, spec, n):
  """One decode-table row: the kind's per-token time and state bytes at
  context n, and the time of recomputing the prefix (its causal forward
  over n tokens)."""
  b, h, d = config.batch_size, config.heads, config.head_dim
  row = {'kind': name, 'length': n, 'pass': 'decode',
         'implementation': spec['implementation']}
  if not av.supports_causal(spec):
    return {**row, 'status': 'bidirectional only'}
  *prefix, learned = _inputs(config, spec, n)
  rng = jax.random.key(config.seed)
  recompute = jax.jit(lambda q, k, v: av.attend(
      q, k, v, spec, causal=True, rng=rng, learned=learned)).lower(
          *prefix).compile()
  row['recompute_s'] = _median_seconds(recompute, prefix, config.warmup,
                                       config.repeats, config.min_time_s)
  if not av.can_decode(spec):
    row['status'] = 'no decoding state (recomputes)'
    return row
  state = av.decode_init(spec, batch=b, max_len=n, num_heads=h,
                         num_kv_heads=h, head_dim=d,
                         dtype=jnp.dtype(config.dtype), rng=rng,
                         learned=learned)
  row['state_bytes'] = int(sum(x.size * x.dtype.itemsize
                               for x in jax.tree.leaves(state)))
  token = [x[:, -1] for x in prefix]
  pos = jnp.int32(n - 1)
  step = jax.jit(lambda q, k, v, state, pos: av.decode_step(
      q, k, v, state, pos, spec), donate_argnums=3)
  compiled = step.lower(*token, state, pos).compile()
  holder = [state]

  def one(*_):  # the state is donated: each call takes the last one's
    out, holder[0] = compiled(*token, holder[0], pos)
    return out
  row['time_s'] = _median_seconds(one, (), config.warmup, config.repeats,
                                  config.min_time_s)
  row['status'] = 'ok'
  return row


def decode_markdown(rows) -> str:
  """The decode table: per-token time, state bytes, and the speed-up over
  recomputing the prefix; then each kind's exponent over 1K..16K."""
  lines = ['| kind | context | decode (ms/token) | state | recompute '
           '(ms/token) | speed-up | status |', '|---|---|---|---|---|---|---|']
  kinds = []
  for r in rows:
    if r['pass'] != 'decode':
      continue
    kinds += [r['kind']] if r['kind'] not in kinds else []
    t = f'{1e3 * r["time_s"]:.3f}' if 'time_s' in r else '-'
    re = f'{1e3 * r["recompute_s"]:.2f}' if 'recompute_s' in r else '-'
    up = (f'{r["recompute_s"] / r["time_s"]:.0f}x'
          if 'time_s' in r and 'recompute_s' in r else '-')
    lines.append(f'| {r["kind"]} | {r["length"]} | {t} | '
                 f'{_fmt_bytes(r.get("state_bytes"))} | {re} | {up} | '
                 f'{r["status"]} |')
  lines += ['', '| kind | decode time exponent (1K..16K) |', '|---|---|']
  for name in kinds:
    e = scaling_exponent(rows, name, 'decode', lo=1024)
    if e is not None:
      lines.append(f'| {name} | {e:.2f} |')
  return '\n'.join(lines)


def scaling_exponent(rows, name, pass_name, lo=2048, hi=16384):
  """Slope of log(time) against log(length) over lengths in [lo, hi]."""
  pts = [(r['length'], r['time_s']) for r in rows
         if r['kind'] == name and r['pass'] == pass_name
         and r.get('status') == 'ok' and lo <= r['length'] <= hi]
  if len(pts) < 2:
    return None
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def _fmt_bytes(b):
  return f'{b / 2**20:.1f} MiB' if b is not None else '-'


def markdown(rows, fns) -> str:
  """Table: time, peak memory, and ratios to the kind's peer; then the
  decode table when decode rows were measured."""
  decode = [r for r in rows if r['pass'] == 'decode']
  rows = [r for r in rows if r['pass'] != 'decode']
  if not rows:
    return decode_markdown(decode)
  by = {(r['kind'], r['length'], r['pass']): r for r in rows}
  lines = ['| kind | length | pass | time (ms) | peak memory | vs peer: speed-up '
           '| vs peer: memory saving | status |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    peer = fns[r['kind']][2]
    p = by.get((peer, r['length'], r['pass'])) if peer else None
    speed = mem = '-'
    if p and p.get('status') == 'ok' and r.get('status') == 'ok':
      speed = f'{p["time_s"] / r["time_s"]:.2f}x'
    if p and p.get('peak_bytes') and r.get('peak_bytes'):
      mem = f'{p["peak_bytes"] / r["peak_bytes"]:.1f}x'
    t = f'{1e3 * r["time_s"]:.1f}' if 'time_s' in r else '-'
    lines.append(f'| {r["kind"]} | {r["length"]} | {r["pass"]} | {t} | '
                 f'{_fmt_bytes(r.get("peak_bytes"))} | {speed} | {mem} | '
                 f'{r.get("status")} |')
  lines += ['', '| kind | pass | time exponent (2K..16K) |', '|---|---|---|']
  for name in fns:
    for pass_name in sorted({r['pass'] for r in rows}):
      e = scaling_exponent(rows, name, pass_name)
      if e is not None:
        lines.append(f'| {name} | {pass_name} | {e:.2f} |')
  if decode:
    lines += ['', decode_markdown(decode)]
  return '\n'.join(lines)


def run(config, workdir: str) -> dict:
  """Measures every cell, writes benchmark.json and benchmark.md."""
  trainer.prepare_workdir(workdir)
  spec = config.attention.to_dict()
  fns = _functions(config, spec)
  lengths = [int(n) for n in names(config.lengths)]
  passes = names(config.passes)
  bad = set(passes) - {'forward', 'forward_backward', 'decode'}
  if bad or not lengths or min(lengths) < 1:
    raise ValueError(f'benchmark passes must be forward, forward_backward or '
                     f'decode and lengths positive; got passes='
                     f'{config.passes!r}, lengths={config.lengths!r}')
  # The decode pass measures the kinds (its peer is their own recompute).
  cells = [(name, pass_name) for name in fns for pass_name in passes
           if pass_name != 'decode' or fns[name][3] is not None]
  rows, total = [], len(cells) * len(lengths)
  code = provenance.code_version()

  def write(complete: bool) -> dict:
    """benchmark.json (and .md) of the rows so far, written after every
    cell: a run killed part way (the kernel's OOM killer on a large cell)
    keeps what it measured, marked complete=False."""
    result = {'device': profile.device_kind(), 'dtype': config.dtype,
              'batch_size': config.batch_size, 'heads': config.heads,
              'head_dim': config.head_dim, 'causal': config.causal,
              'attention': spec, 'code': code, 'complete': complete,
              'rows': rows,
              'exponents': {f'{n}/{p}': scaling_exponent(
                  rows, n, p, lo=1024 if p == 'decode' else 2048)
                            for n, p in cells}}
    writer_lib.write_json_atomic(os.path.join(workdir, 'benchmark.json'),
                                 result)
    writer_lib.write_text_atomic(os.path.join(workdir, 'benchmark.md'),
                                 markdown(rows, fns) + '\n')
    return result

  for name, (fn, impl, _, kind_spec) in fns.items():
    if name == 'full':
      impl = full.choose_implementation(
          jnp.zeros((1, 1, 1, config.head_dim), config.dtype),
          jnp.zeros((1, 1, 1, config.head_dim), config.dtype), impl)
    for n in lengths:
      for pass_name in passes:
        if (name, pass_name) not in cells:
          continue
        row = (measure_decode(config, name, kind_spec, n)
               if pass_name == 'decode' else
               measure(config, name, fn, pass_name, n, impl, kind_spec))
        rows.append(row)
        logging.info('[%d/%d] %s N=%d %s: %s', len(rows), total, name, n,
                     pass_name, f'{1e3 * row["time_s"]:.1f} ms'
                     if 'time_s' in row else row['status'])
        if len(rows) < total:
          write(complete=False)
  result = write(complete=True)
  table = markdown(rows, fns)
  print(table)
  return result
