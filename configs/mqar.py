"""Multi-query associative recall (Zoology, Arora et al. 2023), offline.

  python main.py --config=configs/mqar.py:cpu --workdir=runs/mqar
Key-value pairs, then each key again as a query later in the sequence; the
model predicts the value after each query (causal). Presets: smoke, cpu, lra
(the Zoology grid's (512, 64) point with vocab 8192).
"""
from configs import default


def _smoke(c):
  c.task.update(seq_len=32, num_pairs=4, vocab_size=64, num_train=256,
                num_validation=64, num_test=64)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)


def _cpu(c):
  c.task.update(seq_len=128, num_pairs=8, vocab_size=256, num_train=20_000,
                num_validation=500, num_test=500)
  c.model.update(num_layers=2, dim=64, num_heads=2, mlp_dim=128)
  c.train.update(batch_size=64, num_steps=3000, learning_rate=3e-3,
                 warmup_steps=200, eval_every=500, log_every=100,
                 checkpoint_every=500)


def _lra(c):
  c.task.update(seq_len=512, num_pairs=64, vocab_size=8192,
                num_train=100_000, num_validation=3_000, num_test=3_000)
  c.model.update(num_layers=2, dim=256, num_heads=2, mlp_dim=512)
  c.train.update(batch_size=64, num_steps=20_000, learning_rate=1e-3,
                 warmup_steps=1000, eval_every=1000, log_every=100,
                 checkpoint_every=1000)


def get_config(arg=None):
  c = default.base()
  c.task.update(
      name='mqar',
      seq_len=512,            # tokens per example (model input length)
      num_pairs=64,           # key-value pairs at the start of the sequence
      vocab_size=8192,        # keys from the lower half, values the upper half
      num_train=100_000,
      num_validation=3_000,
      num_test=3_000,
      data_seed=0,            # generator seed (fixed across training seeds)
  )
  return default.with_preset(
      c, arg, {'smoke': _smoke, 'cpu': _cpu, 'lra': _lra}, default='cpu')
