"""Benchmark mode: rows for every kind, peers in the same run, ratios, exponents."""
import json
import os
import time

import pytest

from configs import benchmark as benchmark_config
from evaluate import benchmark
from utils import provenance


def test_smoke_benchmark_writes_rows_and_ratios(tmp_path, monkeypatch):
  config = benchmark_config.get_config('smoke')
  config.kinds = 'full,local'
  config.attention.local.window = 16
  config.lengths = '32,64'
  config.repeats = 1
  monkeypatch.chdir(tmp_path)
  result = benchmark.run(config, 'bench')  # a relative workdir
  tmp_path = tmp_path / 'bench'
  with open(tmp_path / 'benchmark.json') as f:
    assert json.load(f)['rows'] == result['rows']
  names = {r['kind'] for r in result['rows']}
  assert names == {'full', 'local', 'dot_product_attention',
                   'dot_product_attention(window)'}
  assert len(result['rows']) == 4 * 2 * 2
  for r in result['rows']:
    assert r['status'] == 'ok' and r['time_s'] > 0 and r['peak_bytes'] > 0
    assert r['flops'] > 0
  table = (tmp_path / 'benchmark.md').read_text()
  assert '| local | 64 | forward |' in table
  assert 'x |' in table  # a ratio against the peer was rendered


def test_fast_cells_are_timed_until_min_time():
  calls = []

  def compiled():
    calls.append(None)
    time.sleep(0.002)
    return 0

  benchmark._median_seconds(compiled, (), warmup=1, repeats=3)
  assert len(calls) == 1 + 3
  calls.clear()
  median = benchmark._median_seconds(compiled, (), warmup=0, repeats=3,
                                     min_time_s=0.05)
  assert 3 < len(calls) <= 26  # >= 2 ms each: at most 25 fit in 50 ms, + 1
  assert median >= 0.002


def test_scaling_exponent_of_known_rows():
  rows = [{'kind': 'a', 'pass': 'forward', 'status': 'ok', 'length': n,
           'time_s': 1e-6 * n**2} for n in (2048, 4096, 8192)]
  assert benchmark.scaling_exponent(rows, 'a', 'forward') == pytest.approx(2.0)
  assert benchmark.scaling_exponent(rows, 'b', 'forward') is None


def test_cell_that_does_not_fit_is_reported(tmp_path):
  config = benchmark_config.get_config('smoke')
  config.kinds = 'full'
  config.lengths = '64'
  config.passes = 'forward'
  config.memory_fraction = 1e-12
  rows = benchmark.run(config, str(tmp_path))['rows']
  assert {r['status'] for r in rows} == {'does not fit in memory'}


def test_bad_lengths(tmp_path):
  config = benchmark_config.get_config('smoke')
  config.lengths = '0'
  with pytest.raises(ValueError, match='lengths'):
    benchmark.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'benchmark.json')


def test_rows_are_written_as_they_come(tmp_path, monkeypatch):
  """A run that dies part way (here: the third cell raises, as the kernel's
  OOM killer would end it) leaves benchmark.json with the cells measured,
  marked incomplete; a finished run is marked complete."""
  config = benchmark_config.get_config('smoke')
  config.kinds = 'full'
  config.lengths = '32'
  config.repeats = 1
  real, calls = benchmark.measure, []

  def measure(*args, **kwargs):
    calls.append(args)
    if len(calls) == 3:
      raise MemoryError('killed')
    return real(*args, **kwargs)
  monkeypatch.setattr(benchmark, 'measure', measure)
  with pytest.raises(MemoryError):
    benchmark.run(config, str(tmp_path / 'b'))
  with open(tmp_path / 'b' / 'benchmark.json') as f:
    partial = json.load(f)
  assert not partial['complete'] and len(partial['rows']) == 2
  assert [r['kind'] for r in partial['rows']] == ['full', 'full']
  monkeypatch.setattr(benchmark, 'measure', real)
  done = benchmark.run(config, str(tmp_path / 'c'))
  assert done['complete'] and len(done['rows']) == 4
  assert done['code'] == provenance.code_version()  # the code that ran


def test_decode_table_against_recomputing_the_prefix(tmp_path):
  config = benchmark_config.get_config('smoke')
  config.kinds = 'full,local,performer,lsh,linformer'
  config.passes = 'decode'
  config.causal = True
  config.attention.local.window = 16
  result = benchmark.run(config, str(tmp_path))
  rows = {(r['kind'], r['length']): r for r in result['rows']}
  assert {r['pass'] for r in result['rows']} == {'decode'}
  assert set(rows) == {(k, n) for k in ('full', 'local', 'performer', 'lsh',
                                        'linformer') for n in (64, 128)}
  for kind in ('full', 'local', 'performer'):
    for n in (64, 128):
      r = rows[kind, n]
      assert r['status'] == 'ok' and r['time_s'] > 0 and r['recompute_s'] > 0
  # A cache grows with the context; a window's ring and the features' sums
  # do not.
  assert rows['full', 128]['state_bytes'] == 2 * rows['full', 64]['state_bytes']
  for kind in ('local', 'performer'):
    assert rows[kind, 128]['state_bytes'] == rows[kind, 64]['state_bytes']
  assert rows['lsh', 64]['status'] == 'no decoding state (recomputes)'
  assert 'time_s' not in rows['lsh', 64] and rows['lsh', 64]['recompute_s'] > 0
  assert rows['linformer', 64]['status'] == 'bidirectional only'
  table = (tmp_path / 'benchmark.md').read_text()
  assert '| kind | context | decode (ms/token) |' in table
  assert 'decode time exponent (1K..16K)' in table
