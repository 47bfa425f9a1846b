"""Byte-level language modelling on real text (next-byte prediction).

  python main.py --config=configs/lm.py:cpu --workdir=runs/lm
Tokens are UTF-8 bytes and a DOC token before each document (vocabulary
258); the model reads causally and is scored in bits per byte on every byte
(tasks/lm.py, tasks/heads/lm.py). The offline corpus is this Python
installation's standard library; `--config.task.dataset=lm1b` reads TFDS's
One Billion Word benchmark instead (downloaded on first use).
Presets: smoke (seconds, tests: the standard library's `email` package),
cpu (1K-byte windows of the whole standard library, minutes on 2 cores),
long (8K-byte windows; accelerators).
"""
import os

from configs import default


def _smoke(c):
  from tasks import lm  # the standard library's location, read at use
  c.task.update(source_dir=os.path.join(lm.stdlib_dir(), 'email'),
                max_length=64, validation_percent=20, test_percent=20,
                num_validation=64, num_test=64)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)
  c.generation.update(num_prompts=4, prompt_tokens=32, new_tokens=16,
                      exact_match_tokens=4, batch_size=2)


def _cpu(c):
  c.task.update(max_length=1024)
  c.model.update(num_layers=2, dim=64, num_heads=2, mlp_dim=256)
  c.train.update(batch_size=4, num_steps=1500, learning_rate=2e-3,
                 warmup_steps=100, eval_every=500, log_every=50,
                 checkpoint_every=500)


def _long(c):
  c.task.update(max_length=8192)
  c.model.update(num_layers=4, dim=256, num_heads=4, mlp_dim=1024)
  c.train.update(batch_size=8, num_steps=20_000, learning_rate=1e-3,
                 warmup_steps=1000, eval_every=1000, log_every=100,
                 checkpoint_every=1000)


def get_config(arg=None):
  c = default.base()
  c.task.update(
      name='lm',
      dataset='pystdlib',       # 'pystdlib' (offline) | 'lm1b' (TFDS)
      source_dir='',            # pystdlib: '' -> this Python's standard
                                # library; else a folder of .py files
      max_length=1024,          # tokens per input window (1K to 8K)
      validation_percent=5,     # pystdlib: share of documents (files);
      test_percent=5,           # lm1b: validation is this share of train
      num_train=0,              # examples per split, capped on read;
      num_validation=0,         # 0 keeps them all
      num_test=0,
      download=True,            # lm1b: download it into data_dir if missing
      data_seed=0,              # which files go to which split; lm1b's cut
  )
  c.generation = default.generation()
  return default.with_preset(
      c, arg, {'smoke': _smoke, 'cpu': _cpu, 'long': _long}, default='cpu')
