"""A comparison sweep: attention variants x tasks x seeds, plus a training
speed/memory measurement per variant and sequence length, then the Long Range
Arena tables (accuracy, Table 1; efficiency, Table 2) and plots.

  python main.py --mode=compare --config=configs/compare.py:cpu \
      --workdir=runs/compare
  # rebuild tables and plots from what is on disk, no training:
  python main.py --mode=compare --config=configs/compare.py:cpu \
      --workdir=runs/compare --config.only_tables=True

Presets: smoke (seconds, tests), cpu (every registered variant on ListOps,
MQAR and copy, about 30 minutes on 2 CPU cores), lra (the tasks' paper-scale
presets and LRA Table 2's lengths and batch; accelerators), pathx (every
variant's train step at Path-X's 16,384 tokens, with smoke-sized pathx
runs). Rerunning the same command resumes: finished runs are skipped,
interrupted ones resume from their
checkpoints. See evaluate/compare.py for the directory layout.

Overrides are nested like the run config they change: `overrides.train.
num_steps` sets `train.num_steps` of every run; `task_overrides.<task>` and
`kind_overrides.<kind>` apply to that task's or that variant's runs only
(applied in that order, after `overrides`).
"""
import ml_collections

import attention_variants as av
import tasks
from configs import default


def _efficiency(**model) -> ml_collections.ConfigDict:
  """Measurement settings; the model block has every field of a run's."""
  model_cfg = default.base().model
  model_cfg.update(model)
  return ml_collections.ConfigDict(dict(
      lengths='1024,2048,3072,4096',  # sequence lengths measured ('' skips)
      batch_size=32,          # examples per step, on one device (LRA: 32)
      steps=10,               # timed train steps per cell, after warmup
      warmup_steps=2,         # untimed steps after compiling
      vocab_size=258,         # padding, 256 bytes, CLS: the text task's
      num_classes=2,          # classification head, as LRA's text task
      model=model_cfg,        # model of every cell (all fields of config.model)
  ))


def _smoke(c):
  # Two variants so ratios to full exist; tiny everything.
  c.kinds = ','.join(k for k in ('full', 'local') if k in av.KINDS)
  c.tasks = 'listops:smoke,mqar:smoke'
  c.seeds = '0'
  c.overrides.attention = dict(local=dict(window=8))
  c.efficiency = _efficiency(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.efficiency.update(lengths='32,64', batch_size=4, steps=2,
                      warmup_steps=1)


_CPU_TASKS = ('listops', 'mqar', 'copy')


def _cpu(c):
  # Budget: about 30 minutes on 2 CPU cores for every kind x every task x
  # 2 seeds; measured times are in docs/results/README.md.
  # So few steps rank variants only roughly; use lra (or raise num_steps
  # with --config.overrides.train.num_steps) for numbers to quote.
  c.kinds = ','.join(av.KINDS)
  # The visual and byte-level text tasks' cpu runs take 15-30 minutes each
  # (784-1,024 pixels or bytes; Path-X 16K), so they are not in this
  # 30-minute sweep: add them with e.g.
  # --config.tasks=image:cpu,text:cpu,retrieval:cpu (lra lists every task).
  c.tasks = ','.join(f'{t}:cpu' for t in tasks.NAMES if t in _CPU_TASKS)
  c.seeds = '0,1'
  c.overrides.train = dict(num_steps=300, warmup_steps=30, eval_every=150,
                           log_every=50, checkpoint_every=150)
  if 'listops' in tasks.NAMES:  # the slowest cpu model: half the steps
    c.task_overrides.listops = dict(train=dict(
        num_steps=150, eval_every=75, checkpoint_every=75))
  # The cpu tasks are ~128 tokens: sparsity parameters well below that, so
  # each variant really is sparse here (the defaults would cover the whole
  # sequence and equal full attention; linformer's k = 256, clamped to the
  # length, would compress nothing).
  sparsity = dict(
      local=dict(window=16), sparse=dict(block_size=16, num_summary=4),
      bigbird=dict(block_size=16), lsh=dict(bucket_size=16),
      blockwise=dict(q_block=32, kv_block=32),
      longformer=dict(window=16, block=16),
      linformer=dict(k=32), sinkhorn=dict(block_size=16))
  c.overrides.attention = {k: v for k, v in sparsity.items()
                           if k in av.KINDS}
  c.efficiency = _efficiency(num_layers=2, dim=64, num_heads=2, mlp_dim=128)
  c.efficiency.update(lengths='256,512,1024', batch_size=8, steps=3,
                      warmup_steps=1)


# Tasks outside Long Range Arena (no lra preset): language modelling.
NOT_LRA = ('lm',)


def _lra(c):
  # The tasks' own lra presets (paper sizes and steps); efficiency as LRA
  # Table 2: byte-level text model (4 layers, 256 wide, 4 heads, MLP 1024),
  # batch 32, lengths 1K-4K.
  c.kinds = ','.join(av.KINDS)
  c.tasks = ','.join(f'{t}:lra' for t in tasks.NAMES if t not in NOT_LRA)
  c.seeds = '0,1,2'
  c.efficiency = _efficiency(num_layers=4, dim=256, num_heads=4,
                             mlp_dim=1024)
  c.efficiency.update(steps=20, warmup_steps=3)


def _pathx(c):
  # Path-X's length for the efficiency cells: every kind's train step at
  # 16,384 tokens (batch 1; a kind whose step would not fit in memory is
  # reported as such), beside seconds-long runs of the pathx smoke task
  # (training at 16K on CPU takes hours; the pathx cpu preset shows it
  # for one kind).
  c.kinds = ','.join(av.KINDS)
  c.tasks = 'pathx:smoke'
  c.seeds = '0'
  c.efficiency = _efficiency(num_layers=2, dim=64, num_heads=2, mlp_dim=128)
  c.efficiency.update(lengths='16384', batch_size=1, steps=2,
                      warmup_steps=1)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.kinds = 'full'              # variants, comma-separated names of av.KINDS
  c.tasks = 'listops:cpu'       # comma-separated task:preset (configs/<task>)
  c.seeds = '0'                 # comma-separated training seeds (data fixed)
  c.data_dir = ''               # TFDS dir of all runs; '' -> as train's default
  c.overrides = ml_collections.ConfigDict()       # nested; set in every run
  c.task_overrides = ml_collections.ConfigDict()  # <task> -> nested overrides
  c.kind_overrides = ml_collections.ConfigDict()  # <kind> -> nested overrides
  c.efficiency = _efficiency()  # steps/s and memory per variant and length
  c.speed_length = 0            # length of the accuracy-vs-speed plot; 0 -> the
                                # longest that every plotted variant measured
  c.only_tables = False         # rebuild tables/plots from disk; no training
  return default.with_preset(
      c, arg, {'smoke': _smoke, 'cpu': _cpu, 'lra': _lra, 'pathx': _pathx},
      default='cpu')
