"""Pathfinder (LRA; Linsley et al. 2018): are the two dots joined by a path?

  python main.py --config=configs/pathfinder.py:cpu --workdir=runs/pathfinder
One token per pixel (grey level 0-255), row-major; mean pooling (no CLS).
Images from the project's generator (tasks/pathfinder_draw.py) or LRA's
released PNGs (--config.task.source=lra_release --config.task.manual_dir=..).
Presets: smoke (seconds, tests), cpu (32 x 32 at the easiest difficulty,
contour length 6; minutes on 2 cores), lra (LRA's hard split: 32 x 32,
contour length 14, 160K/20K/20K images, LRA's model and schedule).
"""
from configs import default


def smoke(c):
  """Seconds-long settings (configs/pathx.py's smoke preset too)."""
  c.task.update(image_size=32, contour_length=6, num_train=128,
                num_validation=32, num_test=32, workers=1)
  c.model.update(num_layers=1, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=16, num_steps=6, warmup_steps=2, eval_every=3,
                 log_every=2, checkpoint_every=3)


def _cpu(c):
  # Full attention over 1,024 pixels, 2 layers: ~0.45 steps/s on 2 cores, so
  # 700 steps and the evaluations fit in 30 minutes.
  c.task.update(image_size=32, contour_length=6, num_train=40_000,
                num_validation=1_000, num_test=2_000)
  c.model.update(num_layers=2, dim=32, num_heads=2, mlp_dim=64)
  c.train.update(batch_size=32, num_steps=700, learning_rate=1e-3,
                 warmup_steps=70, eval_every=100, log_every=50,
                 checkpoint_every=100)


def lra(c):
  """LRA's Pathfinder settings (configs/pathx.py's lra presets too)."""
  # LRA's Pathfinder config: batch 512, 200 epochs of 160K (62,500 steps), lr
  # 1e-3, 4 layers, 4 heads, width 32. The MLP width and warmup are not in
  # the paper's table; 64 and 1,000 here.
  c.task.update(image_size=32, contour_length=14, num_train=160_000,
                num_validation=20_000, num_test=20_000)
  c.model.update(num_layers=4, dim=32, num_heads=4, mlp_dim=64)
  c.train.update(batch_size=512, num_steps=62_500, learning_rate=1e-3,
                 warmup_steps=1000, eval_every=1000, log_every=100,
                 checkpoint_every=1000)


def base(name: str):
  """The config both Pathfinder tasks start from (configs/pathx.py too)."""
  c = default.base()
  c.model.pooling = 'mean'      # pixels have no CLS token
  c.task.update(
      name=name,
      source='generate',        # 'generate' (offline) | 'lra_release' (PNGs)
      image_size=32,            # 32, 64, 128 or 256 pixels a side
      contour_length=14,        # paddles per target curve: 6, 9 or 14
      num_train=160_000,        # generated images per split (balanced)
      num_validation=20_000,
      num_test=20_000,
      data_seed=0,              # generator seed (fixed across training seeds)
      workers=0,                # generator processes; 0 -> one per CPU core
      manual_dir='',            # lra_release: the folder with pathfinder<N>/
  )
  return c


def get_config(arg=None):
  return default.with_preset(
      base('pathfinder'), arg, {'smoke': smoke, 'cpu': _cpu, 'lra': lra},
      default='cpu')
