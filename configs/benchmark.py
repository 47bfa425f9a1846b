"""Attention micro-benchmark: time and peak memory per kind and length.

  python main.py --mode=benchmark --config=configs/benchmark.py --workdir=runs/bench
Times the forward pass and forward+backward (median of at least `repeats`
runs after `warmup`, and of as many as fit in `min_time_s`), reads FLOPs and
peak memory off the compiled executables, and sets each kind beside its
peer jax.nn.dot_product_attention measured in the same process (plain, and
with local_window_size for `local`). Presets: cpu (default: 1K..16K, batch
1, 4 heads, head dim 64, float32), smoke (tests), gpu (bfloat16, longer
sequences), decode (the decode table at the cpu sizes: per-token time and
state bytes of every causal kind against context length, beside
recomputing the prefix).
"""
import ml_collections

import attention_variants as av
from configs import default


def _smoke(c):
  c.lengths = '64,128'
  c.repeats = 2
  c.min_time_s = 0.0
  c.warmup = 1


def _cpu(c):
  del c  # the defaults are the CPU benchmark


def _decode(c):
  # The decode table: one generated token per causal kind against context
  # length, beside recomputing the prefix (evaluate/benchmark.py).
  c.passes = 'decode'
  c.causal = True


def _gpu(c):
  c.lengths = '1024,2048,4096,8192,16384,32768'
  c.dtype = 'bfloat16'
  c.head_dim = 128
  c.batch_size = 4
  c.heads = 16


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.kinds = ','.join(av.KINDS)    # comma-separated kinds to measure
  c.lengths = '1024,2048,4096,8192,16384'  # sequence lengths, comma-separated
  # which passes to time: forward, forward_backward, and decode (one
  # generated token from the kind's decoding state, beside recomputing the
  # prefix; causal kinds)
  c.passes = 'forward,forward_backward'
  c.batch_size = 1                # batch
  c.heads = 4                     # query heads (= kv heads)
  c.head_dim = 64                 # head dimension
  c.dtype = 'float32'             # 'float32' | 'bfloat16'
  c.causal = False                # causal masking
  c.repeats = 5                   # timed runs per cell (median reported)
  # ...and more runs until the timed calls add up to this many seconds, so
  # fast cells get a stable median on a shared machine.
  c.min_time_s = 1.0
  c.warmup = 1                    # untimed runs per cell after compilation
  # Skip cells whose compiled peak exceeds this share of available memory:
  # XLA:CPU's resident peak ran ~1.5x its memory analysis (the 16K dense
  # forward+backward was OOM-killed at 24 GB with an analysed 16.5 GB).
  c.memory_fraction = 0.5
  c.seed = 0                      # input data and attention rng
  # Attention spec shared by every measured kind; per-kind parameters
  # (e.g. attention.local.window) override the variants' defaults.
  c.attention = default.base().attention
  return default.with_preset(c, arg, {'smoke': _smoke, 'cpu': _cpu,
                                      'gpu': _gpu, 'decode': _decode},
                             default='cpu')
