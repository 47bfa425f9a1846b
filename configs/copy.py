"""Duplication task of the Reformer paper (`S w S w`), offline.

  python main.py --config=configs/copy.py:cpu --workdir=runs/copy
The model reads the sequence causally and is scored on the second copy of w
(tasks/copy.py). Presets: smoke (seconds, tests), cpu (minutes on 2 cores),
lra (the paper's setting: w of 511 symbols from 127, 1024 tokens, 1 layer).
"""
from configs import default


def _smoke(c):
  c.task.update(word_length=7, num_symbols=8, num_train=256,
                num_validation=64, num_test=64)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)
  c.generation.update(num_prompts=4, batch_size=2)


def _cpu(c):
  c.task.update(word_length=63, num_symbols=15, num_train=5_000,
                num_validation=500, num_test=500)
  c.model.update(num_layers=2, dim=64, num_heads=2, mlp_dim=128)
  c.train.update(batch_size=32, num_steps=2000, learning_rate=3e-3,
                 warmup_steps=200, eval_every=500, log_every=100,
                 checkpoint_every=500)


def _lra(c):
  c.task.update(word_length=511, num_symbols=127, num_train=100_000,
                num_validation=2_000, num_test=2_000)
  c.model.update(num_layers=1, dim=256, num_heads=4, mlp_dim=512)
  c.train.update(batch_size=32, num_steps=20_000, learning_rate=1e-3,
                 warmup_steps=1000, eval_every=1000, log_every=100,
                 checkpoint_every=1000)


def get_config(arg=None):
  c = default.base()
  c.task.update(
      name='copy',
      word_length=511,        # symbols in w; seq_len = 2 * word_length + 2
      num_symbols=127,        # w's alphabet: ids 2..num_symbols+1 (1 separates)
      num_train=100_000,      # examples per split, each split its own stream
      num_validation=2_000,
      num_test=2_000,
      data_seed=0,            # generator seed (fixed across training seeds)
  )
  # Generating w's second copy from `S w S`: the prompt runs to the first
  # scored token, the reference is every scored one; exact match of all.
  c.generation = default.generation(prompt_tokens=0, new_tokens=0,
                                    exact_match_tokens=0)
  return default.with_preset(
      c, arg, {'smoke': _smoke, 'cpu': _cpu, 'lra': _lra}, default='cpu')
