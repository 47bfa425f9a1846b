"""ListOps (Long Range Arena), generated offline with the brackets kept.

  python main.py --config=configs/listops.py:cpu --workdir=runs/listops
Presets: smoke (seconds, tests), cpu (README default, minutes on 2 cores),
lra (paper-scale: 500 < length < 2000, 96K/2K/2K examples; accelerators).
"""
from configs import default


def _smoke(c):
  c.task.update(min_length=8, max_length=40, max_depth=3, num_train=256,
                num_validation=64, num_test=64)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)


def _cpu(c):
  c.task.update(min_length=20, max_length=128, max_depth=4, num_train=20_000,
                num_validation=1_000, num_test=1_000)
  # Sized to finish in minutes on 2 CPU cores (~2.3 GFLOP per step).
  c.model.update(num_layers=3, dim=64, num_heads=4, mlp_dim=128)
  c.train.update(batch_size=32, num_steps=2000, learning_rate=1e-3,
                 warmup_steps=200, eval_every=500, log_every=100,
                 checkpoint_every=500)


def _lra(c):
  c.task.update(min_length=500, max_length=2000, max_depth=10,
                num_train=96_000, num_validation=2_000, num_test=2_000)
  c.model.update(num_layers=6, dim=512, num_heads=8, mlp_dim=2048,
                 dropout=0.1)
  c.train.update(batch_size=32, num_steps=5000, learning_rate=5e-4,
                 warmup_steps=1000, eval_every=500, log_every=100,
                 checkpoint_every=500)


def get_config(arg=None):
  c = default.base()
  c.task.update(
      name='listops',
      min_length=500,         # keep trees strictly longer than this (tokens)
      max_length=2000,        # ... and strictly shorter than this
      max_depth=10,           # nodes at this depth are digits
      max_args=10,            # operators take 2..max_args arguments
      num_train=96_000,       # unique examples per split, split in order
      num_validation=2_000,
      num_test=2_000,
      data_seed=0,            # generator seed (fixed across training seeds)
  )
  return default.with_preset(
      c, arg, {'smoke': _smoke, 'cpu': _cpu, 'lra': _lra}, default='cpu')
